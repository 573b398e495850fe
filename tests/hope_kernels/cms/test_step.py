"""Triton decode step of a CMS level, SPEC §3 v2 (hope_kernels/cms/step.py), vs the float64 PyTorch reference.

Token by token over a sequence that crosses chunk boundaries, from no state and from mid-chunk / boundary states,
with masks (holes, and padding over whole chunks, where the decay pull must be skipped): y_t and the seven tensors
of the state after every token within 1e-5 relative of `cms_level_step_reference` in float64; position and
chunk_has_valid exactly. Fresh random inputs on every run (HOPE_TEST_SEED=<int> replays one).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from hope_kernels.cms.reference import STATE_TENSORS, CMSState, cms_level_step_reference  # noqa: E402
from hope_kernels.cms.step import cms_level_step_triton  # noqa: E402
from tests.hope_kernels.cms.test_chunk import DEV, ETA_MAX, NAMES, RUN_SEED, _seed, make_case, rel  # noqa: E402

F64, F32 = torch.float64, torch.float32
TOL = 1e-5


def _state(leaves, dtype, position, seen):
    return CMSState(*(leaves[f"state.{n}"].to(device=DEV, dtype=dtype) for n in STATE_TENSORS), position=position,
                    chunk_has_valid=seen.to(DEV))


# (B, T, D, F, C, objective, decay, mask, position): D and F no multiples of the interpreter's 32-wide tiles.
CASES = [
    (3, 9, 16, 40, 4, "l2", 0.1, "random", None),
    (1, 7, 24, 20, 3, "dot", 0.0, "none", None),
    (3, 13, 16, 24, 6, "l2", 0.3, "chunk_pad", 4),  # whole padded chunks with decay: no pull (SPEC §5)
    (2, 6, 40, 16, 1, "dot", 0.2, "random", 3),  # chunk size 1: every token closes its chunk
    (2, 5, 16, 16, 4, "l2", 0.1, "right_pad", 8),  # a state on a boundary
]


@pytest.mark.parametrize("B,T,D,Fh,C,objective,decay,mask_kind,position", CASES)
def test_step_matches_reference(B, T, D, Fh, C, objective, decay, mask_kind, position):
    _check_steps(B, T, D, Fh, C, objective, decay, mask_kind, position)


def test_step_strided_float32_mask():
    """The decode loop's `mask[:, t]` of a float32 (B, T) mask is a strided view that `.to(float32)` does not copy:
    the kernel must read row b's entry, not entry b of the storage (sequences padded differently)."""
    _check_steps(3, 9, 16, 24, 4, "l2", 0.1, "random", 3, layout=lambda m, t: m.float()[:, t])


def test_step_broadcast_mask():
    """A stride-0 mask (one value expanded over the batch) is read as B equal entries."""
    _check_steps(3, 6, 16, 24, 4, "dot", 0.1, "random", None,
                 layout=lambda m, t: m[:1, t].float().expand(m.shape[0]))


def _check_steps(B, T, D, Fh, C, objective, decay, mask_kind, position, layout=None):
    """y_t and the state after every token, `cms_level_step_triton` against the float64 reference; layout(mask, t)
    gives the step's mask (default mask[:, t])."""
    tag = () if layout is None else ("layout",)
    seed = _seed("step", B, T, D, Fh, C, objective, decay, mask_kind, position, *tag)
    leaves, mask, seen = make_case(seed, B, T, D, Fh, position=position, C=C, mask=mask_kind)
    leaves = {k: v.to(F32).to(F64) for k, v in leaves.items()}
    where = f"seed={seed} (HOPE_TEST_SEED={RUN_SEED})"
    kw = dict(chunk_size=C, eta_max=ETA_MAX, objective=objective, decay=decay)
    params = {dt: [leaves[n].to(device=DEV, dtype=dt) for n in NAMES[1:]] for dt in (F64, F32)}
    s_ref = None if position is None else _state(leaves, F64, position, seen)
    s_k = None if position is None else _state(leaves, F32, position, seen)
    with torch.no_grad():
        for t in range(T):
            m_t = None if mask is None else (mask[:, t] if layout is None else layout(mask, t)).to(DEV)
            z_t = leaves["z"][:, t].to(DEV)
            y_ref, s_ref = cms_level_step_reference(z_t, *params[F64], mask=m_t, state=s_ref, **kw)
            y_k, s_k = cms_level_step_triton(z_t.float(), *params[F32], mask=m_t, state=s_k, **kw)
            assert y_k.dtype == F32 and all(getattr(s_k, n).dtype == F32 for n in STATE_TENSORS)
            assert s_k.position == s_ref.position
            assert torch.equal(s_k.chunk_has_valid.cpu(), s_ref.chunk_has_valid.cpu()), f"t={t} {where}"
            errs = {"y": rel(y_k, y_ref)}
            errs.update({n: rel(getattr(s_k, n), getattr(s_ref, n)) for n in STATE_TENSORS})
            bad = {k: f"{e:.1e}" for k, e in errs.items() if not e <= TOL}
            assert not bad, f"token {t}, {where}: relative errors above {TOL:.0e}: {bad}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_half_inputs(dtype):
    """16-bit activations and parameters: y in z_t.dtype, the state in fp32, equal to the reference on the same
    (rounded) values."""
    leaves, mask, seen = make_case(_seed("step-half", str(dtype)), 2, 3, 16, 24, position=2, C=4, mask="random")
    leaves = {k: v.to(dtype).to(F64) for k, v in leaves.items()}
    kw = dict(chunk_size=4, eta_max=ETA_MAX, objective="l2", decay=0.1, mask=mask[:, 0].to(DEV))
    with torch.no_grad():
        y_ref, s_ref = cms_level_step_reference(leaves["z"][:, 0].to(DEV), *(leaves[n].to(DEV) for n in NAMES[1:]),
                                                state=_state(leaves, F64, 2, seen), **kw)
        y_k, s_k = cms_level_step_triton(leaves["z"][:, 0].to(device=DEV, dtype=dtype),
                                         *(leaves[n].to(device=DEV, dtype=dtype) for n in NAMES[1:]),
                                         state=_state(leaves, dtype, 2, seen), **kw)
    assert y_k.dtype == dtype and all(getattr(s_k, n).dtype == F32 for n in STATE_TENSORS)
    assert rel(y_k, y_ref) <= 1e-2
    for n in STATE_TENSORS:
        assert rel(getattr(s_k, n), getattr(s_ref, n)) <= 1e-5, n


def test_step_refuses_a_training_path():
    """No backward: an input that requires grad with grad mode on raises instead of silently losing the gradient."""
    leaves, _, _ = make_case(0, 2, 1, 16, 16)
    args = [leaves[n].float().to(DEV) for n in NAMES]
    args[1].requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        cms_level_step_triton(args[0][:, 0], *args[1:], chunk_size=4, eta_max=ETA_MAX, state=None)


def test_step_rejects_bad_inputs():
    leaves, _, _ = make_case(0, 2, 1, 16, 16)
    args = [leaves[n].float().to(DEV) for n in NAMES]
    with pytest.raises(ValueError, match=r"z_t must be \(B, D\)"):
        cms_level_step_triton(args[0], *args[1:], chunk_size=4, eta_max=ETA_MAX, state=None)
    with pytest.raises(ValueError, match="float64"):
        cms_level_step_triton(args[0][:, 0].double(), *(a.double() for a in args[1:]), chunk_size=4,
                              eta_max=ETA_MAX, state=None)
    with pytest.raises(ValueError, match=r"mask must be \(B,\)"):
        cms_level_step_triton(args[0][:, 0], *args[1:], chunk_size=4, eta_max=ETA_MAX, state=None,
                              mask=torch.ones(2, 1))
