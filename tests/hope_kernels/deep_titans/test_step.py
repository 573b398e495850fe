"""Triton decode step of the deep Titans memory (hope_kernels/deep_titans/step.py): equal to the float64 reference
step and, token by token, to the chunked forward (kernel and reference), SPEC §5. Interpreter on CPU; fresh random
inputs every run (HOPE_TEST_SEED replays)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from hope_kernels.deep_titans import (  # noqa: E402
    DeepTitansState,
    titans_deep_memory_reference,
    titans_deep_memory_step,
    titans_deep_memory_step_reference,
)
from hope_kernels.deep_titans.chunk import titans_deep_memory_triton  # noqa: E402
from hope_kernels.deep_titans.step import titans_deep_memory_step_triton  # noqa: E402
from tests.hope_kernels.deep_titans.test_chunk import (  # noqa: E402
    DEV,
    F32,
    F64,
    INPUTS,
    LITERAL,
    STATE,
    TOL,
    _seed,
    flags,
    make_case,
    rel_err,
)


def _state(x: dict, position: int, dtype=F32) -> DeepTitansState:
    t = {n: x[n].to(DEV, dtype) for n in STATE}
    return DeepTitansState(t["z_chunk"], t["z"], None, t["w1_chunk"], t["w1"], None, t["w2_chunk"], t["w2"], None,
                           position)


def assert_states(st, ref, what=""):
    assert st.position == ref.position and st.s is None and st.s1 is None and st.s2 is None, what
    for name in STATE:
        t = getattr(st, name)
        assert t.dtype == F32, (what, name)
        e = rel_err(t, getattr(ref, name))
        assert e <= TOL, f"{what} state.{name}: relative error {e:.2e}"


@pytest.mark.parametrize("kw,d,h", [
    (dict(), 8, 12),
    (dict(objective="dot", memory_target="value", dgd=False, adaptive_chunk_size=8, **LITERAL), 8, 8),
    (dict(memory_residual=False, adaptive=("k", "alpha")), 24, 20),  # several row tiles, odd h; the guard binds
    (dict(memory_retention="zero", memory_value_norm=False), 16, 16),
    (dict(memory_curvature_guard=False), 24, 20),
    (dict(), 24, 40),  # two hidden-unit tiles (BF = 32), the second part masked
])
def test_step_matches_reference_step(kw, d, h):
    """Batch row 1 masked; positions inside a chunk, at a chunk's last token and at an adaptive chunk's last."""
    kw = flags(**kw)
    B, H = 3, 2
    x, _, _ = make_case(_seed("step", kw, d, h), B, 1, H, d, h, position=0)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    q, a = x["q"][:, 0], x["a"][:, 0]
    rest = [x[n] for n in INPUTS[2:]]
    for position in (0, 1, 3, 7):
        state = None if position == 0 else DeepTitansState(*(x[n] if n in x else None for n in DeepTitansState._fields[:9]),
                                                           position)
        o_ref, st_ref = titans_deep_memory_step_reference(q, a, *rest, mask=mask, state=state, **kw)
        k_state = None if position == 0 else _state(x, position)
        o, st = titans_deep_memory_step_triton(q.to(DEV, F32), a.to(DEV, F32), *(t.to(DEV, F32) for t in rest),
                                               mask=mask.to(DEV), state=k_state, **kw)
        assert o.dtype == F32 and rel_err(o, o_ref) <= TOL, (position, rel_err(o, o_ref))
        assert_states(st, st_ref, what=f"position {position}")
    assert torch.equal(st.w1[1].cpu(), x["w1"][1].to(F32))  # the masked row changed no memory


@pytest.mark.parametrize("kw,prompt", [(dict(), 3), (dict(objective="dot", adaptive_chunk_size=8), 0), (LITERAL, 5)])
def test_decode_equals_chunked_forward(kw, prompt):
    """A mid-chunk cached state, a prompt through the chunk kernel, then step by step over chunk boundaries."""
    kw = flags(**kw)
    B, T, H, d, h = 2, 11, 1, 8, 12
    x, m, _ = make_case(_seed("decode", kw, prompt), B, T, H, d, h, position=2, mask="random")
    q, a = x["q"].to(DEV, F32), x["a"].to(DEV, F32)
    rest = [x[n].to(DEV, F32) for n in INPUTS[2:]]
    m = m.to(DEV, F32)
    ref_state = DeepTitansState(*(x[n] if n in x else None for n in DeepTitansState._fields[:9]), 2)
    o_ref, st_ref = titans_deep_memory_reference(x["q"], x["a"], *(x[n] for n in INPUTS[2:]), mask=m.double().cpu(),
                                                 state=ref_state, output_final_state=True, **kw)
    outs, st = [], _state(x, 2)
    if prompt:
        o_p, st = titans_deep_memory_triton(q[:, :prompt], a[:, :prompt], *rest, mask=m[:, :prompt], state=st,
                                            output_final_state=True, **kw)
        outs.append(o_p)
    for t in range(prompt, T):
        o_t, st = titans_deep_memory_step_triton(q[:, t], a[:, t], *rest, mask=m[:, t], state=st, **kw)
        outs.append(o_t.unsqueeze(1))
    assert rel_err(torch.cat(outs, 1), o_ref) <= TOL
    assert_states(st, st_ref, what="decoded")


def test_first_token_half_inputs_dispatch_and_bad_input():
    x, _, _ = make_case(_seed("first"), 2, 1, 1, 8, 8)
    args = [x["q"][:, 0], x["a"][:, 0]] + [x[n] for n in INPUTS[2:]]
    o_ref, st_ref = titans_deep_memory_step_reference(*args, **flags(chunk_size=1))
    k_args = [t.to(DEV, F32) for t in args]
    o, st = titans_deep_memory_step_triton(*k_args, **flags(chunk_size=1))
    assert rel_err(o, o_ref) <= TOL and rel_err(st.w2_chunk, st_ref.w2_chunk) <= TOL  # C = 1: the chunk moves
    assert torch.equal(titans_deep_memory_step(*k_args, **flags(chunk_size=1), backend="triton")[0], o)
    bf16 = titans_deep_memory_step_triton(*[t.to(torch.bfloat16) if i < 2 else t for i, t in enumerate(k_args)],
                                          **flags(chunk_size=1))[0]
    assert bf16.dtype == torch.bfloat16 and rel_err(bf16, o_ref) <= 1e-2
    with pytest.raises(ValueError, match="float64"):
        titans_deep_memory_step_triton(*(t.to(DEV) for t in args), **flags())
    with pytest.raises(ValueError, match="momentum=True"):
        titans_deep_memory_step(*k_args, torch.zeros(1, device=DEV), momentum=True, backend="triton", **flags())
