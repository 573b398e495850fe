"""PyTorch reference of the self-modifying Titans memory with a deep main memory (SPEC §2 "Deep memory",
paper Eq. 91, `memory_depth=2`).

Per (sequence, head) the main memory is a residual 2-layer MLP

    M(z) = z + W1 sigma(W2 z),      W1: d x h, W2: h x d, h = `memory_hidden`, sigma = SiLU.

The adaptive memories A = [M_k ; M_v ; m_eta ; m_alpha] ((2d+2) x d) stay linear and follow the linear op
exactly (`hope_kernels.titans.reference`, whose helpers this module imports): k_t, v_t, eta_t, alpha_t of every
token of chunk c come from the chunk-start A_c (Eq. 90); a masked token has eta = 0, alpha = 1 and takes no
momentum step; the chunk phase counts from position 0; a cached state can start mid-chunk.

Decisions of the lead where the SPEC is silent:

* Objective at the chunk-start theta_c = (W1_c, W2_c). Target: the self target M_c(v_t) (Eqs. 83-85), or v_t with
  `memory_target="value"`. No inner gradient flows through the target; the outer gradient flows through
  everything (targets included). `objective="l2"`: e_t = M_c(k_t) - target; `"dot"`: e_t = -target.
* The inner gradients are rank one, with p_t = W2_c k_t:
      G1_t = e_t sigma(p_t)ᵀ                          (d x h)
      G2_t = (sigma'(p_t) ⊙ W1_cᵀ e_t) k_tᵀ            (h x d)
* Update per token for both layers, with the shared momentum beta and retention alpha_t (Eq. 88 with momentum):
      S_t = beta S_{t-1} - eta_t G_t                  (`momentum=False`: S_t = -eta_t G_t)
      W_t = alpha_t W_{t-1} - eps eta_t D_t + S_t
  The DGD preconditioner acts on the input side only: D2_t = W2_c k_t k_tᵀ, D1_t = 0 (eps = 1 with `dgd`).
* The read after token t's update: o_t = M_t(q_t) = q_t + W1_t sigma(W2_t q_t) (Eq. 79).

Within a chunk this is the TTT-MLP dual form: with the SPEC §2 decay coefficients gamma, c_{i,t}, sigma_t
(`chunk_decays`, log space),
    W2_t q_t = gamma_t W2_s q_t + sigma_t S2_s q_t
               - Σ_{i<=t} eta_i (k_i . q_t) (eps (gamma_t/gamma_i) p_i + c_{i,t} g_i)
    W1_t h_t = gamma_t W1_s h_t + sigma_t S1_s h_t - Σ_{i<=t} eta_i c_{i,t} (sigma(p_i) . h_t) e_i,
    h_t = sigma(W2_t q_t)
where g_i = sigma'(p_i) ⊙ W1_cᵀ e_i and (W_s, S_s) is the segment-start state (the chunk start, or a mid-chunk
cached state): a handful of masked C x C and C x d (C x h) matmuls per chunk.

Four functions with one semantics:
- `titans_deep_memory_reference`: the chunked closed form, a Python loop over chunks only.
- `titans_deep_memory_step_reference`: one decode token, the per-token recurrence with the rank-one gradients.
- `titans_deep_memory_naive`: the token-by-token oracle: it builds every per-token state explicitly and takes
  the inner gradients with torch.autograd (not with the rank-one formulas); the ground truth of the tests.
Tensors use the layout (B, T, H, d) at the API and (B, H, T, d) inside.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hope_kernels._dispatch import compute_dtype
from hope_kernels.titans.reference import (
    ADAPTIVE_NAMES,
    _check_inputs,
    adaptive_row_mask,
    advance_rows,
    chunk_decays,
    chunk_reads,
    end_weights,
    read_weights,
    step_reads,
    step_update,
)

__all__ = [
    "DeepTitansState",
    "adaptive_rows",
    "titans_deep_memory_naive",
    "titans_deep_memory_reference",
    "titans_deep_memory_step_reference",
]


class DeepTitansState(NamedTuple):
    """Recurrent state of the deep Titans memory for one layer (SPEC §5 cache), fp32 (fp64 for fp64 inputs).

    z_chunk, z, s:     (B, H, 2d+2, d) adaptive rows [M_k ; M_v ; m_eta ; m_alpha]: at the chunk start, after the
                       last consumed token, and their momentum.
    w1_chunk, w1, s1:  (B, H, d, h) the main memory's output layer W1: chunk start, current, momentum.
    w2_chunk, w2, s2:  (B, H, h, d) its input layer W2: chunk start, current, momentum.
    position:          tokens consumed so far; the chunk phase is position % chunk_size.
    The chunk-start copies make cached decoding exact: every gradient of a chunk is taken there.
    """

    z_chunk: Tensor
    z: Tensor
    s: Tensor
    w1_chunk: Tensor
    w1: Tensor
    s1: Tensor
    w2_chunk: Tensor
    w2: Tensor
    s2: Tensor
    position: int


def adaptive_rows(d: int) -> int:
    """Rows of the adaptive memories [M_k ; M_v ; m_eta ; m_alpha] for head dim d."""
    return 2 * d + 2


def _silu_grad(x: Tensor) -> Tensor:
    """d/dx x sigmoid(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _check_deep_inputs(
    q: Tensor, a: Tensor, w1_0: Tensor, w2_0: Tensor, z0: Tensor, b_eta: Tensor, b_alpha: Tensor,
    momentum_logit: Tensor, chunk_size: int, eta_max: float, objective: str, memory_target: str,
    adaptive: Sequence[str], mask: Optional[Tensor], state: Optional[DeepTitansState], token_dim: bool = True,
) -> None:
    _check_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective, memory_target, adaptive,
                  mask, None, token_dim=token_dim, adaptive_only=True)
    H, d = q.shape[-2], q.shape[-1]
    for name, t in (("w1_0", w1_0), ("w2_0", w2_0)):
        if not t.is_floating_point() or t.device != q.device:
            raise ValueError(f"{name} must be a floating tensor on {q.device}, got {t.dtype} on {t.device}")
    if w1_0.dim() != 3 or w1_0.shape[:2] != (H, d) or w1_0.shape[2] < 1:
        raise ValueError(f"w1_0 must be (H, d, h) = ({H}, {d}, h), got {tuple(w1_0.shape)}")
    h = w1_0.shape[2]
    if w2_0.shape != (H, h, d):
        raise ValueError(f"w2_0 must be (H, h, d) = {(H, h, d)} (h from w1_0), got {tuple(w2_0.shape)}")
    if state is not None:
        B = q.shape[0]
        groups = (((B, H, adaptive_rows(d), d), ("z_chunk", "z", "s")), ((B, H, d, h), ("w1_chunk", "w1", "s1")),
                  ((B, H, h, d), ("w2_chunk", "w2", "s2")))
        for want, names in groups:
            for name in names:
                t = getattr(state, name)
                if tuple(t.shape) != want:
                    raise ValueError(f"state.{name} must be {want}, got {tuple(t.shape)}")
        if state.position < 0:
            raise ValueError(f"state.position must be >= 0, got {state.position}")


def _prepare(
    q: Tensor, w1_0: Tensor, w2_0: Tensor, z0: Tensor, momentum_logit: Tensor, momentum: bool,
    state: Optional[DeepTitansState], batch: int,
) -> tuple[torch.dtype, list[Tensor], int, Optional[Tensor]]:
    """Compute dtype, the nine state tensors (in DeepTitansState order) in it, the position and log(beta)."""
    dtype = compute_dtype(q.dtype)
    log_beta = F.logsigmoid(momentum_logit.to(dtype)) if momentum else None
    if state is None:
        tensors = []
        for init in (z0, w1_0, w2_0):
            x = init.to(dtype).unsqueeze(0).expand(batch, *init.shape)
            tensors += [x, x, torch.zeros_like(x)]
        return dtype, tensors, 0, log_beta
    return dtype, [t.to(dtype) for t in state[:9]], state.position, log_beta


def _targets(
    k: Tensor, v: Tensor, w1c: Tensor, w2c: Tensor, objective: str, value_target: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Inner-loss pieces at the chunk start for tokens (..., L, d): p = W2_c k, e and g = sigma'(p) ⊙ W1_cᵀ e.

    The target is M_c(v) (self) or v (value); no inner gradient flows through it (it is a constant of the inner
    loss), but it stays in the outer graph.
    """
    p = k @ w2c.transpose(-1, -2)  # (..., L, h)
    target = v if value_target else v + F.silu(v @ w2c.transpose(-1, -2)) @ w1c.transpose(-1, -2)
    if objective == "l2":
        e = k + F.silu(p) @ w1c.transpose(-1, -2) - target  # dL/dM for L = ½||M_c(k) - target||²
    else:
        e = -target  # dL/dM for L = -<M_c(k), target>
    g = _silu_grad(p) * (e @ w1c)  # (..., L, h): back through W1 and the SiLU
    return p, e, g


def _rank_one_sum(w: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Σ_i w_i left_i right_iᵀ over the tokens i.

    w: (B, H, L); left: (B, H, L, m); right: (B, H, L, n). Returns (B, H, m, n).
    """
    return (w.unsqueeze(-1) * left).transpose(-1, -2) @ right


def _deep_segment(
    q: Tensor,
    a: Tensor,
    valid: Tensor,
    states: list[Tensor],
    b_eta: Tensor,
    b_alpha: Tensor,
    log_beta: Optional[Tensor],
    eps: float,
    eta_max: float,
    objective: str,
    value_target: bool,
    rows: Tensor,
) -> tuple[Tensor, list[Tensor]]:
    """Tokens 1..L of one chunk (or of its remainder after a mid-chunk state), in closed form (TTT-MLP dual form).

    q, a: (B, H, L, d); valid: (B, H, L) 0/1; states: the nine tensors of DeepTitansState (chunk-start and
    segment-start); rows: (2d+2,) bool, the adaptive rows that learn. Returns o (B, H, L, d) and the nine
    state tensors after token L (the chunk-start copies unchanged; the caller moves them at chunk ends).
    """
    zc, z, s, w1c, w1, s1, w2c, w2, s2 = states
    # Eq. 90: k, v, eta, alpha from the chunk-start adaptive rows, exactly as the linear op.
    k, v, eta, log_alpha = chunk_reads(a, zc, valid, b_eta, b_alpha, eta_max)
    decays = chunk_decays(log_alpha, valid, log_beta)
    u = k - v if objective == "l2" else -v  # linear self targets A_c v: the gradient A_c u kᵀ
    z_end, s_end = advance_rows(zc, z, s, k, u, eta, decays, eps)
    rows = rows[:, None]
    z_end, s_end = torch.where(rows, z_end, z), torch.where(rows, s_end, s)

    p, e, g = _targets(k, v, w1c, w2c, objective, value_target)
    r = F.silu(p)  # right factor of G1_i = e_i r_iᵀ
    gamma = decays.gamma.unsqueeze(-1)

    # Read, first layer: W2_t q_t with G2_i = g_i k_iᵀ and the DGD term D2_i = p_i k_iᵀ (both right factor k_i).
    w_dgd, w_grad = read_weights(k @ q.transpose(-1, -2), eta, decays, eps)  # [i, t] weights, scores k_i . q_t
    pre = gamma * (q @ w2.transpose(-1, -2)) - w_dgd.transpose(-1, -2) @ p - w_grad.transpose(-1, -2) @ g
    if log_beta is not None:
        pre = pre + decays.sigma.unsqueeze(-1) * (q @ s2.transpose(-1, -2))
    hid = F.silu(pre)  # (B, H, L, h) = sigma(W2_t q_t)
    # Second layer: W1_t h_t with G1_i = e_i r_iᵀ; W1 has no DGD term.
    _, w1_grad = read_weights(r @ hid.transpose(-1, -2), eta, decays, 0.0)  # scores r_i . h_t
    o = q + gamma * (hid @ w1.transpose(-1, -2)) - w1_grad.transpose(-1, -2) @ e
    if log_beta is not None:
        o = o + decays.sigma.unsqueeze(-1) * (hid @ s1.transpose(-1, -2))

    # State after token L: W_L = gamma_L W_s + sigma_L S_s - Σ_i eta_i (eps (gamma_L/gamma_i) D_i + c_{i,L} G_i).
    eta_dgd, eta_grad, eta_mom = end_weights(eta, decays, eps)
    gamma_last = decays.gamma[..., -1, None, None]
    w1_end = gamma_last * w1 - _rank_one_sum(eta_grad, e, r)
    w2_end = gamma_last * w2 - _rank_one_sum(eta_grad, g, k) - _rank_one_sum(eta_dgd, p, k)
    if eta_mom is None:
        s1_end, s2_end = s1, s2
    else:
        sigma_last = decays.sigma[..., -1, None, None]
        w1_end = w1_end + sigma_last * s1
        w2_end = w2_end + sigma_last * s2
        b_last = decays.log_b[..., -1, None, None].exp()
        s1_end = b_last * s1 - _rank_one_sum(eta_mom, e, r)
        s2_end = b_last * s2 - _rank_one_sum(eta_mom, g, k)
    return o, [zc, z_end, s_end, w1c, w1_end, s1_end, w2c, w2_end, s2_end]


def _valid(mask: Optional[Tensor], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.ones(shape, dtype=dtype, device=device) if mask is None else mask.to(dtype)


def titans_deep_memory_reference(
    q: Tensor,
    a: Tensor,
    w1_0: Tensor,
    w2_0: Tensor,
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
    state: Optional[DeepTitansState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[DeepTitansState]]:
    """Chunked deep Titans memory: reads o_t = M_t(q_t) = q_t + W1_t silu(W2_t q_t) for every token.

    Args:
        q: (B, T, H, d) static queries, l2-normalised by the caller.
        a: (B, T, H, d) input of the adaptive memories.
        w1_0: (H, d, h) and w2_0: (H, h, d): the initial main memory (parameters), h = memory_hidden.
        z0: (H, 2d+2, d) initial adaptive memories [M_k ; M_v ; m_eta ; m_alpha] (parameters).
        b_eta, b_alpha, momentum_logit: (H,) per-head biases; beta = sigmoid(momentum_logit).
        chunk_size: C, the tokens that share one chunk-start state; the chunk phase counts from position 0.
        mask: (B, T), 0 at positions that must change no state.
        state: a cached DeepTitansState to continue from (the initial parameters are then not read).
    Returns:
        o: (B, T, H, d) in q.dtype, and the DeepTitansState after the last token when `output_final_state`.
    """
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective,
                       memory_target, adaptive, mask, state)
    B, T, H, d = q.shape
    dtype, states, position, log_beta = _prepare(q, w1_0, w2_0, z0, momentum_logit, momentum, state, B)
    qh = q.transpose(1, 2).to(dtype)
    ah = a.transpose(1, 2).to(dtype)
    valid = _valid(mask, (B, T), dtype, q.device).unsqueeze(1).expand(B, H, T)
    rows = adaptive_row_mask(adaptive, d, q.device)[d:]
    b_eta, b_alpha = b_eta.to(dtype), b_alpha.to(dtype)
    eps = 1.0 if dgd else 0.0

    outputs = []
    t = 0
    while t < T:
        length = min(chunk_size - (position + t) % chunk_size, T - t)
        sl = slice(t, t + length)
        o, states = _deep_segment(qh[:, :, sl], ah[:, :, sl], valid[:, :, sl], states, b_eta, b_alpha, log_beta,
                                  eps, eta_max, objective, memory_target == "value", rows)
        outputs.append(o)
        t += length
        if (position + t) % chunk_size == 0:  # a chunk ends: its state is the next chunk-start state
            states[0], states[3], states[6] = states[1], states[4], states[7]
    o = torch.cat(outputs, dim=2).transpose(1, 2).to(q.dtype) if outputs else q.new_zeros(q.shape)
    if not output_final_state:
        return o, None
    # contiguous(): a state that never left its init is an expanded view of a parameter; the cache gets a copy.
    return o, DeepTitansState(*(x.contiguous() for x in states), position + T)


def _step_main_grads(
    k: Tensor, v: Tensor, w1c: Tensor, w2c: Tensor, objective: str, value_target: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """One token's main-memory inner gradients G1 (B, H, d, h), G2 (B, H, h, d) and DGD matrix W2_c k kᵀ."""
    p, e, g = _targets(k.unsqueeze(-2), v.unsqueeze(-2), w1c, w2c, objective, value_target)
    p, e, g = p.squeeze(-2), e.squeeze(-2), g.squeeze(-2)
    g1 = e.unsqueeze(-1) * F.silu(p).unsqueeze(-2)  # e sigma(p)ᵀ
    g2 = g.unsqueeze(-1) * k.unsqueeze(-2)  # (sigma'(p) ⊙ W1_cᵀ e) kᵀ
    return g1, g2, p.unsqueeze(-1) * k.unsqueeze(-2)


def _read(q: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """o = q + W1 silu(W2 q) for q (B, H, d), W1 (B, H, d, h), W2 (B, H, h, d)."""
    return q + (w1 @ F.silu(w2 @ q.unsqueeze(-1))).squeeze(-1)


def _adaptive_step(
    zc: Tensor, z: Tensor, s: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, valid: Tensor,
    beta: Optional[Tensor], eps: float, objective: str, rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """One token of the linear rule for the adaptive rows (self targets A_c v, gradient at the chunk start)."""
    pred = (zc @ k.unsqueeze(-1)).squeeze(-1)
    target = (zc @ v.unsqueeze(-1)).squeeze(-1)
    err = pred - target if objective == "l2" else -target
    z_new, s_new = step_update(z, s, err.unsqueeze(-1) * k.unsqueeze(-2), eps * pred.unsqueeze(-1) * k.unsqueeze(-2),
                               eta, alpha, valid, beta)
    rows = rows[:, None]
    return torch.where(rows, z_new, z), torch.where(rows, s_new, s)


def titans_deep_memory_step_reference(
    q: Tensor,
    a: Tensor,
    w1_0: Tensor,
    w2_0: Tensor,
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
    state: Optional[DeepTitansState] = None,
) -> tuple[Tensor, DeepTitansState]:
    """One decode token of the deep Titans memory: the per-token recurrence with the rank-one inner gradients.

    q, a: (B, H, d); mask: (B,). Returns o (B, H, d) in q.dtype and the state after the token.
    """
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective,
                       memory_target, adaptive, mask, state, token_dim=False)
    B, H, d = q.shape
    dtype, (zc, z, s, w1c, w1, s1, w2c, w2, s2), position, log_beta = _prepare(
        q, w1_0, w2_0, z0, momentum_logit, momentum, state, B)
    out_dtype = q.dtype
    q, a = q.to(dtype), a.to(dtype)
    valid = _valid(mask, (B,), dtype, q.device)[:, None]  # (B, 1)
    beta = None if log_beta is None else log_beta.exp()
    eps = 1.0 if dgd else 0.0

    k, v, eta, alpha = step_reads(a, zc, valid, b_eta.to(dtype), b_alpha.to(dtype), eta_max)
    z, s = _adaptive_step(zc, z, s, k, v, eta, alpha, valid, beta, eps, objective,
                          adaptive_row_mask(adaptive, d, q.device)[d:])
    g1, g2, d2 = _step_main_grads(k, v, w1c, w2c, objective, memory_target == "value")
    w1, s1 = step_update(w1, s1, g1, torch.zeros_like(g1), eta, alpha, valid, beta)  # no DGD on W1
    w2, s2 = step_update(w2, s2, g2, eps * d2, eta, alpha, valid, beta)  # DGD on the input side W2
    o = _read(q, w1, w2)  # Eq. 79: the read after the token's update
    if (position + 1) % chunk_size == 0:
        zc, w1c, w2c = z, w1, w2
    return o.to(out_dtype), DeepTitansState(zc, z, s, w1c, w1, s1, w2c, w2, s2, position + 1)


def titans_deep_memory_naive(
    q: Tensor,
    a: Tensor,
    w1_0: Tensor,
    w2_0: Tensor,
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
    state: Optional[DeepTitansState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[DeepTitansState]]:
    """Token-by-token oracle with the signature of `titans_deep_memory_reference`. Test oracle only.

    It builds every per-token state explicitly and takes the main memory's inner gradients with torch.autograd
    of the inner loss at the chunk start (the target held constant), so it checks the rank-one formulas too.
    Outer gradients flow through it (create_graph).
    """
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective,
                       memory_target, adaptive, mask, state)
    B, T, H, d = q.shape
    dtype, (zc, z, s, w1c, w1, s1, w2c, w2, s2), position, log_beta = _prepare(
        q, w1_0, w2_0, z0, momentum_logit, momentum, state, B)
    beta = None if log_beta is None else log_beta.exp()
    eps = 1.0 if dgd else 0.0
    rows = adaptive_row_mask(adaptive, d, q.device)[d:]
    valid_all = _valid(mask, (B, T), dtype, q.device)
    outer_grad = torch.is_grad_enabled()
    outputs = []
    for t in range(T):
        qt, at, valid = q[:, t].to(dtype), a[:, t].to(dtype), valid_all[:, t, None]
        k, v, eta, alpha = step_reads(at, zc, valid, b_eta.to(dtype), b_alpha.to(dtype), eta_max)
        z, s = _adaptive_step(zc, z, s, k, v, eta, alpha, valid, beta, eps, objective, rows)
        with torch.enable_grad():
            # The inner loss at theta_c; separate leaves for the prediction keep the target out of the inner
            # gradient while the outer graph (create_graph) still sees every path.
            p1 = w1c.clone() if w1c.requires_grad else w1c.detach().clone().requires_grad_()
            p2 = w2c.clone() if w2c.requires_grad else w2c.detach().clone().requires_grad_()
            pred = k + (p1 @ F.silu(p2 @ k.unsqueeze(-1))).squeeze(-1)
            target = v if memory_target == "value" else _read(v, w1c, w2c)
            if objective == "l2":
                loss = 0.5 * (pred - target).square().sum()
            else:
                loss = -(pred * target).sum()
            g1, g2 = torch.autograd.grad(loss, (p1, p2), create_graph=outer_grad)
        dgd_term = eps * (w2c @ k.unsqueeze(-1)) @ k.unsqueeze(-2)  # W2_c k kᵀ
        w1, s1 = step_update(w1, s1, g1, torch.zeros_like(g1), eta, alpha, valid, beta)
        w2, s2 = step_update(w2, s2, g2, dgd_term, eta, alpha, valid, beta)
        outputs.append(_read(qt, w1, w2).to(q.dtype))
        if (position + t + 1) % chunk_size == 0:
            zc, w1c, w2c = z, w1, w2
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(q.shape)
    final = DeepTitansState(zc, z, s, w1c, w1, s1, w2c, w2, s2, position + T) if output_final_state else None
    return o, final
