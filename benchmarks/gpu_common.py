"""Shared pieces of the GPU benchmark scripts: CUDA-event timing, the measured matmul ceiling, errors."""
from __future__ import annotations

import time


def cuda_time_ms(fn, reps, warmup=1, max_seconds=60.0):
    """Median of `reps` timed calls (CUDA events); fewer when one call takes long."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.time()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if time.time() - t_start > max_seconds:
            break
    times.sort()
    return times[len(times) // 2], len(times)


def matmul_rate_tflops(n=8192):
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = cuda_time_ms(lambda: a @ b, 10, warmup=3)
    return 2 * n**3 / ms / 1e9


def rel_err(x, y):
    import torch

    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    n = y.norm().item()
    return (x - y).norm().item() / n if n > 0 else x.norm().item()


def gpu_unavailable_reason(script: str) -> str | None:
    """Why `script` cannot benchmark compiled kernels here (no torch, no CUDA, no triton, the interpreter), or
    None when it can. The scripts print the reason and exit 0, so they run anywhere with one command."""
    try:
        import torch
    except ImportError:
        return f"{script}: torch is not installed; nothing to do."
    if not torch.cuda.is_available():
        return f"{script}: no CUDA device available; this benchmark needs a GPU. Skipping (exit 0)."
    try:
        import triton  # noqa: F401
    except ImportError:
        return f"{script}: triton is not installed; the kernels cannot run. Skipping (exit 0)."
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return f"{script}: TRITON_INTERPRET=1 is set; unset it to benchmark compiled kernels."
    return None
