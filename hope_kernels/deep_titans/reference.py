"""PyTorch reference of the self-modifying Titans memory with a deep main memory, SPEC §2 v2 "Deep memory"
(paper Eqs. 89, 91, `memory_depth=2`).

Per (sequence, head) the main memory is a residual 2-layer MLP

    M(z) = z + W1 sigma(W2 z),      W1: d x h, W2: h x d, h = `memory_hidden`, sigma = SiLU.

The generating memories G = [W_k ; W_v ; w_eta ; w_alpha] ((2d+2) x d) stay residual-linear and follow the linear
op exactly (`hope_kernels.titans.reference`, whose helpers this module imports): k_t, v_t, eta_t, alpha_t of a
token come from the adaptive-chunk-start G_c; a masked token has eta = 0, alpha = 1 and takes no momentum step.

The main memory's inner loss is taken at the chunk start theta_c = (W1_c, W2_c), against the self target M_c(v_t)
(or v_t with `memory_target="value"`); no inner gradient flows through the target. With p_t = W2_c k_t,
e_t = M_c(k_t) - target ("l2") or -target ("dot"), the inner gradients are rank one:

    ∇W1 = e_t sigma(p_t)ᵀ                     ∇W2 = g_t k_tᵀ,   g_t = sigma'(p_t) ⊙ W1_cᵀ e_t

and each layer follows SPEC §2 v2 (momentum, when on, as for the linear memories):

    W2_t = W2_0 + alpha_t (W2_{t-1} - W2_0) - eps eta_t W2_{t-1} k_t k_tᵀ - eta_t g_t k_tᵀ
                                                     DGD on the running input side: a gated delta rule, keys k_t
    W1_t = W1_0 + alpha_t (W1_{t-1} - W1_0) - eta_t e_t sigma(p_t)ᵀ    retention only: decayed linear attention
                                                                         with keys sigma(p_t)
    o_t  = q_t + W1_t sigma(W2_t q_t)                                    the read after token t's update

With `memory_retention="zero"` the retention pulls toward 0 instead of the initial state (W_t = alpha_t W_{t-1}
...); `memory_value_norm` normalises v_t (see the linear op).
Inside a chunk W2_t q_t comes from the delta rule's UT form (G and W2 share one triangular solve: same keys and
transition), then W1_t from the linear-attention form (`hope_kernels.titans.reference.delta_rule_*`).

- `titans_deep_memory_reference`: the chunked form, a Python loop over chunks only.
- `titans_deep_memory_step_reference`: one decode token.
Tests hold a token-by-token oracle that takes the inner gradients with torch.autograd. Tensors use (B, T, H, d)
at the API and (B, H, T, d) inside.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hope_kernels.titans.reference import (
    ADAPTIVE_NAMES,
    _config,
    adaptive_row_mask,
    check_memory_inputs,
    check_state,
    delta_rule_corrections,
    delta_rule_end,
    delta_rule_read,
    delta_rule_step,
    generating_reads,
    generating_step_reads,
    generating_writes,
    inner_error,
    segment_decays,
)
from hope_kernels._dispatch import compute_dtype

__all__ = [
    "DeepTitansState",
    "adaptive_rows",
    "titans_deep_memory_reference",
    "titans_deep_memory_step_reference",
]


class DeepTitansState(NamedTuple):
    """Recurrent state of the deep Titans memory for one layer (SPEC §5 cache), fp32 (fp64 for fp64 inputs).

    z_chunk, z, s:     (B, H, 2d+2, d) generating memories [W_k ; W_v ; w_eta ; w_alpha]: at the start of the
                       current adaptive chunk, after the last consumed token, and their momentum.
    w1_chunk, w1, s1:  (B, H, d, h) the main memory's output layer W1: chunk start, current, momentum.
    w2_chunk, w2, s2:  (B, H, h, d) its input layer W2: chunk start, current, momentum.
    position:          tokens consumed so far.
    The momentum tensors are None without momentum. The chunk-start copies make cached decoding exact.
    """

    z_chunk: Tensor
    z: Tensor
    s: Optional[Tensor]
    w1_chunk: Tensor
    w1: Tensor
    s1: Optional[Tensor]
    w2_chunk: Tensor
    w2: Tensor
    s2: Optional[Tensor]
    position: int


def adaptive_rows(d: int) -> int:
    """Rows of the generating memories [W_k ; W_v ; w_eta ; w_alpha] for head dim d."""
    return 2 * d + 2


def silu_grad(x: Tensor) -> Tensor:
    """d/dx x sigmoid(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, state, token_dim, kwargs) -> None:
    check_memory_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, token_dim=token_dim,
                        z0_rows=adaptive_rows(q.shape[-1]), **kwargs)
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
        g, w1, w2 = (B, H, adaptive_rows(d), d), (B, H, d, h), (B, H, h, d)
        check_state(state, dict(z_chunk=g, z=g, s=g, w1_chunk=w1, w1=w1, s1=w1, w2_chunk=w2, w2=w2, s2=w2),
                    kwargs["momentum"])


def _prepare(q, w1_0, w2_0, z0, momentum_logit, state, batch) -> tuple[torch.dtype, list, int, Optional[Tensor]]:
    """Compute dtype, the nine state tensors (DeepTitansState order; momentum None without), position, log(beta)."""
    dtype = compute_dtype(q.dtype)
    log_beta = None if momentum_logit is None else F.logsigmoid(momentum_logit.to(dtype))
    if state is None:
        tensors = []
        for init in (z0, w1_0, w2_0):
            x = init.to(dtype).unsqueeze(0).expand(batch, *init.shape)
            tensors += [x, x, None if log_beta is None else torch.zeros_like(x)]
        return dtype, tensors, 0, log_beta
    return dtype, [None if t is None else t.to(dtype) for t in state[:9]], state.position, log_beta


def main_memory_errors(
    k: Tensor, v: Tensor, w1c: Tensor, w2c: Tensor, objective: str, value_target: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Inner-loss pieces at the chunk start for tokens (..., L, d): p = W2_c k (..., L, h), e = dℓ/dM (..., L, d)
    and g = sigma'(p) ⊙ W1_cᵀ e (..., L, h). The target is M_c(v) (self) or v (value), held constant."""
    p = k @ w2c.transpose(-1, -2)
    target = v if value_target else v + F.silu(v @ w2c.transpose(-1, -2)) @ w1c.transpose(-1, -2)
    if objective == "l2":
        e = k + F.silu(p) @ w1c.transpose(-1, -2) - target  # ℓ = ½||M_c(k) - target||²
    else:
        e = -target  # ℓ = -<M_c(k), target>
    return p, e, silu_grad(p) * (e @ w1c)


def _deep_segment(
    q: Tensor, a: Tensor, valid: Tensor, states: list, anchors: Optional[tuple], b_eta: Tensor, b_alpha: Tensor,
    log_beta: Optional[Tensor], rows: Tensor, cfg: dict,
) -> tuple[Tensor, list]:
    """One segment (tokens that share one gradient state), in closed form.

    q, a: (B, H, L, d); valid: (B, H, L) 0/1; states: the nine DeepTitansState tensors; anchors: the retention
    targets (G_0, W1_0, W2_0) broadcast over the batch, or None for retention toward 0; rows: (2d+2,) bool, the
    generating rows that learn. Returns o (B, H, L, d) and the nine tensors after token L (chunk-start copies
    unchanged: the caller moves them).
    """
    zc, z, s, w1c, w1, s1, w2c, w2, s2 = states
    d, n_gen = q.shape[-1], zc.shape[-2]
    k, v, eta, log_alpha = generating_reads(a, zc, valid, b_eta, b_alpha, cfg)
    dec = segment_decays(log_alpha, valid, log_beta)
    p, e, g = main_memory_errors(k, v, w1c, w2c, cfg["objective"], cfg["value_target"])

    # G and W2 share keys k_t and the transition alpha_t I - eps eta_t k_t k_tᵀ: one delta rule over their rows.
    x0 = torch.cat([z, w2], dim=-2)
    anchor = None if anchors is None else torch.cat([anchors[0], anchors[2]], dim=-2)
    w1_anchor = None if anchors is None else anchors[1]
    if anchor is not None:
        x0, w1 = x0 - anchor, w1 - w1_anchor  # the delta rule runs on the deviations from the anchors
    s0 = None if s is None else torch.cat([s, s2], dim=-2)
    writes = torch.cat([generating_writes(zc, inner_error(k, v, cfg["objective"]), eta, cfg["residual"]),
                        -eta.unsqueeze(-1) * g], dim=-1)
    corrections = delta_rule_corrections(x0, s0, writes, k, eta, dec, anchor) if cfg["dgd"] else None
    w2_writes = writes[..., n_gen:]
    w2_corrections = None if corrections is None else corrections[..., n_gen:]
    pre = delta_rule_read(x0[..., n_gen:, :], s2, w2_writes, w2_corrections, k, q, dec)
    if anchor is not None:
        pre = pre + q @ anchors[2].transpose(-1, -2)
    hidden = F.silu(pre)  # sigma(W2_t q_t)
    w1_writes, w1_keys = -eta.unsqueeze(-1) * e, F.silu(p)
    o = q + delta_rule_read(w1, s1, w1_writes, None, w1_keys, hidden, dec)
    if anchor is not None:
        o = o + hidden @ w1_anchor.transpose(-1, -2)

    x_end, s_end = delta_rule_end(x0, s0, writes, corrections, k, dec)
    w1_end, s1_end = delta_rule_end(w1, s1, w1_writes, None, w1_keys, dec)
    if anchor is not None:
        x_end, w1_end = x_end + anchor, w1_end + w1_anchor
    rows = rows[:, None]
    z_end = torch.where(rows, x_end[..., :n_gen, :], z)  # rows outside `adaptive` keep their initial value
    w2_end = x_end[..., n_gen:, :]
    sz_end = s2_end = None
    if s_end is not None:
        sz_end, s2_end = torch.where(rows, s_end[..., :n_gen, :], s), s_end[..., n_gen:, :]
    return o, [zc, z_end, sz_end, w1c, w1_end, s1_end, w2c, w2_end, s2_end]


def _move_chunk_starts(states: list, position: int, cfg: dict) -> list:
    """At a chunk end the current state becomes the gradient state: W1 and W2 every chunk_size tokens, the
    generating memories every adaptive_chunk_size tokens."""
    states = list(states)
    if position % cfg["chunk_size"] == 0:
        states[3], states[6] = states[4], states[7]
    if position % cfg["adaptive_chunk_size"] == 0:
        states[0] = states[1]
    return states


def _anchors(cfg: dict, dtype: torch.dtype, batch: int, z0: Tensor, w1_0: Tensor, w2_0: Tensor) -> Optional[tuple]:
    """The retention targets (G_0, W1_0, W2_0) broadcast over the batch, or None for retention toward 0."""
    if not cfg["anchored"]:
        return None
    return tuple(x.to(dtype).unsqueeze(0).expand(batch, *x.shape) for x in (z0, w1_0, w2_0))


def _kwargs(chunk_size, adaptive_chunk_size, eta_max, momentum, objective, memory_target, adaptive, mask) -> dict:
    return dict(chunk_size=chunk_size, adaptive_chunk_size=adaptive_chunk_size, eta_max=eta_max, momentum=momentum,
                objective=objective, memory_target=memory_target, adaptive=adaptive, mask=mask)


def titans_deep_memory_reference(
    q: Tensor,
    a: Tensor,
    w1_0: Tensor,
    w2_0: Tensor,
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
    state: Optional[DeepTitansState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[DeepTitansState]]:
    """Chunked deep Titans memory: reads o_t = M_t(q_t) = q_t + W1_t silu(W2_t q_t) for every token.

    Args:
        q: (B, T, H, d) static queries, l2-normalised by the caller.
        a: (B, T, H, d) input of the generating memories.
        w1_0: (H, d, h) and w2_0: (H, h, d): the initial main memory (parameters), h = memory_hidden.
        z0: (H, 2d+2, d) initial generating memories [W_k ; W_v ; w_eta ; w_alpha] (parameters).
        b_eta, b_alpha: (H,) per-head biases; momentum_logit: (H,), given iff momentum.
        chunk_size, adaptive_chunk_size: as `titans_memory_reference` (W1 and W2 use chunk_size).
        memory_residual: the identity skip of M_k and M_v (the deep M is always residual, Eq. 91).
        memory_value_norm, memory_retention: as `titans_memory_reference`.
        mask: (B, T), 0 at positions that must change no state.
        state: a cached DeepTitansState to continue from (the initial parameters are then not read).
    Returns:
        o: (B, T, H, d) in q.dtype, and the DeepTitansState after the last token when `output_final_state`.
    """
    kwargs = _kwargs(chunk_size, adaptive_chunk_size, eta_max, momentum, objective, memory_target, adaptive, mask)
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, state, True, kwargs)
    B, T, H, d = q.shape
    cfg = _config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
                  memory_value_norm, memory_retention)
    dtype, states, position, log_beta = _prepare(q, w1_0, w2_0, z0, momentum_logit, state, B)
    anchors = _anchors(cfg, dtype, B, z0, w1_0, w2_0)
    qh, ah = q.transpose(1, 2).to(dtype), a.transpose(1, 2).to(dtype)
    valid = (torch.ones(B, T, dtype=dtype, device=q.device) if mask is None else mask.to(dtype)).unsqueeze(1).expand(B, H, T)
    rows = adaptive_row_mask(adaptive, d, q.device)[d:]
    b_eta, b_alpha = b_eta.to(dtype), b_alpha.to(dtype)

    outputs = []
    t = 0
    while t < T:
        length = min(chunk_size - (position + t) % chunk_size, T - t)
        piece = slice(t, t + length)
        o, states = _deep_segment(qh[:, :, piece], ah[:, :, piece], valid[:, :, piece], states, anchors, b_eta,
                                  b_alpha, log_beta, rows, cfg)
        outputs.append(o)
        t += length
        states = _move_chunk_starts(states, position + t, cfg)
    o = torch.cat(outputs, dim=2).transpose(1, 2).to(q.dtype) if outputs else q.new_zeros(q.shape)
    if not output_final_state:
        return o, None
    # contiguous(): a state that never left its init is an expanded view of a parameter; the cache gets a copy.
    return o, DeepTitansState(*(None if x is None else x.contiguous() for x in states), position + T)


def titans_deep_memory_step_reference(
    q: Tensor,
    a: Tensor,
    w1_0: Tensor,
    w2_0: Tensor,
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
    state: Optional[DeepTitansState] = None,
) -> tuple[Tensor, DeepTitansState]:
    """One decode token of the deep Titans memory. q, a: (B, H, d); mask: (B,). Returns o (B, H, d) in q.dtype and
    the state after the token."""
    kwargs = _kwargs(chunk_size, adaptive_chunk_size, eta_max, momentum, objective, memory_target, adaptive, mask)
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, state, False, kwargs)
    B, H, d = q.shape
    cfg = _config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
                  memory_value_norm, memory_retention)
    dtype, (zc, z, s, w1c, w1, s1, w2c, w2, s2), position, log_beta = _prepare(q, w1_0, w2_0, z0, momentum_logit,
                                                                              state, B)
    g_anchor, w1_anchor, w2_anchor = _anchors(cfg, dtype, B, z0, w1_0, w2_0) or (None, None, None)
    out_dtype = q.dtype
    q, a = q.to(dtype), a.to(dtype)
    valid = (torch.ones(B, dtype=dtype, device=q.device) if mask is None else mask.to(dtype))[:, None]  # (B, 1)
    beta = None if log_beta is None else log_beta.exp()
    k, v, eta, alpha = generating_step_reads(a, zc, valid, b_eta.to(dtype), b_alpha.to(dtype), cfg)
    dgd_coef = eta if dgd else torch.zeros_like(eta)
    u = inner_error(k, v, objective)
    gen_write = generating_writes(zc, u.unsqueeze(-2), eta.unsqueeze(-1), cfg["residual"]).squeeze(-2)
    z_new, s_new = delta_rule_step(z, s, gen_write, k, dgd_coef, alpha, beta, valid, g_anchor)
    rows = adaptive_row_mask(adaptive, d, q.device)[d:, None]
    z_new = torch.where(rows, z_new, z)
    if s_new is not None:
        s_new = torch.where(rows, s_new, s)
    p, e, g = (x.squeeze(-2) for x in main_memory_errors(k.unsqueeze(-2), v.unsqueeze(-2), w1c, w2c, objective,
                                                        cfg["value_target"]))
    w2, s2 = delta_rule_step(w2, s2, -eta.unsqueeze(-1) * g, k, dgd_coef, alpha, beta, valid, w2_anchor)
    w1, s1 = delta_rule_step(w1, s1, -eta.unsqueeze(-1) * e, F.silu(p), torch.zeros_like(eta), alpha, beta, valid,
                             w1_anchor)
    o = q + (w1 @ F.silu(w2 @ q.unsqueeze(-1))).squeeze(-1)  # the read after the token's update
    states = _move_chunk_starts([zc, z_new, s_new, w1c, w1, s1, w2c, w2, s2], position + 1, cfg)
    return o.to(out_dtype), DeepTitansState(*states, position + 1)
