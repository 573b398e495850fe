"""Triton chunk kernels of the deep Titans memory, SPEC §2 v2 (hope_kernels/deep_titans/chunk.py), vs the float64
reference: outputs, every tensor of the final state and every gradient within 1e-4 relative in fp32.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), so the
shapes are tiny, with one case at d = h = 64, C = 64. Fresh random inputs on every run; HOPE_TEST_SEED replays.

The rule flags: most cases run the model's defaults (unit values, retention toward (G_0, W1_0, W2_0), which makes
z0, w1_0 and w2_0 retention anchors with gradients of their own, and the curvature guard, which binds on some
tokens at d = 16 and on all at d = 64 with these inputs; `test_curvature_guard_binds` makes sure it binds);
LITERAL is the rule as printed, and each flag is also flipped alone.
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

from hope_kernels.deep_titans import (  # noqa: E402
    DeepTitansState,
    adaptive_rows,
    titans_deep_memory,
    titans_deep_memory_reference,
)
from hope_kernels.deep_titans.chunk import titans_deep_memory_triton  # noqa: E402
from hope_kernels.deep_titans.reference import curvature_scale, main_memory_errors  # noqa: E402
from tests.hope_kernels.titans.test_chunk import BIAS_SCALE, cotangents_unchanged, rel_err  # noqa: E402

F64, F32 = torch.float64, torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4
RUN_SEED = int(os.environ.get("HOPE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
INPUTS = ("q", "a", "w1_0", "w2_0", "z0", "b_eta", "b_alpha")
STATE = ("z_chunk", "z", "w1_chunk", "w1", "w2_chunk", "w2")
LITERAL = dict(memory_value_norm=False, memory_retention="zero", memory_curvature_guard=False)


def _seed(*params) -> int:
    return (RUN_SEED + zlib.crc32(repr(params).encode())) % (2**31)


def make_case(seed, B, T, H, d, h, *, position=None, mask=None, w2_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    G = adaptive_rows(d)
    x = {
        "q": F.normalize(torch.randn(B, T, H, d, generator=g, dtype=F64), dim=-1),
        "a": 0.25 * torch.randn(B, T, H, d, generator=g, dtype=F64),
        "w1_0": 0.5 * torch.randn(H, d, h, generator=g, dtype=F64) / math.sqrt(h),
        "w2_0": w2_scale * torch.randn(H, h, d, generator=g, dtype=F64) / math.sqrt(d),
        "z0": torch.randn(H, G, d, generator=g, dtype=F64) / math.sqrt(d),
        "b_eta": 0.5 * torch.randn(H, generator=g, dtype=F64),
        "b_alpha": 3.0 + 0.3 * torch.randn(H, generator=g, dtype=F64),
    }
    if position is not None:
        for name, shape, scale in (("z", (G, d), d), ("w1", (d, h), 4 * h), ("w2", (h, d), 4 * d)):
            start = torch.randn(B, H, *shape, generator=g, dtype=F64) / math.sqrt(scale)
            x[name + "_chunk"] = start
            x[name] = start + 0.3 * torch.randn(B, H, *shape, generator=g, dtype=F64) / math.sqrt(scale)
    m = None
    if mask == "random":
        m = (torch.rand(B, T, generator=g, dtype=F64) > 0.3).to(F64)
        m[0, min(1, T - 1)] = 0.0
    elif mask == "right":
        m = torch.ones(B, T, dtype=F64)
        m[-1, T - max(1, T // 3):] = 0.0
    cots = {"o": torch.randn(B, T, H, d, generator=g, dtype=F64)}
    for name, shape in (("z", (G, d)), ("w1", (d, h)), ("w2", (h, d))):
        cots[name + "_chunk"] = torch.randn(B, H, *shape, generator=g, dtype=F64)
        cots[name] = torch.randn(B, H, *shape, generator=g, dtype=F64)
    return x, m, cots


def run(fn, inputs, mask, position, kw, dtype, grad, cots, device):
    leaves = {k: v.detach().to(device=device, dtype=dtype).requires_grad_(grad) for k, v in inputs.items()}
    state = None
    if "z" in leaves:
        state = DeepTitansState(leaves["z_chunk"], leaves["z"], None, leaves["w1_chunk"], leaves["w1"], None,
                                leaves["w2_chunk"], leaves["w2"], None, position)
    m = None if mask is None else mask.to(device=device, dtype=dtype)
    o, fin = fn(*(leaves[n] for n in INPUTS), mask=m, state=state, output_final_state=True, **kw)
    grads = None
    if grad:
        loss = (o * cots["o"].to(device, o.dtype)).sum()
        for name in STATE:
            t = getattr(fin, name)
            loss = loss + (t * cots[name].to(device, t.dtype)).sum()
        names = list(leaves)
        gs = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        grads = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, gs)}
    return o, fin, grads


def flags(chunk_size=4, **kw):
    return dict(chunk_size=chunk_size, eta_max=0.9, **kw)


def check_case(seed, B, T, H, d, h, kw, *, position=None, mask=None, grad=True, w2_scale=0.5):
    inputs, m, cots = make_case(seed, B, T, H, d, h, position=position, mask=mask, w2_scale=w2_scale)
    inputs = {k: v.to(F32).to(F64) for k, v in inputs.items()}
    pos = position or 0
    o_ref, st_ref, g_ref = run(titans_deep_memory_reference, inputs, m, pos, kw, F64, grad, cots, "cpu")
    o, st, g = run(titans_deep_memory_triton, inputs, m, pos, kw, F32, grad, cots, DEV)
    assert o.dtype == F32 and o.shape == o_ref.shape
    assert st.position == st_ref.position == pos + T and st.s is None and st.s1 is None and st.s2 is None
    errs = {"o": rel_err(o, o_ref)}
    for name in STATE:
        t = getattr(st, name)
        assert t.dtype == F32 and t.shape == getattr(st_ref, name).shape, name
        errs["state." + name] = rel_err(t, getattr(st_ref, name))
    if grad:
        for name, gr in g_ref.items():
            assert g[name].shape == gr.shape and g[name].dtype == F32, name
            errs["d" + name] = rel_err(g[name], gr, floor=BIAS_SCALE if name in ("b_eta", "b_alpha") else 0.0)
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"seed={seed} (HOPE_TEST_SEED={RUN_SEED}): relative errors above {TOL:.0e}: {bad}"
    return errs


# Each flag value with a mask and an initial state (mid-chunk, on a boundary); B = 1 and 3; T no multiple of C;
# h != d; adaptive_chunk_size > chunk_size; rows that do not learn.
CASES = [
    # flags, B, T, H, d, h, position, mask
    (dict(), 1, 11, 1, 8, 12, None, None),
    (dict(objective="dot", adaptive_chunk_size=8), 3, 13, 1, 8, 8, 3, "random"),
    (dict(memory_target="value", dgd=False, **LITERAL), 1, 10, 2, 8, 16, 4, "right"),
    (dict(memory_target="value", objective="dot", memory_residual=False, adaptive=("v", "alpha"),
          memory_value_norm=False), 1, 9, 1, 16, 8, 6, "random"),
    (dict(adaptive=(), chunk_size=8), 2, 19, 1, 16, 16, None, "random"),
    (dict(adaptive_chunk_size=8, memory_retention="zero"), 1, 13, 1, 16, 12, 5, "random"),
    (dict(memory_curvature_guard=False), 1, 11, 1, 16, 16, 2, None),
    (dict(adaptive_chunk_size=8, **LITERAL), 1, 13, 1, 16, 12, None, "random"),
    (dict(), 3, 11, 1, 8, 20, 3, "random"),  # the hidden blocks (BF = 16): two, the second partly masked
    (dict(adaptive_chunk_size=8), 1, 21, 1, 8, 40, 6, "right"),  # three blocks, over five segments
    (dict(memory_target="value", objective="dot", dgd=False), 2, 9, 1, 8, 33, None, "random"),  # the third: 1 unit
    (dict(), 1, 9, 1, 24, 16, 2, "random"),  # the column tiles of k, q, e, o (BWO = 16): two, the second partly masked
    (dict(objective="dot", **LITERAL), 3, 10, 1, 40, 20, None, "right"),  # three column tiles, two hidden blocks
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_forward_backward(case):
    kw, B, T, H, d, h, position, mask = case
    check_case(_seed("deep", case), B, T, H, d, h, flags(**kw), position=position, mask=mask)


def test_position_near_the_int32_limit():
    """The linear op's test of the same name, through the deep memory's generating scan."""
    check_case(_seed("deep-int32"), 2, 7, 1, 8, 12, flags(chunk_size=4, adaptive_chunk_size=8), position=2**31 - 1,
               mask="random")


@pytest.mark.parametrize("rule", [dict(), LITERAL], ids=["defaults", "literal"])
def test_real_size(rule):
    """d = h = 64, C = 64: the presets' tile, two segments, the first mid-chunk."""
    check_case(_seed("deep64", rule), 1, 70, 1, 64, 64, flags(chunk_size=64, **rule), position=40, mask="random")


def test_curvature_guard_binds():
    """Inputs on which N_t > 1 at the first chunk start (so the guard scales the writes and its gradient path is
    taken): the kernel follows the reference with and without the guard, and the guard changes the result."""
    seed = _seed("guard")
    x, _, _ = make_case(seed, 1, 9, 1, 16, 16, w2_scale=1.0)
    d = x["q"].shape[-1]
    k = F.normalize(x["a"][0, :, 0] + x["a"][0, :, 0] @ x["z0"][0, :d].transpose(0, 1), dim=-1)
    # N_t reads only sigma(p), sigma'(p) with p = W2_c k: any target will do (here the value form with v = k)
    errors = main_memory_errors(k[:4], k[:4], x["w1_0"][0], x["w2_0"][0], "l2", True)
    scale = curvature_scale(errors, x["w1_0"][0])
    assert (scale < 1).any(), f"seed={seed}: the guard does not bind on these inputs ({scale})"
    outs = []
    for guard in (True, False):
        check_case(seed, 1, 9, 1, 16, 16, flags(memory_curvature_guard=guard), w2_scale=1.0)
        xs = [x[n].to(DEV, F32) for n in INPUTS]
        outs.append(titans_deep_memory_triton(*xs, **flags(memory_curvature_guard=guard))[0])
    assert rel_err(outs[0], outs[1]) > 1e-3


@pytest.mark.parametrize("position", [3, 4], ids=["mid-chunk", "boundary"])
def test_cotangents_unchanged(position):
    inputs, _, _ = make_case(_seed("cotangents", position), 1, 7, 1, 8, 8, position=position)
    unchanged = cotangents_unchanged(
        titans_deep_memory_triton, inputs, INPUTS,
        lambda x: DeepTitansState(x["z_chunk"], x["z"], None, x["w1_chunk"], x["w1"], None, x["w2_chunk"], x["w2"],
                                  None, position), STATE, flags())
    assert all(unchanged), f"cotangents of (o, {', '.join(STATE)}) changed by the backward: {unchanged}"


def test_dispatcher_and_momentum():
    inputs, _, _ = make_case(_seed("dispatch"), 1, 6, 1, 8, 8)
    x = [inputs[n].to(DEV, F32) for n in INPUTS]
    logit = torch.zeros(1, device=DEV)
    with pytest.raises(ValueError, match="momentum=True"):
        titans_deep_memory(*x, logit, momentum=True, backend="triton", **flags())
    o, _ = titans_deep_memory(*x, logit, momentum=True, backend="auto", **flags())
    assert torch.equal(o, titans_deep_memory_reference(*x, logit, momentum=True, **flags())[0])
    o, _ = titans_deep_memory(*x, backend="triton", **flags())
    assert rel_err(o, titans_deep_memory_reference(*inputs.values(), **flags())[0]) <= TOL


def test_bad_input_raises():
    inputs, _, _ = make_case(_seed("bad"), 1, 4, 1, 8, 8)
    x = [inputs[n].to(DEV, F32) for n in INPUTS]
    with pytest.raises(ValueError, match="float64"):
        titans_deep_memory_triton(*(t.double() for t in x), **flags())
    with pytest.raises(ValueError, match="w2_0 must be"):
        titans_deep_memory_triton(*x[:3], x[3][:, :-1], *x[4:], **flags())
    with pytest.raises(ValueError, match="memory_curvature_guard='yes'"):
        titans_deep_memory_triton(*x, memory_curvature_guard="yes", **flags())
    with pytest.raises(ValueError, match="memory_retention='both'"):
        titans_deep_memory_triton(*x, memory_retention="both", **flags())
    big = make_case(_seed("bad", 1), 1, 2, 1, 8, 136)[0]
    with pytest.raises(ValueError, match="h=136"):
        titans_deep_memory_triton(*(big[n].to(DEV, F32) for n in INPUTS), **flags())
