"""Continuum Memory System level op (SPEC §3): one SwiGLU level whose weights learn in context per chunk.

`cms_level` / `cms_level_step` pick a backend with `hope_kernels._dispatch.resolve_backend`. The op has only its
PyTorch reference (`reference.py`) for now: the v1 Triton kernels implemented the step that SPEC §3 v2 replaces
and were removed; the v2 kernel (issue #13, part 3) is to be written against this reference. So "auto" runs
the reference everywhere and kernel_backend="triton" raises for the CMS.
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

HAS_TRITON = False
GPU_VERIFIED = False

__all__ = [
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

    backend: "auto" or "torch" (the PyTorch reference); "triton" raises until the CMS has a kernel.
    """
    resolve_backend(backend, z.device, op="cms", has_triton=HAS_TRITON, gpu_verified=GPU_VERIFIED)
    return cms_level_reference(z, w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size=chunk_size, eta_max=eta_max,
                               objective=objective, decay=decay, step=step, mask=mask, state=state,
                               output_final_state=output_final_state)


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
    """One decode token z_t (B, D); see `cms_level_step_reference` for the arguments and shapes."""
    resolve_backend(backend, z_t.device, op="cms", has_triton=HAS_TRITON, gpu_verified=GPU_VERIFIED)
    return cms_level_step_reference(z_t, w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size=chunk_size,
                                    eta_max=eta_max, objective=objective, decay=decay, step=step, mask=mask,
                                    state=state)
