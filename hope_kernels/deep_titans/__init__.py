"""Self-modifying Titans memory with a deep main memory (SPEC §2 "Deep memory", Eq. 91, `memory_depth=2`):
one op, dispatched to the PyTorch reference or Triton.

The Triton kernels (`chunk.py`: forward and backward, one launch each; `step.py`: decode) are checked against the
float64 reference in Triton's interpreter; they have not been run or timed on a GPU (GPU_VERIFIED = False), so
kernel_backend="auto" keeps the reference on CUDA too, and kernel_backend="triton" runs them.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from hope_kernels._dispatch import resolve_backend
from hope_kernels.deep_titans.reference import (
    DeepTitansState,
    adaptive_rows,
    titans_deep_memory_naive,
    titans_deep_memory_reference,
    titans_deep_memory_step_reference,
)
from hope_kernels.titans.reference import ADAPTIVE_NAMES

HAS_TRITON = True
GPU_VERIFIED = False

__all__ = [
    "DeepTitansState",
    "adaptive_rows",
    "titans_deep_memory",
    "titans_deep_memory_step",
    "titans_deep_memory_naive",
    "titans_deep_memory_reference",
    "titans_deep_memory_step_reference",
]


def _backend(backend: str, q: Tensor) -> str:
    return resolve_backend(backend, q.device, op="deep_titans", has_triton=HAS_TRITON, gpu_verified=GPU_VERIFIED)


def titans_deep_memory(
    q: Tensor,
    a: Tensor,
    w1_0: Tensor,
    w2_0: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    momentum: bool = True,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[DeepTitansState] = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Optional[DeepTitansState]]:
    """Chunked deep Titans memory over a sequence; shapes and semantics as `titans_deep_memory_reference`."""
    kwargs = dict(chunk_size=chunk_size, eta_max=eta_max, momentum=momentum, dgd=dgd, objective=objective,
                  memory_target=memory_target, adaptive=adaptive, mask=mask, state=state,
                  output_final_state=output_final_state)
    if _backend(backend, q) == "triton":
        from hope_kernels.deep_titans.chunk import titans_deep_memory_triton

        return titans_deep_memory_triton(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, **kwargs)
    return titans_deep_memory_reference(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, **kwargs)


def titans_deep_memory_step(
    q: Tensor,
    a: Tensor,
    w1_0: Tensor,
    w2_0: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    momentum: bool = True,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[DeepTitansState] = None,
    backend: str = "auto",
) -> tuple[Tensor, DeepTitansState]:
    """One decode token; shapes and semantics as `titans_deep_memory_step_reference`."""
    kwargs = dict(chunk_size=chunk_size, eta_max=eta_max, momentum=momentum, dgd=dgd, objective=objective,
                  memory_target=memory_target, adaptive=adaptive, mask=mask, state=state)
    if _backend(backend, q) == "triton":
        from hope_kernels.deep_titans.step import titans_deep_memory_step_triton

        return titans_deep_memory_step_triton(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, **kwargs)
    return titans_deep_memory_step_reference(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, **kwargs)
