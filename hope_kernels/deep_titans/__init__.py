"""Self-modifying Titans memory with a deep main memory (SPEC §2 "Deep memory", Eq. 91, `memory_depth=2`):
one op, dispatched to the PyTorch reference or Triton.

There is no Triton kernel yet (HAS_TRITON = False): kernel_backend="auto" runs the reference everywhere and
kernel_backend="triton" raises (it never falls back silently).
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

HAS_TRITON = False
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
    _backend(backend, q)  # only "torch" can come back until the kernels exist; "triton" raises
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
    _backend(backend, q)
    return titans_deep_memory_step_reference(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, **kwargs)
