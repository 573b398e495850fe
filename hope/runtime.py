"""What every Hope command shares at run time: one policy for torch's CPU thread count.

`hope-train`, `hope-eval`, the demo (`hope-train --demo`) and `hope-learn` all call `configure_threads` with
their `--num_threads` flag, so they run at the same speed on the same machine.
"""
from __future__ import annotations

import os
from typing import Optional


def idle_cores() -> int:
    """CPU cores this process may use minus the load of other processes (1-minute load average), at least 1.

    On a shared machine, more intra-op threads than idle cores make torch's OpenMP threads spin-wait on each
    other, and small ops then run 5-10x slower than on one thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def thread_source(num_threads: Optional[int] = None) -> str:
    """Where `configure_threads(num_threads)` takes its count from: "--num_threads", "OMP_NUM_THREADS" or
    "idle cores"."""
    if num_threads is not None:
        return "--num_threads"
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return "OMP_NUM_THREADS"
    return "idle cores"


def configure_threads(num_threads: Optional[int] = None) -> int:
    """Set torch's intra-op CPU thread count and return it.

    The count is `num_threads` when given (the commands' `--num_threads`); else the `OMP_NUM_THREADS`
    environment variable when set (torchrun sets it to 1 per process); else the idle cores
    (`idle_cores()`) shared among the processes of this machine (`LOCAL_WORLD_SIZE`, set by the launchers).
    Raises ValueError for a count below 1 or an `OMP_NUM_THREADS` that is not a positive integer."""
    import torch

    source = thread_source(num_threads)
    if source == "--num_threads":
        count = num_threads
    elif source == "OMP_NUM_THREADS":
        value = os.environ["OMP_NUM_THREADS"].strip()
        if not value.isdigit():
            raise ValueError(f"OMP_NUM_THREADS={value!r} is not a positive integer")
        count = int(value)
    else:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        count = max(1, idle_cores() // max(1, processes))
    if count < 1:
        raise ValueError(f"{source} must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count


def describe_threads(count: int, num_threads: Optional[int] = None) -> str:
    """"2 CPU threads (idle cores; --num_threads N to change)": what `configure_threads(num_threads)` chose."""
    source = thread_source(num_threads)
    hint = "" if source == "--num_threads" else "; --num_threads N to change"
    return f"{count} CPU thread{'s' if count != 1 else ''} (from {source}{hint})"
