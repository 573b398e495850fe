"""Timing and hardware ceilings shared by the benchmarks: CUDA-event (or, on CPU, wall-clock) medians, the
measured copy bandwidth and bf16 matmul rate, relative errors, and why a GPU run cannot happen here."""
from __future__ import annotations

import os
import time
from typing import Callable, Optional


def _summary(times: list, stat: str) -> float:
    """Median (robust to a stray slow call) or mean (what a throughput over a whole cycle needs) of `times`."""
    if stat == "mean":
        return sum(times) / len(times)
    if stat != "median":
        raise ValueError(f"stat must be 'median' or 'mean', got {stat!r}")
    return sorted(times)[len(times) // 2]


def cuda_time_ms(fn: Callable[[], object], reps: int, warmup: int = 1, max_seconds: float = 60.0,
                 stat: str = "median") -> tuple[float, int]:
    """Median (or mean) of `reps` timed calls of `fn` (CUDA events around each call) after `warmup` calls;
    fewer calls when they take longer than `max_seconds` together. Returns (ms, calls timed)."""
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
    return _summary(times, stat), len(times)


def wall_time_ms(fn: Callable[[], object], reps: int, warmup: int = 1, max_seconds: float = 60.0,
                 stat: str = "median") -> tuple[float, int]:
    """As `cuda_time_ms` with the host clock, for CPU tensors (the work is synchronous there)."""
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
        if time.perf_counter() - t_start > max_seconds:
            break
    return _summary(times, stat), len(times)


def time_ms(fn: Callable[[], object], reps: int, device, warmup: int = 1, max_seconds: float = 60.0,
            stat: str = "median") -> tuple[float, int]:
    """Median (or mean) ms of `fn` on `device` (a torch.device or its type string): CUDA events on CUDA, else
    the host clock."""
    kind = getattr(device, "type", device)
    timer = cuda_time_ms if kind == "cuda" else wall_time_ms
    return timer(fn, reps, warmup=warmup, max_seconds=max_seconds, stat=stat)


def matmul_rate_tflops(n: int = 8192, device="cuda", dtype=None) -> tuple[float, float]:
    """Rate of an n x n x n matmul on random data (zeros run faster on some GPUs): (TFLOP/s, median ms).
    bf16 on CUDA; on CPU the dtype defaults to fp32 (bf16 matmuls are emulated slowly there)."""
    import torch

    kind = getattr(device, "type", device)
    dtype = dtype or (torch.bfloat16 if kind == "cuda" else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = time_ms(lambda: a @ b, 10, device, warmup=3)
    return 2 * n**3 / ms / 1e9, ms


def copy_rate_gbps(nbytes: int = 2 << 30, device="cuda") -> tuple[float, float]:
    """Device-to-device copy bandwidth counting bytes read plus bytes written: (GB/s, median ms)."""
    import torch

    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), 10, device, warmup=3)
    return 2 * src.numel() * 4 / ms / 1e6, ms


def rel_err(x, y) -> float:
    """||x - y|| / ||y|| in float64 (||x|| when y is zero)."""
    import torch

    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    n = y.norm().item()
    return (x - y).norm().item() / n if n > 0 else x.norm().item()


def gpu_unavailable_reason(script: str) -> Optional[str]:
    """Why `script` cannot benchmark compiled kernels here (no torch, no CUDA, no triton, the interpreter), or
    None when it can. The scripts print the reason and exit 0, so they run anywhere with one command."""
    try:
        import torch
    except ImportError:
        return f"{script}: torch is not installed; nothing to do."
    if not torch.cuda.is_available():
        return f"{script}: no CUDA device available; this benchmark needs a GPU (--dry-run runs on CPU). Skipping (exit 0)."
    try:
        import triton  # noqa: F401
    except ImportError:
        return f"{script}: triton is not installed; the kernels cannot run. Skipping (exit 0)."
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return f"{script}: TRITON_INTERPRET=1 is set; unset it to benchmark compiled kernels."
    return None
