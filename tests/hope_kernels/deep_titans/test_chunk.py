"""Triton forward kernel of the deep Titans memory (hope_kernels/deep_titans/chunk.py) vs the float64 reference.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py and again
here), so the shapes are tiny. Inputs are fresh random numbers (seeded per case from the test parameters).
Tolerance: ||kernel - ref|| / ||ref|| <= 1e-4 for fp32 inputs, for o, every tensor of the final state and (from the
Triton backward kernel) every gradient; bf16 inputs: o 1e-2, the fp32 states 1e-4.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from hope_kernels.deep_titans import DeepTitansState, titans_deep_memory, titans_deep_memory_reference  # noqa: E402
from hope_kernels.deep_titans.chunk import titans_deep_memory_triton  # noqa: E402
from tests.hope_kernels.deep_titans.test_reference import _gen, flags, make_inputs, make_mask  # noqa: E402

F64, F32 = torch.float64, torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().cpu(), y.double().cpu()
    return ((x - y).norm() / y.norm().clamp_min(1e-12)).item()


def _prefix_state(inputs, position, kw):
    """The float64 reference's state after `position` tokens of other random inputs (a mid-chunk start)."""
    if position == 0:
        return None
    g = _gen("prefix", position)
    B, _, H, d = inputs[0].shape
    other = make_inputs(g, B=B, T=position, H=H, d=d, h=inputs[2].shape[-1])
    return titans_deep_memory_reference(other[0], other[1], *inputs[2:], **dict(kw, mask=None),
                                        output_final_state=True)[1]


def check(seed, B, T, H, d, h, kw, position=0, mask="none", dtype=F32, tol_o=TOL):
    g = _gen(seed)
    inputs = make_inputs(g, B=B, T=T, H=H, d=d, h=h)
    kw = dict(kw, mask=make_mask(mask, g, B, T))
    state = _prefix_state(inputs, position, kw)
    # The reference runs on the inputs as the kernel sees them (rounded to dtype), in float64.
    ref_inputs = [x.to(dtype).to(F64) for x in inputs[:2]] + inputs[2:]
    o_ref, st_ref = titans_deep_memory_reference(*ref_inputs, **kw, state=state, output_final_state=True)
    k_inputs = [x.to(DEV, dtype if i < 2 else F32) for i, x in enumerate(inputs)]
    k_state = None if state is None else DeepTitansState(*(x.to(DEV, F32) for x in state[:9]), state.position)
    k_mask = None if kw["mask"] is None else kw["mask"].to(DEV)
    o, st = titans_deep_memory_triton(*k_inputs, **dict(kw, mask=k_mask), state=k_state, output_final_state=True)
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert rel(o, o_ref) <= tol_o, f"o: {rel(o, o_ref):.2e}"
    assert st.position == st_ref.position == position + T
    for name in DeepTitansState._fields[:9]:
        x, y = getattr(st, name), getattr(st_ref, name)
        assert x.dtype == F32
        assert rel(x, y) <= TOL, f"state.{name}: {rel(x, y):.2e}"


@pytest.mark.parametrize("momentum,dgd,objective,target", [
    (True, True, "l2", "self"), (True, False, "dot", "self"), (False, True, "l2", "value"),
    (False, False, "dot", "value"), (True, True, "l2", "value"), (False, True, "dot", "self"),
])
def test_forward_flags(momentum, dgd, objective, target):
    kw = flags(chunk_size=4, momentum=momentum, dgd=dgd, objective=objective, memory_target=target)
    check(("flags", momentum, dgd, objective, target), 2, 11, 2, 8, 12, kw, mask="random")


@pytest.mark.parametrize("adaptive", [(), ("v", "eta")])
def test_forward_adaptive_subsets(adaptive):
    check(("adaptive", adaptive), 2, 9, 1, 8, 8, flags(chunk_size=4, adaptive=adaptive), mask="random")


@pytest.mark.parametrize("B,T,H,d,h,C,position,mask", [
    (1, 20, 1, 16, 16, 8, 0, "none"),  # several full chunks
    (3, 9, 2, 8, 12, 4, 5, "random"),  # start mid-chunk from a state, B = 3
    (2, 5, 1, 5, 3, 16, 2, "right_pad"),  # odd d and h; C > T
    (1, 6, 1, 4, 4, 1, 3, "random"),  # C = 1: the online rule
    (2, 7, 1, 8, 20, 3, 3, "none"),  # h > 16: a 32-wide hidden tile; starts on a chunk boundary
])
def test_forward_shapes(B, T, H, d, h, C, position, mask):
    check(("shapes", B, T, H, d, h, C, position, mask), B, T, H, d, h, flags(chunk_size=C), position=position,
          mask=mask)


def test_bf16_inputs():
    check(("bf16",), 2, 9, 1, 8, 8, flags(chunk_size=4), position=2, mask="random", dtype=torch.bfloat16, tol_o=1e-2)


GRAD_CASES = {
    # name: (flags, B, T, d, h, position, mask)
    "default_mid_chunk": (flags(chunk_size=3), 2, 7, 8, 8, 2, "random"),
    "no_momentum_dot_value": (flags(chunk_size=3, momentum=False, objective="dot", memory_target="value"),
                              2, 7, 8, 12, 1, "random"),
    "no_dgd_value_l2": (flags(chunk_size=4, dgd=False, memory_target="value"), 1, 9, 5, 3, 0, "none"),
    "dot_self_adaptive_subset": (flags(chunk_size=4, objective="dot", adaptive=("v", "alpha")), 2, 6, 8, 8, 2,
                                 "right_pad"),  # ends on a chunk boundary
    "chunk_one": (flags(chunk_size=1, adaptive=("k", "eta")), 1, 4, 8, 20, 1, "random"),
    "one_segment": (flags(chunk_size=8), 2, 4, 8, 8, 3, "random"),  # mid-chunk start and end, one segment
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_of_every_input(case, monkeypatch):
    """The Triton backward gives every gradient of the float64 reference: q, a, the initial parameters
    (w1_0, w2_0, z0), b_eta, b_alpha, momentum_logit and all nine tensors of a (mid-chunk) start state, through o and
    every tensor of the final state (chunk-start copies included). The gradients come from the backward kernel
    (its launcher is counted), not from a recompute through the reference."""
    import hope_kernels.deep_titans.chunk as chunk_module

    backward_launches = []
    original = chunk_module._deep_backward
    monkeypatch.setattr(chunk_module, "_deep_backward",
                        lambda *args, **kwargs: backward_launches.append(1) or original(*args, **kwargs))
    kw0, B, T, d, h, position, mask = GRAD_CASES[case]
    g = _gen("grads", case)
    inputs = make_inputs(g, B=B, T=T, H=1, d=d, h=h)
    kw = dict(kw0, mask=make_mask(mask, g, B, T))
    state = _prefix_state(inputs, position, kw) if position else _prefix_state(inputs, 3, kw)
    w_o = torch.randn(B, T, 1, d, generator=g, dtype=F64)
    w_s = [torch.randn(x.shape, generator=g, dtype=F64) for x in state[:9]]
    mask_dev = None if kw["mask"] is None else kw["mask"].to(DEV)
    grads = []
    for dtype, fn in ((F64, titans_deep_memory_reference), (F32, titans_deep_memory_triton)):
        leaves = [x.to(DEV, dtype).requires_grad_() for x in inputs]
        st = [x.to(DEV, dtype).clone().requires_grad_() for x in state[:9]]  # distinct leaves (z_chunk may alias z)
        start = DeepTitansState(*st, state.position if position else 0)
        o, fin = fn(*leaves, **dict(kw, mask=mask_dev), state=start if position else None, output_final_state=True)
        loss = (o * w_o.to(DEV, dtype)).sum() + sum((x * w.to(DEV, x.dtype)).sum() for x, w in zip(fin[:9], w_s))
        if position:
            o2, _ = fn(*leaves, **dict(kw, mask=mask_dev))  # and from the initial parameters
            loss = loss + (o2 * w_o.to(DEV, dtype)).sum()
        grads.append(torch.autograd.grad(loss, leaves + (st if position else []), allow_unused=True))
    assert len(backward_launches) == (2 if position else 1)
    names = ["q", "a", "w1_0", "w2_0", "z0", "b_eta", "b_alpha", "momentum_logit", *DeepTitansState._fields[:9]]
    for name, ref, ker in zip(names, *grads):
        if name == "momentum_logit" and not kw["momentum"]:
            assert ref is None and (ker is None or ker.abs().max() == 0)
            continue
        assert ref is not None and ker is not None, name
        assert ker.dtype == F32
        assert ref.abs().max() > 0, name
        assert rel(ker, ref) <= TOL, f"grad {name}: {rel(ker, ref):.2e}"


def test_empty_sequence_and_no_final_state():
    g = _gen("empty")
    inputs = [x.to(DEV, F32) for x in make_inputs(g, B=2, T=0, H=1, d=8, h=8)]
    o, st = titans_deep_memory_triton(*inputs, **flags(), output_final_state=True)
    assert o.shape == (2, 0, 1, 8) and st.position == 0
    assert torch.equal(st.w1, inputs[2].expand_as(st.w1)) and st.s2.abs().max() == 0
    inputs = [x.to(DEV, F32) for x in make_inputs(g, B=1, T=3, H=1, d=8, h=8)]
    assert titans_deep_memory_triton(*inputs, **flags())[1] is None


def test_dispatcher_runs_the_kernel_and_checks_constraints():
    g = _gen("dispatch_kernel")
    inputs = [x.to(DEV, F32) for x in make_inputs(g, B=1, T=5, H=1, d=8, h=8)]
    o_k, _ = titans_deep_memory_triton(*inputs, **flags())
    assert torch.equal(titans_deep_memory(*inputs, **flags(), backend="triton")[0], o_k)
    with pytest.raises(ValueError, match="float64"):
        titans_deep_memory_triton(*[x.double() for x in inputs], **flags())
    big = make_inputs(g, B=1, T=2, H=1, d=8, h=136)
    with pytest.raises(ValueError, match="memory_hidden h=136"):
        titans_deep_memory_triton(*[x.to(DEV, F32) for x in big], **flags())
