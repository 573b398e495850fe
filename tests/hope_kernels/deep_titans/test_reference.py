"""Tests of the PyTorch reference of the deep Titans memory (SPEC §2 "Deep memory", Eq. 91, memory_depth=2).

The chunked closed form `titans_deep_memory_reference` (TTT-MLP dual form) is checked against the token-by-token
oracle `titans_deep_memory_naive`, which builds every per-token state and takes the inner gradients with
torch.autograd; the decode step against both. Everything runs in float64 on tiny shapes and fresh random inputs.
"""
from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from hope_kernels.deep_titans import (
    DeepTitansState,
    adaptive_rows,
    titans_deep_memory,
    titans_deep_memory_naive,
    titans_deep_memory_reference,
    titans_deep_memory_step,
    titans_deep_memory_step_reference,
)
from hope_kernels.titans import memory_rows, titans_memory_reference

F64 = torch.float64
ETA_MAX = 0.5
ALL = ("k", "v", "eta", "alpha")
TOL = 1e-10


def _gen(*params) -> torch.Generator:
    """A generator seeded from the test parameters: reproducible, different across cases."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def make_inputs(g, B=3, T=10, H=2, d=4, h=6, dtype=F64):
    """q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit. Small a keeps the self-target memories bounded."""
    q = F.normalize(torch.randn(B, T, H, d, generator=g, dtype=F64), dim=-1)
    a = 0.25 * torch.randn(B, T, H, d, generator=g, dtype=F64)
    w1 = 0.5 * torch.randn(H, d, h, generator=g, dtype=F64) / math.sqrt(h)
    w2 = torch.randn(H, h, d, generator=g, dtype=F64)  # q is unit-norm: unit-scale pre-activations
    z0 = torch.randn(H, adaptive_rows(d), d, generator=g, dtype=F64) / math.sqrt(d)
    b_eta = 0.5 * torch.randn(H, generator=g, dtype=F64)
    b_alpha = 3.0 + 0.3 * torch.randn(H, generator=g, dtype=F64)  # alpha around 0.95
    momentum_logit = 1.0 + 0.5 * torch.randn(H, generator=g, dtype=F64)  # beta around 0.7
    return [t.to(dtype) for t in (q, a, w1, w2, z0, b_eta, b_alpha, momentum_logit)]


def make_mask(kind, g, B, T):
    if kind == "none":
        return None
    m = (torch.rand(B, T, generator=g, dtype=F64) > 0.3).to(F64)
    m[0, 1], m[0, 0] = 0.0, 1.0  # at least one hole, early
    if kind == "right_pad":
        m = torch.ones(B, T, dtype=F64)
        m[-1, T // 2 :] = 0.0
    return m


def flags(**overrides):
    kw = dict(chunk_size=4, eta_max=ETA_MAX, momentum=True, dgd=True, objective="l2", memory_target="self",
              adaptive=ALL)
    kw.update(overrides)
    return kw


def assert_close(x, y, what, tol=TOL):
    err = (x - y).abs().max().item()
    scale = max(y.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max |diff| {err:.3e} (scale {scale:.3e})"


def assert_states_close(s1: DeepTitansState, s2: DeepTitansState, tol=TOL):
    assert s1.position == s2.position
    for name in DeepTitansState._fields[:9]:
        assert_close(getattr(s1, name), getattr(s2, name), f"state.{name}", tol)


# --------------------------------------------------------------------------- 1. chunked == token-by-token oracle

FLAG_GRID = list(itertools.product([True, False], [True, False], ["l2", "dot"], ["self", "value"]))


@pytest.mark.parametrize("momentum,dgd,objective,target", FLAG_GRID)
@pytest.mark.parametrize("chunk_size,mask_kind", [(4, "none"), (3, "random"), (1, "random")])
def test_chunked_equals_naive(momentum, dgd, objective, target, chunk_size, mask_kind):
    g = _gen("flags", momentum, dgd, objective, target, chunk_size, mask_kind)
    inputs = make_inputs(g)  # T = 10: no multiple of 4 or 3
    kw = flags(chunk_size=chunk_size, momentum=momentum, dgd=dgd, objective=objective, memory_target=target,
               mask=make_mask(mask_kind, g, 3, 10), output_final_state=True)
    o, st = titans_deep_memory_reference(*inputs, **kw)
    o_ref, st_ref = titans_deep_memory_naive(*inputs, **kw)
    assert_close(o, o_ref, "o")
    assert_states_close(st, st_ref)
    # The memory really learned: the reads differ from those of the frozen initial memory.
    frozen = inputs[0] + (inputs[2] @ F.silu(inputs[3] @ inputs[0].unsqueeze(-1))).squeeze(-1)
    assert (o - frozen).abs().max() > 1e-3


@pytest.mark.parametrize("adaptive", [(), ("k",), ("v", "alpha"), ("eta",), ("k", "v", "eta")])
def test_adaptive_subsets(adaptive):
    g = _gen("adaptive", adaptive)
    inputs = make_inputs(g)
    kw = flags(adaptive=adaptive, mask=make_mask("random", g, 3, 10), output_final_state=True)
    o, st = titans_deep_memory_reference(*inputs, **kw)
    o_ref, st_ref = titans_deep_memory_naive(*inputs, **kw)
    assert_close(o, o_ref, "o")
    assert_states_close(st, st_ref)
    d = inputs[0].shape[-1]
    blocks = {"k": slice(0, d), "v": slice(d, 2 * d), "eta": slice(2 * d, 2 * d + 1),
              "alpha": slice(2 * d + 1, 2 * d + 2)}
    for name, rows in blocks.items():
        moved = (st.z[:, :, rows] - inputs[4][:, rows]).abs().max().item()
        assert (moved > 1e-6) == (name in adaptive), f"{name}: moved {moved}"


@pytest.mark.parametrize("B", [1, 3])
def test_batch_sizes_and_long_sequence(B):
    g = _gen("batch", B)
    inputs = make_inputs(g, B=B, T=17, h=3)  # h != d
    kw = flags(chunk_size=5, mask=make_mask("right_pad", g, B, 17), output_final_state=True)
    o, st = titans_deep_memory_reference(*inputs, **kw)
    o_ref, st_ref = titans_deep_memory_naive(*inputs, **kw)
    assert_close(o, o_ref, "o")
    assert_states_close(st, st_ref)
    # Batch rows are independent: row 0 alone gives row 0 of the batch.
    o0, _ = titans_deep_memory_reference(inputs[0][:1], inputs[1][:1], *inputs[2:], **dict(kw, mask=kw["mask"][:1]))
    assert_close(o0, o[:1], "row 0 alone")


def test_padded_positions_change_no_state():
    """Right padding: the valid prefix equals the unpadded run and the final state is the prefix's state."""
    g = _gen("pad")
    inputs = make_inputs(g, B=2, T=10)
    mask = torch.ones(2, 10, dtype=F64)
    mask[:, 7:] = 0.0
    o, st = titans_deep_memory_reference(*inputs, **flags(mask=mask, output_final_state=True))
    short = [inputs[0][:, :7], inputs[1][:, :7], *inputs[2:]]
    o_short, st_short = titans_deep_memory_reference(*short, **flags(output_final_state=True))
    assert_close(o[:, :7], o_short, "valid prefix")
    for name in ("z", "s", "w1", "s1", "w2", "s2"):
        assert_close(getattr(st, name), getattr(st_short, name), name)


def test_fully_masked_reads_the_initial_memory():
    g = _gen("allmasked")
    inputs = make_inputs(g, B=2, T=6)
    q, w1, w2 = inputs[0], inputs[2], inputs[3]
    o, st = titans_deep_memory_reference(*inputs, **flags(mask=torch.zeros(2, 6), output_final_state=True))
    expected = q + torch.einsum("hdn,bthn->bthd", w1, F.silu(torch.einsum("hnd,bthd->bthn", w2, q)))
    assert_close(o, expected, "o")
    assert_close(st.w1, w1.expand_as(st.w1), "w1")
    assert_close(st.w2, w2.expand_as(st.w2), "w2")
    assert st.s1.abs().max() == 0 and st.s2.abs().max() == 0


# ------------------------------------------------------------------------------------ 2. the update rule itself


def test_rank_one_inner_gradients_match_autograd():
    """One token from a given state: the step's rank-one G1, G2 (plus DGD on W2) equal autograd of the inner loss."""
    g = _gen("rank_one")
    q, a, w1, w2, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=1)
    for objective, target in itertools.product(["l2", "dot"], ["self", "value"]):
        kw = flags(objective=objective, memory_target=target, momentum=False, dgd=True)
        _, st = titans_deep_memory_step_reference(q[:, 0], a[:, 0], w1, w2, z0, b_eta, b_alpha, mlog, **kw)
        d = q.shape[-1]
        k = F.normalize(torch.einsum("hed,bhd->bhe", z0[:, :d], a[:, 0]), dim=-1)
        v = torch.einsum("hed,bhd->bhe", z0[:, d : 2 * d], a[:, 0])
        eta = ETA_MAX * torch.sigmoid((z0[:, 2 * d] * a[:, 0]).sum(-1) + b_eta)
        alpha = torch.sigmoid((z0[:, 2 * d + 1] * a[:, 0]).sum(-1) + b_alpha)
        p1 = w1.expand(2, *w1.shape).clone().requires_grad_()
        p2 = w2.expand(2, *w2.shape).clone().requires_grad_()
        pred = k + (p1 @ F.silu(p2 @ k.unsqueeze(-1))).squeeze(-1)
        tgt = v if target == "value" else v + (w1 @ F.silu(w2 @ v.unsqueeze(-1))).squeeze(-1)
        loss = 0.5 * (pred - tgt).square().sum() if objective == "l2" else -(pred * tgt).sum()
        g1, g2 = torch.autograd.grad(loss, (p1, p2))
        e, al = eta[..., None, None], alpha[..., None, None]
        assert_close(st.w1, al * w1 - e * g1, f"w1 {objective}/{target}")
        dgd = (w2 @ k.unsqueeze(-1)) @ k.unsqueeze(-2)
        assert_close(st.w2, al * w2 - e * dgd - e * g2, f"w2 {objective}/{target}")


def test_chunk_size_one_is_the_online_rule():
    """C = 1: every gradient at the previous token's state; written here as an independent online loop."""
    g = _gen("online")
    q, a, w1, w2, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=7, d=3, h=5)
    o, _ = titans_deep_memory_reference(q, a, w1, w2, z0, b_eta, b_alpha, mlog, **flags(chunk_size=1, adaptive=()))
    d = q.shape[-1]
    W1, W2 = w1.expand(2, *w1.shape), w2.expand(2, *w2.shape)
    S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)
    beta = torch.sigmoid(mlog)[:, None, None]
    for t in range(q.shape[1]):
        k = F.normalize(torch.einsum("hed,bhd->bhe", z0[:, :d], a[:, t]), dim=-1)
        v = torch.einsum("hed,bhd->bhe", z0[:, d : 2 * d], a[:, t])
        eta = (ETA_MAX * torch.sigmoid((z0[:, 2 * d] * a[:, t]).sum(-1) + b_eta))[..., None, None]
        alpha = torch.sigmoid((z0[:, 2 * d + 1] * a[:, t]).sum(-1) + b_alpha)[..., None, None]
        mem = lambda z: z + (W1 @ F.silu(W2 @ z.unsqueeze(-1))).squeeze(-1)  # noqa: E731
        pk = W2 @ k.unsqueeze(-1)
        err = (mem(k) - mem(v)).unsqueeze(-1)
        G1 = err @ F.silu(pk).transpose(-1, -2)
        sig = torch.sigmoid(pk)
        G2 = (sig * (1 + pk * (1 - sig)) * (W1.transpose(-1, -2) @ err)) @ k.unsqueeze(-2)
        S1, S2 = beta * S1 - eta * G1, beta * S2 - eta * G2
        W1, W2 = alpha * W1 + S1, alpha * W2 - eta * pk @ k.unsqueeze(-2) + S2
        assert_close(o[:, t], mem(q[:, t]), f"token {t}")


def test_zero_w1_leaves_w2_to_retention_in_the_first_chunk():
    """With W1_0 = 0 the inner gradient of W2 (through W1ᵀ e) vanishes in the first chunk: without DGD, W2 only
    decays, W2_C = gamma_C W2_0 (momentum stays 0 too), while W1 learns."""
    g = _gen("zero_w1")
    q, a, w1, w2, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=4)
    w1 = torch.zeros_like(w1)
    _, st = titans_deep_memory_reference(q, a, w1, w2, z0, b_eta, b_alpha, mlog,
                                         **flags(dgd=False, output_final_state=True))
    alpha = torch.sigmoid(torch.einsum("hd,bthd->bht", z0[:, -1], a) + b_alpha[:, None])  # chunk-start m_alpha
    gamma = alpha.prod(-1)[..., None, None]
    assert_close(st.w2, gamma * w2, "w2")
    assert st.s2.abs().max() == 0
    assert st.w1.abs().max() > 1e-3


def test_adaptive_rows_match_the_linear_op():
    """The adaptive rows do not depend on the main memory: they equal rows d: of the linear op's stacked Z."""
    g = _gen("linear_rows")
    q, a, w1, w2, z0, b_eta, b_alpha, mlog = make_inputs(g, T=9)
    d = q.shape[-1]
    m0 = torch.randn(q.shape[2], d, d, generator=g, dtype=F64) / math.sqrt(d)
    mask = make_mask("random", g, 3, 9)
    for momentum, objective, target in itertools.product([True, False], ["l2", "dot"], ["self", "value"]):
        kw = flags(chunk_size=3, momentum=momentum, objective=objective, memory_target=target, mask=mask,
                   output_final_state=True)
        _, deep = titans_deep_memory_reference(q, a, w1, w2, z0, b_eta, b_alpha, mlog, **kw)
        _, lin = titans_memory_reference(q, a, torch.cat([m0, z0], 1), b_eta, b_alpha, mlog, **kw)
        for name in ("z_chunk", "z", "s"):
            assert_close(getattr(deep, name), getattr(lin, name)[:, :, d:], name)


# ------------------------------------------------------------------------------- 3. states, decode, gradients


@pytest.mark.parametrize("split", [2, 4, 5, 9])
def test_continue_from_a_state(split):
    """Prefix then the rest from its state (mid-chunk for split 2, 5, 9 with C = 4) == the whole sequence."""
    g = _gen("split", split)
    inputs = make_inputs(g, T=11)
    mask = make_mask("random", g, 3, 11)
    kw = flags(output_final_state=True)
    o_full, st_full = titans_deep_memory_naive(*inputs, mask=mask, **kw)
    q, a, rest = inputs[0], inputs[1], inputs[2:]
    o1, st1 = titans_deep_memory_reference(q[:, :split], a[:, :split], *rest, mask=mask[:, :split], **kw)
    o2, st2 = titans_deep_memory_reference(q[:, split:], a[:, split:], *rest, mask=mask[:, split:], state=st1, **kw)
    assert st1.position == split
    assert_close(torch.cat([o1, o2], 1), o_full, "o")
    assert_states_close(st2, st_full)


@pytest.mark.parametrize("momentum,objective,target", [(True, "l2", "self"), (False, "dot", "value"),
                                                       (True, "dot", "self"), (False, "l2", "value")])
def test_step_by_step_equals_chunked(momentum, objective, target):
    g = _gen("steps", momentum, objective, target)
    inputs = make_inputs(g, T=10)
    q, a, rest = inputs[0], inputs[1], inputs[2:]
    mask = make_mask("random", g, 3, 10)
    kw = flags(chunk_size=3, momentum=momentum, objective=objective, memory_target=target)
    o_full, st_full = titans_deep_memory_reference(*inputs, mask=mask, output_final_state=True, **kw)
    # Prefill 4 tokens (mid-chunk at C = 3), then decode one token at a time.
    o_pre, state = titans_deep_memory_reference(q[:, :4], a[:, :4], *rest, mask=mask[:, :4], output_final_state=True,
                                                **kw)
    outs = [o_pre]
    for t in range(4, 10):
        o_t, state = titans_deep_memory_step(q[:, t], a[:, t], *rest, mask=mask[:, t], state=state, **kw)
        outs.append(o_t[:, None])
    assert_close(torch.cat(outs, 1), o_full, "o")
    assert_states_close(state, st_full)
    # From no state at all, the step starts at the initial parameters.
    o0, st0 = titans_deep_memory_step_reference(q[:, 0], a[:, 0], *rest, **kw)
    assert_close(o0, titans_deep_memory_reference(q[:, :1], a[:, :1], *rest, **kw)[0][:, 0], "first token")
    assert st0.position == 1


def _outer_loss(o, st, g):
    loss = (o * torch.randn(o.shape, generator=g, dtype=F64)).sum()
    for x in st[:9]:
        loss = loss + (x * torch.randn(x.shape, generator=g, dtype=F64)).sum()
    return loss


@pytest.mark.parametrize("momentum,objective,target", [(True, "l2", "self"), (False, "dot", "value"),
                                                       (True, "l2", "value")])
def test_outer_gradients_equal_the_oracle(momentum, objective, target):
    """Every input's gradient (incl. the initial state, started mid-chunk) through the chunked form equals the
    gradient through the token-by-token oracle: the outer gradient flows through targets and inner gradients."""
    g = _gen("grads", momentum, objective, target)
    inputs = make_inputs(g, B=2, T=7, d=3, h=4)
    kw = flags(chunk_size=3, momentum=momentum, objective=objective, memory_target=target,
               mask=make_mask("random", g, 2, 7), output_final_state=True)
    with torch.no_grad():
        _, st0 = titans_deep_memory_reference(*[x[:, :2] if i < 2 else x for i, x in enumerate(inputs)],
                                              **flags(chunk_size=3, momentum=momentum, output_final_state=True))
    grads = []
    for fn in (titans_deep_memory_reference, titans_deep_memory_naive):
        leaves = [x.clone().requires_grad_() for x in inputs]
        state = DeepTitansState(*[x.clone().requires_grad_() for x in st0[:9]], st0.position)
        o, st = fn(*leaves, state=state, **kw)
        loss = _outer_loss(o, st, _gen("loss"))
        o2, st2 = fn(*leaves, **kw)  # from the initial parameters as well
        loss = loss + _outer_loss(o2, st2, _gen("loss2"))
        grads.append(torch.autograd.grad(loss, leaves + list(state[:9]), allow_unused=True))
    names = ["q", "a", "w1_0", "w2_0", "z0", "b_eta", "b_alpha", "momentum_logit"] + list(DeepTitansState._fields[:9])
    for name, x, y in zip(names, *grads):
        if name == "momentum_logit" and not momentum:
            assert x is None or x.abs().max() == 0
            continue
        assert x is not None and y is not None, name
        assert_close(x, y, f"grad {name}", tol=1e-9)
        assert y.abs().max() > 0, f"grad {name} is zero"


def test_gradcheck_tiny():
    g = _gen("gradcheck")
    inputs = [x.requires_grad_() for x in make_inputs(g, B=1, T=5, H=1, d=2, h=3)]
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]], dtype=F64)
    fn = lambda *xs: titans_deep_memory_reference(*xs, **flags(chunk_size=2, mask=mask))[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ 4. API


def test_dtypes_fp32_state():
    g = _gen("dtypes")
    inputs = make_inputs(g, B=2, T=6)
    for dtype in (torch.float32, torch.bfloat16):
        cast = [x.to(dtype) for x in inputs]
        o, st = titans_deep_memory_reference(*cast, **flags(output_final_state=True))
        assert o.dtype == dtype
        assert all(x.dtype == torch.float32 for x in st[:9])
        o64, _ = titans_deep_memory_reference(*[x.to(dtype).to(F64) for x in inputs], **flags())
        assert_close(o.to(F64), o64, f"{dtype}", tol=1e-5 if dtype == torch.float32 else 2e-2)


def test_bad_inputs_raise():
    g = _gen("bad")
    q, a, w1, w2, z0, b_eta, b_alpha, mlog = make_inputs(g, B=2, T=3)
    d = q.shape[-1]
    cases = {
        "w1_0": (q, a, w1[:, :3], w2, z0),
        "w2_0": (q, a, w1, w2[:, :, :3], z0),
        r"z0 must be \(H, 2d\+2, d\)": (q, a, w1, w2, torch.zeros(2, memory_rows(d), d, dtype=F64)),
    }
    for pattern, head in cases.items():
        with pytest.raises(ValueError, match=pattern):
            titans_deep_memory_reference(*head, b_eta, b_alpha, mlog, **flags())
    _, st = titans_deep_memory_reference(q, a, w1, w2, z0, b_eta, b_alpha, mlog, **flags(output_final_state=True))
    with pytest.raises(ValueError, match=r"state\.s1"):
        titans_deep_memory_reference(q, a, w1, w2, z0, b_eta, b_alpha, mlog,
                                     **flags(state=st._replace(s1=st.s1[..., :2])))
    with pytest.raises(ValueError, match="objective"):
        titans_deep_memory_step_reference(q[:, 0], a[:, 0], w1, w2, z0, b_eta, b_alpha, mlog, **flags(objective="x"))


def test_dispatcher_backends():
    """"torch" and "auto" (on CPU) run the reference; "triton" never falls back silently to it: float64, which
    only the reference takes, is refused."""
    g = _gen("dispatch")
    inputs = make_inputs(g, B=1, T=3)
    ref, _ = titans_deep_memory_reference(*inputs, **flags())
    for backend in ("torch", "auto"):
        assert torch.equal(titans_deep_memory(*inputs, **flags(), backend=backend)[0], ref)
    with pytest.raises(ValueError, match="float64"):
        titans_deep_memory(*inputs, **flags(), backend="triton")
    with pytest.raises(ValueError, match="float64"):
        titans_deep_memory_step(inputs[0][:, 0], inputs[1][:, 0], *inputs[2:], **flags(), backend="triton")
    with pytest.raises(ValueError, match="kernel_backend"):
        titans_deep_memory(*inputs, **flags(), backend="cuda")
