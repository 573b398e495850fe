"""Triton chunk kernel of a CMS level (hope_kernels/cms/chunk.py) vs the float64 PyTorch reference.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py and
again here), so the shapes are tiny. Inputs are fresh random numbers on every run; the seed of a case is in
its failure message, and HOPE_TEST_SEED=<int> replays a run.

Tolerance: ||kernel - ref|| / ||ref|| <= 1e-4 (fp32 kernel vs float64 reference) for y, all six tensors of
the final state and the gradient of a random linear functional of all of them w.r.t. every input.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("triton cannot be imported: the Triton kernels are not testable here", allow_module_level=True)

from hope_kernels.cms.chunk import cms_level_triton  # noqa: E402
from hope_kernels.cms.reference import CMSState, cms_level_reference  # noqa: E402
from tests.hope_kernels.cms.test_reference import chunk_pad_mask  # noqa: E402

F64, F32 = torch.float64, torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ETA_MAX = 0.5
TOL = 1e-4
RUN_SEED = int(os.environ.get("HOPE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
NAMES = ("z", "w_gate", "w_up", "w_down", "p_v", "w_eta", "b_eta")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seed(*params) -> int:
    return (RUN_SEED + zlib.crc32(repr(params).encode())) % (2**31)


def make_case(seed, B, T, D, Fh, *, position=None, mask="none"):
    """float64 CPU inputs: z at RMS 0.4 (normed level input, scaled), eta ~ sigmoid(-1) * ETA_MAX."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, D, generator=g, dtype=F64)
    z = 0.4 * z / z.pow(2).mean(-1, keepdim=True).sqrt()
    leaves = {
        "z": z,
        "w_gate": torch.randn(Fh, D, generator=g, dtype=F64) / D**0.5,
        "w_up": torch.randn(Fh, D, generator=g, dtype=F64) / D**0.5,
        "w_down": torch.randn(D, Fh, generator=g, dtype=F64) / Fh**0.5,
        "p_v": torch.randn(D, D, generator=g, dtype=F64) / D**0.5,
        "w_eta": torch.randn(D, generator=g, dtype=F64) / D**0.5,
        "b_eta": torch.tensor(-1.0 + 0.3 * torch.randn((), generator=g, dtype=F64).item(), dtype=F64),
    }
    if position is not None:
        for n in ("w_gate", "w_up", "w_down"):
            leaves[f"state.{n}"] = leaves[n] + 0.05 * torch.randn(B, *leaves[n].shape, generator=g, dtype=F64)
        for n, w in (("grad_gate", "w_gate"), ("grad_up", "w_up"), ("grad_down", "w_down")):
            leaves[f"state.{n}"] = 0.02 * torch.randn(B, *leaves[w].shape, generator=g, dtype=F64)
    m = None
    if mask == "random":
        m = torch.rand(B, T, generator=g) < 0.7
    elif mask == "right_pad":
        lengths = torch.tensor([T, T - 5, 3, T - 1][:B])
        m = (torch.arange(T)[None] < lengths[:, None]).long()
    elif mask == "chunk_pad":
        m = chunk_pad_mask(B, T)
    return leaves, m


def run(fn, leaves, dtype, *, mask, position, output_final_state=True, grad=True, seed=0, **kw):
    """Run fn on copies of the leaves in `dtype`; return outputs and d(random functional)/d(every leaf)."""
    xs = {k: v.detach().to(device=DEV, dtype=dtype).requires_grad_(grad) for k, v in leaves.items()}
    state = None
    if position is not None:
        # mid-chunk: sequences alternate between a chunk in progress with and without a valid token so far
        seen = torch.arange(len(xs["z"]), device=DEV) % 2 == 0
        if position % kw["chunk_size"] == 0:
            seen = torch.zeros_like(seen)
        state = CMSState(*(xs[f"state.{n}"] for n in CMSState._fields[:6]), position=position, chunk_has_valid=seen)
    m = None if mask is None else mask.to(DEV)
    y, fs = fn(*(xs[n] for n in NAMES), eta_max=ETA_MAX, mask=m, state=state,
               output_final_state=output_final_state, **kw)
    outs = [y] + ([] if fs is None else list(fs[:6]))
    grads = {}
    if grad:
        g = torch.Generator().manual_seed(seed + 3000)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(device=DEV, dtype=o.dtype)).sum() for o in outs)
        gs = torch.autograd.grad(loss, list(xs.values()), materialize_grads=True)
        grads = dict(zip(xs.keys(), gs))
    return outs, fs, grads


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    d = (a - b).norm().item()
    n = b.norm().item()
    return d / n if n > 0 else d


def check_case(B, T, D, Fh, C, objective, decay, mask_kind, position, *, output_final_state=True, tol=TOL):
    seed = _seed(B, T, D, Fh, C, objective, decay, mask_kind, position, output_final_state)
    leaves, mask = make_case(seed, B, T, D, Fh, position=position, mask=mask_kind)
    if position is not None and position % C == 0:  # on a boundary the running sums are zero, as after an update
        for n in ("grad_gate", "grad_up", "grad_down"):
            leaves[f"state.{n}"] = torch.zeros_like(leaves[f"state.{n}"])
    kw = dict(chunk_size=C, objective=objective, decay=decay, mask=mask, position=position,
              output_final_state=output_final_state, seed=seed)
    o_ref, s_ref, g_ref = run(cms_level_reference, leaves, F64, **kw)
    o_k, s_k, g_k = run(cms_level_triton, leaves, F32, **kw)
    msg = f"seed={seed} (HOPE_TEST_SEED={RUN_SEED})"
    assert o_k[0].dtype == F32 and o_k[0].shape == o_ref[0].shape
    names = ["y"] + [f"state.{n}" for n in CMSState._fields[:6]][: len(o_ref) - 1]
    for name, a, b in zip(names, o_k, o_ref):
        assert a.shape == b.shape, f"{name} shape {msg}"
        assert rel(a, b) <= tol, f"{name}: rel err {rel(a, b):.2e} {msg}"
    if output_final_state:
        assert s_k.position == s_ref.position
        assert torch.equal(s_k.chunk_has_valid.cpu(), s_ref.chunk_has_valid), f"chunk_has_valid {msg}"
        assert all(t.dtype == F32 for t in s_k[:6])
    for name in g_ref:
        err = rel(g_k[name], g_ref[name])
        assert err <= tol, f"d loss / d {name}: rel err {err:.2e} {msg}"


# ------------------------------------------------------------------------------------------------- cases

# (B, T, D, F, C, objective, decay, mask, position): both objectives, decay 0 and 0.1, C 4 and 8, T no
# multiple of C, B 1 and 3, the three mask kinds, no state / state on a boundary / mid-chunk state.
CASES = [
    (3, 11, 16, 32, 4, "l2", 0.1, "random", None),
    (2, 11, 16, 16, 4, "dot", 0.1, "random", None),
    (3, 13, 32, 16, 8, "l2", 0.1, "right_pad", None),
    (2, 13, 16, 16, 8, "dot", 0.0, "right_pad", None),
    (1, 11, 16, 16, 4, "l2", 0.0, "none", None),
    (1, 19, 16, 32, 8, "dot", 0.1, "none", None),
    (3, 10, 16, 16, 4, "l2", 0.1, "random", 7),
    (2, 10, 16, 32, 4, "dot", 0.0, "random", 7),
    (3, 14, 32, 16, 8, "l2", 0.0, "right_pad", 13),
    (2, 14, 16, 16, 8, "dot", 0.1, "none", 13),
    (1, 10, 16, 32, 4, "l2", 0.1, "random", 32),
    (1, 18, 32, 16, 8, "dot", 0.0, "none", 32),
    (2, 11, 16, 16, 4, "l2", 0.1, "right_pad", 8),
    (1, 5, 16, 16, 8, "l2", 0.1, "none", 2),  # one partial segment that does not close its chunk
    (2, 5, 16, 16, 1, "l2", 0.1, "random", 3),  # chunk size 1: every token updates
    # padding over whole chunks with decay > 0 (SPEC §5): those chunks skip the pull, forward and backward
    (3, 13, 16, 16, 4, "l2", 0.3, "chunk_pad", 6),  # mid-chunk state, with and without a valid token so far
    (1, 11, 16, 24, 4, "dot", 0.3, "chunk_pad", 8),  # left padding from a state on a boundary
    (3, 10, 16, 16, 3, "dot", 0.2, "chunk_pad", None),
]


@pytest.mark.parametrize("B,T,D,Fh,C,objective,decay,mask_kind,position", CASES)
def test_kernel_matches_reference(B, T, D, Fh, C, objective, decay, mask_kind, position):
    check_case(B, T, D, Fh, C, objective, decay, mask_kind, position)


@pytest.mark.parametrize("position", [None, 6])
def test_without_final_state(position):
    """No returned state: the last segment's inner step is skipped; y and every gradient still match."""
    check_case(2, 11, 16, 16, 4, "l2", 0.1, "random", position, output_final_state=False)


def test_multi_tile():
    """D, F not powers of two and a chunk longer than the token tile: several tiles along every axis."""
    check_case(1, 40, 24, 40, 36, "l2", 0.1, "random", 3)


def test_plain_ffn_when_nothing_learns():
    """No state, no final state, T <= C: the level is an ordinary FFN (and matches the reference)."""
    check_case(2, 6, 16, 16, 8, "l2", 0.1, "random", None, output_final_state=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """Half-precision activations and parameters: y comes back in z.dtype, the state in fp32."""
    seed = _seed("half", str(dtype))
    leaves, mask = make_case(seed, 2, 13, 16, 32, position=5, mask="random")
    leaves = {k: v.to(dtype).to(F64) for k, v in leaves.items()}  # same values as the half inputs
    kw = dict(chunk_size=4, objective="l2", decay=0.1, mask=mask, position=5, seed=seed)
    o_ref, s_ref, _ = run(cms_level_reference, leaves, F64, grad=False, **kw)
    o_k, s_k, g_k = run(cms_level_triton, leaves, dtype, **kw)
    assert o_k[0].dtype == dtype and all(t.dtype == F32 for t in s_k[:6])
    assert rel(o_k[0], o_ref[0]) <= 1e-2
    for a, b in zip(o_k[1:], o_ref[1:]):
        assert rel(a, b) <= 1e-4
    assert all(g.dtype == dtype and torch.isfinite(g).all() for k, g in g_k.items() if not k.startswith("state"))


def test_empty_sequence():
    leaves, _ = make_case(1, 2, 0, 16, 16)
    y, st = cms_level_triton(*(leaves[n].float().to(DEV) for n in NAMES), chunk_size=4, eta_max=ETA_MAX,
                             output_final_state=True)
    assert y.shape == (2, 0, 16) and st.position == 0 and st.chunk_has_valid.tolist() == [False, False]


# ------------------------------------------------------------------------------------------- bad inputs


def _good(dtype=F32):
    leaves, _ = make_case(0, 2, 5, 16, 32)
    return [leaves[n].to(device=DEV, dtype=dtype) for n in NAMES]


def test_rejects_float64():
    with pytest.raises(ValueError, match="float64"):
        cms_level_triton(*_good(F64), chunk_size=4, eta_max=ETA_MAX)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "z must be"),  # (T, D) instead of (B, T, D)
        (lambda a: a.__setitem__(3, a[3].T), "w_down must have shape"),
        (lambda a: a.__setitem__(4, a[4][:3]), "p_v must have shape"),
        (lambda a: a.__setitem__(1, a[1].long()), "w_gate has dtype"),
    ],
)
def test_rejects_bad_shapes(change, match):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        cms_level_triton(*args, chunk_size=4, eta_max=ETA_MAX)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(objective="l1"), "objective"),
        (dict(decay=1.5), "decay"),
        (dict(eta_max=-1.0), "eta_max"),
        (dict(mask=torch.ones(2, 4)), "mask must have shape"),
    ],
)
def test_rejects_bad_options(kw, match):
    full = dict(chunk_size=4, eta_max=ETA_MAX)
    full.update(kw)
    with pytest.raises(ValueError, match=match):
        cms_level_triton(*_good(), **full)


def test_rejects_bad_state():
    args = _good()
    shapes = [(32, 16)] * 2 + [(16, 32)] + [(32, 16)] * 2 + [(16, 32)]
    seen = torch.zeros(2, dtype=torch.bool)
    st = CMSState(*(torch.zeros(2, *s) for s in shapes), position=-1, chunk_has_valid=seen)
    with pytest.raises(ValueError, match="position"):
        cms_level_triton(*args, chunk_size=4, eta_max=ETA_MAX, state=st)
    with pytest.raises(ValueError, match="chunk_has_valid"):
        cms_level_triton(*args, chunk_size=4, eta_max=ETA_MAX, state=st._replace(position=1, chunk_has_valid=None))
    st = CMSState(*(torch.zeros(2, *s, dtype=F64) for s in shapes), position=1, chunk_has_valid=seen)
    with pytest.raises(ValueError, match="float64"):
        cms_level_triton(*args, chunk_size=4, eta_max=ETA_MAX, state=st)
