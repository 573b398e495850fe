"""What every op shares: the backend resolver (`kernel_backend`: auto / triton / torch) and the state dtype."""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the `triton` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton runs its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(
    backend: str, device: torch.device, *, op: str, has_triton: bool, gpu_verified: bool = False
) -> str:
    """Return "torch" or "triton" for one call of `op` on tensors living on `device`.

    "auto" picks Triton on CUDA when the op has a kernel that has been verified and timed on a GPU
    (`gpu_verified`) and triton is installed, the PyTorch reference otherwise. "triton" never falls back:
    it raises when the kernel cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        use_kernel = device.type == "cuda" and has_triton and gpu_verified and triton_available()
        return "triton" if use_kernel else "torch"
    if not has_triton:
        raise RuntimeError(f"kernel_backend='triton': the {op} op has no Triton kernel yet; use 'torch' or 'auto'")
    if not triton_available():
        raise RuntimeError("kernel_backend='triton' needs the triton package: pip install triton")
    if device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"kernel_backend='triton' needs CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 to run the kernels on CPU tensors in Triton's interpreter"
        )
    return "triton"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States, momentum and inner-gradient sums are fp32 whatever the activations (SPEC §5); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
