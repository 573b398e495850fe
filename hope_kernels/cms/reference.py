"""PyTorch reference of one Continuum Memory System level (SPEC §3 v2, paper Eqs. 30-31, 70-74).

A level is a SwiGLU MLP whose weights θ = (W_gate, W_up, W_down) are fast weights, learned per sequence
inside the forward pass. With row tensors (z_t is a row of z):

    MLP_θ(z)  = (silu(z W_gateᵀ) * (z W_upᵀ)) W_downᵀ,   a_t = z_t W_gateᵀ, b_t = z_t W_upᵀ, h_t = silu(a_t) * b_t
    y_t       = MLP_{θ_c}(z_t)                                     every token of chunk c reads θ_c (Eq. 31)
    θ_{c+1}   = θ_c - decay_c (θ_c - θ_0) - Δ_c
    Δ_c       = Σ_{t in c} eta_t ∇_θ ℓ_t(θ_c)  /  N_c                          (N_c: SPEC §3 v2, below)
    N_c       = Σ_{t in c} mask_t κ_t,   κ_t = ‖z_t‖² + ‖h_t‖² + ‖z_t‖² Σ_f r_tf² ‖W_down[:, f]‖²
    r_tf²     = silu(a_tf)² + (b_tf silu'(a_tf))²
    decay_c   = decay if chunk c holds a valid (mask = 1) token of the sequence, else 0
    eta_t     = eta_max * sigmoid(z_t · w_eta + b_eta) * mask_t
    ℓ_t       = ½ ||MLP_θ(z_t) - z_t P_v||²   ("l2")   or   -<MLP_θ(z_t), z_t P_v>   ("dot")

The step normalisation N_c (`cms_step="gauss_newton"`, the only one): with J_t = ∂y_t/∂θ, the linearised l2 update
of one chunk maps the chunk's residuals E to (I - 𝒥 diag(eta) 𝒥ᵀ / N_c) E, which contracts when
eta_max λ_max(Σ_t J_tᵀ J_t) / N_c < 2. κ_t - ‖z_t‖² = ‖h_t‖² + ‖z_t‖² Σ_f r_tf² ‖W_down[:, f]‖² bounds λ_max(J_t J_tᵀ)
from above (the W_down block of J_t J_tᵀ is ‖h_t‖² I exactly; the W_gate and W_up blocks by their traces), and
λ_max of a sum is at most the sum of the λ_max, so N_c bounds the chunk's curvature whatever the scale of z, h
and θ: any eta_max < 2 is stable, and the step shrinks by itself when outer training grows the features. The
‖z_t‖² term damps the step (Levenberg-Marquardt): for unit-scale features at initialisation it dominates, and
the step is the old v1 step eta_t / (C ‖z_t‖²) ≈ eta_t / (C D). N_c is an ordinary differentiable function of
z and θ_c, so the outer gradient flows through it too; it costs one (C, F) x (F,) product per chunk on top of
the forward (the column norms of W_down, and r², come with the a, b and h the read already computed).

Three functions with one semantics:

- `cms_level_reference`: the chunked form the model runs on CPU. Vectorised over batch, a Python loop over
  chunks, inner gradients by hand-written backprop through SwiGLU as batched matmuls over each chunk.
- `cms_level_step_reference`: one decode token, the same chunk step applied to a chunk piece of length 1.
- `cms_level_naive`: a token loop with `torch.autograd.grad` for the inner gradient and for J_t (so κ_t comes
  from autograd, not from the formula above); the test oracle only.

Chunk c is the tokens at absolute positions [cC, (c+1)C); absolute position = tokens the state has already
consumed + index in `z` (SPEC §5: chunk phase counts from position 0). The model applies the level's RMSNorm
before calling these functions, so `z` is the normed input.

Masks (SPEC §5: a masked position changes no state): a masked token has eta_t = 0, so it adds no gradient, and
mask_t = 0 in N_c, so it adds nothing to the normalisation either; a chunk with no valid token of a sequence
skips the retention pull too (decay_c = 0 above), so padding that covers whole chunks leaves θ exactly as it
was (its Σ eta ∇ℓ and N_c are both 0, and Δ_c = 0). A chunk with at least one valid token decays as usual.
`CMSState.chunk_has_valid` remembers whether the chunk in progress has seen a valid token, so that a chunk
split across calls (prefill, then decode) decides the same way.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hope_kernels._dispatch import compute_dtype

OBJECTIVES = ("l2", "dot")
STEPS = ("gauss_newton",)


class CMSState(NamedTuple):
    """Recurrent state of one CMS level (SPEC §5 cache), in the compute dtype (fp32, or fp64 for fp64 inputs).

    w_gate:    (B, F, D) chunk-start fast weights θ_c of the chunk in progress.
    w_up:      (B, F, D)
    w_down:    (B, D, F)
    grad_gate: (B, F, D) Σ eta_t ∇ℓ_t(θ_c) over the tokens already seen in the chunk in progress;
    grad_up:   (B, F, D)   zeros right after a chunk boundary, where the update has been applied.
    grad_down: (B, D, F)
    curvature_sum: (B,) N_c so far: Σ mask_t κ_t over the tokens already seen in the chunk in progress (the
               step normalisation of SPEC §3 v2); zero right after a chunk boundary.
    position:  tokens consumed so far; the chunk phase is position % chunk_size.
    chunk_has_valid: (B,) bool, whether a valid (mask = 1) token of the chunk in progress has been consumed,
               i.e. whether Eq. 31's retention pull applies when that chunk closes (SPEC §5: a chunk that is
               all padding changes no state). False right after a chunk boundary.
    """

    w_gate: Tensor
    w_up: Tensor
    w_down: Tensor
    grad_gate: Tensor
    grad_up: Tensor
    grad_down: Tensor
    curvature_sum: Tensor
    position: int
    chunk_has_valid: Tensor


# The CMSState fields that are tensors of the compute dtype: θ_c and the chunk's running sums.
STATE_TENSORS = CMSState._fields[:7]


# ----------------------------------------------------------------------------------------------------------
# input validation


def _shape_str(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _validate(
    z: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    p_v: Tensor,
    w_eta: Tensor,
    b_eta: Tensor,
    chunk_size: int,
    eta_max: float,
    objective: str,
    decay: float,
    mask: Tensor | None,
    state: CMSState | None,
    step: str,
) -> tuple[int, int, int, int]:
    """Raise ValueError on any bad argument; return (B, T, D, F). `z` is (B, T, D) here."""
    named = {"z": z, "w_gate": w_gate, "w_up": w_up, "w_down": w_down, "p_v": p_v, "w_eta": w_eta, "b_eta": b_eta}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: a floating dtype (fp16, bf16, fp32, fp64)")
    if z.dim() != 3:
        raise ValueError(f"z must be (B, T, D), got shape {_shape_str(z)}")
    B, T, D = z.shape
    if w_gate.dim() != 2 or w_gate.shape[1] != D:
        raise ValueError(f"w_gate must be (F, D) with D={D} from z, got shape {_shape_str(w_gate)}")
    Fh = w_gate.shape[0]
    expected = {"w_up": (Fh, D), "w_down": (D, Fh), "p_v": (D, D), "w_eta": (D,)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (D={D} from z, F={Fh} from w_gate), "
                f"got {_shape_str(named[name])}"
            )
    if b_eta.numel() != 1 or b_eta.dim() > 1:
        raise ValueError(f"b_eta must be a scalar tensor of shape () or (1,), got {_shape_str(b_eta)}")

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
    if step not in STEPS:
        raise ValueError(f"step={step!r} is not one of {STEPS}")
    if not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    if not isinstance(eta_max, (int, float)) or not (eta_max > 0 and math.isfinite(eta_max)):
        raise ValueError(f"eta_max must be a finite number > 0, got {eta_max!r}")

    devices = {name: t.device for name, t in named.items()}
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have shape (B, T) = {(B, T)} like z, got {_shape_str(mask)}")
        if mask.dtype != torch.bool:
            if mask.is_complex():
                raise ValueError(f"mask must be bool or 0/1, got dtype {mask.dtype}")
            if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must be bool or contain only 0 and 1; got other values")
        devices["mask"] = mask.device

    if state is not None:
        if not isinstance(state, CMSState):
            raise ValueError(f"state must be a CMSState or None, got {type(state).__name__}")
        expected = {
            "w_gate": (B, Fh, D), "w_up": (B, Fh, D), "w_down": (B, D, Fh),
            "grad_gate": (B, Fh, D), "grad_up": (B, Fh, D), "grad_down": (B, D, Fh), "curvature_sum": (B,),
        }
        for name, shape in expected.items():
            t = getattr(state, name)
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"state.{name} must be a floating-point tensor, got {t!r:.60}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"state.{name} must have shape {shape} (B={B} from z, F={Fh}, D={D}), got {_shape_str(t)}"
                )
            devices[f"state.{name}"] = t.device
        pos = state.position
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
            raise ValueError(f"state.position must be an int >= 0, got {pos!r}")
        seen = state.chunk_has_valid
        if not isinstance(seen, Tensor) or seen.dtype != torch.bool or tuple(seen.shape) != (B,):
            got = f"{seen.dtype} {_shape_str(seen)}" if isinstance(seen, Tensor) else type(seen).__name__
            raise ValueError(f"state.chunk_has_valid must be a bool tensor of shape ({B},) (B from z), got {got}")
        devices["state.chunk_has_valid"] = seen.device

    bad = {name: dev for name, dev in devices.items() if dev != z.device}
    if bad:
        raise ValueError(f"all tensors must be on z's device {z.device}; on other devices: {bad}")
    return B, T, D, Fh


# ----------------------------------------------------------------------------------------------------------
# the chunk step shared by the chunked op and the decode step


def _no_autocast(device: torch.device):
    """Keep autocast from running the fp32 fast-weight matmuls in half precision (SPEC §5 numerics)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _curvature(zz: Tensor, s: Tensor, bds: Tensor, h: Tensor, w_down: Tensor) -> Tensor:
    """κ_t = ‖z_t‖² + ‖h_t‖² + ‖z_t‖² Σ_f r_tf² ‖W_down[:, f]‖² (B, L), the per-token term of N_c (module docstring).

    zz = ‖z_t‖²: (B, L); s = silu(a), bds = b silu'(a), h: (B, L, F); w_down: (D, F) shared or (B, D, F).
    """
    column = w_down.pow(2).sum(-2)  # (F,) or (B, F): ‖W_down[:, f]‖²
    r2 = torch.addcmul(s * s, bds, bds)  # r_tf² = silu(a)² + (b silu'(a))²
    through_down = r2 @ column if column.dim() == 1 else torch.bmm(r2, column.unsqueeze(-1)).squeeze(-1)
    return torch.addcmul(zz + (h * h).sum(-1), zz, through_down)


class TokenTerms(NamedTuple):
    """What a token contributes that does not depend on θ, computed for the whole sequence before the chunk loop
    (one matmul each instead of one per chunk). eta: (B, T) eta_t, zero on masked tokens (SPEC §5); target:
    (B, T, D) z_t P_v; zz: (B, T) ‖z_t‖²."""

    eta: Tensor
    target: Tensor
    zz: Tensor


def _token_terms(z: Tensor, mask: Tensor | None, p_v: Tensor, w_eta: Tensor, b_eta: Tensor, eta_max: float) -> TokenTerms:
    """TokenTerms of z (B, T, D); mask (B, T) in the compute dtype or None."""
    # eta_t = eta_max sigmoid(z_t·w_eta + b_eta) (SPEC §3), zero on masked tokens so they change no state (§5).
    eta = eta_max * torch.sigmoid(z @ w_eta + b_eta)
    if mask is not None:
        eta = eta * mask
    return TokenTerms(eta, z @ p_v, z.pow(2).sum(-1))


def _read(x: Tensor, w: Tensor) -> Tensor:
    """x @ wᵀ (B, L, out) for x (B, L, in) and a weight w, shared (out, in) or per sequence (B, out, in).

    A per-sequence weight is read as (w @ xᵀ)ᵀ, not x @ wᵀ: the same product, but its backward then makes w's
    gradient in w's own (B, out, in) layout, where x @ wᵀ makes a transposed view. That gradient is summed with
    the state's other gradients chunk after chunk (and over the batch into θ_0's), and on CPU mixing layouts there
    costs several times a contiguous pass. A shared weight takes one matmul over all B L rows.
    torch.bmm, not @, for the per-sequence products here and in `_chunk_piece`: @ on 3-d tensors wraps the bmm
    in expand and reshape views, several autograd nodes more per product, per chunk.
    """
    return x @ w.mT if w.dim() == 2 else torch.bmm(w, x.mT).mT


def _piece_lengths(position: int, T: int, chunk_size: int) -> list[int]:
    """Lengths of the pieces of T tokens starting at absolute `position` that each lie in one chunk."""
    lengths, t = [], 0
    while t < T:
        lengths.append(min(chunk_size - (position + t) % chunk_size, T - t))
        t += lengths[-1]
    return lengths


def _chunk_piece(
    z: Tensor,
    mask: Tensor | None,
    terms: TokenTerms | None,
    theta: tuple[Tensor, Tensor, Tensor],
    grads: tuple[Tensor, Tensor, Tensor] | None,
    curvature: Tensor | None,
    seen: Tensor,
    pull: tuple[Tensor, Tensor, Tensor] | None,
    *,
    objective: str,
    decay: float,
    learn: bool,
    closes_chunk: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor] | None, Tensor | None, Tensor]:
    """Process L consecutive tokens that all lie in one chunk c.

    z: (B, L, D); mask: (B, L) in the compute dtype or None; terms: the piece's TokenTerms ((B, L), (B, L, D),
           (B, L)), None if not `learn`.
    theta: θ_c, either shared (F, D), (F, D), (D, F) (θ_0 before any update, read with one plain matmul
           over the batch) or per sequence (B, F, D), (B, F, D), (B, D, F).
    grads: the chunk's running Σ eta_t ∇ℓ_t(θ_c) so far, (B, F, D), (B, F, D), (B, D, F), or None for zeros.
    curvature: the chunk's running N_c = Σ mask_t κ_t so far, (B,), or None for zero.
    seen: (B,) bool, whether chunk c has had a valid token before this piece (CMSState.chunk_has_valid).
    pull: decay θ_0 ((F, D), (F, D), (D, F)), the fixed part of Eq. 31's retention pull (`_pull`), or None when
           decay is 0 or the piece does not close its chunk (decode: formed on a chunk's last token only).
    learn: compute this piece's inner gradients, and apply Eq. 31's update if the piece closes its chunk;
           False when nobody will read the result, so the piece is only read.
    closes_chunk: the piece ends on a chunk boundary.

    Returns y (B, L, D) and the (θ, grads, curvature, seen) to carry on: θ_{c+1}, None, None and all False after
    a boundary.
    """
    w_gate, w_up, w_down = theta
    # Read: every token of the chunk uses θ_c (Eq. 31), which makes the chunk one batch of matmuls.
    a = _read(z, w_gate)  # (B, L, F)
    b = _read(z, w_up)  # (B, L, F)
    s = F.silu(a)
    h = s * b
    y = _read(h, w_down)  # (B, L, D)
    if not learn:
        return y, theta, grads, curvature, seen

    sig = torch.sigmoid(a)
    # silu'(a) = σ(a) (1 + a (1 - σ(a))) = σ(a) + silu(a) (1 - σ(a)); b silu'(a) serves N_c and W_gate's factor.
    bds = b * torch.addcmul(sig, s, 1 - sig)
    # N_c (SPEC §3 v2) sums κ_t over the valid tokens only: a masked token adds nothing to the normalisation.
    kappa = _curvature(terms.zz, s, bds, h, w_down)
    if mask is not None:
        kappa = kappa * mask
    curvature = kappa.sum(1) if curvature is None else curvature + kappa.sum(1)
    seen = torch.ones_like(seen) if mask is None else seen | (mask > 0).any(dim=1)
    # e_t = dℓ_t/dy_t: y_t - target_t for l2, -target_t for dot. Every gradient below is linear in e_t, so
    # eta_t, and 1 / N_c when the piece closes its chunk, are folded in here, on (L, D) errors, instead of
    # scaling three (F, D) weight gradients.
    e = (y - terms.target) if objective == "l2" else -terms.target
    weight = terms.eta  # (B, L)
    if closes_chunk:
        # A chunk without a valid token has Σ eta ∇ℓ = 0 and N_c = 0: it divides by 1 (a clamp would leave the
        # backward a 0 / 0).
        inv_n = 1 / torch.where(curvature > 0, curvature, torch.ones_like(curvature))[:, None, None]  # (B, 1, 1)
        weight = weight * inv_n[:, :, 0]
    e = e * weight.unsqueeze(-1)
    # Backprop through SwiGLU by hand, summed over the chunk's tokens as matmuls (never per-token weight
    # gradients). These are ordinary differentiable ops, so the outer gradient flows through them exactly,
    # second order included (SPEC §3 "Gradient"). Each weight gradient is left.mT @ right:
    # gate Σ_t da_t z_tᵀ, up Σ_t db_t z_tᵀ, down Σ_t e_t h_tᵀ.
    dh = e @ w_down if w_down.dim() == 2 else torch.bmm(e, w_down)  # (B, L, F)
    factors = ((dh * bds, z), (dh * s, z), (e, h))

    if not closes_chunk:
        if grads is None:
            grads = tuple(torch.bmm(left.mT, right) for left, right in factors)
        else:
            grads = tuple(torch.baddbmm(g, left.mT, right) for g, (left, right) in zip(grads, factors))
        return y, theta, grads, curvature, seen

    # θ_{c+1} = θ_c - decay_c (θ_c - θ_0) - Σ_{t in c} eta_t ∇ℓ_t(θ_c) / N_c   (Eq. 31, SPEC §3 v2)
    # decay_c = decay only if chunk c held a valid token: a chunk of padding changes no state (SPEC §5).
    # Written as (1 - decay_c) θ_c + decay_c θ_0 - Σ left.mT right, with decay θ_0 (`pull`, formed once per call)
    # added in place: on CPU the cost of this reference is state-sized (B, F, D) passes and fresh state-sized
    # buffers, and a lerp makes one buffer more forward and a state-sized product more backward. Without a mask
    # decay_c is a plain number and (1 - decay_c) rides on baddbmm's beta; with one it is per sequence, (B, 1, 1),
    # and scales θ_c first. In place is exact for autograd: baddbmm does not keep its output for its backward.
    held = None if mask is None else seen.to(z.dtype)[:, None, None]  # 1 where chunk c held a valid token
    keep = 1 - decay if held is None else 1 - decay * held
    new_theta = []
    for i, (left, right) in enumerate(factors):
        if held is None:
            new = torch.baddbmm(theta[i], left.mT, right, beta=keep, alpha=-1)
        else:
            new = torch.baddbmm(theta[i] * keep, left.mT, right, alpha=-1)
        if pull is not None:
            new.add_(pull[i] if held is None else held * pull[i])
        if grads is not None:  # the chunk's tokens from earlier calls (prefill, then decode)
            new.sub_(grads[i] * inv_n)
        new_theta.append(new)
    return y, tuple(new_theta), None, None, torch.zeros_like(seen)


def _final_state(
    theta: tuple[Tensor, Tensor, Tensor], grads: tuple[Tensor, Tensor, Tensor] | None, curvature: Tensor | None,
    seen: Tensor, B: int, position: int,
) -> CMSState:
    """Package (θ_c, running sums, seen (B,) bool) as per-sequence (B, ...) tensors; None sums mean zeros."""
    theta = tuple(w if w.dim() == 3 else w.expand(B, -1, -1).contiguous() for w in theta)
    if grads is None:
        grads = tuple(torch.zeros_like(w) for w in theta)
    if curvature is None:
        curvature = theta[0].new_zeros(B)
    return CMSState(*theta, *grads, curvature, position=position, chunk_has_valid=seen)


def _cast_inputs(
    z: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, p_v: Tensor, w_eta: Tensor, b_eta: Tensor,
    mask: Tensor | None, state: CMSState | None,
) -> tuple[Tensor, tuple[Tensor, ...], Tensor, Tensor | None, CMSState | None]:
    """Everything in the compute dtype (SPEC §5); b_eta as a () scalar, the mask as 0/1 floats."""
    dt = compute_dtype(z.dtype)
    params = tuple(t.to(dt) for t in (w_gate, w_up, w_down, p_v, w_eta))
    b_eta = b_eta.to(dt).reshape(())
    mask = None if mask is None else mask.to(dt)
    if state is not None:
        state = state._replace(**{name: getattr(state, name).to(dt) for name in STATE_TENSORS})
    return z.to(dt), params, b_eta, mask, state


def _pull(theta0: tuple[Tensor, Tensor, Tensor], decay: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """decay θ_0, formed once per call rather than once per chunk (its gradient then sums over the chunks as
    (F, D) tensors and is scaled once); None when decay is 0."""
    return tuple(decay * w for w in theta0) if decay else None


def _initial(
    theta0: tuple[Tensor, Tensor, Tensor], state: CMSState | None, B: int
) -> tuple[int, tuple[Tensor, ...], tuple[Tensor, ...] | None, Tensor | None, Tensor]:
    """(position, θ, running sums or None, curvature sums or None, chunk_has_valid (B,) bool) to start from:
    the state, or θ_0 at 0."""
    if state is None:
        return 0, theta0, None, None, torch.zeros(B, dtype=torch.bool, device=theta0[0].device)
    return state.position, tuple(state[:3]), tuple(state[3:6]), state.curvature_sum, state.chunk_has_valid


# ----------------------------------------------------------------------------------------------------------
# public ops


def cms_level_reference(
    z: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    p_v: Tensor,
    w_eta: Tensor,
    b_eta: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    objective: str = "l2",
    decay: float = 0.0,
    step: str = "gauss_newton",
    mask: Tensor | None = None,
    state: CMSState | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, CMSState | None]:
    """One CMS level over a sequence: y_t = MLP_{θ_c}(z_t) with in-context chunk updates of θ (Eq. 31).

    Args:
        z: (B, T, D) the level's normed input.
        w_gate, w_up: (F, D) and w_down: (D, F): θ_0, the level's parameters (also the decay anchor).
        p_v: (D, D) target projection: target_t = z_t @ p_v.
        w_eta: (D,) and b_eta: () scalar: the learning-rate gate.
        chunk_size: C >= 1; θ is updated after every C tokens counted from absolute position 0.
        eta_max: > 0, the bound of eta_t. The step is divided by N_c, so eta_max is a fraction of the chunk's
            Gauss-Newton stability bound: the linearised update contracts for eta_max < 2 at any feature scale.
        objective: "l2" or "dot".
        decay: in [0, 1], the retention pull of θ_c toward θ_0 at each update of a chunk that held a valid token.
        step: the step normalisation N_c; "gauss_newton" (module docstring) is the only one.
        mask: (B, T) bool or 0/1, None = all valid. Masked tokens are still read but add no gradient and nothing
            to N_c, and a chunk without a valid token (counting the state's tokens of the chunk in progress)
            skips the decay pull.
        state: a CMSState to continue from; None starts at θ_0, position 0, no valid token seen.
        output_final_state: return the state after the last token.

    Returns:
        y: (B, T, D) in z.dtype, and the CMSState after the last token (None unless output_final_state).
    The state is in fp32 (fp64 for fp64 z); the outer gradient is exact w.r.t. every tensor input.
    """
    B, T, D, Fh = _validate(
        z, w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size, eta_max, objective, decay, mask, state, step
    )
    out_dtype = z.dtype
    with _no_autocast(z.device):
        z, (w_gate, w_up, w_down, p_v, w_eta), b_eta, mask, state = _cast_inputs(
            z, w_gate, w_up, w_down, p_v, w_eta, b_eta, mask, state
        )
        theta0 = (w_gate, w_up, w_down)
        start, theta, grads, curvature, seen = _initial(theta0, state, B)

        lengths = _piece_lengths(start, T, chunk_size)
        # What the last piece learns is only read through the returned state: without one, skip its inner
        # gradients. With no state and C >= T this makes the level a plain FFN at the cost of one.
        learns = [output_final_state or i + 1 < len(lengths) for i in range(len(lengths))]
        ends = list(itertools.accumulate(lengths, initial=start))[1:]
        closes = [learn and end % chunk_size == 0 for learn, end in zip(learns, ends)]
        pull = _pull(theta0, decay) if any(closes) else None
        # split(), not slicing: each slice's backward would fill a zero tensor of the whole sequence.
        nothing = [None] * len(lengths)
        masks = nothing if mask is None else mask.split(lengths, 1)
        terms = nothing
        if any(learns):
            terms = [TokenTerms(*x) for x in zip(*(x.split(lengths, 1) for x in
                                                  _token_terms(z, mask, p_v, w_eta, b_eta, eta_max)))]
        ys = []
        for learn, closes_chunk, z_n, mask_n, terms_n in zip(learns, closes, z.split(lengths, 1), masks, terms):
            y, theta, grads, curvature, seen = _chunk_piece(
                z_n, mask_n, terms_n, theta, grads, curvature, seen, pull,
                objective=objective, decay=decay, learn=learn, closes_chunk=closes_chunk,
            )
            ys.append(y)

        y = torch.cat(ys, dim=1) if ys else z.new_zeros(B, 0, D)
        final = _final_state(theta, grads, curvature, seen, B, start + T) if output_final_state else None
    return y.to(out_dtype), final


def cms_level_step_reference(
    z_t: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    p_v: Tensor,
    w_eta: Tensor,
    b_eta: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    objective: str = "l2",
    decay: float = 0.0,
    step: str = "gauss_newton",
    mask: Tensor | None = None,
    state: CMSState | None,
) -> tuple[Tensor, CMSState]:
    """One decode token: read θ_c, add eta_t ∇ℓ_t(θ_c) and κ_t to the running sums, update θ if the token closes
    a chunk.

    Args:
        z_t: (B, D) the level's normed input for this token.
        w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size, eta_max, objective, decay, step: as
            cms_level_reference.
        mask: (B,) bool or 0/1, None = valid.
        state: the CMSState so far (None = start of a sequence, θ_0 at position 0).

    Returns:
        y_t: (B, D) in z_t.dtype, and the CMSState after this token.
    """
    if not isinstance(z_t, Tensor) or z_t.dim() != 2:
        shape = _shape_str(z_t) if isinstance(z_t, Tensor) else type(z_t).__name__
        raise ValueError(f"z_t must be (B, D), got {shape}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 1):
        shape = _shape_str(mask) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be (B,) for one token, got {shape}")
    z = z_t.unsqueeze(1)
    mask = None if mask is None else mask.unsqueeze(1)
    B, _, D, Fh = _validate(
        z, w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size, eta_max, objective, decay, mask, state, step
    )
    out_dtype = z_t.dtype
    with _no_autocast(z.device):
        z, (w_gate, w_up, w_down, p_v, w_eta), b_eta, mask, state = _cast_inputs(
            z, w_gate, w_up, w_down, p_v, w_eta, b_eta, mask, state
        )
        theta0 = (w_gate, w_up, w_down)
        position, theta, grads, curvature, seen = _initial(theta0, state, B)
        closes_chunk = (position + 1) % chunk_size == 0
        y, theta, grads, curvature, seen = _chunk_piece(
            z, mask, _token_terms(z, mask, p_v, w_eta, b_eta, eta_max), theta, grads, curvature, seen,
            _pull(theta0, decay) if closes_chunk else None,
            objective=objective, decay=decay, learn=True, closes_chunk=closes_chunk,
        )
        final = _final_state(theta, grads, curvature, seen, B, position + 1)
    return y.squeeze(1).to(out_dtype), final


def cms_level_naive(
    z: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    p_v: Tensor,
    w_eta: Tensor,
    b_eta: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    objective: str = "l2",
    decay: float = 0.0,
    step: str = "gauss_newton",
    mask: Tensor | None = None,
    state: CMSState | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, CMSState | None]:
    """Test oracle: the token loop of SPEC §3, inner gradients by torch.autograd.grad(create_graph=True).

    Same arguments, shapes and returns as `cms_level_reference`; shares none of its math, so it checks the
    hand-written SwiGLU backprop and the chunk bookkeeping. Slow: tests only.
    """
    B, T, D, Fh = _validate(
        z, w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size, eta_max, objective, decay, mask, state, step
    )
    dt = compute_dtype(z.dtype)
    out_dtype = z.dtype
    z, p_v, w_eta = z.to(dt), p_v.to(dt), w_eta.to(dt)
    b_eta = b_eta.to(dt).reshape(())
    valid = torch.ones(B, T, dtype=dt, device=z.device) if mask is None else mask.to(dt)
    theta0 = [w.to(dt).expand(B, -1, -1) for w in (w_gate, w_up, w_down)]
    if state is None:
        position = 0
        theta = list(theta0)
        grads = [torch.zeros_like(w) for w in theta0]
        curvature = z.new_zeros(B)
        seen = torch.zeros(B, dtype=torch.bool, device=z.device)
    else:
        position = state.position
        theta = [w.to(dt) for w in state[:3]]
        grads = [g.to(dt) for g in state[3:6]]
        curvature = state.curvature_sum.to(dt)
        seen = state.chunk_has_valid

    ys = []
    with torch.enable_grad():  # the inner loop is a gradient step, whatever the caller's grad mode
        for t in range(T):
            z_t = z[:, t]  # (B, D)
            # autograd.grad needs θ_c in the graph; a θ no outer gradient reaches gets its own leaf.
            th = [w if w.requires_grad else w.detach().requires_grad_() for w in theta]
            a = torch.einsum("bfd,bd->bf", th[0], z_t)
            b = torch.einsum("bfd,bd->bf", th[1], z_t)
            y_t = torch.einsum("bdf,bf->bd", th[2], F.silu(a) * b)  # MLP_{θ_c}(z_t)
            target = z_t @ p_v
            if objective == "l2":
                loss = 0.5 * ((y_t - target) ** 2).sum(-1)  # ℓ_t = ½ ||MLP(z_t) - z_t P_v||²
            else:
                loss = -(y_t * target).sum(-1)  # ℓ_t = -<MLP(z_t), z_t P_v>
            # Sequences do not share θ, so the gradient of the batch sum is each sequence's own ∇ℓ_t.
            inner = torch.autograd.grad(loss.sum(), th, create_graph=True)
            eta = eta_max * torch.sigmoid(z_t @ w_eta + b_eta) * valid[:, t]  # (B,)
            # κ_t = ‖z_t‖² + λ_max(J_down J_downᵀ) + tr(J_gate J_gateᵀ) + tr(J_up J_upᵀ), with the rows of
            # J_t = ∂y_t/∂θ from autograd; J_down J_downᵀ = ‖h_t‖² I, so its λ_max is its trace / D.
            rows = [torch.autograd.grad(y_t[:, i].sum(), th, create_graph=True) for i in range(D)]
            traces = [sum(row[k].pow(2).sum((-2, -1)) for row in rows) for k in range(3)]
            kappa = z_t.pow(2).sum(-1) + traces[0] + traces[1] + traces[2] / D
            curvature = curvature + valid[:, t] * kappa
            grads = [g + eta[:, None, None] * d for g, d in zip(grads, inner)]
            seen = seen | (valid[:, t] > 0)
            ys.append(y_t)
            if (position + t + 1) % chunk_size == 0:  # token t closes its chunk: Eq. 31 with the v2 step
                n_c = torch.where(curvature > 0, curvature, torch.ones_like(curvature))[:, None, None]
                # the pull applies only to a chunk that held a valid token (SPEC §5: padding changes no state)
                lam = decay * seen.to(dt)[:, None, None]
                theta = [w - lam * (w - w0) - g / n_c for w, w0, g in zip(theta, theta0, grads)]
                grads = [torch.zeros_like(g) for g in grads]
                curvature = torch.zeros_like(curvature)
                seen = torch.zeros_like(seen)

    y = torch.stack(ys, dim=1) if ys else z.new_zeros(B, 0, D)
    final = None
    if output_final_state:
        final = CMSState(*theta, *grads, curvature, position=position + T, chunk_has_valid=seen)
    return y.to(out_dtype), final
