"""Self-modifying Titans memory (SPEC §2 v2): one op, dispatched to the PyTorch reference or Triton.

The Triton kernels (`chunk.py`, `step.py`) cover every flag except momentum: `kernel_backend="triton"` with
momentum=True raises, and "auto" then picks the reference. "auto" picks Triton only on CUDA once the kernels have
been verified on a GPU (GPU_VERIFIED); no GPU has run them yet.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from hope_kernels._dispatch import resolve_backend
from hope_kernels.titans.reference import (
    ADAPTIVE_NAMES,
    TitansState,
    adaptive_row_mask,
    memory_rows,
    titans_memory_reference,
    titans_memory_step_reference,
)

HAS_TRITON = True
GPU_VERIFIED = False

__all__ = [
    "ADAPTIVE_NAMES",
    "TitansState",
    "adaptive_row_mask",
    "memory_rows",
    "titans_memory",
    "titans_memory_step",
    "titans_memory_reference",
    "titans_memory_step_reference",
]


def _backend(backend: str, device, momentum: bool) -> str:
    """"torch" or "triton": the kernels have no momentum, so "auto" picks the reference for it and "triton" raises."""
    if momentum and backend == "triton":
        raise ValueError("kernel_backend='triton' does not support momentum=True (the Titans Triton kernels have no "
                         "momentum); use kernel_backend='torch', or 'auto', which runs the PyTorch reference for it")
    return resolve_backend(backend, device, op="titans", has_triton=HAS_TRITON and not momentum,
                           gpu_verified=GPU_VERIFIED)


def titans_memory(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Optional[Tensor] = None,
    *,
    chunk_size: int,
    eta_max: float,
    adaptive_chunk_size: Optional[int] = None,
    momentum: bool = False,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    memory_residual: bool = True,
    memory_value_norm: bool = True,
    memory_retention: str = "init",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[TitansState] = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Optional[TitansState]]:
    """Chunked Titans memory over a sequence; shapes and semantics as `titans_memory_reference`."""
    kwargs = dict(chunk_size=chunk_size, eta_max=eta_max, adaptive_chunk_size=adaptive_chunk_size, momentum=momentum,
                  dgd=dgd, objective=objective, memory_target=memory_target, memory_residual=memory_residual,
                  memory_value_norm=memory_value_norm, memory_retention=memory_retention, adaptive=adaptive,
                  mask=mask, state=state, output_final_state=output_final_state)
    if _backend(backend, q.device, momentum) == "triton":
        from hope_kernels.titans.chunk import titans_memory_triton

        return titans_memory_triton(q, a, z0, b_eta, b_alpha, momentum_logit, **kwargs)
    return titans_memory_reference(q, a, z0, b_eta, b_alpha, momentum_logit, **kwargs)


def titans_memory_step(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Optional[Tensor] = None,
    *,
    chunk_size: int,
    eta_max: float,
    adaptive_chunk_size: Optional[int] = None,
    momentum: bool = False,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    memory_residual: bool = True,
    memory_value_norm: bool = True,
    memory_retention: str = "init",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[TitansState] = None,
    backend: str = "auto",
) -> tuple[Tensor, TitansState]:
    """One decode token; shapes and semantics as `titans_memory_step_reference`."""
    kwargs = dict(chunk_size=chunk_size, eta_max=eta_max, adaptive_chunk_size=adaptive_chunk_size, momentum=momentum,
                  dgd=dgd, objective=objective, memory_target=memory_target, memory_residual=memory_residual,
                  memory_value_norm=memory_value_norm, memory_retention=memory_retention, adaptive=adaptive,
                  mask=mask, state=state)
    if _backend(backend, q.device, momentum) == "triton":
        from hope_kernels.titans.step import titans_memory_step_triton

        return titans_memory_step_triton(q, a, z0, b_eta, b_alpha, momentum_logit, **kwargs)
    return titans_memory_step_reference(q, a, z0, b_eta, b_alpha, momentum_logit, **kwargs)
