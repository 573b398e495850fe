"""PyTorch reference of the self-modifying Titans memory (SPEC §2, paper Eqs. 79-93, linear memories).

Three functions with one semantics:

- `titans_memory_reference`: the chunked closed form. It is what the model runs on CPU and what the
  Triton kernels are checked against. Vectorised over batch and heads, a Python loop over chunks.
- `titans_memory_step_reference`: one decode token, the per-token recurrence (Eq. 88 with momentum).
- `titans_memory_naive`: the token-by-token recurrence built from that step; the test oracle only.

The fast memories of one head are stacked row-wise as Z = [M ; M_k ; M_v ; m_eta ; m_alpha], a (3d+2) x d
matrix. Every row X follows the same rule, with all state-dependent terms taken at the chunk-start X_c:

    g_t = X_c u_t k_tᵀ                    u_t = k_t - v_t (objective "l2") or -v_t ("dot"): self targets X_c v_t
    S_t = beta S_{t-1} - eta_t g_t        momentum (without it: S_t = -eta_t g_t)
    X_t = alpha_t X_{t-1} - eps eta_t X_c k_t k_tᵀ + S_t          eps = 1 with DGD (Eq. 88), else 0

Tensors use the layout (B, T, H, d) at the API and (B, H, T, d) inside.
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


class TitansState(NamedTuple):
    """Recurrent state of the Titans memory for one layer (SPEC §5 cache).

    z_chunk: (B, H, 3d+2, d) stacked memories at the start of the current chunk (Z_c): k, v, eta, alpha
             and every gradient of the chunk are read from it.
    z:       (B, H, 3d+2, d) stacked memories after the last consumed token (Z_t).
    s:       (B, H, 3d+2, d) momentum after the last consumed token (S_t); zeros without momentum.
    position: tokens consumed so far; the chunk phase is position % chunk_size.
    """

    z_chunk: Tensor
    z: Tensor
    s: Tensor
    position: int


def memory_rows(d: int) -> int:
    """Rows of the stacked memory Z = [M ; M_k ; M_v ; m_eta ; m_alpha] for head dim d."""
    return 3 * d + 2


def adaptive_row_mask(adaptive: Sequence[str], d: int, device: torch.device | None = None) -> Tensor:
    """(3d+2,) bool: which rows of Z learn in context. M always does; the others per `adaptive`."""
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



def _check_inputs(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Tensor,
    chunk_size: int,
    eta_max: float,
    objective: str,
    memory_target: str,
    adaptive: Sequence[str],
    mask: Optional[Tensor],
    state: Optional[TitansState],
    token_dim: bool = True,
    adaptive_only: bool = False,
) -> None:
    """ValueError for any malformed input. `adaptive_only`: z0 holds only the adaptive rows
    [M_k ; M_v ; m_eta ; m_alpha], (H, 2d+2, d) (the deep memory's main memory lives elsewhere)."""
    lead = "(B, T, H, d)" if token_dim else "(B, H, d)"
    if q.dim() != (4 if token_dim else 3):
        raise ValueError(f"q must be {lead}, got shape {tuple(q.shape)}")
    if a.shape != q.shape:
        raise ValueError(f"a must have the shape of q {tuple(q.shape)}, got {tuple(a.shape)}")
    for name, t in (("q", q), ("a", a), ("z0", z0), ("b_eta", b_eta), ("b_alpha", b_alpha), ("momentum_logit", momentum_logit)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    H, d = q.shape[-2], q.shape[-1]
    want_rows, rows_label = (memory_rows(d) - d, "2d+2") if adaptive_only else (memory_rows(d), "3d+2")
    if z0.shape != (H, want_rows, d):
        raise ValueError(f"z0 must be (H, {rows_label}, d) = {(H, want_rows, d)}, got {tuple(z0.shape)}")
    for name, t in (("b_eta", b_eta), ("b_alpha", b_alpha), ("momentum_logit", momentum_logit)):
        if t.shape != (H,):
            raise ValueError(f"{name} must be (H,) = ({H},), got {tuple(t.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not eta_max > 0:
        raise ValueError(f"eta_max must be > 0, got {eta_max!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; allowed: {list(OBJECTIVES)}")
    if memory_target not in MEMORY_TARGETS:
        raise ValueError(f"memory_target={memory_target!r}; allowed: {list(MEMORY_TARGETS)}")
    adaptive_row_mask(adaptive, d)
    if mask is not None:
        want = q.shape[:2] if token_dim else q.shape[:1]
        if tuple(mask.shape) != tuple(want):
            raise ValueError(f"mask must be {'(B, T)' if token_dim else '(B,)'} = {tuple(want)}, got {tuple(mask.shape)}")
    if state is not None:
        want = (q.shape[0], H, memory_rows(d), d)
        for name in ("z_chunk", "z", "s"):
            t = getattr(state, name)
            if tuple(t.shape) != want:
                raise ValueError(f"state.{name} must be (B, H, 3d+2, d) = {want}, got {tuple(t.shape)}")
        if state.position < 0:
            raise ValueError(f"state.position must be >= 0, got {state.position}")


def _stacked_update(x_chunk: Tensor, w_u: Tensor, w_k: Tensor, k: Tensor, u: Tensor) -> Tensor:
    """X_c Σ_i (w_k[i] k_i + w_u[i] u_i) k_iᵀ for weights over the chunk tokens i.

    x_chunk: (B, H, R, d); w_u, w_k: (B, H, L); k, u: (B, H, L, d). Returns (B, H, R, d).
    """
    rank_sum = (w_k.unsqueeze(-1) * k + w_u.unsqueeze(-1) * u).transpose(-1, -2) @ k
    return x_chunk @ rank_sum


class ChunkDecays(NamedTuple):
    """Decay coefficients of the SPEC §2 closed form over the L tokens of one segment (`chunk_decays`).

    decay: (B, H, L, L), [j, t] = gamma_t/gamma_j for j <= t, else 0.
    gamma: (B, H, L), the retention product gamma_t = prod_{s<=t} alpha_s.
    c:     (B, H, L, L), [i, t] = Σ_{j=i..t} valid_j (gamma_t/gamma_j)(B_j/B_i); equal to decay without momentum.
    sigma: (B, H, L), Σ_{j<=t} valid_j (gamma_t/gamma_j) B_j; None without momentum.
    mom:   (B, H, L, L), [i, j] = B_j/B_i for i <= j, B the momentum product; None without momentum.
    log_b: (B, H, L), log B_t; None without momentum.
    """

    decay: Tensor
    gamma: Tensor
    c: Tensor
    sigma: Optional[Tensor]
    mom: Optional[Tensor]
    log_b: Optional[Tensor]


def chunk_reads(
    a: Tensor, adaptive_chunk: Tensor, valid: Tensor, b_eta: Tensor, b_alpha: Tensor, eta_max: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eq. 90: k, v, eta and log(alpha) of every token of a chunk, read from the chunk-start adaptive memories.

    a: (B, H, L, d); adaptive_chunk: (B, H, 2d+2, d) = [M_k ; M_v ; m_eta ; m_alpha] at the chunk start;
    valid: (B, H, L) 0/1; b_eta, b_alpha: (H,). Returns k, v (B, H, L, d) and eta, log_alpha (B, H, L);
    a masked token has eta = 0 and alpha = 1.
    """
    d = a.shape[-1]
    k = F.normalize(a @ adaptive_chunk[..., :d, :].transpose(-1, -2), dim=-1)
    v = a @ adaptive_chunk[..., d : 2 * d, :].transpose(-1, -2)
    eta = eta_max * torch.sigmoid((a * adaptive_chunk[..., 2 * d, :].unsqueeze(-2)).sum(-1) + b_eta[:, None]) * valid
    log_alpha = F.logsigmoid((a * adaptive_chunk[..., 2 * d + 1, :].unsqueeze(-2)).sum(-1) + b_alpha[:, None]) * valid
    return k, v, eta, log_alpha


def chunk_decays(log_alpha: Tensor, valid: Tensor, log_beta: Optional[Tensor]) -> ChunkDecays:
    """The decay coefficients of one segment from log(alpha), valid (B, H, L) and log(beta) (H,) or None.

    Computed in log space: only exponents of non-positive numbers are ever formed (no beta^{-i}, no 1/gamma).
    """
    L = log_alpha.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=log_alpha.device).triu()  # [j, t]: j <= t
    log_gamma = log_alpha.cumsum(-1)
    decay = torch.where(causal, log_gamma.unsqueeze(-2) - log_gamma.unsqueeze(-1), -torch.inf).exp()  # gamma_t/gamma_j
    gamma = log_gamma.exp()
    if log_beta is None:
        # S_t = -eta_t g_t: token i's gradient enters X_i once, then decays like X.
        return ChunkDecays(decay, gamma, decay, None, None, None)
    log_b = (log_beta[:, None] * valid).cumsum(-1)
    mom = torch.where(causal, log_b.unsqueeze(-2) - log_b.unsqueeze(-1), -torch.inf).exp()  # B_j/B_i, i <= j
    c = mom @ (valid.unsqueeze(-1) * decay)
    sigma = ((valid * log_b.exp()).unsqueeze(-2) @ decay).squeeze(-2)
    return ChunkDecays(decay, gamma, c, sigma, mom, log_b)


def read_weights(scores: Tensor, eta: Tensor, decays: ChunkDecays, eps: float) -> tuple[Tensor, Tensor]:
    """Weights [i, t] of token i's DGD and gradient terms in a read at token t (t >= i) inside a segment.

    scores: (B, H, L, L), [i, t] = r_i . z_t, the right factor of token i's rank-one update applied to the
    read's input z_t; eta: (B, H, L). Returns eps eta_i (gamma_t/gamma_i) scores and eta_i c_{i,t} scores.
    """
    return eps * eta.unsqueeze(-1) * scores * decays.decay, eta.unsqueeze(-1) * scores * decays.c


def end_weights(eta: Tensor, decays: ChunkDecays, eps: float) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Weights of token i's DGD, gradient and momentum terms in the state after the segment's last token L:
    eps eta_i gamma_L/gamma_i, eta_i c_{i,L} and eta_i B_L/B_i (None without momentum). Each (B, H, L)."""
    eta_mom = None if decays.mom is None else eta * decays.mom[..., :, -1]
    return eps * eta * decays.decay[..., :, -1], eta * decays.c[..., :, -1], eta_mom


def advance_rows(
    x_chunk: Tensor, x_start: Tensor, s_start: Tensor, k: Tensor, u: Tensor, eta: Tensor, decays: ChunkDecays,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Memory and momentum of self-target rows after the segment's last token L (SPEC §2 closed form):

        X_L = gamma_L X_s - X_c Σ_i eta_i (eps (gamma_L/gamma_i) k_i + c_{i,L} u_i) k_iᵀ + sigma_L S_s
        S_L = B_L S_s - X_c Σ_i eta_i (B_L/B_i) u_i k_iᵀ                 (S_L = S_s without momentum)

    x_chunk, x_start, s_start: (B, H, R, d); k, u: (B, H, L, d); eta: (B, H, L). Returns X_L, S_L (B, H, R, d).
    """
    eta_dgd, eta_grad, eta_mom = end_weights(eta, decays, eps)
    x_end = decays.gamma[..., -1, None, None] * x_start - _stacked_update(x_chunk, eta_grad, eta_dgd, k, u)
    if eta_mom is None:
        return x_end, s_start
    x_end = x_end + decays.sigma[..., -1, None, None] * s_start
    s_end = decays.log_b[..., -1, None, None].exp() * s_start - _stacked_update(
        x_chunk, eta_mom, torch.zeros_like(eta_mom), k, u)
    return x_end, s_end


def step_reads(
    a: Tensor, adaptive_chunk: Tensor, valid: Tensor, b_eta: Tensor, b_alpha: Tensor, eta_max: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eq. 90 for one decode token: k, v (B, H, d) and eta, alpha (B, H) from the chunk-start adaptive rows.

    a: (B, H, d); adaptive_chunk: (B, H, 2d+2, d) = [M_k ; M_v ; m_eta ; m_alpha]; valid: (B, 1) 0/1;
    b_eta, b_alpha: (H,). A masked token has eta = 0 and alpha = 1.
    """
    d = a.shape[-1]
    k = F.normalize(torch.einsum("bhed,bhd->bhe", adaptive_chunk[..., :d, :], a), dim=-1)
    v = torch.einsum("bhed,bhd->bhe", adaptive_chunk[..., d : 2 * d, :], a)
    eta = eta_max * torch.sigmoid((adaptive_chunk[..., 2 * d, :] * a).sum(-1) + b_eta) * valid
    alpha = torch.sigmoid((adaptive_chunk[..., 2 * d + 1, :] * a).sum(-1) + b_alpha)
    return k, v, eta, torch.where(valid > 0, alpha, torch.ones_like(alpha))


def step_update(
    x: Tensor, s: Tensor, grad: Tensor, dgd: Tensor, eta: Tensor, alpha: Tensor, valid: Tensor,
    beta: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """One token of Eq. 88 with Titans momentum, for any memory block X (B, H, R, R'):

        S_t = beta S_{t-1} - eta_t grad_t        (without momentum, beta None: S_t = -eta_t grad_t, s is kept)
        X_t = alpha_t X_{t-1} - eta_t dgd_t + S_t

    grad, dgd: (B, H, R, R') the inner gradient and the DGD term (eps X_c k kᵀ), both at the chunk start;
    eta, alpha: (B, H); valid: (B, 1) 0/1, a masked token changes nothing; beta: (H,) or None.
    Returns X_t and the momentum to carry.
    """
    step = -eta[..., None, None] * grad
    upd = valid[..., None, None] > 0
    if beta is None:
        s_new, new = s, step
    else:
        s_new = torch.where(upd, beta[:, None, None] * s + step, s)
        new = s_new
    x_new = alpha[..., None, None] * x - eta[..., None, None] * dgd + new
    return torch.where(upd, x_new, x), s_new


def _segment(
    q: Tensor,
    a: Tensor,
    valid: Tensor,
    z_chunk: Tensor,
    z_start: Tensor,
    s_start: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    log_beta: Optional[Tensor],
    eps: float,
    eta_max: float,
    objective: str,
    value_target: bool,
    rows: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens 1..L of one chunk (or of its remainder when the state starts mid-chunk), in closed form.

    q, a: (B, H, L, d); valid: (B, H, L) 0/1; z_chunk, z_start, s_start: (B, H, R, d) with R = 3d+2.
    Returns the reads o (B, H, L, d) and the memory and momentum after token L.

    SPEC §2 closed form, extended to a start state Z_s that may differ from the chunk-start Z_c:
        X_t = gamma_t X_s - X_c Σ_{i<=t} eta_i (eps (gamma_t/gamma_i) k_i + c_{i,t} u_i) k_iᵀ + sigma_t S_s
    with gamma the retention product, c_{i,t} = Σ_{j=i..t} valid_j (gamma_t/gamma_j)(B_j/B_i) and
    B the momentum product; a masked token has alpha = 1, eta = 0 and takes no momentum step.
    """
    d = q.shape[-1]
    m_chunk = z_chunk[..., :d, :]
    # Eq. 90: k, v, eta and alpha of every token of the chunk are read from the chunk-start memories.
    k, v, eta, log_alpha = chunk_reads(a, z_chunk[..., d:, :], valid, b_eta, b_alpha, eta_max)
    decays = chunk_decays(log_alpha, valid, log_beta)

    # Self-generated targets X_c v_t (Eqs. 83-85) turn every gradient into X_c u_t k_tᵀ.
    u = k - v if objective == "l2" else -v
    if value_target:
        # Titans/DeltaNet target for M: g = (M_c k - v) k^T, so M's self part is k (l2) or nothing (dot).
        u_m = k if objective == "l2" else torch.zeros_like(k)
    else:
        u_m = u

    # Read o_t = M_t q_t (Eq. 79, after token t's update).
    w_dgd, w_grad = read_weights(k @ q.transpose(-1, -2), eta, decays, eps)  # scores [i, t] = k_i . q_t
    r = w_dgd.transpose(-1, -2) @ k + w_grad.transpose(-1, -2) @ u_m
    o = decays.gamma.unsqueeze(-1) * (q @ z_start[..., :d, :].transpose(-1, -2)) - r @ m_chunk.transpose(-1, -2)
    if log_beta is not None:
        o = o + decays.sigma.unsqueeze(-1) * (q @ s_start[..., :d, :].transpose(-1, -2))
    if value_target:
        o = o + w_grad.transpose(-1, -2) @ v

    # State after token L: every row moves by the same right-multiplication (M differs with value targets).
    z_end, s_end = advance_rows(z_chunk, z_start, s_start, k, u, eta, decays, eps)
    if value_target:
        m_end, s_m = advance_rows(m_chunk, z_start[..., :d, :], s_start[..., :d, :], k, u_m, eta, decays, eps)
        _, eta_grad, eta_mom = end_weights(eta, decays, eps)
        m_end = m_end + (eta_grad.unsqueeze(-1) * v).transpose(-1, -2) @ k
        z_end = torch.cat([m_end, z_end[..., d:, :]], dim=-2)
        if eta_mom is not None:
            s_m = s_m + (eta_mom.unsqueeze(-1) * v).transpose(-1, -2) @ k
            s_end = torch.cat([s_m, s_end[..., d:, :]], dim=-2)
    # Rows outside `adaptive` keep their initial value: they are ordinary projections.
    rows = rows[:, None]
    return o, torch.where(rows, z_end, z_start), torch.where(rows, s_end, s_start)


def _prepare(
    q: Tensor, z0: Tensor, momentum_logit: Tensor, momentum: bool, state: Optional[TitansState], batch: int
) -> tuple[torch.dtype, Tensor, Tensor, Tensor, int, Optional[Tensor]]:
    dtype = compute_dtype(q.dtype)
    log_beta = F.logsigmoid(momentum_logit.to(dtype)) if momentum else None
    if state is None:
        z = z0.to(dtype).unsqueeze(0).expand(batch, *z0.shape)
        return dtype, z, z, torch.zeros_like(z), 0, log_beta
    return dtype, state.z_chunk.to(dtype), state.z.to(dtype), state.s.to(dtype), state.position, log_beta


def titans_memory_reference(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    momentum: bool = True,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[TitansState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[TitansState]]:
    """Chunked self-modifying Titans memory: reads o_t = M_t q_t for every token.

    Args:
        q: (B, T, H, d) static queries, l2-normalised by the caller.
        a: (B, T, H, d) input of the adaptive memories.
        z0: (H, 3d+2, d) initial stacked memories [M ; M_k ; M_v ; m_eta ; m_alpha] (parameters).
        b_eta, b_alpha, momentum_logit: (H,) per-head biases; beta = sigmoid(momentum_logit).
        chunk_size: C, the tokens that share one chunk-start state; chunk phase counts from position 0.
        mask: (B, T), 0 at positions that must change no state.
        state: cached state to continue from (then z0 only anchors nothing: the state's rows are used).
    Returns:
        o: (B, T, H, d) in q.dtype, and the TitansState after the last token when `output_final_state`.
    """
    _check_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective, memory_target, adaptive, mask, state)
    B, T, H, d = q.shape
    dtype, z_chunk, z, s, position, log_beta = _prepare(q, z0, momentum_logit, momentum, state, B)
    qh = q.transpose(1, 2).to(dtype)
    ah = a.transpose(1, 2).to(dtype)
    valid = (torch.ones(B, T, dtype=dtype, device=q.device) if mask is None else mask.to(dtype)).unsqueeze(1).expand(B, H, T)
    rows = adaptive_row_mask(adaptive, d, q.device)
    b_eta, b_alpha = b_eta.to(dtype), b_alpha.to(dtype)
    eps = 1.0 if dgd else 0.0

    outputs = []
    t = 0
    while t < T:
        length = min(chunk_size - (position + t) % chunk_size, T - t)
        o, z, s = _segment(
            qh[:, :, t : t + length], ah[:, :, t : t + length], valid[:, :, t : t + length],
            z_chunk, z, s, b_eta, b_alpha, log_beta, eps, eta_max, objective, memory_target == "value", rows,
        )
        outputs.append(o)
        t += length
        if (position + t) % chunk_size == 0:
            z_chunk = z
    o = torch.cat(outputs, dim=2).transpose(1, 2).to(q.dtype) if outputs else q.new_zeros(q.shape)
    # contiguous(): a state that never left z0 is an expanded view of the parameter; the cache gets its own copy.
    final = TitansState(z_chunk.contiguous(), z.contiguous(), s.contiguous(), position + T) if output_final_state else None
    return o, final


def titans_memory_step_reference(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    momentum: bool = True,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[TitansState] = None,
) -> tuple[Tensor, TitansState]:
    """One decode token of the Titans memory: the per-token recurrence, straight from SPEC §2.

    q, a: (B, H, d); mask: (B,). Returns o (B, H, d) in q.dtype and the state after the token.
    """
    _check_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective, memory_target, adaptive, mask, state, token_dim=False)
    B, H, d = q.shape
    dtype, z_chunk, z, s, position, log_beta = _prepare(q, z0, momentum_logit, momentum, state, B)
    out_dtype = q.dtype
    q, a = q.to(dtype), a.to(dtype)
    valid = (torch.ones(B, dtype=dtype, device=q.device) if mask is None else mask.to(dtype))[:, None]  # (B, 1)
    rows = adaptive_row_mask(adaptive, d, q.device)[:, None]

    k, v, eta, alpha = step_reads(a, z_chunk[..., d:, :], valid, b_eta.to(dtype), b_alpha.to(dtype), eta_max)

    # Eqs. 83-86: self targets X_c v, L2 (or dot) gradient at the chunk start.
    target = torch.einsum("bhrd,bhd->bhr", z_chunk, v)
    pred = torch.einsum("bhrd,bhd->bhr", z_chunk, k)
    err = pred - target if objective == "l2" else -target
    if memory_target == "value":
        err_m = pred[..., :d] - v if objective == "l2" else -v
        err = torch.cat([err_m, err[..., d:]], dim=-1)
    grad = err.unsqueeze(-1) * k.unsqueeze(-2)  # (B, H, R, d)
    dgd = (1.0 if dgd else 0.0) * pred.unsqueeze(-1) * k.unsqueeze(-2)  # Eq. 88: X_c k kᵀ
    z_new, s_new = step_update(z, s, grad, dgd, eta, alpha, valid, log_beta.exp() if momentum else None)
    z_new = torch.where(rows, z_new, z)
    s_new = torch.where(rows, s_new, s)
    o = torch.einsum("bhed,bhd->bhe", z_new[..., :d, :], q)
    if (position + 1) % chunk_size == 0:
        z_chunk = z_new
    return o.to(out_dtype), TitansState(z_chunk, z_new, s_new, position + 1)


def titans_memory_naive(
    q: Tensor,
    a: Tensor,
    z0: Tensor,
    b_eta: Tensor,
    b_alpha: Tensor,
    momentum_logit: Tensor,
    *,
    chunk_size: int,
    eta_max: float,
    momentum: bool = True,
    dgd: bool = True,
    objective: str = "l2",
    memory_target: str = "self",
    adaptive: Sequence[str] = ADAPTIVE_NAMES,
    mask: Optional[Tensor] = None,
    state: Optional[TitansState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[TitansState]]:
    """Token-by-token recurrence with the signature of `titans_memory_reference`. Test oracle only."""
    kwargs = dict(chunk_size=chunk_size, eta_max=eta_max, momentum=momentum, dgd=dgd, objective=objective,
                  memory_target=memory_target, adaptive=adaptive)
    outputs = []
    for t in range(q.shape[1]):
        o, state = titans_memory_step_reference(
            q[:, t], a[:, t], z0, b_eta, b_alpha, momentum_logit,
            mask=None if mask is None else mask[:, t], state=state, **kwargs,
        )
        outputs.append(o.to(q.dtype))
    return torch.stack(outputs, dim=1), (state if output_final_state else None)
