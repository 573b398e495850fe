"""Triton decode step of a CMS level (hope_kernels/cms/step.py): token by token it equals the chunked forward.

Runs in Triton's CPU interpreter without a GPU (TRITON_INTERPRET=1). Fresh random inputs every run; the seed is
in failure messages, HOPE_TEST_SEED=<int> replays. Tolerance ||Δ|| / ||ref|| <= 1e-4 vs the float64 reference.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("triton cannot be imported: the Triton kernels are not testable here", allow_module_level=True)

from hope_kernels.cms.chunk import cms_level_triton  # noqa: E402
from hope_kernels.cms.reference import CMSState, cms_level_reference, cms_level_step_reference  # noqa: E402
from tests.hope_kernels.cms.test_reference import chunk_pad_mask  # noqa: E402
from hope_kernels.cms.step import cms_level_step_triton  # noqa: E402

F64, F32 = torch.float64, torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ETA_MAX = 0.5
TOL = 1e-4
RUN_SEED = int(os.environ.get("HOPE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
NAMES = ("w_gate", "w_up", "w_down", "p_v", "w_eta", "b_eta")


def _seed(*params) -> int:
    return (RUN_SEED + zlib.crc32(repr(params).encode())) % (2**31)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    n = b.norm().item()
    d = (a - b).norm().item()
    return d / n if n > 0 else d


def make(seed, B, T, D, Fh, position):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, D, generator=g, dtype=F64)
    z = 0.4 * z / z.pow(2).mean(-1, keepdim=True).sqrt()
    p = dict(
        w_gate=torch.randn(Fh, D, generator=g, dtype=F64) / D**0.5,
        w_up=torch.randn(Fh, D, generator=g, dtype=F64) / D**0.5,
        w_down=torch.randn(D, Fh, generator=g, dtype=F64) / Fh**0.5,
        p_v=torch.randn(D, D, generator=g, dtype=F64) / D**0.5,
        w_eta=torch.randn(D, generator=g, dtype=F64) / D**0.5,
        b_eta=torch.tensor(-1.0, dtype=F64),
    )
    state = None
    if position is not None:
        th = [p[n] + 0.05 * torch.randn(B, *p[n].shape, generator=g, dtype=F64) for n in NAMES[:3]]
        gr = [0.02 * torch.randn(B, *p[n].shape, generator=g, dtype=F64) for n in NAMES[:3]]
        state = CMSState(*th, *gr, position=position, chunk_has_valid=torch.arange(B) % 2 == 0)
    mask = torch.rand(B, T, generator=g) < 0.7
    return z, p, state, mask


def to(x, dtype):
    if isinstance(x, CMSState):
        return CMSState(*(t.to(device=DEV, dtype=dtype) for t in x[:6]), position=x.position,
                        chunk_has_valid=x.chunk_has_valid.to(DEV))
    return x.to(device=DEV, dtype=dtype) if x.is_floating_point() else x.to(DEV)


@pytest.mark.parametrize(
    "B,T,D,Fh,C,objective,decay,position,mask_kind",
    [
        (3, 9, 16, 32, 4, "l2", 0.1, None, "random"),
        (2, 10, 32, 16, 4, "dot", 0.0, 6, "random"),
        (1, 7, 16, 16, 8, "l2", 0.0, 5, "none"),
        (2, 6, 24, 40, 1, "l2", 0.1, 8, "random"),  # non-power-of-two D, F; every token closes a chunk
        # padding over whole chunks with decay > 0 (SPEC §5): the step skips their pull, counting the state's tokens
        (3, 11, 16, 16, 4, "l2", 0.3, 6, "chunk_pad"),  # mid-chunk state, with and without a valid token so far
        (1, 9, 16, 16, 4, "dot", 0.3, 4, "chunk_pad"),  # left padding from a state on a boundary
    ],
)
def test_step_equals_chunked(B, T, D, Fh, C, objective, decay, position, mask_kind):
    seed = _seed(B, T, D, Fh, C, objective, decay, position, mask_kind)
    msg = f"seed={seed} (HOPE_TEST_SEED={RUN_SEED})"
    z, p, state, mask = make(seed, B, T, D, Fh, position)
    mask = {"random": mask, "none": None, "chunk_pad": chunk_pad_mask(B, T)}[mask_kind]
    kw = dict(chunk_size=C, eta_max=ETA_MAX, objective=objective, decay=decay)
    y_ref, s_ref = cms_level_reference(z, *p.values(), mask=mask, state=state, output_final_state=True, **kw)
    pk = [to(t, F32) for t in p.values()]
    y_chunk, s_chunk = cms_level_triton(to(z, F32), *pk, mask=None if mask is None else to(mask, F32),
                                        state=None if state is None else to(state, F32), output_final_state=True,
                                        **kw)
    st = None if state is None else to(state, F32)
    ys = []
    for t in range(T):
        m = None if mask is None else to(mask[:, t], F32)
        y_t, st = cms_level_step_triton(to(z[:, t], F32), *pk, mask=m, state=st, **kw)
        assert y_t.shape == (B, D) and y_t.dtype == F32
        ys.append(y_t)
    y_step = torch.stack(ys, 1)
    assert st.position == s_ref.position
    assert torch.equal(st.chunk_has_valid.cpu(), s_ref.chunk_has_valid), f"chunk_has_valid {msg}"
    assert torch.equal(s_chunk.chunk_has_valid.cpu(), s_ref.chunk_has_valid), f"chunk_has_valid {msg}"
    assert rel(y_step, y_ref) <= TOL, f"y vs reference {msg}"
    assert rel(y_step, y_chunk) <= TOL, f"y vs chunked kernel {msg}"
    for name in CMSState._fields[:6]:
        a = getattr(st, name)
        assert a.dtype == F32
        assert rel(a, getattr(s_ref, name)) <= TOL, f"state.{name} vs reference {msg}"
        assert rel(a, getattr(s_chunk, name)) <= TOL, f"state.{name} vs chunked kernel {msg}"


def test_step_matches_step_reference_bf16():
    """bf16 activations and parameters; the state stays fp32, y comes back in bf16."""
    z, p, state, mask = make(_seed("bf16"), 2, 1, 16, 32, 3)
    zb = z[:, 0].to(torch.bfloat16)
    pb = [t.to(torch.bfloat16) for t in p.values()]
    y_ref, s_ref = cms_level_step_reference(zb.double(), *(t.double() for t in pb), chunk_size=4, eta_max=ETA_MAX,
                                            state=state, mask=mask[:, 0])
    y, s = cms_level_step_triton(to(zb, torch.bfloat16), *(to(t, torch.bfloat16) for t in pb), chunk_size=4,
                                 eta_max=ETA_MAX, state=to(state, F32), mask=to(mask[:, 0], F32))
    assert y.dtype == torch.bfloat16 and all(t.dtype == F32 for t in s[:6])
    assert rel(y, y_ref) <= 1e-2
    for a, b in zip(s[:6], s_ref[:6]):
        assert rel(a, b) <= 1e-4


def test_step_bad_inputs():
    z, p, state, mask = make(0, 2, 1, 16, 32, None)
    pk = [to(t, F32) for t in p.values()]
    with pytest.raises(ValueError, match="z_t must be"):
        cms_level_step_triton(to(z, F32), *pk, chunk_size=4, eta_max=ETA_MAX, state=None)
    with pytest.raises(ValueError, match="float64"):
        cms_level_step_triton(z[:, 0].to(DEV), *(to(t, F64) for t in p.values()), chunk_size=4, eta_max=ETA_MAX,
                              state=None)
    with pytest.raises(ValueError, match="mask must be"):
        cms_level_step_triton(to(z[:, 0], F32), *pk, chunk_size=4, eta_max=ETA_MAX, state=None,
                              mask=torch.ones(2, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        cms_level_step_triton(to(z[:, 0], F32), *pk, chunk_size=0, eta_max=ETA_MAX, state=None)
