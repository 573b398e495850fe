"""Tests of the CMS level reference (SPEC §3, paper Eq. 31) against the token-loop oracle.

All comparisons run in float64, where the chunked op and the oracle agree to rounding, so any mismatch is a
semantic bug rather than noise. Inputs are drawn from seeded generators so the tests never flake.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hope_kernels.cms import (
    GPU_VERIFIED,
    HAS_TRITON,
    CMSState,
    cms_level,
    cms_level_naive,
    cms_level_reference,
    cms_level_step,
    cms_level_step_reference,
)
from hope_kernels.cms.reference import STATE_TENSORS

F64 = torch.float64
D, FH, T = 8, 12, 19
ETA_MAX = 0.5
PARAM_NAMES = ("w_gate", "w_up", "w_down", "p_v", "w_eta", "b_eta")



def close(actual, expected, rtol=1e-10, atol=1e-12, msg=""):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def make_inputs(seed, B=3, T=T, D=D, Fh=FH, requires_grad=True):
    """z at RMS 0.4 (the level sees RMSNorm output, scaled down) and eta ~ sigmoid(-1): with eta_max=0.5 the
    fast weights drift by ~10% over 19 tokens, large enough to matter and small enough to stay stable."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, D, generator=g, dtype=F64)
    z = 0.4 * z / z.pow(2).mean(-1, keepdim=True).sqrt()
    params = dict(
        w_gate=torch.randn(Fh, D, generator=g, dtype=F64) / D**0.5,
        w_up=torch.randn(Fh, D, generator=g, dtype=F64) / D**0.5,
        w_down=torch.randn(D, Fh, generator=g, dtype=F64) / Fh**0.5,
        p_v=torch.randn(D, D, generator=g, dtype=F64) / D**0.5,
        w_eta=torch.randn(D, generator=g, dtype=F64) / D**0.5,
        b_eta=torch.tensor(-1.0, dtype=F64),
    )
    for t in (z, *params.values()):
        t.requires_grad_(requires_grad)
    return z, params


def make_state(seed, params, B, position, zero_grads=False, requires_grad=True):
    """θ_c near θ_0 and small running sums; at a chunk boundary the sums are zero, as after an update.
    The curvature sums are positive, of the size of a few tokens' κ_t (‖z‖² = 1.28 here).
    chunk_has_valid: all False with zero sums (nothing consumed in the chunk yet), else True, False, True, ...
    so that both ways of a mid-chunk state's pending retention pull are exercised."""
    g = torch.Generator().manual_seed(seed + 1000)
    theta = [(params[n].detach() + 0.05 * torch.randn(B, *params[n].shape, generator=g, dtype=F64))
             for n in ("w_gate", "w_up", "w_down")]
    grads = [torch.zeros_like(w) if zero_grads else 0.02 * torch.randn(w.shape, generator=g, dtype=F64)
             for w in theta]
    curv = torch.zeros(B, dtype=F64) if zero_grads else 2.0 + torch.rand(B, generator=g, dtype=F64)
    seen = torch.zeros(B, dtype=torch.bool) if zero_grads else torch.arange(B) % 2 == 0
    tensors = [t.requires_grad_(requires_grad) for t in theta + grads + [curv]]
    return CMSState(*tensors, position=position, chunk_has_valid=seen)


def flushed(state: CMSState, b: int | None = None) -> list[torch.Tensor]:
    """θ_c - Δ_c = θ_c - G / N_c of each weight: what the pending chunk of `state` applies at its boundary without
    decay (nothing after a boundary, where G = 0 and N_c = 0)."""
    rows = slice(None) if b is None else slice(b, b + 1)
    n_c = state.curvature_sum[rows, None, None]
    n_c = torch.where(n_c > 0, n_c, torch.ones_like(n_c))
    return [getattr(state, w)[rows] - getattr(state, g)[rows] / n_c
            for w, g in (("w_gate", "grad_gate"), ("w_up", "grad_up"), ("w_down", "grad_down"))]


def chunk_pad_mask(B: int, T: int) -> torch.Tensor:
    """(B, T) int64 padding over whole chunks of C = 1, 2, 4, 8 (SPEC §5): sequence 0 is left-padded by 8 tokens,
    sequence 1 right-padded after 5 valid tokens, sequence 2 all padding."""
    m = torch.ones(B, T, dtype=torch.long)
    m[0, :8] = 0
    m[1:2, 5:] = 0
    m[2:3] = 0
    return m


def make_mask(kind, B, T, seed):
    if kind == "none":
        return None
    if kind == "random":  # holes anywhere, bool
        g = torch.Generator().manual_seed(seed + 2000)
        return torch.rand(B, T, generator=g) < 0.7
    if kind == "chunk_pad":
        return chunk_pad_mask(B, T)
    # right padding as an HF attention_mask (int64 0/1): different valid lengths per sequence
    lengths = torch.tensor([T, T - 5, 3, T - 1][:B])
    return (torch.arange(T)[None] < lengths[:, None]).long()


def outer_loss(y, state, seed):
    """A random linear functional of everything the op returns, so every output path carries gradient."""
    g = torch.Generator().manual_seed(seed + 3000)
    loss = (y * torch.randn(y.shape, generator=g, dtype=F64)).sum()
    for name in STATE_TENSORS:
        t = getattr(state, name)
        loss = loss + (t * torch.randn(t.shape, generator=g, dtype=F64)).sum()
    return loss


def run_and_grad(fn, z, params, seed, **kw):
    y, state = fn(z, *params.values(), output_final_state=True, **kw)
    inputs = [z, *params.values()]
    if kw.get("state") is not None:
        inputs += [getattr(kw["state"], name) for name in STATE_TENSORS]
    # With a state and decay 0, θ_0 feeds nothing (it is only the decay anchor): its gradient is zero.
    grads = torch.autograd.grad(outer_loss(y, state, seed), inputs, materialize_grads=True)
    return y, state, grads


def assert_states_close(actual, expected, **tol):
    assert actual.position == expected.position
    assert torch.equal(actual.chunk_has_valid, expected.chunk_has_valid)
    for name in STATE_TENSORS:
        close(getattr(actual, name), getattr(expected, name), msg=f"state.{name}", **tol)


# ----------------------------------------------------------------------------------------------------------
# the chunked op equals the token loop of Eq. 31, forward and (second-order) backward

STATES = {"none": None, "boundary": 32, "mid_chunk": 7}  # 32 is a boundary of C = 1, 4, 16; 7 is not of 4, 16
OBJECTIVES, CHUNKS, MASKS = ("l2", "dot"), (1, 4, 16), ("none", "random", "right_pad", "chunk_pad")
# (B, objective, decay, chunk_size, mask_kind, state_kind): the full product with decay 0.1 (decay touches
# every update); decay 0 once per objective/chunk/state, where θ_0 drops out of the graph once a state is
# given; B = 1 on a small grid, since batch-size-1 broadcasting is its only extra risk.
GRID = (
    [(3, o, 0.1, c, m, s) for o, c, m, s in itertools.product(OBJECTIVES, CHUNKS, MASKS, STATES)]
    + [(3, o, 0.0, c, "random", s) for o, c, s in itertools.product(OBJECTIVES, CHUNKS, STATES)]
    + [(1, o, 0.1, c, "none", s) for o, c, s in itertools.product(OBJECTIVES, CHUNKS, STATES)]
    + [(1, o, 0.1, 4, "chunk_pad", s) for o, s in itertools.product(OBJECTIVES, STATES)]
)


@pytest.mark.parametrize("B,objective,decay,chunk_size,mask_kind,state_kind", GRID)
def test_reference_matches_naive(B, objective, decay, chunk_size, mask_kind, state_kind):
    seed = zlib.crc32(repr((B, objective, decay, chunk_size, mask_kind, state_kind)).encode())
    z, params = make_inputs(seed, B=B)
    position = STATES[state_kind]
    state = None if position is None else make_state(seed, params, B, position, zero_grads=state_kind == "boundary")
    kw = dict(chunk_size=chunk_size, eta_max=ETA_MAX, objective=objective, decay=decay,
              mask=make_mask(mask_kind, B, T, seed), state=state)

    y_ref, s_ref, g_ref = run_and_grad(cms_level_reference, z, params, seed, **kw)
    y_naive, s_naive, g_naive = run_and_grad(cms_level_naive, z, params, seed, **kw)

    close(y_ref, y_naive, msg="y")
    assert_states_close(s_ref, s_naive)
    # Without a returned state the op skips the last piece's inner step; the outputs must not change.
    y_only, no_state = cms_level_reference(z, *params.values(), **kw)
    assert no_state is None
    close(y_only, y_ref, rtol=0, atol=0, msg="y without output_final_state")
    names = ["z", *PARAM_NAMES] + ([f"state.{n}" for n in STATE_TENSORS] if state is not None else [])
    for name, a, b in zip(names, g_ref, g_naive):
        close(a, b, msg=f"d loss / d {name}")
    # The fast weights really moved: otherwise the equality above would hold for a plain FFN too.
    start = params["w_gate"] if state is None else state.w_gate
    assert (s_ref.w_gate - start).abs().max() > 1e-3


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("with_state", [False, True])
def test_gradcheck(objective, with_state):
    """Finite differences confirm that the hand-written SwiGLU backprop and the step normalisation N_c are
    differentiated exactly (SPEC §3 Gradient: the outer gradient flows through N_c)."""
    B, T_, D_, Fh, C = 2, 5, 3, 4, 2
    z, params = make_inputs(7, B=B, T=T_, D=D_, Fh=Fh)
    z = (z.detach() * 2).requires_grad_()  # larger inputs so second-order terms are not negligible
    state = make_state(7, params, B, position=3) if with_state else None
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    n = len(STATE_TENSORS)
    inputs = (z, *params.values()) + (tuple(getattr(state, k) for k in STATE_TENSORS) if with_state else ())

    def fn(*args):
        s = CMSState(*args[7:], position=3, chunk_has_valid=state.chunk_has_valid) if with_state else None
        y, final = cms_level_reference(*args[:7], chunk_size=C, eta_max=ETA_MAX, objective=objective,
                                       decay=0.1, mask=mask, state=s, output_final_state=True)
        return (y, *final[:n])

    # fast_mode checks a random projection v^T J u against finite differences: any wrong entry of J
    # shows with probability 1, at the cost of a few forwards instead of one per input element.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


# ----------------------------------------------------------------------------------------------------------
# state: splitting, decode, masks


@pytest.mark.parametrize("T1", [1, 5, 8, 13])
@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_split_sequence_equals_one_run(T1, objective):
    """The cache is exact (SPEC §5): T1 tokens, then T - T1 from the returned state, equals one run,
    whether the split lands mid-chunk (1, 5, 13) or on a boundary (8)."""
    z, params = make_inputs(11 + T1)
    mask = make_mask("random", 3, T, 11)
    kw = dict(chunk_size=4, eta_max=ETA_MAX, objective=objective, decay=0.1)
    y_full, s_full = cms_level_reference(z, *params.values(), mask=mask, output_final_state=True, **kw)
    y1, s1 = cms_level_reference(z[:, :T1], *params.values(), mask=mask[:, :T1], output_final_state=True, **kw)
    y2, s2 = cms_level_reference(z[:, T1:], *params.values(), mask=mask[:, T1:], state=s1,
                                 output_final_state=True, **kw)
    assert s1.position == T1
    close(torch.cat([y1, y2], 1), y_full, msg="y")
    assert_states_close(s2, s_full)
    # The outer gradient also flows across the split through the state tensors.
    g_full = torch.autograd.grad(outer_loss(y_full, s_full, 0), [z, *params.values()])
    g_split = torch.autograd.grad(outer_loss(torch.cat([y1, y2], 1), s2, 0), [z, *params.values()])
    for name, a, b in zip(["z", *PARAM_NAMES], g_split, g_full):
        close(a, b, msg=f"d loss / d {name}")


def test_state_at_boundary_has_zero_running_sums():
    """When the sequence ends on a chunk boundary the update has been applied and the sums restart."""
    z, params = make_inputs(5)
    _, s = cms_level_reference(z[:, :16], *params.values(), chunk_size=8, eta_max=ETA_MAX, output_final_state=True)
    for name in ("grad_gate", "grad_up", "grad_down"):
        assert torch.count_nonzero(getattr(s, name)) == 0
    assert (s.w_gate - params["w_gate"]).abs().max() > 1e-3
    _, s_mid = cms_level_reference(z[:, :13], *params.values(), chunk_size=8, eta_max=ETA_MAX,
                                   output_final_state=True)
    assert s_mid.grad_gate.abs().max() > 1e-4


@pytest.mark.parametrize("mask_kind", ["random", "chunk_pad"])
@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("start", [None, 6])
def test_decode_steps_equal_chunked(objective, start, mask_kind):
    """Generation (SPEC §5): one token at a time with the cache reproduces the full-sequence forward,
    from scratch and from a mid-chunk state, with masked tokens in between or padding over whole chunks
    (decay 0.1: the step must skip the pull of a chunk without a valid token, counting the state's tokens)."""
    z, params = make_inputs(21)
    mask = make_mask(mask_kind, 3, T, 21)
    state = None if start is None else make_state(21, params, 3, position=start)
    kw = dict(chunk_size=4, eta_max=ETA_MAX, objective=objective, decay=0.1)
    y_full, s_full = cms_level_reference(z, *params.values(), mask=mask, state=state, output_final_state=True, **kw)
    s = state
    for t in range(T):
        y_t, s = cms_level_step_reference(z[:, t], *params.values(), mask=mask[:, t], state=s, **kw)
        close(y_t, y_full[:, t], msg=f"y at token {t}")
    assert_states_close(s, s_full)


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_right_padding_within_chunk_changes_no_state(decay):
    """SPEC §5: padded positions change no state. Padding that stays inside the last chunk leaves θ_c and the
    running sums exactly as in the run truncated to the valid tokens; only the position differs."""
    z, params = make_inputs(31, B=1)
    kw = dict(chunk_size=8, eta_max=ETA_MAX, decay=decay)
    mask = (torch.arange(T) < 17)[None]  # tokens 17, 18 are padding inside chunk [16, 24)
    y_pad, s_pad = cms_level_reference(z, *params.values(), mask=mask, output_final_state=True, **kw)
    y_cut, s_cut = cms_level_reference(z[:, :17], *params.values(), output_final_state=True, **kw)
    close(y_pad[:, :17], y_cut, msg="valid outputs")
    assert (s_pad.position, s_cut.position) == (T, 17)
    for name in STATE_TENSORS:
        close(getattr(s_pad, name), getattr(s_cut, name), msg=name)


def test_right_padding_across_chunks_adds_no_gradient():
    """With padding that crosses chunk boundaries (decay 0), the padded run applies the pending step at the
    boundary while the truncated run still holds it: θ - G / N_c must agree, i.e. the pads added nothing to
    the gradient sum G nor to the normalisation N_c."""
    z, params = make_inputs(37)
    lengths = torch.tensor([9, 19, 4])
    mask = torch.arange(T)[None] < lengths[:, None]
    kw = dict(chunk_size=4, eta_max=ETA_MAX, output_final_state=True)
    y_pad, s_pad = cms_level_reference(z, *params.values(), mask=mask, **kw)
    for b, n in enumerate(lengths.tolist()):
        y_cut, s_cut = cms_level_reference(z[b : b + 1, :n], *params.values(), **kw)
        close(y_pad[b : b + 1, :n], y_cut, msg=f"valid outputs of sequence {b}")
        for name, a, c in zip(("w_gate", "w_up", "w_down"), flushed(s_pad, b), flushed(s_cut)):
            close(a, c, msg=f"{name} - its pending step, sequence {b}")


def test_masked_tokens_do_not_reach_the_step():
    """SPEC §5 and §3 v2: a masked token adds nothing to the inner gradient nor to N_c. Replacing the masked
    tokens by inputs 1000 times larger changes no valid output and no state."""
    z, params = make_inputs(43, requires_grad=False)
    mask = make_mask("random", 3, T, 43)
    loud = torch.where(mask[..., None], z, 1000 * torch.randn(z.shape, generator=torch.Generator().manual_seed(5),
                                                               dtype=F64))
    kw = dict(chunk_size=4, eta_max=ETA_MAX, decay=0.1, mask=mask, output_final_state=True)
    y, s = cms_level_reference(z, *params.values(), **kw)
    y_loud, s_loud = cms_level_reference(loud, *params.values(), **kw)
    close(y_loud[mask], y[mask], msg="valid outputs")
    assert_states_close(s_loud, s)


# ----------------------------------------------------------------------------------------------------------
# SPEC §5 with decay > 0: a chunk with no valid token of a sequence skips Eq. 31's retention pull too


def _row(state: CMSState | None, b: int) -> CMSState | None:
    """Sequence b of a state, as a batch of one."""
    if state is None:
        return None
    return state._replace(**{name: getattr(state, name)[b : b + 1] for name in CMSState._fields if name != "position"})


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("start", [None, 4])
def test_right_padding_over_whole_chunks_changes_no_state(objective, start):
    """Right padding over whole chunks, and a fully padded row: each row's final state equals the run that stops
    at the end of its last chunk with a valid token, which for a length that is a multiple of C is the
    unpadded run. The padding chunks close without pulling θ toward θ_0 (and add no gradient)."""
    C, s0 = 4, start or 0
    z, params = make_inputs(61, requires_grad=False)
    state = None if start is None else make_state(61, params, 3, start, zero_grads=True, requires_grad=False)
    lengths = [8, 5, 0]  # a multiple of C (3 padding chunks close after it), mid-chunk, fully padded
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    kw = dict(chunk_size=C, eta_max=ETA_MAX, objective=objective, decay=0.3)
    y_pad, s_pad = cms_level_reference(z, *params.values(), mask=mask, state=state, output_final_state=True, **kw)
    for b, n in enumerate(lengths):
        cut = -(-(s0 + n) // C) * C - s0  # tokens up to the end of the chunk of the last valid token
        y_cut, s_cut = cms_level_reference(z[b : b + 1, :cut], *params.values(), mask=mask[b : b + 1, :cut],
                                           state=_row(state, b), output_final_state=True, **kw)
        close(y_pad[b : b + 1, :n], y_cut[:, :n], msg=f"valid outputs of sequence {b}")
        for name in STATE_TENSORS:
            close(getattr(s_pad, name)[b : b + 1], getattr(s_cut, name), msg=f"state.{name} of sequence {b}")
        assert not s_pad.chunk_has_valid[b] and not s_cut.chunk_has_valid[0]
        # θ is away from θ_0 where the padding starts (but for a padded row without a state), so a pull would show
        if n or state is not None:
            assert (s_cut.w_gate[0] - params["w_gate"]).abs().max() > 1e-3


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("chunk_size", [1, 4, 8])
def test_left_padding_over_whole_chunks_changes_no_state(objective, chunk_size):
    """From a state on a chunk boundary with θ ≠ θ_0 (a previous call's cache), a left pad of 8 tokens, a
    multiple of every chunk size here, gives the unpadded run: the same valid outputs and final state."""
    pad = 8
    z, params = make_inputs(67, requires_grad=False)
    state = make_state(67, params, 3, position=8, zero_grads=True, requires_grad=False)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[:, :pad] = False
    kw = dict(chunk_size=chunk_size, eta_max=ETA_MAX, objective=objective, decay=0.3, state=state,
              output_final_state=True)
    y_pad, s_pad = cms_level_reference(z, *params.values(), mask=mask, **kw)
    y_cut, s_cut = cms_level_reference(z[:, pad:], *params.values(), **kw)
    close(y_pad[:, pad:], y_cut, msg="valid outputs")
    assert (s_pad.position, s_cut.position) == (8 + T, 8 + T - pad)
    assert torch.equal(s_pad.chunk_has_valid, s_cut.chunk_has_valid)
    for name in STATE_TENSORS:
        close(getattr(s_pad, name), getattr(s_cut, name), msg=f"state.{name}")


@pytest.mark.parametrize("decode", [False, True])
def test_fully_masked_input_applies_only_the_pending_pull(decode):
    """All padding from a mid-chunk state (position 6, C = 4): the chunk in progress includes the tokens consumed
    before, so it closes at 8 with θ <- (1 - λ)θ + λθ_0 - G / N if it had seen a valid token and θ <- θ - G / N
    if not (G, N: the state's running gradient and curvature sums); the all-padding chunks after it change
    nothing. The same token by token with the decode step."""
    decay, C = 0.3, 4
    z, params = make_inputs(71, requires_grad=False)
    state = make_state(71, params, 3, position=6, requires_grad=False)
    assert state.chunk_has_valid.tolist() == [True, False, True]
    mask = torch.zeros(3, 11, dtype=torch.bool)  # positions 6..16: boundaries at 8, 12, 16
    kw = dict(chunk_size=C, eta_max=ETA_MAX, decay=decay)
    if decode:
        final = state
        for t in range(11):
            _, final = cms_level_step_reference(z[:, t], *params.values(), mask=mask[:, t], state=final, **kw)
    else:
        _, final = cms_level_reference(z[:, :11], *params.values(), mask=mask, state=state, output_final_state=True,
                                       **kw)
    lam = decay * state.chunk_has_valid.to(F64)[:, None, None]
    for w, g in (("w_gate", "grad_gate"), ("w_up", "grad_up"), ("w_down", "grad_down")):
        th = getattr(state, w)
        step = getattr(state, g) / state.curvature_sum[:, None, None]
        close(getattr(final, w), th - lam * (th - params[w]) - step, msg=w)
        assert torch.count_nonzero(getattr(final, g)) == 0
    assert torch.count_nonzero(final.curvature_sum) == 0
    assert final.position == 17 and not final.chunk_has_valid.any()


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("scale", [1, 10, 100, 1000])
def test_large_inputs_stay_finite_and_the_drift_bounded(objective, scale):
    """SPEC §3 v2 acceptance at op level: 128 chunk updates on inputs whose RMS outer training has grown x10 ...
    x1000 keep y finite and θ within half of ‖θ_0‖ of θ_0, at the default eta_max = 1 and the gate at 1/2
    (the v1 step 1/(C D), measured: NaN at x10 already, and for "dot" at x1; benchmarks/cms_stability.py)."""
    C, D_, Fh = 4, 16, 48
    g = torch.Generator().manual_seed(91)
    z = torch.randn(2, 128 * C, D_, generator=g)
    z = scale * z / z.pow(2).mean(-1, keepdim=True).sqrt()
    theta0 = [0.2 * torch.randn(*shape, generator=g) for shape in ((Fh, D_), (Fh, D_), (D_, Fh))]
    p_v = 0.2 * torch.randn(D_, D_, generator=g)
    y, state = cms_level_reference(z, *theta0, p_v, torch.zeros(D_), torch.zeros(()), chunk_size=C, eta_max=1.0,
                                   objective=objective, output_final_state=True)
    assert torch.isfinite(y).all()
    drift = sum((w - w0).pow(2).sum((1, 2)) for w, w0 in zip(state[:3], theta0)).sqrt()
    drift = drift / sum(w0.pow(2).sum() for w0 in theta0).sqrt()
    assert (drift < 0.5).all(), drift
    assert (drift > 0).all()  # the fast weights did learn


@pytest.mark.parametrize("t", [0, 2, 3, 9, 17])
def test_causality(t):
    """y_t depends only on z_{<=t}: within a chunk every token reads θ_c, and θ_c only sums earlier chunks."""
    z, params = make_inputs(41, requires_grad=False)
    state = make_state(41, params, 3, position=2, requires_grad=False)
    kw = dict(chunk_size=4, eta_max=ETA_MAX, state=state)
    y, _ = cms_level_reference(z, *params.values(), **kw)
    z2 = z.clone()
    z2[:, t + 1 :] += torch.randn(z2[:, t + 1 :].shape, dtype=F64)
    y2, _ = cms_level_reference(z2, *params.values(), **kw)
    close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-14, msg="outputs up to t")
    assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().amax() > 1e-3  # the perturbation is visible later


# ----------------------------------------------------------------------------------------------------------
# the FFN limit, dtypes


class CountMatmuls(TorchDispatchMode):
    OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.mv.default, torch.ops.aten.dot.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk_size", [T, T + 5])
def test_no_chunk_completes_is_a_plain_ffn(chunk_size):
    """SPEC §3: with C >= T and no state, no token reads updated weights, so the level is an ordinary SwiGLU
    FFN and costs exactly one: three matmuls, no inner gradients, no eta or target projections."""
    z, params = make_inputs(51, requires_grad=False)
    w_gate, w_up, w_down = params["w_gate"], params["w_up"], params["w_down"]
    expected = (F.silu(z @ w_gate.T) * (z @ w_up.T)) @ w_down.T
    with CountMatmuls() as counter:
        y, state = cms_level_reference(z, *params.values(), chunk_size=chunk_size, eta_max=ETA_MAX)
    close(y, expected, rtol=0, atol=0, msg="y")
    assert state is None
    assert counter.count == 3
    # Asking for the state does run the inner step (so the count above is not vacuous), and it matches the oracle.
    with CountMatmuls() as counter:
        _, state = cms_level_reference(z, *params.values(), chunk_size=chunk_size, eta_max=ETA_MAX,
                                       output_final_state=True)
    assert counter.count > 3
    _, expected_state = cms_level_naive(z, *params.values(), chunk_size=chunk_size, eta_max=ETA_MAX,
                                        output_final_state=True)
    assert_states_close(state, expected_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    """SPEC §5: states and gradient sums are fp32 whatever the activation dtype; y keeps the input dtype."""
    z, params = make_inputs(61, requires_grad=False)
    y64, s64 = cms_level_reference(z, *params.values(), chunk_size=4, eta_max=ETA_MAX, output_final_state=True)
    y, s = cms_level_reference(z.to(dtype), *(p.to(dtype) for p in params.values()), chunk_size=4,
                               eta_max=ETA_MAX, output_final_state=True)
    assert y.dtype == dtype
    assert all(t.dtype == torch.float32 for t in s[:6])
    tol = 1e-5 if dtype == torch.float32 else 5e-2  # bf16 rounds the inputs; the math after that is fp32
    close(y.double(), y64, rtol=tol, atol=tol, msg="y")
    close(s.w_down.double(), s64.w_down, rtol=tol, atol=tol, msg="state.w_down")


# ----------------------------------------------------------------------------------------------------------
# validation and dispatch


def _call(**overrides):
    z, params = make_inputs(71, requires_grad=False)
    args = dict(z=z, **params)
    kw = dict(chunk_size=4, eta_max=ETA_MAX)
    for k, v in overrides.items():
        (args if k in args else kw)[k] = v
    return cms_level_reference(*args.values(), **kw)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(z=torch.zeros(3, D, dtype=F64)), r"z must be \(B, T, D\)"),
        (dict(w_up=torch.zeros(FH + 1, D, dtype=F64)), r"w_up must have shape \(12, 8\)"),
        (dict(w_down=torch.zeros(FH, D, dtype=F64)), r"w_down must have shape \(8, 12\)"),
        (dict(w_gate=torch.zeros(FH, D + 1, dtype=F64)), r"w_gate must be \(F, D\) with D=8"),
        (dict(b_eta=torch.zeros(2, dtype=F64)), r"b_eta must be a scalar"),
        (dict(chunk_size=0), r"chunk_size must be an int >= 1, got 0"),
        (dict(objective="l1"), r"objective='l1' is not one of \('l2', 'dot'\)"),
        (dict(decay=1.5), r"decay must be a number in \[0, 1\], got 1.5"),
        (dict(eta_max=0.0), r"eta_max must be a finite number > 0"),
        (dict(step="v1"), r"step='v1' is not one of \('gauss_newton',\)"),
        (dict(mask=torch.ones(3, T + 1, dtype=torch.bool)), r"mask must have shape \(B, T\) = \(3, 19\)"),
        (dict(mask=torch.full((3, T), 2)), r"mask must be bool or contain only 0 and 1"),
        (dict(z=torch.zeros(3, T, D, dtype=torch.long)), r"z has dtype torch.int64"),
        (dict(p_v=torch.zeros(D, D, dtype=F64, device="meta")), r"all tensors must be on z's device.*p_v"),
    ],
)
def test_bad_input_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_bad_state_raises():
    z, params = make_inputs(73, requires_grad=False)
    good = make_state(73, params, 3, position=5, requires_grad=False)
    with pytest.raises(ValueError, match=r"state.w_gate must have shape \(2, 12, 8\) \(B=2"):
        cms_level_reference(z[:2], *params.values(), chunk_size=4, eta_max=ETA_MAX, state=good)
    with pytest.raises(ValueError, match=r"state.position must be an int >= 0, got -1"):
        cms_level_reference(z, *params.values(), chunk_size=4, eta_max=ETA_MAX, state=good._replace(position=-1))
    for bad in (good.chunk_has_valid.long(), good.chunk_has_valid[:2], None):
        with pytest.raises(ValueError, match=r"state.chunk_has_valid must be a bool tensor of shape \(3,\)"):
            cms_level_reference(z, *params.values(), chunk_size=4, eta_max=ETA_MAX,
                                state=good._replace(chunk_has_valid=bad))
    with pytest.raises(ValueError, match=r"z_t must be \(B, D\)"):
        cms_level_step_reference(z, *params.values(), chunk_size=4, eta_max=ETA_MAX, state=good)


def test_backend_dispatch(monkeypatch):
    z, params = make_inputs(81, requires_grad=False)
    kw = dict(chunk_size=4, eta_max=ETA_MAX, output_final_state=True)
    y_ref, s_ref = cms_level_reference(z, *params.values(), **kw)
    for backend in ("torch", "auto"):  # auto on CPU tensors (and on a GPU until GPU_VERIFIED) is the reference
        y, s = cms_level(z, *params.values(), backend=backend, **kw)
        close(y, y_ref, rtol=0, atol=0, msg=f"backend={backend}")
        assert_states_close(s, s_ref, rtol=0, atol=0)
    y_t, _ = cms_level_step(z[:, 0], *params.values(), chunk_size=4, eta_max=ETA_MAX, state=None, backend="torch")
    close(y_t, y_ref[:, 0], msg="cms_level_step")
    assert HAS_TRITON and not GPU_VERIFIED
    with pytest.raises(ValueError, match="kernel_backend='cuda' is not one of"):
        cms_level(z, *params.values(), backend="cuda", **kw)
    pytest.importorskip("triton", reason="kernel_backend='triton' needs the triton package")
    # "triton" runs the kernels (tests/hope_kernels/cms/test_chunk.py, test_step.py check them), never the
    # reference: float64 has no kernel and raises, on CPU tensors only Triton's interpreter can run them.
    p32 = [p.float() for p in params.values()]
    with pytest.raises(ValueError, match="float64"):
        cms_level(z, *params.values(), backend="triton", **kw)
    if not torch.cuda.is_available():
        y, s = cms_level(z.float(), *p32, backend="triton", **kw)
        close(y, y_ref.float(), rtol=1e-4, atol=1e-6, msg="backend=triton")
        with torch.no_grad():
            y_t, _ = cms_level_step(z[:, 0].float(), *p32, chunk_size=4, eta_max=ETA_MAX, state=None,
                                    backend="triton")
        close(y_t, y_ref[:, 0].float(), rtol=1e-4, atol=1e-6, msg="cms_level_step backend=triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="kernel_backend='triton' needs CUDA tensors"):
            cms_level(z.float(), *p32, backend="triton", **kw)
        with pytest.raises(RuntimeError, match="kernel_backend='triton' needs CUDA tensors"):
            cms_level_step(z[:, 0].float(), *p32, chunk_size=4, eta_max=ETA_MAX, state=None, backend="triton")
