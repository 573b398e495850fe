"""Triton chunk kernels of the Titans memory (hope_kernels/titans/chunk.py) vs the float64 PyTorch reference.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py and
again here), so the shapes are tiny. Inputs are fresh random numbers on every run; the seed of a case is in
its failure message, and HOPE_TEST_SEED=<int> replays a run.

Tolerance: ||kernel - ref|| / ||ref|| <= 1e-4 for fp32 inputs, for the output, the final state and every
gradient. The (H,) per-head parameters b_eta, b_alpha, momentum_logit are sums over every token of terms of
both signs; for them a larger error is accepted only when the PyTorch reference itself, run in fp32, is off
by at least a tenth of it (then fp32 rounding, not the kernel, sets the error; in a 30-seed stress run the
kernel's error on these was at most 3.2x the fp32 reference's and never above 3e-5). fp16/bf16 inputs: o and
the gradients are rounded to the input dtype, tolerance 1e-2; the states stay fp32 and keep 1e-4.
On a GPU the same tests run compiled (fp32 inputs use tf32x3 dots, ~fp32 accuracy).
"""
from __future__ import annotations

import itertools
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("triton cannot be imported: the Triton kernels are not testable here", allow_module_level=True)

from hope_kernels.titans.chunk import titans_memory_triton  # noqa: E402
from hope_kernels.titans.reference import TitansState, memory_rows, titans_memory_reference  # noqa: E402

F64 = torch.float64
F32 = torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ETA_MAX = 0.5
ALL = ("k", "v", "eta", "alpha")
TOL = 1e-4
RUN_SEED = int(os.environ.get("HOPE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
PARAMS = ("b_eta", "b_alpha", "momentum_logit")


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seed(*params) -> int:
    return (RUN_SEED + zlib.crc32(repr(params).encode())) % (2**31)


def make_case(seed, B, T, H, d, *, state=None, mask=None):
    """Random inputs in float64 on CPU. state: None, or the position of a random mid-stream state."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, d, generator=g, dtype=F64), dim=-1)
    a = torch.randn(B, T, H, d, generator=g, dtype=F64)
    z0 = torch.randn(H, memory_rows(d), d, generator=g, dtype=F64) / math.sqrt(d)
    b_eta = 0.5 * torch.randn(H, generator=g, dtype=F64)
    b_alpha = 3.0 + 0.3 * torch.randn(H, generator=g, dtype=F64)
    mlog = 1.0 + 0.5 * torch.randn(H, generator=g, dtype=F64)
    inputs = {"q": q, "a": a, "z0": z0, "b_eta": b_eta, "b_alpha": b_alpha, "momentum_logit": mlog}
    if state is not None:
        R = memory_rows(d)
        zc = torch.randn(B, H, R, d, generator=g, dtype=F64) / math.sqrt(d)
        inputs["z_chunk"] = zc
        inputs["z"] = zc + 0.3 * torch.randn(B, H, R, d, generator=g, dtype=F64) / math.sqrt(d)
        inputs["s"] = 0.3 * torch.randn(B, H, R, d, generator=g, dtype=F64) / math.sqrt(d)
    m = None
    if mask == "random":
        m = (torch.rand(B, T, generator=g, dtype=F64) > 0.3).to(F64)
        m[0, min(1, T - 1)] = 0.0
    elif mask == "right":
        m = torch.ones(B, T, dtype=F64)
        m[-1, T - max(1, T // 3):] = 0.0
    elif mask is not None:
        raise AssertionError(mask)
    cot_g = torch.Generator().manual_seed(seed + 1)
    R = memory_rows(d)
    cots = {"o": torch.randn(B, T, H, d, generator=cot_g, dtype=F64)}
    for name in ("z_chunk", "z", "s"):
        cots[name] = torch.randn(B, H, R, d, generator=cot_g, dtype=F64)
    return inputs, m, cots


def run(fn, inputs, mask, position, kw, dtype, device, grad, cots):
    """Run fn on copies of the inputs in dtype; returns o, final state and the gradients (dict) or None."""
    leaves = {k: v.detach().to(device=device, dtype=dtype).requires_grad_(grad) for k, v in inputs.items()}
    state = None
    if "z_chunk" in leaves:
        state = TitansState(leaves["z_chunk"], leaves["z"], leaves["s"], position)
    m = None if mask is None else mask.to(device=device, dtype=dtype)
    o, fin = fn(leaves["q"], leaves["a"], leaves["z0"], leaves["b_eta"], leaves["b_alpha"], leaves["momentum_logit"],
                mask=m, state=state, output_final_state=True, **kw)
    grads = None
    if grad:
        loss = (o * cots["o"].to(device=device, dtype=o.dtype)).sum()
        for name in ("z_chunk", "z", "s"):
            t = getattr(fin, name)
            loss = loss + (t * cots[name].to(device=device, dtype=t.dtype)).sum()
        names = list(leaves)
        gs = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        grads = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, gs)}
    return o, fin, grads


def rel_err(x, y) -> float:
    x, y = x.detach().to("cpu", F64), y.detach().to("cpu", F64)
    denom = y.norm()
    if denom == 0:
        return x.norm().item()
    return ((x - y).norm() / denom).item()


def flags(momentum=True, dgd=True, objective="l2", memory_target="self", adaptive=ALL, chunk_size=8):
    return dict(chunk_size=chunk_size, eta_max=ETA_MAX, momentum=momentum, dgd=dgd, objective=objective,
                memory_target=memory_target, adaptive=adaptive)


def check_case(seed, B, T, H, d, kw, *, position=None, mask=None, grad=True, dtype=F32, tol_o=TOL, tol=TOL):
    """Kernel (dtype) vs the reference in float64 on the same (rounded) inputs."""
    inputs, m, cots = make_case(seed, B, T, H, d, state=position, mask=mask)
    inputs = {k: v.to(dtype).to(F64) for k, v in inputs.items()}  # the reference sees the kernel's inputs
    cots["o"] = cots["o"].to(dtype).to(F64)  # and the kernel's output gradient (a 16-bit o has a 16-bit grad)
    pos = position or 0
    o_ref, st_ref, g_ref = run(titans_memory_reference, inputs, m, pos, kw, F64, "cpu", grad, cots)
    o, st, g = run(titans_memory_triton, inputs, m, pos, kw, dtype, DEV, grad, cots)
    where = f"seed={seed} (HOPE_TEST_SEED={RUN_SEED})"
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert st.position == st_ref.position == pos + T
    errs = {"o": rel_err(o, o_ref)}
    for name in ("z_chunk", "z", "s"):
        t = getattr(st, name)
        assert t.dtype == F32 and t.shape == getattr(st_ref, name).shape
        errs["state." + name] = rel_err(t, getattr(st_ref, name))
    assert errs["o"] <= tol_o, f"{where}: o relative error {errs['o']:.2e}"
    for k, e in errs.items():
        assert k == "o" or e <= tol, f"{where}: {k} relative error {e:.2e} > {tol:.0e}"
    if grad:
        gtol = tol if dtype == F32 else tol_o  # half precision: the gradients are rounded to the input dtype
        ref32 = None
        for name, gr in g_ref.items():
            gk = g[name]
            assert gk.dtype == dtype and gk.shape == gr.shape, name
            e = rel_err(gk, gr)
            errs["d" + name] = e
            if e <= gtol:
                continue
            assert name in PARAMS, f"{where}: d{name} relative error {e:.2e} > {gtol:.0e}"
            if ref32 is None:  # how far is the reference itself in fp32? (these gradients are long sums)
                ref32 = run(titans_memory_reference, inputs, m, pos, kw, F32, "cpu", True, cots)[2]
            e32 = rel_err(ref32[name], gr)
            assert e <= 10 * e32, f"{where}: d{name} relative error {e:.2e} (fp32 reference: {e32:.2e})"
    return errs


# ------------------------------------------------------------ 1. forward: the full flag product, masks, state

FLAG_PRODUCT = list(itertools.product([True, False], [True, False], ["l2", "dot"], ["self", "value"], ["all", "none"]))


@pytest.mark.parametrize("momentum,dgd,objective,memory_target,adaptive", FLAG_PRODUCT,
                         ids=["-".join(map(str, p)) for p in FLAG_PRODUCT])
def test_forward_flag_product(momentum, dgd, objective, memory_target, adaptive):
    """Every flag combination, with a random mask and a mid-chunk initial state (position 5, C = 8)."""
    kw = flags(momentum, dgd, objective, memory_target, ALL if adaptive == "all" else ())
    seed = _seed("fwd", momentum, dgd, objective, memory_target, adaptive)
    check_case(seed, 2, 21, 1, 16, kw, position=5, mask="random", grad=False)


@pytest.mark.parametrize(
    "B,T,H,d,C,position,mask",
    [
        (1, 40, 1, 16, 16, None, None),      # no state: T not a multiple of C
        (3, 37, 2, 32, 16, None, "right"),   # B = 3, d = 32, right padding
        (3, 23, 2, 16, 8, 8, "random"),      # state on a chunk boundary
        (1, 19, 2, 32, 8, 13, None),         # mid-chunk state
        (2, 5, 1, 16, 16, 3, "random"),      # the whole call inside the first (partial) segment
        (2, 17, 1, 24, 12, 7, "random"),     # padded head dim (24 -> 32) and chunk (12 -> 16)
        (1, 9, 1, 8, 1, 2, None),            # C = 1 (fully online), d = 8
        (2, 33, 1, 16, 32, 30, "right"),     # C = 32
    ],
)
def test_forward_shapes(B, T, H, d, C, position, mask):
    check_case(_seed("shape", B, T, H, d, C, position, mask), B, T, H, d, flags(chunk_size=C), position=position,
               mask=mask, grad=False)


# ------------------------------------------------------------------------------------ 2. every gradient

# A covering set: each value of each flag appears with a mask and a (mid-chunk) initial state; d = 16, 32;
# chunk sizes 8 and 16; B = 1 and 3; T never a multiple of C.
GRAD_CASES = [
    # momentum, dgd, objective, memory_target, adaptive, B, T, H, d, C, position, mask
    (True, True, "l2", "self", ALL, 1, 40, 1, 16, 16, None, None),
    (True, True, "l2", "self", ALL, 3, 21, 2, 16, 8, 5, "random"),
    (True, False, "dot", "value", ALL, 1, 19, 1, 32, 16, 11, "random"),
    (False, True, "dot", "self", (), 3, 13, 1, 16, 8, 3, "right"),
    (False, False, "l2", "value", ("v", "alpha"), 1, 21, 2, 16, 8, 8, "random"),
    (True, True, "dot", "value", ("k", "eta"), 3, 11, 1, 16, 8, 6, "random"),
    (False, True, "l2", "value", ALL, 1, 37, 1, 32, 16, None, "right"),
    (True, False, "l2", "self", (), 1, 21, 1, 16, 8, 2, None),
    (False, False, "dot", "self", ALL, 3, 12, 1, 16, 8, None, "random"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"g{i}" for i in range(len(GRAD_CASES))])
def test_gradients(case):
    momentum, dgd, objective, memory_target, adaptive, B, T, H, d, C, position, mask = case
    kw = flags(momentum, dgd, objective, memory_target, adaptive, C)
    check_case(_seed("grad", case), B, T, H, d, kw, position=position, mask=mask, grad=True)


def test_gradient_coverage():
    """The covering set above does what its comment says."""
    for i, values in enumerate([[True, False], [True, False], ["l2", "dot"], ["self", "value"]]):
        for v in values:
            assert any(c[i] == v and c[10] not in (None, 0) and c[11] is not None for c in GRAD_CASES), (i, v)
    for ad in (ALL, ()):
        assert any(c[4] == ad and c[10] is not None and c[11] is not None for c in GRAD_CASES)
    assert {c[8] for c in GRAD_CASES} >= {16, 32} and {c[9] for c in GRAD_CASES} >= {8, 16}
    assert {c[5] for c in GRAD_CASES} >= {1, 3}
    assert all(c[6] % c[9] for c in GRAD_CASES)


# ----------------------------------------------------------------------------------- 3. dtypes, API details


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    """fp16/bf16 activations: fp32 states and sums inside, o and the gradients rounded to the input dtype."""
    kw = flags(chunk_size=8)
    errs = check_case(_seed("half", dtype), 2, 19, 1, 16, kw, position=3, mask="random", grad=True, dtype=dtype,
                      tol_o=1e-2, tol=TOL)
    assert errs["state.z"] <= TOL  # the states are fp32: only o and the gradients carry the rounding


def test_no_final_state_and_empty_sequence():
    inputs, _, _ = make_case(_seed("api"), 2, 7, 1, 16)
    q, a, z0, be, ba, ml = (inputs[k].to(DEV, F32) for k in ("q", "a", "z0", "b_eta", "b_alpha", "momentum_logit"))
    o, st = titans_memory_triton(q, a, z0, be, ba, ml, **flags())
    assert st is None and o.shape == q.shape
    o_ref, _ = titans_memory_reference(q.double().cpu(), a.double().cpu(), z0.double().cpu(), be.double().cpu(),
                                       ba.double().cpu(), ml.double().cpu(), **flags())
    assert rel_err(o, o_ref) <= TOL
    o0, st0 = titans_memory_triton(q[:, :0], a[:, :0], z0, be, ba, ml, output_final_state=True, **flags())
    assert o0.shape == (2, 0, 1, 16) and st0.position == 0
    assert torch.equal(st0.z.cpu(), z0.expand(2, *z0.shape).cpu()) and st0.s.abs().sum() == 0


def test_noncontiguous_and_bool_mask():
    inputs, m, _ = make_case(_seed("layout"), 2, 11, 2, 16, mask="random")
    q = inputs["q"].to(DEV, F32).transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, d), strides of (B, H, T, d)
    assert not q.is_contiguous()
    rest = [inputs[k].to(DEV, F32) for k in ("a", "z0", "b_eta", "b_alpha", "momentum_logit")]
    o, _ = titans_memory_triton(q, *rest, mask=m.to(DEV).bool(), **flags())
    o_ref, _ = titans_memory_reference(*(inputs[k] for k in ("q", "a", "z0", "b_eta", "b_alpha", "momentum_logit")),
                                       mask=m, **flags())
    assert rel_err(o, o_ref) <= TOL


def test_continuation_equals_one_call():
    """Two calls chained through the returned state (split mid-chunk) == one call over the whole sequence."""
    kw = flags(chunk_size=8)
    inputs, m, _ = make_case(_seed("split"), 2, 29, 1, 16, mask="random")
    x = {k: v.to(DEV, F32) for k, v in inputs.items()}
    args = [x[k] for k in ("z0", "b_eta", "b_alpha", "momentum_logit")]
    m = m.to(DEV, F32)
    o, st = titans_memory_triton(x["q"], x["a"], *args, mask=m, output_final_state=True, **kw)
    o1, st1 = titans_memory_triton(x["q"][:, :11], x["a"][:, :11], *args, mask=m[:, :11], output_final_state=True, **kw)
    o2, st2 = titans_memory_triton(x["q"][:, 11:], x["a"][:, 11:], *args, mask=m[:, 11:], state=st1,
                                   output_final_state=True, **kw)
    assert rel_err(torch.cat([o1, o2], 1), o) <= TOL
    for name in ("z_chunk", "z", "s"):
        assert rel_err(getattr(st2, name), getattr(st, name)) <= TOL
    assert st2.position == st.position == 29


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_kernel_that_does_not_fit_raises(monkeypatch, which):
    """A kernel that does not fit the GPU (OutOfResources at launch, at every precision) raises a RuntimeError
    that says what to change: kernel_backend="triton" never falls back to the reference."""
    import hope_kernels.titans.chunk as chunk_mod

    class TooBig:
        fn = chunk_mod._titans_fwd_kernel.fn if which == "forward" else chunk_mod._titans_bwd_kernel.fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise chunk_mod._OutOfResources(300000, 232448, "shared memory")

            return launch

    monkeypatch.setattr(chunk_mod, "_titans_fwd_kernel" if which == "forward" else "_titans_bwd_kernel", TooBig())
    with pytest.raises(RuntimeError, match="does not fit this GPU"):
        check_case(_seed("too-big", which), 2, 13, 1, 16, flags(chunk_size=8), position=3, mask="random", grad=True)


# --------------------------------------------------------------------------------------- 4. bad input


def _good(d=16, T=5, dtype=F32):
    inputs, _, _ = make_case(_seed("bad"), 1, T, 1, d)
    return [inputs[k].to(DEV, dtype) for k in ("q", "a", "z0", "b_eta", "b_alpha", "momentum_logit")]


@pytest.mark.parametrize(
    "mutate,kw,match",
    [
        (lambda x: [t.double() for t in x], {}, "float64"),
        (lambda x: [x[0], x[1].half()] + x[2:], {}, "must match"),
        (lambda x: x, {"chunk_size": 256}, "chunk_size=256"),
        (lambda x: x, {"chunk_size": 0}, "chunk_size"),
        (lambda x: [x[0], x[1][:, :3]] + x[2:], {}, "shape of q"),
        (lambda x: x[:2] + [x[2][:, :-1]] + x[3:], {}, "z0 must be"),
        (lambda x: x, {"objective": "huber"}, "objective"),
        (lambda x: x, {"adaptive": ("k", "w")}, "adaptive"),
    ],
)
def test_bad_input_raises(mutate, kw, match):
    args = mutate(_good())
    with pytest.raises(ValueError, match=match):
        titans_memory_triton(*args, **{**flags(), **kw})


def test_head_dim_limit():
    with pytest.raises(ValueError, match="d=160"):
        titans_memory_triton(*_good(d=160, T=1), **flags())


def test_bad_state_and_mask():
    args = _good()
    with pytest.raises(ValueError, match="mask must be"):
        titans_memory_triton(*args, mask=torch.ones(1, 4, device=DEV), **flags())
    z = torch.zeros(1, 1, memory_rows(16), 8, device=DEV)
    with pytest.raises(ValueError, match="state.z_chunk"):
        titans_memory_triton(*args, state=TitansState(z, z, z, 0), **flags())
