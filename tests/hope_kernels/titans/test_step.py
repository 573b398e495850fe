"""Triton decode step of the Titans memory, SPEC §2 v2 (hope_kernels/titans/step.py).

It must equal the reference step (`titans_memory_step_reference`, float64) and, token by token, the chunked forward
(the Triton chunk kernel and the reference): SPEC §5, generation with the cache reproduces the full-sequence
forward, including prompts whose length is no multiple of the chunk size. Runs in Triton's CPU interpreter without
a GPU; fresh random inputs every run (HOPE_TEST_SEED replays).
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package")
os.environ.setdefault("HOPE_TITANS_DOT_PRECISION", "ieee")

from hope_kernels.titans.chunk import titans_memory_triton  # noqa: E402
from hope_kernels.titans.reference import (  # noqa: E402
    TitansState,
    memory_rows,
    titans_memory_reference,
    titans_memory_step_reference,
)
from hope_kernels.titans.step import titans_memory_step_triton  # noqa: E402

F64 = torch.float64
F32 = torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4
RUN_SEED = int(os.environ.get("HOPE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def _gen(*params) -> torch.Generator:
    return torch.Generator().manual_seed((RUN_SEED + zlib.crc32(repr(params).encode())) % (2**31))


def make_inputs(g, B, T, H, d):
    """q, a: (B, T, H, d) (q[:, t] is one decode token); z0; b_eta, b_alpha. float64, CPU."""
    q = F.normalize(torch.randn(B, T, H, d, generator=g, dtype=F64), dim=-1)
    a = 0.25 * torch.randn(B, T, H, d, generator=g, dtype=F64)
    z0 = torch.randn(H, memory_rows(d), d, generator=g, dtype=F64) / math.sqrt(d)
    return [q, a, z0, 0.5 * torch.randn(H, generator=g, dtype=F64), 3.0 + 0.3 * torch.randn(H, generator=g, dtype=F64)]


def make_state(g, B, H, d, position):
    R = memory_rows(d)
    zc = torch.randn(B, H, R, d, generator=g, dtype=F64) / math.sqrt(d)
    return TitansState(zc, zc + 0.3 * torch.randn(B, H, R, d, generator=g, dtype=F64) / math.sqrt(d), None, position)


def to(x, dtype=F32, device=DEV):
    if x is None:
        return None
    if isinstance(x, TitansState):
        return TitansState(to(x.z_chunk, dtype, device), to(x.z, dtype, device), None, x.position)
    return x.to(device=device, dtype=dtype)


def rel_err(x, y) -> float:
    x, y = x.detach().to("cpu", F64), y.detach().to("cpu", F64)
    return (x - y).norm().item() / max(y.norm().item(), 1e-30)


def assert_states(st, ref, what=""):
    assert st.position == ref.position and st.s is None, what
    for name in ("z_chunk", "z"):
        t = getattr(st, name)
        assert t.dtype == F32, (what, name, t.dtype)
        e = rel_err(t, getattr(ref, name))
        assert e <= TOL, f"{what} state.{name}: relative error {e:.2e} (HOPE_TEST_SEED={RUN_SEED})"


def flags(chunk_size=4, **kw):
    return dict(chunk_size=chunk_size, eta_max=0.9, **kw)


# ------------------------------------------------------------------------------- 1. step == reference step

LITERAL = dict(memory_value_norm=False, memory_retention="zero")  # the rule as printed (defaults: both on)
STEP_FLAGS = [
    dict(),
    dict(objective="dot", dgd=False),
    dict(memory_target="value", **LITERAL),
    dict(memory_target="value", objective="dot", memory_residual=False, adaptive=("v", "alpha"),
         memory_value_norm=False),
    dict(adaptive=(), adaptive_chunk_size=8, memory_retention="zero"),
]


@pytest.mark.parametrize("kw", STEP_FLAGS, ids=[f"s{i}" for i in range(len(STEP_FLAGS))])
def test_step_matches_reference_step(kw):
    """Batch row 1 masked; positions inside a chunk, at a chunk's last token and at an adaptive chunk's last."""
    kw = flags(**kw)
    g = _gen("step", kw)
    B, H, d = 3, 2, 16
    q, a, *rest = make_inputs(g, B, 1, H, d)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    for state in (None, make_state(g, B, H, d, 1), make_state(g, B, H, d, 3), make_state(g, B, H, d, 7)):
        o_ref, st_ref = titans_memory_step_reference(q[:, 0], a[:, 0], *rest, mask=mask, state=state, **kw)
        o, st = titans_memory_step_triton(to(q[:, 0]), to(a[:, 0]), *map(to, rest), mask=to(mask), state=to(state),
                                          **kw)
        pos = 0 if state is None else state.position
        assert o.dtype == F32 and o.shape == (B, H, d)
        assert rel_err(o, o_ref) <= TOL, (pos, rel_err(o, o_ref), RUN_SEED)
        assert_states(st, st_ref, what=f"position {pos}")
    # the masked row changed no memory
    assert torch.equal(st.z[1].cpu(), to(state.z)[1].cpu())


@pytest.mark.parametrize("d", [8, 24, 48])  # 24, 48: tiles that straddle the row blocks
def test_step_head_dims(d):
    kw = flags(memory_target="value", adaptive=("v", "alpha"))
    g = _gen("dims", d)
    q, a, *rest = make_inputs(g, 2, 1, 1, d)
    state = make_state(g, 2, 1, d, 3)
    o_ref, st_ref = titans_memory_step_reference(q[:, 0], a[:, 0], *rest, state=state, **kw)
    o, st = titans_memory_step_triton(to(q[:, 0]), to(a[:, 0]), *map(to, rest), state=to(state), **kw)
    assert rel_err(o, o_ref) <= TOL
    assert_states(st, st_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_step_half_inputs(dtype):
    g = _gen("half", dtype)
    q, a, *rest = [t.to(dtype).to(F64) for t in make_inputs(g, 2, 1, 2, 16)]
    state = make_state(g, 2, 2, 16, 3)
    o_ref, st_ref = titans_memory_step_reference(q[:, 0], a[:, 0], *rest, state=state, **flags())
    o, st = titans_memory_step_triton(to(q[:, 0], dtype), to(a[:, 0], dtype), *(to(t, dtype) for t in rest),
                                      state=to(state), **flags())
    assert o.dtype == dtype and rel_err(o, o_ref) <= 1e-2
    assert_states(st, st_ref)  # states stay fp32


# ------------------------------------------------------------------------ 2. decoding == the chunked forward


@pytest.mark.parametrize(
    "kw,prompt",
    [
        (dict(), 5),
        (dict(objective="dot", memory_target="value", adaptive=("k", "alpha"), adaptive_chunk_size=8), 4),
        (dict(dgd=False, memory_residual=False), 0),
        (LITERAL, 3),
    ],
)
def test_decode_equals_chunked_forward(kw, prompt):
    """Prompt through the chunk kernel (length no multiple of C), then decode step by step: every read and the
    final state equal one chunked call over the whole sequence (Triton and reference)."""
    kw = flags(**kw)
    g = _gen("decode", kw, prompt)
    B, T, H, d = 2, 13, 1, 16
    q, a, *rest = make_inputs(g, B, T, H, d)
    mask = torch.ones(B, T, dtype=F64)
    mask[1, 4] = mask[1, 9] = 0.0
    state = make_state(g, B, H, d, 2)  # a cached state in the middle of a chunk
    o_ref, st_ref = titans_memory_reference(q, a, *rest, mask=mask, state=state, output_final_state=True, **kw)
    o_full, st_full = titans_memory_triton(to(q), to(a), *map(to, rest), mask=to(mask), state=to(state),
                                           output_final_state=True, **kw)
    assert rel_err(o_full, o_ref) <= TOL
    assert_states(st_full, st_ref, what="chunk kernel")
    outs = []
    st = to(state)
    if prompt:
        o_p, st = titans_memory_triton(to(q[:, :prompt]), to(a[:, :prompt]), *map(to, rest),
                                       mask=to(mask[:, :prompt]), state=st, output_final_state=True, **kw)
        outs.append(o_p)
    for t in range(prompt, T):
        o_t, st = titans_memory_step_triton(to(q[:, t]), to(a[:, t]), *map(to, rest), mask=to(mask[:, t]), state=st,
                                            **kw)
        outs.append(o_t.unsqueeze(1))
    o_dec = torch.cat(outs, 1)
    assert rel_err(o_dec, o_full) <= TOL and rel_err(o_dec, o_ref) <= TOL
    assert_states(st, st_ref, what="decoded")


# --------------------------------------------------------------------------------------------- 3. bad input


def test_step_bad_input_raises():
    g = _gen("bad")
    q, a, *rest = make_inputs(g, 1, 1, 1, 16)
    args = [to(q[:, 0]), to(a[:, 0]), *map(to, rest)]
    with pytest.raises(ValueError, match="float64"):
        titans_memory_step_triton(q[:, 0].to(DEV), a[:, 0].to(DEV), *(t.to(DEV) for t in rest), **flags())
    with pytest.raises(ValueError, match="must match"):
        titans_memory_step_triton(args[0], args[1].half(), *args[2:], **flags())
    with pytest.raises(ValueError, match=r"\(B, H, d\)"):
        titans_memory_step_triton(to(q), to(a), *args[2:], **flags())
    with pytest.raises(ValueError, match="mask must be"):
        titans_memory_step_triton(*args, mask=torch.ones(2, device=DEV), **flags())
    with pytest.raises(ValueError, match="momentum=True is not supported"):
        titans_memory_step_triton(*args, torch.zeros(1, device=DEV), momentum=True, **flags())
    q, a, *rest = make_inputs(g, 1, 1, 1, 136)
    with pytest.raises(ValueError, match="d=136"):
        titans_memory_step_triton(to(q[:, 0]), to(a[:, 0]), *map(to, rest), **flags())
