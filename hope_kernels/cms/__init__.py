"""Continuum Memory System level op (SPEC §3): one SwiGLU level whose weights learn in context per chunk.

`cms_level` / `cms_level_step` pick a backend with `hope_kernels._dispatch.resolve_backend`: the PyTorch
reference (`reference.py`) or the Triton kernels (`chunk.py`, `step.py`), which are checked against it in
Triton's interpreter and compiled offline for sm_90a. Until they have been verified and timed on a GPU
(GPU_VERIFIED), "auto" keeps the reference on CUDA too; kernel_backend="triton" runs them.
"""
from __future__ import annotations

from torch import Tensor

from hope_kernels._dispatch import resolve_backend
from hope_kernels.cms.reference import (
    STEPS,
    CMSState,
    cms_level_naive,
    cms_level_reference,
    cms_level_step_reference,
)

HAS_TRITON = True
GPU_VERIFIED = False

__all__ = [
    "GPU_VERIFIED",
    "HAS_TRITON",
    "STEPS",
    "CMSState",
    "cms_level",
    "cms_level_step",
    "cms_level_reference",
    "cms_level_step_reference",
    "cms_level_naive",
]


def cms_level(
    z: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    p_v: Tensor,
    w_eta: Tensor,
    b_eta: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    objective: str = "l2",
    decay: float = 0.0,
    step: str = "gauss_newton",
    mask: Tensor | None = None,
    state: CMSState | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, CMSState | None]:
    """One CMS level over z (B, T, D); see `cms_level_reference` for the arguments and shapes.

    backend: "auto" (Triton on CUDA once GPU_VERIFIED, the PyTorch reference otherwise), "torch" or "triton".
    """
    kwargs = dict(chunk_size=chunk_size, eta_max=eta_max, objective=objective, decay=decay, step=step, mask=mask,
                  state=state, output_final_state=output_final_state)
    if resolve_backend(backend, z.device, op="cms", has_triton=HAS_TRITON, gpu_verified=GPU_VERIFIED) == "triton":
        from hope_kernels.cms.chunk import cms_level_triton

        return cms_level_triton(z, w_gate, w_up, w_down, p_v, w_eta, b_eta, **kwargs)
    return cms_level_reference(z, w_gate, w_up, w_down, p_v, w_eta, b_eta, **kwargs)


def cms_level_step(
    z_t: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    p_v: Tensor,
    w_eta: Tensor,
    b_eta: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    objective: str = "l2",
    decay: float = 0.0,
    step: str = "gauss_newton",
    mask: Tensor | None = None,
    state: CMSState | None,
    backend: str = "auto",
) -> tuple[Tensor, CMSState]:
    """One decode token z_t (B, D); see `cms_level_step_reference` for the arguments and shapes. The Triton step
    has no backward (decode)."""
    kwargs = dict(chunk_size=chunk_size, eta_max=eta_max, objective=objective, decay=decay, step=step, mask=mask,
                  state=state)
    if resolve_backend(backend, z_t.device, op="cms", has_triton=HAS_TRITON, gpu_verified=GPU_VERIFIED) == "triton":
        from hope_kernels.cms.step import cms_level_step_triton

        return cms_level_step_triton(z_t, w_gate, w_up, w_down, p_v, w_eta, b_eta, **kwargs)
    return cms_level_step_reference(z_t, w_gate, w_up, w_down, p_v, w_eta, b_eta, **kwargs)
