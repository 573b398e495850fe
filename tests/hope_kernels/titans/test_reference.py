"""Tests of the PyTorch reference of the self-modifying Titans memory (SPEC §2, §5).

The chunked closed form `titans_memory_reference` is checked against the token-by-token oracle
`titans_memory_naive` (built from `titans_memory_step_reference`) and against an online loop written
independently here. Everything runs in float64 on tiny shapes unless a test is about dtypes.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from hope_kernels import titans as titans_pkg
from hope_kernels.titans import (
    HAS_TRITON,
    TitansState,
    memory_rows,
    titans_memory,
    titans_memory_naive,
    titans_memory_reference,
    titans_memory_step,
    titans_memory_step_reference,
)

F64 = torch.float64
ETA_MAX = 0.5
ALL = ("k", "v", "eta", "alpha")


# ----------------------------------------------------------------------------------------------- helpers


def _gen(*params) -> torch.Generator:
    """A generator seeded from the test parameters: reproducible, different across cases."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def make_inputs(g, B=3, T=19, H=2, d=4, dtype=F64):
    q = F.normalize(torch.randn(B, T, H, d, generator=g, dtype=F64), dim=-1)
    # Small inputs keep the memories bounded over the test lengths: with self-generated targets (and with the
    # dot objective) the rule can grow the memories geometrically, which would only test overflow.
    a = 0.25 * torch.randn(B, T, H, d, generator=g, dtype=F64)
    z0 = torch.randn(H, memory_rows(d), d, generator=g, dtype=F64) / math.sqrt(d)
    b_eta = 0.5 * torch.randn(H, generator=g, dtype=F64)
    b_alpha = 3.0 + 0.3 * torch.randn(H, generator=g, dtype=F64)  # alpha around 0.95
    momentum_logit = 1.0 + 0.5 * torch.randn(H, generator=g, dtype=F64)  # beta around 0.7
    return [t.to(dtype) for t in (q, a, z0, b_eta, b_alpha, momentum_logit)]


def make_mask(kind, g, B, T):
    if kind == "none":
        return None
    if kind == "random":
        m = (torch.rand(B, T, generator=g, dtype=F64) > 0.3).to(F64)
        m[0, 1] = 0.0  # every random mask has at least one hole, early
        m[0, 0] = 1.0
        return m
    if kind == "right":
        lengths = torch.randint(T // 2, T, (B,), generator=g)
        lengths[0] = T - 5
        return (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    raise AssertionError(kind)


def make_state(g, B, H, d, position, scale=0.3):
    """A random (legitimate) mid-stream state: chunk-start memory, current memory and momentum all differ."""
    R = memory_rows(d)
    z_chunk = torch.randn(B, H, R, d, generator=g, dtype=F64) / math.sqrt(d)
    z = z_chunk + scale * torch.randn(B, H, R, d, generator=g, dtype=F64) / math.sqrt(d)
    s = scale * torch.randn(B, H, R, d, generator=g, dtype=F64) / math.sqrt(d)
    return TitansState(z_chunk, z, s, position)


def rel_err(x, y):
    x, y = x.to(F64), y.to(F64)
    denom = y.norm()
    if denom == 0:
        return x.norm().item()
    return ((x - y).norm() / denom).item()


def assert_close_rel(x, y, tol, what=""):
    assert x.shape == y.shape, (what, x.shape, y.shape)
    err = rel_err(x, y)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_states_close(s1, s2, tol, what=""):
    assert s1.position == s2.position, (what, s1.position, s2.position)
    for name in ("z_chunk", "z", "s"):
        assert_close_rel(getattr(s1, name), getattr(s2, name), tol, f"{what} state.{name}")


def flags(momentum=True, dgd=True, objective="l2", memory_target="self", adaptive=ALL, chunk_size=4):
    return dict(chunk_size=chunk_size, eta_max=ETA_MAX, momentum=momentum, dgd=dgd, objective=objective,
                memory_target=memory_target, adaptive=adaptive)


# ----------------------------------------------------------------------- 1. chunked == token-by-token oracle

ADAPTIVE_CASES = {"all": ALL, "eta": ("eta",), "none": ()}



def mixed_mask(g, T):
    """(3, T): row 0 all valid, row 1 random holes, row 2 right padding: every mask kind in one batch."""
    m = torch.ones(3, T, dtype=F64)
    m[1] = (torch.rand(T, generator=g, dtype=F64) > 0.3).to(F64)
    m[1, 1] = 0.0
    m[2, T - 6 :] = 0.0
    return m


@pytest.mark.parametrize("C", [1, 4, 16])
@pytest.mark.parametrize("adaptive", list(ADAPTIVE_CASES))
@pytest.mark.parametrize("memory_target", ["self", "value"])
@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("dgd", [True, False], ids=["dgd", "gd"])
@pytest.mark.parametrize("momentum", [True, False], ids=["mom", "nomom"])
def test_chunked_matches_naive(momentum, dgd, objective, memory_target, adaptive, C):
    """The full flag product; the batch carries the mask kinds (none / random holes / right padding)."""
    T = 19  # no multiple of any chunk size here
    g = _gen("naive", momentum, dgd, objective, memory_target, adaptive, C)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=3, T=T)
    mask = mixed_mask(g, T)
    kw = flags(momentum, dgd, objective, memory_target, ADAPTIVE_CASES[adaptive], C)
    o_ref, st_ref = titans_memory_naive(q, a, z0, b_eta, b_alpha, mlog, mask=mask, output_final_state=True, **kw)
    o, st = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, mask=mask, output_final_state=True, **kw)
    assert o.shape == q.shape and o.dtype == F64
    assert_close_rel(o, o_ref, 1e-10, "o")
    assert_states_close(st, st_ref, 1e-10)
    assert st.position == T
    if not momentum:
        assert torch.count_nonzero(st.s) == 0, "without momentum S stays zero"
    # B = 1 and mask=None: the all-valid first sequence alone gives the first row of the batched oracle.
    o1, st1 = titans_memory_reference(q[:1], a[:1], z0, b_eta, b_alpha, mlog, output_final_state=True, **kw)
    assert_close_rel(o1, o_ref[:1], 1e-10, "B=1 o")
    for name in ("z_chunk", "z", "s"):
        assert_close_rel(getattr(st1, name), getattr(st_ref, name)[:1], 1e-10, f"B=1 {name}")
    # Sanity: the main memory moved, so the comparison is not between two copies of z0.
    d = z0.shape[-1]
    assert (st_ref.z[:, :, :d] - z0[None, :, :d]).abs().max() > 1e-3


@pytest.mark.parametrize("C", [1, 3, 4, 7])
@pytest.mark.parametrize("position", [0, 5, 6, 8])
def test_chunked_matches_naive_from_state(C, position):
    """Continue from an arbitrary cached state, including one that starts mid-chunk (position % C != 0)."""
    g = _gen("naive_state", C, position)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=13)
    state = make_state(g, 2, 2, 4, position)
    mask = make_mask("random", g, 2, 13)
    kw = flags(chunk_size=C)
    o_ref, st_ref = titans_memory_naive(q, a, z0, b_eta, b_alpha, mlog, mask=mask, state=state, output_final_state=True, **kw)
    o, st = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, mask=mask, state=state, output_final_state=True, **kw)
    assert_close_rel(o, o_ref, 1e-10, "o")
    assert_states_close(st, st_ref, 1e-10)
    assert st.position == position + 13


# ------------------------------------------------------------------------------------------- 2. gradients

GRAD_CASES = [
    dict(name="default", kw=flags(), mask="none", state=None),
    dict(name="value_dot", kw=flags(objective="dot", memory_target="value"), mask="none", state=None),
    dict(name="value_l2_right", kw=flags(memory_target="value", chunk_size=5), mask="right", state=None),
    dict(name="nomom_gd_random", kw=flags(momentum=False, dgd=False, chunk_size=3), mask="random", state=None),
    dict(name="nomom_dgd_eta", kw=flags(momentum=False, adaptive=("eta",)), mask="random", state=None),
    dict(name="state_midchunk", kw=flags(chunk_size=4), mask="none", state=6),
    dict(name="state_midchunk_value_dot_mask", kw=flags(objective="dot", memory_target="value", chunk_size=4),
         mask="random", state=5),
    dict(name="state_nomom_noadapt", kw=flags(momentum=False, adaptive=(), chunk_size=3), mask="right", state=7),
    dict(name="state_c1", kw=flags(chunk_size=1), mask="random", state=3),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c["name"] for c in GRAD_CASES])
def test_gradients_match_naive(case):
    B, T, H, d = 2, 11, 2, 4
    g = _gen("grad", case["name"])
    inputs = [t.requires_grad_() for t in make_inputs(g, B=B, T=T, H=H, d=d)]
    mask = make_mask(case["mask"], g, B, T)
    leaves = list(inputs)
    state = None
    if case["state"] is not None:
        st = make_state(g, B, H, d, case["state"])
        state = TitansState(*(t.requires_grad_() for t in st[:3]), st.position)
        leaves += list(state[:3])
    R = memory_rows(d)
    w_o = torch.randn(B, T, H, d, generator=g, dtype=F64)
    w_st = [torch.randn(B, H, R, d, generator=g, dtype=F64) for _ in range(3)]

    def grads(fn):
        o, st = fn(*inputs, mask=mask, state=state, output_final_state=True, **case["kw"])
        loss = (w_o * o).sum() + sum((w * t).sum() for w, t in zip(w_st, st[:3]))
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, gs)]

    g_ref = grads(titans_memory_naive)
    g_chk = grads(titans_memory_reference)
    names = ["q", "a", "z0", "b_eta", "b_alpha", "momentum_logit", "state.z_chunk", "state.z", "state.s"]
    for name, x, y in zip(names, g_chk, g_ref):
        assert_close_rel(x, y, 1e-9, f"grad {name}")
    # The gradients are real: q, a and the biases all influence the loss.
    for name, gr in zip(names, g_ref):
        if name in ("q", "a", "b_eta", "b_alpha") or (name == "momentum_logit" and case["kw"]["momentum"]):
            assert gr.abs().max() > 0, f"grad {name} is zero"
        if name == "momentum_logit" and not case["kw"]["momentum"]:
            assert gr.abs().max() == 0
    if state is None:
        assert g_ref[2].abs().max() > 0, "grad z0 is zero"


# ------------------------------------------------------------------------------------------ 3. gradcheck


@pytest.mark.parametrize("momentum", [True, False], ids=["mom", "nomom"])
def test_gradcheck(momentum):
    """Full finite-difference Jacobian w.r.t. all six inputs (outputs, plus one projection of the states)."""
    g = _gen("gradcheck", momentum)
    inputs = tuple(t.requires_grad_() for t in make_inputs(g, B=2, T=5, H=1, d=2))
    kw = flags(momentum=momentum, chunk_size=2)
    w = [torch.randn(2, 1, memory_rows(2), 2, generator=g, dtype=F64) for _ in range(3)]

    def fn(*xs):
        o, st = titans_memory_reference(*xs, output_final_state=True, **kw)
        return o, sum((wi * t).sum() for wi, t in zip(w, st[:3]))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, check_undefined_grad=False)


@pytest.mark.parametrize("momentum", [True, False], ids=["mom", "nomom"])
def test_gradcheck_fast_all_outputs(momentum):
    """Random-projection gradcheck of outputs and full final states: dot objective, value target, a mask."""
    g = _gen("gradcheck_fast", momentum)
    inputs = tuple(t.requires_grad_() for t in make_inputs(g, B=2, T=5, H=1, d=2))
    kw = flags(momentum=momentum, objective="dot", memory_target="value", chunk_size=2)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0]], dtype=F64)

    def fn(*xs):
        o, st = titans_memory_reference(*xs, mask=mask, output_final_state=True, **kw)
        return o, st.z_chunk, st.z, st.s

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_state_inputs():
    """Gradients w.r.t. a mid-chunk initial state (position 3, chunk 2)."""
    g = _gen("gradcheck_state")
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=1, T=4, H=1, d=2)
    st = make_state(g, 1, 1, 2, position=3)
    leaves = tuple(t.clone().requires_grad_() for t in (q, a, st.z_chunk, st.z, st.s, mlog))

    def fn(q, a, zc, z, s, mlog):
        o, fin = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, state=TitansState(zc, z, s, 3),
                                         output_final_state=True, **flags(chunk_size=2))
        return o, fin.z_chunk, fin.z, fin.s

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ------------------------------------------------------------------------------------------ 4. splitting


@pytest.mark.parametrize("C", [1, 4, 5])
@pytest.mark.parametrize("T1", [0, 3, 8, 10, 19])
@pytest.mark.parametrize("variant", ["default", "nomom_value_dot_mask"])
def test_split_equals_one_run(C, T1, variant):
    T = 19
    g = _gen("split", C, T1, variant)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=T)
    if variant == "default":
        kw, mask = flags(chunk_size=C), None
    else:
        kw = flags(momentum=False, objective="dot", memory_target="value", adaptive=("k", "alpha"), chunk_size=C)
        mask = make_mask("random", g, 2, T)
    o_full, st_full = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, mask=mask, output_final_state=True, **kw)
    m1 = m2 = None
    if mask is not None:
        m1, m2 = mask[:, :T1], mask[:, T1:]
    o1, st1 = titans_memory_reference(q[:, :T1], a[:, :T1], z0, b_eta, b_alpha, mlog, mask=m1,
                                      output_final_state=True, **kw)
    assert st1.position == T1
    o2, st2 = titans_memory_reference(q[:, T1:], a[:, T1:], z0, b_eta, b_alpha, mlog, mask=m2, state=st1,
                                      output_final_state=True, **kw)
    assert o1.shape == (2, T1, 2, 4) and o2.shape == (2, T - T1, 2, 4)
    assert_close_rel(torch.cat([o1, o2], dim=1), o_full, 1e-10, "o")
    assert_states_close(st2, st_full, 1e-10)
    # The intermediate state also matches the prefix of the naive recurrence.
    if T1 > 0:
        _, st_naive = titans_memory_naive(q[:, :T1], a[:, :T1], z0, b_eta, b_alpha, mlog, mask=m1,
                                          output_final_state=True, **kw)
        assert_states_close(st1, st_naive, 1e-10, "prefix")
    else:  # zero tokens: no output, and the state is z0 at position 0
        assert torch.equal(st1.z, z0.expand_as(st1.z)) and torch.equal(st1.z_chunk, st1.z)
        assert torch.count_nonzero(st1.s) == 0


def test_three_way_split_with_state():
    g = _gen("split3")
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=17)
    state = make_state(g, 2, 2, 4, position=2)
    kw = flags(chunk_size=4, memory_target="value")
    o_full, st_full = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, state=state, output_final_state=True, **kw)
    outs, st = [], state
    for lo, hi in ((0, 1), (1, 7), (7, 17)):
        o, st = titans_memory_reference(q[:, lo:hi], a[:, lo:hi], z0, b_eta, b_alpha, mlog, state=st,
                                        output_final_state=True, **kw)
        outs.append(o)
    assert_close_rel(torch.cat(outs, 1), o_full, 1e-10, "o")
    assert_states_close(st, st_full, 1e-10)


# --------------------------------------------------------------------------------------------- 5. decode


@pytest.mark.parametrize("C", [1, 4, 6])
@pytest.mark.parametrize("prefix", [0, 5, 8])
@pytest.mark.parametrize("variant", ["default", "value_nomom_mask"])
def test_decode_matches_chunked(C, prefix, variant):
    T = 15
    g = _gen("decode", C, prefix, variant)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=T)
    if variant == "default":
        kw, mask = flags(chunk_size=C), None
    else:
        kw = flags(chunk_size=C, momentum=False, memory_target="value", adaptive=("v", "eta"))
        mask = make_mask("random", g, 2, T)
    o_full, st_full = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, mask=mask, output_final_state=True, **kw)
    state = None
    if prefix:
        o_pre, state = titans_memory(q[:, :prefix], a[:, :prefix], z0, b_eta, b_alpha, mlog, backend="torch",
                                     mask=None if mask is None else mask[:, :prefix], output_final_state=True, **kw)
        assert_close_rel(o_pre, o_full[:, :prefix], 1e-10, "prefix o")
    for t in range(prefix, T):
        o_t, state = titans_memory_step(q[:, t], a[:, t], z0, b_eta, b_alpha, mlog, backend="torch",
                                        mask=None if mask is None else mask[:, t], state=state, **kw)
        assert o_t.shape == (2, 2, 4)
        assert_close_rel(o_t, o_full[:, t], 1e-10, f"o[{t}]")
        assert state.position == t + 1
    assert_states_close(state, st_full, 1e-10)


# ---------------------------------------------------------------------------------------------- 6. masks


@pytest.mark.parametrize("C", [1, 4, 6])
@pytest.mark.parametrize("momentum", [True, False], ids=["mom", "nomom"])
@pytest.mark.parametrize("memory_target", ["self", "value"])
def test_right_padding_equals_unpadded(C, momentum, memory_target):
    T = 17
    g = _gen("rightpad", C, momentum, memory_target)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=3, T=T)
    lengths = [T, 9, 4]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)
    kw = flags(chunk_size=C, momentum=momentum, memory_target=memory_target)
    o, st = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, mask=mask, output_final_state=True, **kw)
    for b, L in enumerate(lengths):
        o_b, st_b = titans_memory_reference(q[b : b + 1, :L], a[b : b + 1, :L], z0, b_eta, b_alpha, mlog,
                                            output_final_state=True, **kw)
        assert_close_rel(o[b : b + 1, :L], o_b, 1e-10, f"row {b} valid outputs")
        # Padding changes no state: the memory and momentum after the padded run are the unpadded ones.
        assert_close_rel(st.z[b : b + 1], st_b.z, 1e-10, f"row {b} z")
        assert_close_rel(st.s[b : b + 1], st_b.s, 1e-10, f"row {b} s")
        # Reads at padded positions use the (frozen) memory: o_t = M q_t.
        if L < T:
            m = st_b.z[0, :, :4]  # (H, d, d)
            expect = torch.einsum("hed,thd->the", m, q[b, L:])
            assert_close_rel(o[b, L:], expect, 1e-10, f"row {b} padded reads")


@pytest.mark.parametrize("C", [1, 3, 4])
@pytest.mark.parametrize("T1", [4, 5, 8])
@pytest.mark.parametrize("momentum", [True, False], ids=["mom", "nomom"])
def test_masked_tail_leaves_state_exactly(C, T1, momentum):
    g = _gen("tail", C, T1, momentum)
    T2 = 6
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=T1 + T2)
    kw = flags(chunk_size=C, momentum=momentum)
    _, st1 = titans_memory_reference(q[:, :T1], a[:, :T1], z0, b_eta, b_alpha, mlog, output_final_state=True, **kw)
    zeros = torch.zeros(2, T2, dtype=F64)
    for fn in (titans_memory_reference, titans_memory_naive):
        o2, st2 = fn(q[:, T1:], a[:, T1:], z0, b_eta, b_alpha, mlog, mask=zeros, state=st1, output_final_state=True, **kw)
        assert torch.equal(st2.z, st1.z), fn.__name__
        assert torch.equal(st2.s, st1.s), fn.__name__
        assert st2.position == T1 + T2
        crossed = (T1 % C) + T2 >= C  # a chunk boundary lies inside the tail
        if crossed:
            assert torch.equal(st2.z_chunk, st1.z), fn.__name__
        else:
            assert torch.equal(st2.z_chunk, st1.z_chunk), fn.__name__
        expect = torch.einsum("bhed,bthd->bthe", st1.z[:, :, :4], q[:, T1:])
        assert_close_rel(o2, expect, 1e-12, f"{fn.__name__} reads of the masked tail")
    # One run with the masked tail inside it agrees (up to rounding) with the prefix state.
    mask = torch.cat([torch.ones(2, T1, dtype=F64), zeros], 1)
    _, st = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, mask=mask, output_final_state=True, **kw)
    assert_close_rel(st.z, st1.z, 1e-12, "z")
    assert_close_rel(st.s, st1.s, 1e-12, "s")


@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("position", [5, 6, 7])
@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.bool, torch.long])
def test_masked_token_changes_no_state(C, position, mask_dtype):
    """A masked token in the middle of a sequence: the state after it is the state before it."""
    g = _gen("midmask", C, position, mask_dtype)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=position + 1)
    kw = flags(chunk_size=C)
    _, before = titans_memory_naive(q[:, :position], a[:, :position], z0, b_eta, b_alpha, mlog,
                                    output_final_state=True, **kw)
    assert before.position == position
    tok_mask = torch.tensor([0, 1]).to(mask_dtype)  # row 0 masked, row 1 valid
    boundary = (position + 1) % C == 0
    for fn in (titans_memory_step_reference, titans_memory_step):
        _, after = fn(q[:, position], a[:, position], z0, b_eta, b_alpha, mlog, mask=tok_mask, state=before, **kw)
        assert after.position == position + 1
        assert torch.equal(after.z[0], before.z[0])
        assert torch.equal(after.s[0], before.s[0])
        assert torch.equal(after.z_chunk[0], before.z[0] if boundary else before.z_chunk[0])
        # The valid row did learn.
        assert not torch.allclose(after.z[1], before.z[1])
        assert not torch.allclose(after.s[1], before.s[1])
    # The chunked form of that single token agrees exactly on the masked row.
    seq_mask = tok_mask[:, None]
    _, after_c = titans_memory_reference(q[:, position : position + 1], a[:, position : position + 1], z0, b_eta,
                                         b_alpha, mlog, mask=seq_mask, state=before, output_final_state=True, **kw)
    assert torch.equal(after_c.z[0], before.z[0])
    assert torch.equal(after_c.s[0], before.s[0])
    assert_states_close(after_c, after, 1e-12)


def test_masked_positions_do_not_leak_inputs():
    """Whatever q/a hold at masked positions, no state and no other output depends on them."""
    g = _gen("maskleak")
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=13)
    mask = make_mask("random", g, 2, 13)
    kw = flags(chunk_size=4)
    o, st = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, mask=mask, output_final_state=True, **kw)
    hole = mask == 0
    a2 = torch.where(hole[..., None, None], 5 * torch.randn(a.shape, generator=g, dtype=F64), a)
    q2 = torch.where(hole[..., None, None], F.normalize(torch.randn(q.shape, generator=g, dtype=F64), dim=-1), q)
    o2, st2 = titans_memory_reference(q2, a2, z0, b_eta, b_alpha, mlog, mask=mask, output_final_state=True, **kw)
    keep = ~hole
    assert_close_rel(o2[keep], o[keep], 1e-12, "valid outputs")
    assert_states_close(st2, st, 1e-12)


# ------------------------------------------------------------------------------------------ 7. causality


@pytest.mark.parametrize("C", [1, 4, 16])
@pytest.mark.parametrize("t", [0, 5, 10])
def test_causality(C, t):
    T = 19
    g = _gen("causal", C, t)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=T)
    kw = flags(chunk_size=C, memory_target="value")
    o, _ = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, **kw)
    q2, a2 = q.clone(), a.clone()
    q2[:, t + 1 :] = F.normalize(torch.randn(q2[:, t + 1 :].shape, generator=g, dtype=F64), dim=-1)
    a2[:, t + 1 :] += torch.randn(a2[:, t + 1 :].shape, generator=g, dtype=F64)
    o2, _ = titans_memory_reference(q2, a2, z0, b_eta, b_alpha, mlog, **kw)
    assert (o2[:, : t + 1] - o[:, : t + 1]).abs().max() <= 1e-13 * o.abs().max()
    assert (o2[:, t + 1 :] - o[:, t + 1 :]).abs().max() > 1e-3, "the perturbation must change later outputs"
    # Through autograd: no gradient flows from o_t to any later input.
    qg, ag = q.clone().requires_grad_(), a.clone().requires_grad_()
    o3, _ = titans_memory_reference(qg, ag, z0, b_eta, b_alpha, mlog, **kw)
    gq, ga = torch.autograd.grad(o3[:, : t + 1].sum(), (qg, ag))
    assert gq[:, t + 1 :].abs().max() == 0 and ga[:, t + 1 :].abs().max() == 0
    assert ga[:, : t + 1].abs().max() > 0


# ---------------------------------------------------------------------------------------- 8. adaptive rows


@pytest.mark.parametrize("adaptive", [(), ("k",), ("v",), ("eta",), ("alpha",), ("k", "alpha"), ALL],
                         ids=lambda x: "-".join(x) or "none")
@pytest.mark.parametrize("C", [1, 4])
def test_adaptive_rows(adaptive, C):
    d = 4
    g = _gen("rows", adaptive, C)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=11, d=d)
    kw = flags(chunk_size=C, adaptive=adaptive)
    _, st = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, output_final_state=True, **kw)
    groups = {"M": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d),
              "eta": slice(3 * d, 3 * d + 1), "alpha": slice(3 * d + 1, 3 * d + 2)}
    for name, rows in groups.items():
        z0_rows = z0[None, :, rows].expand_as(st.z[:, :, rows])
        if name == "M" or name in adaptive:
            assert (st.z[:, :, rows] - z0_rows).abs().max() > 1e-3, f"{name} rows should learn"
            assert st.s[:, :, rows].abs().max() > 0
        else:
            assert torch.equal(st.z[:, :, rows], z0_rows), f"{name} rows must stay z0"
            assert torch.equal(st.z_chunk[:, :, rows], z0_rows), f"{name} chunk rows must stay z0"
            assert torch.count_nonzero(st.s[:, :, rows]) == 0, f"{name} momentum rows must stay 0"


# -------------------------------------------------------------------------- 9. C = 1 is the plain online rule


def online_rule(q, a, z0, b_eta, b_alpha, mlog, *, momentum, dgd, objective, memory_target, mask=None):
    """Eq. 88 with momentum for the main memory M, written independently; k, v, eta, alpha from z0.

    X_t = X_{t-1}(alpha_t I - eps eta_t k_t k_tᵀ) + S_t,  S_t = beta S_{t-1} - eta_t g_t,
    g_t = (X_{t-1} k_t - target_t) k_tᵀ (l2) or -target_t k_tᵀ (dot), target = X_{t-1} v_t (self) or v_t (value).
    """
    B, T, H, d = q.shape
    eps = 1.0 if dgd else 0.0
    beta = torch.sigmoid(mlog)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            Mk, Mv = z0[h, d : 2 * d], z0[h, 2 * d : 3 * d]
            m_eta, m_alpha = z0[h, 3 * d], z0[h, 3 * d + 1]
            X = z0[h, :d].clone()
            S = torch.zeros(d, d, dtype=q.dtype)
            eye = torch.eye(d, dtype=q.dtype)
            for t in range(T):
                x_t, qt = a[b, t, h], q[b, t, h]
                if mask is None or mask[b, t] != 0:
                    k = Mk @ x_t
                    k = k / k.norm()
                    v = Mv @ x_t
                    eta = ETA_MAX * torch.sigmoid(m_eta @ x_t + b_eta[h])
                    alpha = torch.sigmoid(m_alpha @ x_t + b_alpha[h])
                    target = X @ v if memory_target == "self" else v
                    err = X @ k - target if objective == "l2" else -target
                    grad = torch.outer(err, k)
                    if momentum:
                        S = beta[h] * S - eta * grad
                        X = X @ (alpha * eye - eps * eta * torch.outer(k, k)) + S
                    else:
                        X = X @ (alpha * eye - eps * eta * torch.outer(k, k)) - eta * grad
                out[b, t, h] = X @ qt
    return out


@pytest.mark.parametrize("memory_target", ["self", "value"])
@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("dgd", [True, False], ids=["dgd", "gd"])
@pytest.mark.parametrize("momentum", [True, False], ids=["mom", "nomom"])
def test_c1_is_online_rule(momentum, dgd, objective, memory_target):
    g = _gen("online", momentum, dgd, objective, memory_target)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=9, H=2, d=3)
    mask = make_mask("random", g, 2, 9)
    rule = dict(momentum=momentum, dgd=dgd, objective=objective, memory_target=memory_target)
    expect = online_rule(q, a, z0, b_eta, b_alpha, mlog, mask=mask, **rule)
    o, _ = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, chunk_size=1, eta_max=ETA_MAX, adaptive=(),
                                   mask=mask, **rule)
    assert_close_rel(o, expect, 1e-12, "C=1 vs online rule")
    # At C > 1 the chunk-start approximation differs from the online rule (the test above is not vacuous),
    # except for dot + value target + plain GD, whose update -eta v kᵀ does not read the memory at all.
    o4, _ = titans_memory_reference(q, a, z0, b_eta, b_alpha, mlog, chunk_size=4, eta_max=ETA_MAX, adaptive=(),
                                    mask=mask, **rule)
    if objective == "dot" and memory_target == "value" and not dgd:
        assert_close_rel(o4, expect, 1e-12, "state-free update is chunk-size independent")
    else:
        assert rel_err(o4, expect) > 1e-6


# ---------------------------------------------------------------------------------------------- 10. dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_dtypes(dtype):
    g = _gen("dtype", str(dtype))
    inputs = make_inputs(g, B=2, T=13, dtype=dtype)
    kw = flags(chunk_size=4)
    o, st = titans_memory_reference(*inputs, output_final_state=True, **kw)
    assert o.dtype == dtype
    for name in ("z_chunk", "z", "s"):
        assert getattr(st, name).dtype == torch.float32, name
    # The same values in float64: states are accumulated in fp32, the output is rounded once to `dtype`.
    o64, st64 = titans_memory_reference(*(t.to(F64) for t in inputs), output_final_state=True, **kw)
    if dtype == torch.float32:
        assert_close_rel(o, o64, 1e-5, "fp32 o")
        assert_states_close(st, st64, 1e-5, "fp32")
    else:
        # Only the final rounding to bf16 (8 mantissa bits) separates o from the float64 result.
        err = (o.to(F64) - o64).abs()
        assert (err <= 2.0 ** -8 * o64.abs() + 1e-6).all(), err.max()
        assert_states_close(st, st64, 1e-5, "bf16-input")
    # Continuing from an fp32 state with low-precision activations works and keeps the dtypes.
    o2, st2 = titans_memory_reference(*inputs, state=st, output_final_state=True, **kw)
    assert o2.dtype == dtype and st2.z.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn", [titans_memory_step_reference, titans_memory_step], ids=["reference", "dispatch"])
def test_step_low_precision_dtypes(dtype, fn):
    """The decode step: o in q.dtype (its docstring), states in fp32, o equal to the chunked read."""
    g = _gen("step_dtype", str(dtype))
    q, a, *params = make_inputs(g, B=2, T=6, dtype=dtype)
    kw = flags(chunk_size=4)
    o_full, _ = titans_memory_reference(q, a, *params, **kw)
    _, st = titans_memory_reference(q[:, :5], a[:, :5], *params, output_final_state=True, **kw)
    o_s, st_s = fn(q[:, 5], a[:, 5], *params, state=st, **kw)
    for name in ("z_chunk", "z", "s"):
        assert getattr(st_s, name).dtype == torch.float32, name
    assert o_s.dtype == dtype
    assert_close_rel(o_s.float(), o_full[:, 5].float(), 1e-6 if dtype == torch.float32 else 1e-2, "step o")


# ------------------------------------------------------------------------------------------ 11. bad input


def _bad_cases():
    B, T, H, d = 2, 5, 2, 4
    R = memory_rows(d)
    g = torch.Generator().manual_seed(0)
    base = dict(zip(("q", "a", "z0", "b_eta", "b_alpha", "momentum_logit"), make_inputs(g, B, T, H, d)))
    good_state = TitansState(*(torch.zeros(B, H, R, d, dtype=F64) for _ in range(3)), 0)
    cases = [
        ("q_3d", dict(q=base["q"][0]), {}, r"\bq\b"),
        ("a_shape", dict(a=base["a"][:, :3]), {}, r"\ba\b"),
        ("z0_shape", dict(z0=base["z0"][:, :-1]), {}, "z0"),
        ("z0_heads", dict(z0=base["z0"][:1]), {}, "z0"),
        ("b_eta_shape", dict(b_eta=base["b_eta"][:1]), {}, "b_eta"),
        ("b_alpha_shape", dict(b_alpha=base["b_alpha"][None]), {}, "b_alpha"),
        ("momentum_logit_shape", dict(momentum_logit=torch.zeros(3, dtype=F64)), {}, "momentum_logit"),
        ("chunk_size_0", {}, dict(chunk_size=0), "chunk_size"),
        ("chunk_size_neg", {}, dict(chunk_size=-2), "chunk_size"),
        ("objective", {}, dict(objective="l1"), "objective"),
        ("memory_target", {}, dict(memory_target="key"), "memory_target"),
        ("adaptive", {}, dict(adaptive=("k", "q")), "adaptive"),
        ("mask_shape", {}, dict(mask=torch.ones(B, T + 1)), "mask"),
        ("mask_1d", {}, dict(mask=torch.ones(T)), "mask"),
        ("state_z_shape", {}, dict(state=good_state._replace(z=torch.zeros(B, H, R, d + 1, dtype=F64))), r"state\.z\b"),
        ("state_s_batch", {}, dict(state=good_state._replace(s=torch.zeros(B + 1, H, R, d, dtype=F64))), r"state\.s\b"),
        ("state_z_chunk", {}, dict(state=good_state._replace(z_chunk=torch.zeros(B, H, R - 1, d, dtype=F64))), "state.z_chunk"),
        ("state_position", {}, dict(state=good_state._replace(position=-1)), "position"),
        ("eta_max", {}, dict(eta_max=0.0), "eta_max"),
    ]
    return base, cases


_BASE, _BAD = _bad_cases()
_FNS = {"reference": titans_memory_reference, "naive": titans_memory_naive, "dispatch": titans_memory}
# The naive oracle slices tokens before its step checks them, so token-axis shape errors are not its job.
_BAD_CALLS = [(case, fn) for case in _BAD for fn in _FNS
              if not (fn == "naive" and case[0] in ("q_3d", "a_shape", "mask_1d", "mask_shape"))]


@pytest.mark.parametrize("case,fn", _BAD_CALLS, ids=[f"{c[0]}-{f}" for c, f in _BAD_CALLS])
def test_bad_input_raises(case, fn):
    _, over_inputs, over_kw, pattern = case
    inputs = dict(_BASE, **over_inputs)
    kw = dict(flags(chunk_size=2), **over_kw)
    with pytest.raises(ValueError, match=pattern):
        _FNS[fn](*inputs.values(), **kw)


@pytest.mark.parametrize("which", ["q_4d", "a_shape", "mask_shape", "state_shape", "z0_shape"])
def test_step_bad_input_raises(which):
    B, H, d = 2, 2, 4
    g = _gen("stepbad", which)
    q, a, z0, b_eta, b_alpha, mlog = make_inputs(g, B=B, T=1, H=H, d=d)
    q, a = q[:, 0], a[:, 0]
    kw = flags(chunk_size=2)
    pattern = {"q_4d": r"\bq\b", "a_shape": r"\ba\b", "mask_shape": "mask", "state_shape": "state", "z0_shape": "z0"}[which]
    if which == "q_4d":
        q, a = q[:, None], a[:, None]
    elif which == "a_shape":
        a = a[:, :, :3]
    elif which == "mask_shape":
        kw["mask"] = torch.ones(B, 3)
    elif which == "state_shape":
        R = memory_rows(d)
        kw["state"] = TitansState(*(torch.zeros(B, H, R, d + 1, dtype=F64) for _ in range(3)), 0)
    else:
        z0 = z0[:, :, :3]
    for fn in (titans_memory_step_reference, titans_memory_step):
        with pytest.raises(ValueError, match=pattern):
            fn(q, a, z0, b_eta, b_alpha, mlog, **kw)


# ------------------------------------------------------------------------------------------ 12. dispatcher


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_dispatcher_torch_equals_reference(backend):
    g = _gen("dispatch", backend)
    inputs = make_inputs(g, B=2, T=9)
    mask = make_mask("random", g, 2, 9)
    kw = flags(chunk_size=4, memory_target="value")
    o_ref, st_ref = titans_memory_reference(*inputs, mask=mask, output_final_state=True, **kw)
    o, st = titans_memory(*inputs, mask=mask, output_final_state=True, backend=backend, **kw)
    assert torch.equal(o, o_ref)
    for name in ("z_chunk", "z", "s"):
        assert torch.equal(getattr(st, name), getattr(st_ref, name))
    o_s, st_s = titans_memory_step(inputs[0][:, 0], inputs[1][:, 0], *inputs[2:], mask=mask[:, 0], backend=backend, **kw)
    o_sr, st_sr = titans_memory_step_reference(inputs[0][:, 0], inputs[1][:, 0], *inputs[2:], mask=mask[:, 0], **kw)
    assert torch.equal(o_s, o_sr) and torch.equal(st_s.z, st_sr.z)
    _, none_state = titans_memory(*inputs, backend=backend, **kw)
    assert none_state is None


def test_dispatcher_triton_runs_the_kernels():
    """backend="triton" reaches the Triton kernels (Triton's interpreter on CPU), which take fp32, not float64."""
    assert HAS_TRITON and titans_pkg.HAS_TRITON
    g = _gen("dispatch_triton")
    inputs = make_inputs(g, B=1, T=5)
    kw = flags(chunk_size=2)
    o_ref, _ = titans_memory_reference(*inputs, **kw)
    o, _ = titans_memory(*(t.float() for t in inputs), backend="triton", **kw)
    assert (o.double() - o_ref).norm() / o_ref.norm() < 1e-4
    o_s, _ = titans_memory_step(*(t.float() for t in (inputs[0][:, 0], inputs[1][:, 0], *inputs[2:])), backend="triton", **kw)
    assert (o_s.double() - o_ref[:, 0]).norm() / o_ref[:, 0].norm() < 1e-4


def test_dispatcher_unknown_backend():
    g = _gen("dispatch_unknown")
    inputs = make_inputs(g, B=1, T=3)
    kw = flags(chunk_size=2)
    with pytest.raises(ValueError, match="cuda|backend"):
        titans_memory(*inputs, backend="cuda", **kw)
    with pytest.raises(ValueError, match="backend"):
        titans_memory_step(inputs[0][:, 0], inputs[1][:, 0], *inputs[2:], backend="tpu", **kw)
