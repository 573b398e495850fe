"""PyTorch reference of the self-modifying Titans memory, SPEC §2 v2 (paper Eqs. 79-93), linear memories.

The fast memories of one head are stacked row-wise as Z = [W ; W_k ; W_v ; w_eta ; w_alpha], a (3d+2) x d
matrix; row block X of Z reads z -> E_X z + X z, with E_X = I for the three square memories (the residual
memories of Eq. 89, `memory_residual=True`) and 0 for w_eta, w_alpha. Per token t of chunk c:

    k_t = l2norm(E a_t + W_k,c a_t)   v_t = l2norm(E a_t + W_v,c a_t)   from the chunk-start generating memories
    eta_t = eta_max sigmoid(w_eta,c . a_t + b_eta)    alpha_t = sigmoid(w_alpha,c . a_t + b_alpha)
    u_t = k_t - v_t ("l2") or -v_t ("dot")                           self targets M_c(v_t)
    w^X_t = -eta_t (E_X + X_c) u_t                                   the write: minus eta times the gradient's left
                                                                     factor at the chunk start (Eq. 91)
    X_t = X_0 + alpha_t (X_{t-1} - X_0) - eps eta_t X_{t-1} k_t k_tᵀ + w^X_t k_tᵀ
                                                                     DGD on the running state (Eqs. 88, 93)
    o_t = E q_t + W_t q_t                                            the read after token t's update

Two choices the paper leaves open, both config fields, set by the stability figures
(benchmarks/titans_stability.py): `memory_value_norm=True` l2-normalises v_t like q_t and k_t (without it, W_v's
self-target write is quadratic in W_v and the literal rule diverges on real text at every eta_max tried, 1.0
down to 0.02); `memory_retention="init"` makes alpha_t retain toward the meta-learned initial state X_0 rather
than toward 0 (with unit values and retention toward 0, every memory relaxes to the identity: W_k = W_v is an
attracting fixed point of the self-target objective). `memory_value_norm=False, memory_retention="zero"` is
the rule exactly as printed.

With `momentum=True`, S_t = beta S_{t-1} + w_t k_tᵀ replaces the write term w_t k_tᵀ.
With `memory_target="value"`, W's write is -eta_t ((E + W_c) k_t - v_t) ("l2") or eta_t v_t ("dot").

Every row shares the transition, so a chunk is a gated delta rule over 3d+2 value rows whose writes are known
once the chunk starts (`delta_rule_*` below, also used by the deep memory). The code runs it on two row blocks,
W (which the queries read) and G = [W_k ; W_v ; w_eta ; w_alpha], that share one triangular system per chunk.
W's chunk start moves every `chunk_size` tokens; the generating memories' (and so k, v, eta, alpha) every
`adaptive_chunk_size` tokens.

Two functions with one semantics:
- `titans_memory_reference`: the chunked form (WY / UT representation inside a chunk), vectorised over batch and
  heads, a Python loop over chunks only. What the model runs on CPU and what the kernels are checked against.
- `titans_memory_step_reference`: one decode token, the per-token recurrence.
Tests hold a token-by-token oracle written straight from SPEC §2. Tensors use (B, T, H, d) at the API and
(B, H, T, d) inside.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hope_kernels._dispatch import compute_dtype

ADAPTIVE_NAMES = ("k", "v", "eta", "alpha")
OBJECTIVES = ("l2", "dot")
MEMORY_TARGETS = ("self", "value")
RETENTIONS = ("init", "zero")


class TitansState(NamedTuple):
    """Recurrent state of the Titans memory for one layer (SPEC §5 cache), fp32 (fp64 for fp64 inputs).

    z_chunk: (B, H, 3d+2, d) the gradient state: rows [:d] hold W at the start of the current chunk, rows [d:]
             the generating memories [W_k ; W_v ; w_eta ; w_alpha] at the start of the current adaptive chunk.
    z:       (B, H, 3d+2, d) the stacked memories after the last consumed token (Z_t).
    s:       (B, H, 3d+2, d) momentum after the last consumed token (S_t), or None without momentum.
    position: tokens consumed so far; the chunk phases are position % chunk_size and % adaptive_chunk_size.
    """

    z_chunk: Tensor
    z: Tensor
    s: Optional[Tensor]
    position: int


def memory_rows(d: int) -> int:
    """Rows of the stacked memory Z = [W ; W_k ; W_v ; w_eta ; w_alpha] for head dim d."""
    return 3 * d + 2


def every_row_adapts(adaptive: Sequence[str]) -> bool:
    """Whether every generating row learns in context (decided from the names, so no host sync or graph break)."""
    return set(adaptive) >= set(ADAPTIVE_NAMES)


def adaptive_row_mask(adaptive: Sequence[str], d: int, device: torch.device | None = None) -> Tensor:
    """(3d+2,) bool: which rows of Z learn in context. W always does; the others per `adaptive`."""
    if isinstance(adaptive, str):
        raise ValueError(f"adaptive must be a sequence of names such as ('k', 'v'), got the string {adaptive!r}")
    unknown = set(adaptive) - set(ADAPTIVE_NAMES)
    if unknown:
        raise ValueError(f"adaptive={list(adaptive)!r} has entries {sorted(unknown)}; allowed: {list(ADAPTIVE_NAMES)}")
    mask = torch.zeros(memory_rows(d), dtype=torch.bool, device=device)
    mask[:d] = True
    if "k" in adaptive:
        mask[d : 2 * d] = True
    if "v" in adaptive:
        mask[2 * d : 3 * d] = True
    if "eta" in adaptive:
        mask[3 * d] = True
    if "alpha" in adaptive:
        mask[3 * d + 1] = True
    return mask


def resolve_adaptive_chunk_size(chunk_size: int, adaptive_chunk_size: Optional[int]) -> int:
    """The generating memories' chunk size: `chunk_size` when None, else a positive multiple of it."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if adaptive_chunk_size is None:
        return chunk_size
    if (not isinstance(adaptive_chunk_size, int) or isinstance(adaptive_chunk_size, bool)
            or adaptive_chunk_size < 1 or adaptive_chunk_size % chunk_size):
        raise ValueError(
            f"adaptive_chunk_size={adaptive_chunk_size!r} is not allowed: it must be a positive multiple of "
            f"chunk_size={chunk_size}"
        )
    return adaptive_chunk_size


def check_memory_inputs(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Optional[Tensor],
    *,
    chunk_size: int,
    adaptive_chunk_size: Optional[int],
    eta_max: float,
    momentum: bool,
    objective: str,
    memory_target: str,
    adaptive: Sequence[str],
    mask: Optional[Tensor],
    token_dim: bool = True,
    z0_rows: Optional[int] = None,
) -> None:
    """ValueError for any malformed input shared by the linear and the deep op. `z0_rows` is the row count z0
    must have: 3d+2 (linear op, the default) or 2d+2 (the deep op's generating memories only)."""
    lead = "(B, T, H, d)" if token_dim else "(B, H, d)"
    if q.dim() != (4 if token_dim else 3):
        raise ValueError(f"q must be {lead}, got shape {tuple(q.shape)}")
    if a.shape != q.shape:
        raise ValueError(f"a must have the shape of q {tuple(q.shape)}, got {tuple(a.shape)}")
    if momentum and momentum_logit is None:
        raise ValueError("momentum=True needs momentum_logit, the (H,) logit of beta")
    if not momentum and momentum_logit is not None:
        raise ValueError("momentum_logit is given but momentum=False: pass None (there is no momentum to weight)")
    named = [("q", q), ("a", a), ("z0", z0), ("b_eta", b_eta), ("b_alpha", b_alpha)]
    if momentum_logit is not None:
        named.append(("momentum_logit", momentum_logit))
    for name, t in named:
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    H, d = q.shape[-2], q.shape[-1]
    rows = memory_rows(d) if z0_rows is None else z0_rows
    if z0.shape != (H, rows, d):
        label = "3d+2" if rows == memory_rows(d) else "2d+2"
        raise ValueError(f"z0 must be (H, {label}, d) = {(H, rows, d)}, got {tuple(z0.shape)}")
    for name, t in named[3:]:
        if t.shape != (H,):
            raise ValueError(f"{name} must be (H,) = ({H},), got {tuple(t.shape)}")
    resolve_adaptive_chunk_size(chunk_size, adaptive_chunk_size)
    if not (isinstance(eta_max, (int, float)) and eta_max > 0):
        raise ValueError(f"eta_max must be a number > 0, got {eta_max!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; allowed: {list(OBJECTIVES)}")
    if memory_target not in MEMORY_TARGETS:
        raise ValueError(f"memory_target={memory_target!r}; allowed: {list(MEMORY_TARGETS)}")
    adaptive_row_mask(adaptive, d)
    if mask is not None:
        want = q.shape[:2] if token_dim else q.shape[:1]
        if tuple(mask.shape) != tuple(want):
            raise ValueError(f"mask must be {'(B, T)' if token_dim else '(B,)'} = {tuple(want)}, got {tuple(mask.shape)}")


def check_state(state, want: dict[str, tuple[int, ...]], momentum: bool) -> None:
    """ValueError unless every tensor of a cached state has its shape (momentum tensors exist iff momentum)."""
    for name, shape in want.items():
        t = getattr(state, name)
        if t is None:
            if name.startswith("s") and not momentum:
                continue
            raise ValueError(f"state.{name} is None but momentum={momentum} needs it")
        if name.startswith("s") and not momentum:
            raise ValueError(f"state.{name} is a tensor but momentum=False: a momentum-free state holds None")
        if tuple(t.shape) != shape:
            raise ValueError(f"state.{name} must be {shape}, got {tuple(t.shape)}")
    if state.position < 0:
        raise ValueError(f"state.position must be >= 0, got {state.position}")


# ------------------------------------------------------------------------------------------------------------
# The gated delta rule over one segment (a chunk, or its part after a mid-chunk state), shared with the deep op.
# Every row of a memory follows it with the same keys and transition, so it runs on row blocks: a block is any
# set of rows (W, the generating memories G, the deep op's W2 and W1), each with its own segment-start deviation
# x0 (R, n), momentum s0 and writes (L, R). Matrices over token pairs are indexed [t, j]: target t, source j.


class SegmentDecays(NamedTuple):
    """Decay coefficients of one segment of L tokens, all computed in log space (each factor <= 1).

    gamma:     (B, H, L) retention product gamma_t = prod_{s<=t} alpha_s.
    decay:     (B, H, L, L), [t, j] = gamma_t / gamma_j for j <= t, else 0.
    c:         (B, H, L, L), [t, i] = Σ_{j=i..t} valid_j (gamma_t/gamma_j)(B_j/B_i): the weight of token i's write
               in the state after token t (`decay` itself without momentum).
    decay_end, c_end: (B, H, L) the last rows of `decay` and `c`: the weights in the segment's final state.
    sigma:     (B, H, L) Σ_{j<=t} valid_j (gamma_t/gamma_j) B_j, the weight of the start momentum; None without.
    log_b:     (B, H, L) log B_t, B the momentum product over valid tokens; None without momentum.
    """

    gamma: Tensor
    decay: Tensor
    c: Tensor
    decay_end: Tensor
    c_end: Tensor
    sigma: Optional[Tensor]
    log_b: Optional[Tensor]


def segment_decays(log_alpha: Tensor, valid: Tensor, log_beta: Optional[Tensor]) -> SegmentDecays:
    """Decays of one segment from log(alpha) (B, H, L) (0 at masked tokens), valid (B, H, L) 0/1 and log(beta)
    (H,) or None. Only exponents of non-positive numbers are formed: no 1/gamma, no beta^-i."""
    L = log_alpha.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=log_alpha.device).tril()  # [t, j]: j <= t
    log_gamma = log_alpha.cumsum(-1)
    decay = torch.where(causal, log_gamma.unsqueeze(-1) - log_gamma.unsqueeze(-2), -torch.inf).exp()
    decay_end = (log_gamma[..., -1:] - log_gamma).exp()
    if log_beta is None:
        return SegmentDecays(log_gamma.exp(), decay, decay, decay_end, decay_end, None, None)
    log_b = (log_beta[:, None] * valid).cumsum(-1)
    mom = torch.where(causal, log_b.unsqueeze(-1) - log_b.unsqueeze(-2), -torch.inf).exp()  # [j, i] = B_j/B_i
    c = decay @ (valid.unsqueeze(-1) * mom)
    sigma = (decay @ (valid * log_b.exp()).unsqueeze(-1)).squeeze(-1)
    return SegmentDecays(log_gamma.exp(), decay, c, decay_end, c[..., -1, :], sigma, log_b)


def _before(x: Tensor, fill: float = 0.0) -> Tensor:
    """Shift the token axis t by one: [..., t] = x[..., t-1] for vectors (B, H, L), [..., t, :] = x[..., t-1, :] for
    matrices [t, j], `fill` at t = 0. Turns "after token t" into "after token t-1", the state that token t's DGD
    term reads."""
    if x.dim() == 3:
        return F.pad(x[..., :-1], (1, 0), value=fill)
    return F.pad(x[..., :-1, :], (0, 0, 1, 0), value=fill)


class DGDSystem(NamedTuple):
    """The triangular system of the DGD terms of one segment (`delta_rule_dgd`).

    lower: (B, H, L, L) L[t, j] = dgd_t (gamma_{t-1}/gamma_j) k_t.k_j for j < t, else 0 (the system is I + L).
    write_weights: (B, H, L, L) C'[t, i] = dgd_t c_{t-1,i} k_t.k_i for i < t, with momentum; None without (C' = L).
    start_keys, anchor_keys: (B, H, L, n) dgd_t gamma_{t-1} k_t and dgd_t k_t, the weights of the segment-start
    deviation and of the anchor; momentum_keys: dgd_t sigma_{t-1} k_t, or None without momentum.
    """

    lower: Tensor
    write_weights: Optional[Tensor]
    start_keys: Tensor
    anchor_keys: Tensor
    momentum_keys: Optional[Tensor]


class SegmentKeys(NamedTuple):
    """What the row blocks that share keys k_t (B, H, L, n) share over one segment (`segment_keys`).

    keys: k_t. dgd: the DGD system, None without DGD.
    to_end: c_{L,t} k_t, the weight of write t in the segment's final state; corrections_to_end: (gamma_L/gamma_t)
    k_t, that of correction t (with momentum and DGD, else None: without momentum the writes are net writes);
    momentum_to_end: (B_L/B_t) k_t, that of write t in the final momentum (None without momentum).
    """

    keys: Tensor
    dgd: Optional[DGDSystem]
    to_end: Tensor
    corrections_to_end: Optional[Tensor]
    momentum_to_end: Optional[Tensor]


def segment_keys(keys: Tensor, dgd: Optional[Tensor], dec: SegmentDecays) -> SegmentKeys:
    """The key-side factors of one segment from keys (B, H, L, n), the DGD coefficients dgd (B, H, L) = eps eta_t
    (None without DGD) and the decays."""
    momentum = dec.sigma is not None
    system = None
    if dgd is not None:
        kk = keys @ keys.transpose(-1, -2)
        scale = dgd.unsqueeze(-1)
        system = DGDSystem(
            scale * _before(dec.decay) * kk,
            scale * _before(dec.c) * kk if momentum else None,
            (dgd * _before(dec.gamma, 1.0)).unsqueeze(-1) * keys,
            scale * keys,
            (dgd * _before(dec.sigma)).unsqueeze(-1) * keys if momentum else None,
        )
    corrections_to_end = dec.decay_end.unsqueeze(-1) * keys if momentum and dgd is not None else None
    momentum_to_end = (dec.log_b[..., -1:] - dec.log_b).exp().unsqueeze(-1) * keys if momentum else None
    return SegmentKeys(keys, system, dec.c_end.unsqueeze(-1) * keys, corrections_to_end, momentum_to_end)


def delta_rule_dgd(
    x0: Tensor, s0: Optional[Tensor], writes: Tensor, keys: SegmentKeys, anchor: Optional[Tensor] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """The DGD terms e_t = dgd_t X_{t-1} k_t of one row block over one segment (UT form: one triangular solve).

    With retention toward an anchor A (A = 0 when None), the recurrence
        X_t = A + alpha_t (X_{t-1} - A) - dgd_t X_{t-1} k_t k_tᵀ + N_t
    unrolls, for the deviation D = X - A, to
        D_t = gamma_t D_0 + sigma_t S_0 + Σ_{i<=t} c_{t,i} w_i k_iᵀ - Σ_{j<=t} (gamma_t/gamma_j) e_j k_jᵀ,
    so e_t = dgd_t (A + D_{t-1}) k_t is linear in the earlier e_j:
        (I + L) E = P + C' W,   P_t = dgd_t (A + gamma_{t-1} D_0 + sigma_{t-1} S_0) k_t,   C' = `write_weights`.
    Without momentum c = decay, so C' = L and the net writes n_t = w_t - e_t solve (I + L) N = W - P: the state
    then sums decayed rank-one terms n_j k_jᵀ only.

    x0: (B, H, R, n) segment-start deviation D_0; s0: momentum, or None without momentum; writes: (B, H, L, R),
    row t is w_t; keys: `segment_keys(...)`; anchor: (B, H, R, n) or None. Returns the (writes, corrections) that
    `delta_rule_read` and `delta_rule_end` take: (N, None) without momentum, (W, E) with it, (W, None) without DGD.
    """
    system = keys.dgd
    if system is None:
        return writes, None
    start = system.start_keys @ x0.transpose(-1, -2)
    if anchor is not None:
        start = start + system.anchor_keys @ anchor.transpose(-1, -2)
    # unitriangular: the solve reads I + L from L alone.
    if system.write_weights is None:
        return torch.linalg.solve_triangular(system.lower, writes - start, upper=False, unitriangular=True), None
    rhs = start + system.momentum_keys @ s0.transpose(-1, -2) + system.write_weights @ writes
    return writes, torch.linalg.solve_triangular(system.lower, rhs, upper=False, unitriangular=True)


def delta_rule_read(
    x0: Tensor, s0: Optional[Tensor], writes: Tensor, corrections: Optional[Tensor], keys: SegmentKeys,
    queries: Tensor, dec: SegmentDecays,
) -> Tensor:
    """D_t z_t for every token t of the segment, from the unrolled form of `delta_rule_dgd`.

    x0, s0: (B, H, R, n); writes, corrections: (B, H, L, R) (corrections None when the writes are net: without
    DGD or without momentum); queries: (B, H, L, n). Returns (B, H, L, R).
    """
    qk = queries @ keys.keys.transpose(-1, -2)  # [t, j] = z_t . k_j
    out = (dec.gamma.unsqueeze(-1) * queries) @ x0.transpose(-1, -2) + (dec.c * qk) @ writes
    if corrections is not None:
        out = out - (dec.decay * qk) @ corrections
    if s0 is not None:
        out = out + (dec.sigma.unsqueeze(-1) * queries) @ s0.transpose(-1, -2)
    return out


def delta_rule_end(
    x0: Tensor, s0: Optional[Tensor], writes: Tensor, corrections: Optional[Tensor], keys: SegmentKeys,
    dec: SegmentDecays,
) -> tuple[Tensor, Optional[Tensor]]:
    """Deviation and momentum after the segment's last token L. Shapes as `delta_rule_read`; returns (B, H, R, n)."""
    x_end = dec.gamma[..., -1, None, None] * x0 + writes.transpose(-1, -2) @ keys.to_end
    if corrections is not None:
        x_end = x_end - corrections.transpose(-1, -2) @ keys.corrections_to_end
    if s0 is None:
        return x_end, None
    x_end = x_end + dec.sigma[..., -1, None, None] * s0
    s_end = dec.log_b[..., -1, None, None].exp() * s0 + writes.transpose(-1, -2) @ keys.momentum_to_end
    return x_end, s_end


# ------------------------------------------------------------------------------------------------------------
# Titans-specific pieces: the maps of the memories, their reads and the writes of every row


def identity_rows(square: int, d: int, residual: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """E = residual [I ; ... ; I ; 0 ; 0] ((square d + 2) x d): the skips of the `square` residual memories
    (Eq. 89), none for w_eta and w_alpha. A row block X then maps z -> (E_X + X) z."""
    eye = residual * torch.eye(d, dtype=dtype, device=device)
    return torch.cat([eye] * square + [torch.zeros(2, d, dtype=dtype, device=device)])


def generating_reads(
    a: Tensor, generating: Tensor, valid: Tensor, b_eta: Tensor, b_alpha: Tensor, cfg: dict
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """k, v, eta and log(alpha) of tokens (Eq. 90 with residual memories), from the chunk-start generating memories.

    a: (B, H, L, d); generating: (B, H, 2d+2, d) the maps E + [W_k ; W_v ; w_eta ; w_alpha] (`identity_rows`);
    valid: (B, H, L) 0/1; b_eta, b_alpha: (H,); cfg: eta_max and value_norm. Returns k, v (B, H, L, d) and eta,
    log_alpha (B, H, L); a masked token has eta = 0 and alpha = 1.
    """
    d = a.shape[-1]
    k, v, logit_eta, logit_alpha = (a @ generating.transpose(-1, -2)).split([d, d, 1, 1], dim=-1)
    k = F.normalize(k, dim=-1)
    if cfg["value_norm"]:
        # Self targets make W_v's write quadratic in W_v through v (SPEC §2 v2 notes): unit values bound it.
        v = F.normalize(v, dim=-1)
    eta = cfg["eta_max"] * torch.sigmoid(logit_eta.squeeze(-1) + b_eta[:, None]) * valid
    return k, v, eta, F.logsigmoid(logit_alpha.squeeze(-1) + b_alpha[:, None]) * valid


def inner_error(k: Tensor, v: Tensor, objective: str) -> Tensor:
    """u_t: the self-target gradient of a row block X is (E_X + X_c) u_t k_tᵀ (SPEC §2)."""
    return k - v if objective == "l2" else -v


def gradient_writes(maps: Tensor, u: Tensor, eta: Tensor) -> Tensor:
    """w_t = -eta_t (E + X_c) u_t for the rows of one block (Eq. 91: the gradient at the chunk start).
    maps: (B, H, R, d) E + X_c; u: (B, H, L, d); eta: (B, H, L). Returns (B, H, L, R)."""
    return (-eta.unsqueeze(-1) * u) @ maps.transpose(-1, -2)


def memory_writes(
    maps_w: Tensor, maps_g: Tensor, k: Tensor, v: Tensor, eta: Tensor, objective: str, value_target: bool
) -> tuple[Tensor, Tensor]:
    """The writes of W's rows (B, H, L, d) and of the generating rows (B, H, L, 2d+2): w_t = -eta_t (E + Z_c) u_t.

    maps_w, maps_g: the chunk-start maps E + W_c (B, H, d, d) and E + G_c (B, H, 2d+2, d); k, v: (B, H, L, d);
    eta: (B, H, L). With value targets W's rows regress on v_t instead: -eta_t ((E + W_c) k_t - v_t) ("l2") or
    eta_t v_t ("dot").
    """
    u = inner_error(k, v, objective)
    if not value_target:
        w_writes = gradient_writes(maps_w, u, eta)
    elif objective == "l2":
        w_writes = gradient_writes(maps_w, k, eta) + eta.unsqueeze(-1) * v
    else:
        w_writes = eta.unsqueeze(-1) * v
    return w_writes, gradient_writes(maps_g, u, eta)


def _segment(
    q: Tensor, a: Tensor, valid: Tensor, maps: tuple[Tensor, Tensor], x0: tuple, s0: tuple, anchor: tuple,
    b_eta: Tensor, b_alpha: Tensor, log_beta: Optional[Tensor], rows_g: Optional[Tensor], cfg: dict,
) -> tuple[Tensor, tuple, tuple]:
    """One segment: tokens that share one gradient state, in closed form.

    q, a: (B, H, L, d); valid: (B, H, L) 0/1; maps: the chunk-start maps (E + W_c, E + G_c); x0, s0, anchor:
    (W, G) pairs of the segment-start deviations from the retention anchor, momenta (None without) and anchors
    (None for retention toward 0), W (B, H, d, d), G (B, H, 2d+2, d); rows_g: (2d+2,) bool, the generating rows
    that learn, or None when all do. Returns W's deviation read D_t q_t (B, H, L, d) and the (W, G) pairs of
    deviations and momenta after the segment's last token.
    """
    k, v, eta, log_alpha = generating_reads(a, maps[1], valid, b_eta, b_alpha, cfg)
    writes = memory_writes(*maps, k, v, eta, cfg["objective"], cfg["value_target"])
    dec = segment_decays(log_alpha, valid, log_beta)
    keys = segment_keys(k, eta if cfg["dgd"] else None, dec)  # both blocks: the same keys, the same transition
    (x_w, x_g), (s_w, s_g), (anchor_w, anchor_g) = x0, s0, anchor
    w_writes, w_corrections = delta_rule_dgd(x_w, s_w, writes[0], keys, anchor_w)
    g_writes, g_corrections = delta_rule_dgd(x_g, s_g, writes[1], keys, anchor_g)
    o = delta_rule_read(x_w, s_w, w_writes, w_corrections, keys, q, dec)  # W after each token's update
    w_end, sw_end = delta_rule_end(x_w, s_w, w_writes, w_corrections, keys, dec)
    g_end, sg_end = delta_rule_end(x_g, s_g, g_writes, g_corrections, keys, dec)
    if rows_g is not None:  # rows outside `adaptive` keep their initial value: they are ordinary projections
        g_end = torch.where(rows_g[:, None], g_end, x_g)
        if s_g is not None:
            sg_end = torch.where(rows_g[:, None], sg_end, s_g)
    return o, (w_end, g_end), (sw_end, sg_end)


def _prepare(
    q: Tensor, z0: Tensor, momentum_logit: Optional[Tensor], state: Optional[TitansState], batch: int
) -> tuple[torch.dtype, Tensor, Tensor, Optional[Tensor], int, Optional[Tensor]]:
    """Compute dtype, z_chunk, z, s (None without momentum), position and log(beta) (None without momentum)."""
    dtype = compute_dtype(q.dtype)
    log_beta = None if momentum_logit is None else F.logsigmoid(momentum_logit.to(dtype))
    if state is None:
        z = z0.to(dtype).unsqueeze(0).expand(batch, *z0.shape)
        return dtype, z, z, None if log_beta is None else torch.zeros_like(z), 0, log_beta
    s = None if state.s is None else state.s.to(dtype)
    return dtype, state.z_chunk.to(dtype), state.z.to(dtype), s, state.position, log_beta


def _config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
            memory_value_norm, memory_retention, memory_curvature_guard: bool = False) -> dict:
    if memory_retention not in RETENTIONS:
        raise ValueError(f"memory_retention={memory_retention!r}; allowed: {list(RETENTIONS)}")
    for name, value in (("memory_value_norm", memory_value_norm), ("memory_curvature_guard", memory_curvature_guard)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}; allowed: True or False")
    return dict(chunk_size=chunk_size, adaptive_chunk_size=resolve_adaptive_chunk_size(chunk_size, adaptive_chunk_size),
                eta_max=eta_max, dgd=dgd, objective=objective, value_target=memory_target == "value",
                residual=1.0 if memory_residual else 0.0, value_norm=memory_value_norm,
                anchored=memory_retention == "init", curvature_guard=memory_curvature_guard)


def chunk_ends(position: int, cfg: dict) -> tuple[bool, bool]:
    """Whether `position` tokens end a chunk of the main memory (every chunk_size tokens) and one of the generating
    memories (every adaptive_chunk_size tokens, a multiple of chunk_size): there the current state becomes the
    gradient state."""
    return position % cfg["chunk_size"] == 0, position % cfg["adaptive_chunk_size"] == 0


def segment_lengths(position: int, length: int, chunk_size: int) -> list[int]:
    """Lengths of the segments of a call of `length` tokens from `position`: the rest of the current chunk, whole
    chunks, then the remainder (the chunk phase counts from position 0)."""
    first = min(chunk_size - position % chunk_size, length)
    whole, rest = divmod(length - first, chunk_size)
    return ([first] if first else []) + [chunk_size] * whole + ([rest] if rest else [])


def _blocks(x: Optional[Tensor], d: int) -> tuple:
    """Split stacked rows (..., 3d+2, d) into the row blocks (W, G); (None, None) for None."""
    return (None, None) if x is None else tuple(x.split([d, x.shape[-2] - d], dim=-2))


def titans_memory_reference(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Optional[Tensor] = None,
    *,
    chunk_size: int,
    eta_max: float,
    adaptive_chunk_size: Optional[int] = None,
    momentum: bool = False,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    memory_residual: bool = True,
    memory_value_norm: bool = True,
    memory_retention: str = "init",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[TitansState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[TitansState]]:
    """Chunked self-modifying Titans memory (SPEC §2 v2): reads o_t = E q_t + W_t q_t for every token.

    Args:
        q: (B, T, H, d) static queries, l2-normalised by the caller.
        a: (B, T, H, d) input of the generating memories.
        z0: (H, 3d+2, d) initial stacked memories [W ; W_k ; W_v ; w_eta ; w_alpha] (parameters).
        b_eta, b_alpha: (H,) per-head biases. momentum_logit: (H,), beta = sigmoid of it; given iff momentum.
        chunk_size: C, the tokens whose writes use one chunk-start W; chunk phase counts from position 0.
        adaptive_chunk_size: the same for the generating memories (default C; a multiple of C).
        mask: (B, T), 0 at positions that must change no state.
        state: a cached TitansState to continue from (z0 then serves only as the retention anchor of
            memory_retention="init").
    Returns:
        o: (B, T, H, d) in q.dtype, and the TitansState after the last token when `output_final_state`.
    """
    check_memory_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size=chunk_size,
                        adaptive_chunk_size=adaptive_chunk_size, eta_max=eta_max, momentum=momentum,
                        objective=objective, memory_target=memory_target, adaptive=adaptive, mask=mask)
    B, T, H, d = q.shape
    if state is not None:
        shape = (B, H, memory_rows(d), d)
        check_state(state, dict(z_chunk=shape, z=shape, s=shape), momentum)
    cfg = _config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
                  memory_value_norm, memory_retention)
    dtype, z_chunk, z, s, position, log_beta = _prepare(q, z0, momentum_logit, state, B)
    # The loop runs on deviations from the retention anchor A = Z_0 (A = 0 for retention toward 0) and on the
    # chunk-start maps E + Z_c = (E + A) + D_c. contiguous(): the batched matmuls then read A without a copy each.
    anchor = z0.to(dtype).unsqueeze(0).expand(B, *z0.shape).contiguous() if cfg["anchored"] else None
    base = identity_rows(3, d, cfg["residual"], dtype, q.device)
    if anchor is not None:
        base = base + anchor
        # A fresh state sits at its anchor: deviation 0.
        z_chunk, z = (z_chunk - anchor, z - anchor) if state is not None else (torch.zeros_like(anchor),) * 2
    base_w, base_g = _blocks(base, d)
    x_chunk, x, mom, anchors = _blocks(z_chunk, d), _blocks(z, d), _blocks(s, d), _blocks(anchor, d)
    maps = (base_w + x_chunk[0], base_g + x_chunk[1])
    # contiguous(): the batched matmuls fold (B, H) without a copy of every segment's q and a.
    qh, ah = (x.transpose(1, 2).to(dtype).contiguous() for x in (q, a))
    valid = (torch.ones(B, T, dtype=dtype, device=q.device) if mask is None else mask.to(dtype)).unsqueeze(1).expand(B, H, T)
    rows = adaptive_row_mask(adaptive, d, q.device)[d:]
    rows_g = None if every_row_adapts(adaptive) else rows
    b_eta, b_alpha = b_eta.to(dtype), b_alpha.to(dtype)

    lengths = segment_lengths(position, T, chunk_size)
    reads = []
    t = position
    # split(), not slicing: each slice's backward would fill a zero tensor of the whole sequence.
    for q_n, a_n, valid_n in zip(qh.split(lengths, 2), ah.split(lengths, 2), valid.split(lengths, 2)):
        o, x, mom = _segment(q_n, a_n, valid_n, maps, x, mom, anchors, b_eta, b_alpha, log_beta, rows_g, cfg)
        reads.append(o)
        t += q_n.shape[2]
        w_end, g_end = chunk_ends(t, cfg)
        if w_end:
            x_chunk, maps = (x[0], x_chunk[1]), (base_w + x[0], maps[1])
        if g_end:
            x_chunk, maps = (x_chunk[0], x[1]), (maps[0], base_g + x[1])
    # o_t = (E + A_W) q_t + D_t q_t: the anchor's read for every token at once.
    o = qh @ base_w.transpose(-1, -2)
    if reads:
        o = o + torch.cat(reads, dim=2)
    o = o.transpose(1, 2).to(q.dtype)
    if not output_final_state:
        return o, None
    z_chunk, z = torch.cat(x_chunk, dim=-2), torch.cat(x, dim=-2)
    if anchor is not None:
        z_chunk, z = z_chunk + anchor, z + anchor
    # contiguous(): a state that never left z0 is an expanded view of the parameter; the cache gets its own copy.
    s = None if mom[0] is None else torch.cat(mom, dim=-2)
    return o, TitansState(z_chunk.contiguous(), z.contiguous(), s, position + T)


def generating_step_reads(
    a: Tensor, generating: Tensor, valid: Tensor, b_eta: Tensor, b_alpha: Tensor, cfg: dict
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`generating_reads` for one decode token: a (B, H, d), valid (B, 1). Returns k, v (B, H, d), eta and alpha
    (B, H) (alpha itself, 1 at a masked token)."""
    k, v, eta, log_alpha = generating_reads(a.unsqueeze(-2), generating, valid.unsqueeze(-1).expand(*a.shape[:2], 1),
                                            b_eta, b_alpha, cfg)
    return k.squeeze(-2), v.squeeze(-2), eta.squeeze(-1), log_alpha.squeeze(-1).exp()


def delta_rule_step(
    x: Tensor, s: Optional[Tensor], write: Tensor, key: Tensor, dgd: Tensor, alpha: Tensor, beta: Optional[Tensor],
    valid: Tensor, anchor: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """One token of X_t = A + alpha_t (X_{t-1} - A) - dgd_t X_{t-1} k_t k_tᵀ + N_t, N_t = w_t k_tᵀ (or the momentum
    S_t = beta S_{t-1} + w_t k_tᵀ), with A the retention anchor (0 when None).

    x, s: (B, H, R, n) (s None without momentum); write: (B, H, R); key: (B, H, n); dgd, alpha: (B, H);
    beta: (H,) or None; valid: (B, 1) 0/1, a masked token changes nothing, or None when no token is masked;
    anchor: (B, H, R, n) or None. Returns X_t and S_t.
    """
    correction = dgd.unsqueeze(-1) * (x @ key.unsqueeze(-1)).squeeze(-1)  # e_t = dgd_t X_{t-1} k_t
    x_new = alpha[..., None, None] * (x if anchor is None else x - anchor)
    if anchor is not None:
        x_new = x_new + anchor
    if s is None:
        x_new, s_new = x_new + (write - correction).unsqueeze(-1) * key.unsqueeze(-2), None
    else:
        s_new = beta[:, None, None] * s + write.unsqueeze(-1) * key.unsqueeze(-2)
        x_new = x_new - correction.unsqueeze(-1) * key.unsqueeze(-2) + s_new
    if valid is None:
        return x_new, s_new
    keep = valid[..., None, None] > 0
    return torch.where(keep, x_new, x), None if s is None else torch.where(keep, s_new, s)


def titans_memory_step_reference(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Optional[Tensor] = None,
    *,
    chunk_size: int,
    eta_max: float,
    adaptive_chunk_size: Optional[int] = None,
    momentum: bool = False,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    memory_residual: bool = True,
    memory_value_norm: bool = True,
    memory_retention: str = "init",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[TitansState] = None,
) -> tuple[Tensor, TitansState]:
    """One decode token of the Titans memory: the per-token recurrence of SPEC §2 v2.

    q, a: (B, H, d); mask: (B,). Returns o (B, H, d) in q.dtype and the state after the token.
    """
    check_memory_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size=chunk_size,
                        adaptive_chunk_size=adaptive_chunk_size, eta_max=eta_max, momentum=momentum,
                        objective=objective, memory_target=memory_target, adaptive=adaptive, mask=mask,
                        token_dim=False)
    B, H, d = q.shape
    if state is not None:
        shape = (B, H, memory_rows(d), d)
        check_state(state, dict(z_chunk=shape, z=shape, s=shape), momentum)
    cfg = _config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
                  memory_value_norm, memory_retention)
    dtype, z_chunk, z, s, position, log_beta = _prepare(q, z0, momentum_logit, state, B)
    anchor = z0.to(dtype).unsqueeze(0).expand(B, *z0.shape) if cfg["anchored"] else None
    out_dtype = q.dtype
    q, a = q.to(dtype), a.to(dtype)
    valid = (torch.ones(B, dtype=dtype, device=q.device) if mask is None else mask.to(dtype))[:, None]  # (B, 1)
    maps_w, maps_g = _blocks(identity_rows(3, d, cfg["residual"], dtype, q.device) + z_chunk, d)
    k, v, eta, alpha = generating_step_reads(a, maps_g, valid, b_eta.to(dtype), b_alpha.to(dtype), cfg)
    writes = memory_writes(maps_w, maps_g, k.unsqueeze(-2), v.unsqueeze(-2), eta.unsqueeze(-1), objective,
                           cfg["value_target"])
    dgd_coef = eta if dgd else torch.zeros_like(eta)
    z_new, s_new = delta_rule_step(z, s, torch.cat(writes, dim=-1).squeeze(-2), k, dgd_coef, alpha,
                                   None if log_beta is None else log_beta.exp(), None if mask is None else valid, anchor)
    rows = adaptive_row_mask(adaptive, d, q.device)
    if not bool(rows.all()):  # rows outside `adaptive` keep their initial value
        z_new = torch.where(rows[:, None], z_new, z)
        if s_new is not None:
            s_new = torch.where(rows[:, None], s_new, s)
    w_new = _blocks(z_new, d)[0]
    o = cfg["residual"] * q + (w_new @ q.unsqueeze(-1)).squeeze(-1)  # the read after the token's update
    w_end, g_end = chunk_ends(position + 1, cfg)
    if g_end:
        z_chunk = z_new
    elif w_end:
        z_chunk = torch.cat([_blocks(z_new, d)[0], _blocks(z_chunk, d)[1]], dim=-2)
    return o.to(out_dtype), TitansState(z_chunk, z_new, s_new, position + 1)
