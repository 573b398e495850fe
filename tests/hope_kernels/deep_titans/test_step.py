"""Triton decode-step kernel of the deep Titans memory (hope_kernels/deep_titans/step.py): token-by-token decoding
from a cached state equals the float64 chunked reference (o and every state tensor, <= 1e-4 relative).
Runs in Triton's CPU interpreter without a GPU, so the shapes are tiny."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from hope_kernels.deep_titans import (  # noqa: E402
    DeepTitansState,
    titans_deep_memory_reference,
    titans_deep_memory_step,
    titans_deep_memory_step_reference,
)
from hope_kernels.deep_titans.step import titans_deep_memory_step_triton  # noqa: E402
from tests.hope_kernels.deep_titans.test_chunk import DEV, F32, TOL, rel  # noqa: E402
from tests.hope_kernels.deep_titans.test_reference import _gen, flags, make_inputs, make_mask  # noqa: E402


@pytest.mark.parametrize("momentum,dgd,objective,target,adaptive,d,h", [
    (True, True, "l2", "self", ("k", "v", "eta", "alpha"), 8, 12),
    (False, True, "dot", "value", ("k", "v", "eta", "alpha"), 8, 8),
    (True, False, "dot", "self", ("eta",), 5, 3),  # odd d and h
    (False, False, "l2", "value", ("k", "alpha"), 8, 20),
])
def test_decode_equals_chunked_reference(momentum, dgd, objective, target, adaptive, d, h):
    """Prefill 2 tokens with the reference (mid-chunk at C = 3), then decode 4 with the kernel, crossing a chunk
    boundary, under a random mask."""
    g = _gen("step", momentum, dgd, objective, target, adaptive, d, h)
    B, T, H, prefill = 2, 6, 2, 2
    inputs = make_inputs(g, B=B, T=T, H=H, d=d, h=h)
    mask = make_mask("random", g, B, T)
    kw = flags(chunk_size=3, momentum=momentum, dgd=dgd, objective=objective, memory_target=target, adaptive=adaptive)
    o_ref, st_ref = titans_deep_memory_reference(*inputs, mask=mask, output_final_state=True, **kw)
    q, a, rest = inputs[0], inputs[1], inputs[2:]
    _, state = titans_deep_memory_reference(q[:, :prefill], a[:, :prefill], *rest, mask=mask[:, :prefill],
                                            output_final_state=True, **kw)
    state = DeepTitansState(*(x.to(DEV, F32) for x in state[:9]), state.position)
    k_rest = [x.to(DEV, F32) for x in rest]
    for t in range(prefill, T):
        o, state = titans_deep_memory_step_triton(q[:, t].to(DEV, F32), a[:, t].to(DEV, F32), *k_rest,
                                                  mask=mask[:, t].to(DEV), state=state, **kw)
        assert o.dtype == F32
        assert rel(o, o_ref[:, t]) <= TOL, f"o at token {t}: {rel(o, o_ref[:, t]):.2e}"
    assert state.position == T
    for name in DeepTitansState._fields[:9]:
        assert rel(getattr(state, name), getattr(st_ref, name)) <= TOL, name


def test_first_token_without_state_and_dispatch():
    g = _gen("step_first")
    inputs = make_inputs(g, B=2, T=1, H=1, d=8, h=8)
    q, a, rest = inputs[0][:, 0], inputs[1][:, 0], inputs[2:]
    o_ref, st_ref = titans_deep_memory_step_reference(q, a, *rest, **flags(chunk_size=1))
    k_args = [x.to(DEV, F32) for x in (q, a, *rest)]
    o, st = titans_deep_memory_step_triton(*k_args, **flags(chunk_size=1))
    assert rel(o, o_ref) <= TOL
    assert rel(st.w2_chunk, st_ref.w2_chunk) <= TOL  # C = 1: the token completes a chunk
    assert torch.equal(titans_deep_memory_step(*k_args, **flags(chunk_size=1), backend="triton")[0], o)
    bf16 = titans_deep_memory_step_triton(*[x.to(torch.bfloat16) if i < 2 else x for i, x in enumerate(k_args)],
                                          **flags(chunk_size=1))[0]
    assert bf16.dtype == torch.bfloat16 and rel(bf16, o_ref) <= 1e-2
    with pytest.raises(ValueError, match="float64"):
        titans_deep_memory_step_triton(q, a, *rest, **flags())
