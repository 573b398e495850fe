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

With `memory_curvature_guard=True` (the default) both layers' gradient steps use eta_t / max(1, N_t), N_t the
Gauss-Newton curvature bound of `curvature_scale`: plain steps diverge at C = 64 once ||sigma(p)||² exceeds ~2
(a chunk sums C of them at one state), and the guard leaves unit-curvature steps alone.
With `memory_retention="zero"` the retention pulls toward 0 instead of the initial state (W_t = alpha_t W_{t-1}
...); `memory_value_norm` normalises v_t (see the linear op).
Inside a chunk W2_t q_t comes from the delta rule's UT form (G and W2 share one triangular system: same keys and
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
    every_row_adapts,
    check_memory_inputs,
    check_state,
    chunk_ends,
    delta_rule_dgd,
    delta_rule_end,
    delta_rule_read,
    delta_rule_step,
    generating_reads,
    generating_step_reads,
    gradient_writes,
    identity_rows,
    inner_error,
    segment_decays,
    segment_keys,
    segment_lengths,
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


class InnerErrors(NamedTuple):
    """The main memory's inner-loss pieces at the chunk start for tokens (..., L): with p = W2_c k (..., L, h),
    features = sigma(p) and slopes = sigma'(p) (..., L, h), e = dℓ/dM (..., L, d), g = sigma'(p) ⊙ W1_cᵀ e."""

    features: Tensor
    slopes: Tensor
    e: Tensor
    g: Tensor


def main_memory_errors(
    k: Tensor, v: Tensor, w1c: Tensor, w2c: Tensor, objective: str, value_target: bool
) -> InnerErrors:
    """`InnerErrors` of tokens k, v (..., L, d) at the chunk start (W1_c, W2_c); the target M_c(v) (self) or v
    (value) is held constant."""
    p = k @ w2c.transpose(-1, -2)
    gate = torch.sigmoid(p)
    features = p * gate
    slopes = gate + features * (1 - gate)  # d/dp p sigmoid(p) = sigmoid(p) (1 + p (1 - sigmoid(p)))
    target = v if value_target else v + F.silu(v @ w2c.transpose(-1, -2)) @ w1c.transpose(-1, -2)
    if objective == "l2":
        e = k + features @ w1c.transpose(-1, -2) - target  # ℓ = ½||M_c(k) - target||²
    else:
        e = -target  # ℓ = -<M_c(k), target>
    return InnerErrors(features, slopes, e, slopes * (e @ w1c))


def curvature_scale(errors: InnerErrors, w1c: Tensor) -> Tensor:
    """1 / max(1, N_t): the step scale of the main memory's inner gradient (`memory_curvature_guard`).

    N_t = ||sigma(p_t)||² + Σ_f sigma'(p_f)² ||W1_c[:, f]||² bounds the Gauss-Newton curvature of ℓ_t in
    (W1, W2) at the chunk start (||k_t|| = 1), so eta_t / max(1, N_t) keeps a token's step inside the region where
    gradient descent contracts however wide the hidden features grow; unit-curvature steps are left alone.
    errors: of tokens (..., L); w1c: (..., d, h). Returns (..., L).
    """
    column_norms = w1c.square().sum(-2).unsqueeze(-1)  # (..., h, 1)
    curvature = errors.features.square().sum(-1) + (errors.slopes.square() @ column_norms).squeeze(-1)
    return 1.0 / curvature.clamp_min(1.0)


def _deep_segment(
    q: Tensor, a: Tensor, valid: Tensor, maps_g: Tensor, w1c: Tensor, w2c: Tensor, x0: tuple, s0: tuple,
    anchors: tuple, b_eta: Tensor, b_alpha: Tensor, log_beta: Optional[Tensor], rows_g: Optional[Tensor], cfg: dict,
) -> tuple[Tensor, tuple, tuple]:
    """One segment (tokens that share one gradient state), in closed form.

    q, a: (B, H, L, d); valid: (B, H, L) 0/1; maps_g: (B, H, 2d+2, d) the chunk-start maps E + G_c; w1c, w2c: the
    chunk-start W1, W2; x0, s0, anchors: (G, W1, W2) triples of the segment-start deviations from the retention
    anchors, the momenta (None without) and the anchors (G_0, W1_0, W2_0) broadcast over the batch (None for
    retention toward 0); rows_g: (2d+2,) bool, the generating rows that learn, or None when all do. Returns
    o (B, H, L, d) and the (G, W1, W2) triples of deviations and momenta after token L.
    """
    (x_g, x_1, x_2), (s_g, s_1, s_2), (anchor_g, anchor_1, anchor_2) = x0, s0, anchors
    k, v, eta, log_alpha = generating_reads(a, maps_g, valid, b_eta, b_alpha, cfg)
    dec = segment_decays(log_alpha, valid, log_beta)
    errors = main_memory_errors(k, v, w1c, w2c, cfg["objective"], cfg["value_target"])
    eta_main = eta * curvature_scale(errors, w1c) if cfg["curvature_guard"] else eta

    # G and W2 share keys k_t and the transition alpha_t I - eps eta_t k_t k_tᵀ: one DGD system for both.
    keys = segment_keys(k, eta if cfg["dgd"] else None, dec)
    g_writes = gradient_writes(maps_g, inner_error(k, v, cfg["objective"]), eta)
    g_writes, g_corrections = delta_rule_dgd(x_g, s_g, g_writes, keys, anchor_g)
    w2_writes, w2_corrections = delta_rule_dgd(x_2, s_2, -eta_main.unsqueeze(-1) * errors.g, keys, anchor_2)
    pre = delta_rule_read(x_2, s_2, w2_writes, w2_corrections, keys, q, dec)
    if anchor_2 is not None:
        pre = pre + q @ anchor_2.transpose(-1, -2)
    hidden = F.silu(pre)  # sigma(W2_t q_t)
    w1_writes, w1_keys = -eta_main.unsqueeze(-1) * errors.e, segment_keys(errors.features, None, dec)  # W1: no DGD
    o = q + delta_rule_read(x_1, s_1, w1_writes, None, w1_keys, hidden, dec)
    if anchor_1 is not None:
        o = o + hidden @ anchor_1.transpose(-1, -2)

    g_end, sg_end = delta_rule_end(x_g, s_g, g_writes, g_corrections, keys, dec)
    w1_end, s1_end = delta_rule_end(x_1, s_1, w1_writes, None, w1_keys, dec)
    w2_end, s2_end = delta_rule_end(x_2, s_2, w2_writes, w2_corrections, keys, dec)
    if rows_g is not None:  # rows outside `adaptive` keep their initial value
        g_end = torch.where(rows_g[:, None], g_end, x_g)
        if s_g is not None:
            sg_end = torch.where(rows_g[:, None], sg_end, s_g)
    return o, (g_end, w1_end, w2_end), (sg_end, s1_end, s2_end)


def _anchors(cfg: dict, dtype: torch.dtype, batch: int, z0: Tensor, w1_0: Tensor, w2_0: Tensor,
             contiguous: bool = False) -> tuple:
    """The retention targets (G_0, W1_0, W2_0) broadcast over the batch, or three None for retention toward 0.
    `contiguous` copies them once, so that batched matmuls read them without a copy each."""
    if not cfg["anchored"]:
        return None, None, None
    anchors = tuple(x.to(dtype).unsqueeze(0).expand(batch, *x.shape) for x in (z0, w1_0, w2_0))
    return tuple(x.contiguous() for x in anchors) if contiguous else anchors


def _deviation(x: Optional[Tensor], anchor: Optional[Tensor]) -> Optional[Tensor]:
    return x if x is None or anchor is None else x - anchor


def _absolute(x: Optional[Tensor], anchor: Optional[Tensor]) -> Optional[Tensor]:
    return x if x is None or anchor is None else x + anchor


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
    memory_curvature_guard: bool = True,
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
        memory_curvature_guard: divide the main memory's inner-gradient step by max(1, N_t) (`curvature_scale`).
        mask: (B, T), 0 at positions that must change no state.
        state: a cached DeepTitansState to continue from (the initial parameters then serve only as the retention
            anchor of memory_retention="init").
    Returns:
        o: (B, T, H, d) in q.dtype, and the DeepTitansState after the last token when `output_final_state`.
    """
    kwargs = _kwargs(chunk_size, adaptive_chunk_size, eta_max, momentum, objective, memory_target, adaptive, mask)
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, state, True, kwargs)
    B, T, H, d = q.shape
    cfg = _config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
                  memory_value_norm, memory_retention, memory_curvature_guard)
    dtype, states, position, log_beta = _prepare(q, w1_0, w2_0, z0, momentum_logit, state, B)
    zc, z, s, w1c, w1, s1, w2c, w2, s2 = states
    anchors = _anchors(cfg, dtype, B, z0, w1_0, w2_0, contiguous=True)
    # The loop runs on deviations from the retention anchors; G enters through its chunk-start maps E + G_c.
    base_g = _absolute(identity_rows(2, d, cfg["residual"], dtype, q.device), anchors[0])
    if state is None and anchors[0] is not None:  # a fresh state sits at its anchors: deviations 0
        x, x_gc = tuple(torch.zeros_like(anchor) for anchor in anchors), torch.zeros_like(anchors[0])
    else:
        x, x_gc = tuple(_deviation(t, anchor) for t, anchor in zip((z, w1, w2), anchors)), _deviation(zc, anchors[0])
    mom = (s, s1, s2)
    maps_g = base_g + x_gc
    # contiguous(): the batched matmuls fold (B, H) without a copy of every segment's q and a.
    qh, ah = (x.transpose(1, 2).to(dtype).contiguous() for x in (q, a))
    valid = (torch.ones(B, T, dtype=dtype, device=q.device) if mask is None else mask.to(dtype)).unsqueeze(1).expand(B, H, T)
    rows = adaptive_row_mask(adaptive, d, q.device)[d:]
    rows_g = None if every_row_adapts(adaptive) else rows
    b_eta, b_alpha = b_eta.to(dtype), b_alpha.to(dtype)

    lengths = segment_lengths(position, T, chunk_size)
    outputs = []
    t = position
    # split(), not slicing: each slice's backward would fill a zero tensor of the whole sequence.
    for q_n, a_n, valid_n in zip(qh.split(lengths, 2), ah.split(lengths, 2), valid.split(lengths, 2)):
        o, x, mom = _deep_segment(q_n, a_n, valid_n, maps_g, w1c, w2c, x, mom, anchors, b_eta, b_alpha, log_beta,
                                  rows_g, cfg)
        outputs.append(o)
        t += q_n.shape[2]
        w_end, g_end = chunk_ends(t, cfg)
        if w_end:  # the running state becomes the gradient state: W1 and W2 every chunk_size tokens
            w1c, w2c = _absolute(x[1], anchors[1]), _absolute(x[2], anchors[2])
        if g_end:  # the generating memories every adaptive_chunk_size tokens
            x_gc, maps_g = x[0], base_g + x[0]
    o = torch.cat(outputs, dim=2).transpose(1, 2).to(q.dtype) if outputs else q.new_zeros(q.shape)
    if not output_final_state:
        return o, None
    (z, w1, w2), (s, s1, s2) = (_absolute(t, anchor) for t, anchor in zip(x, anchors)), mom
    states = (_absolute(x_gc, anchors[0]), z, s, w1c, w1, s1, w2c, w2, s2)
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
    memory_curvature_guard: bool = True,
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
                  memory_value_norm, memory_retention, memory_curvature_guard)
    dtype, (zc, z, s, w1c, w1, s1, w2c, w2, s2), position, log_beta = _prepare(q, w1_0, w2_0, z0, momentum_logit,
                                                                              state, B)
    g_anchor, w1_anchor, w2_anchor = _anchors(cfg, dtype, B, z0, w1_0, w2_0)
    out_dtype = q.dtype
    q, a = q.to(dtype), a.to(dtype)
    valid = (torch.ones(B, dtype=dtype, device=q.device) if mask is None else mask.to(dtype))[:, None]  # (B, 1)
    beta = None if log_beta is None else log_beta.exp()
    maps_g = identity_rows(2, d, cfg["residual"], dtype, q.device) + zc
    k, v, eta, alpha = generating_step_reads(a, maps_g, valid, b_eta.to(dtype), b_alpha.to(dtype), cfg)
    dgd_coef = eta if dgd else torch.zeros_like(eta)
    u = inner_error(k, v, objective)
    gen_write = gradient_writes(maps_g, u.unsqueeze(-2), eta.unsqueeze(-1)).squeeze(-2)
    step_valid = None if mask is None else valid
    z_new, s_new = delta_rule_step(z, s, gen_write, k, dgd_coef, alpha, beta, step_valid, g_anchor)
    rows = adaptive_row_mask(adaptive, d, q.device)[d:]
    if not every_row_adapts(adaptive):  # rows outside `adaptive` keep their initial value
        z_new = torch.where(rows[:, None], z_new, z)
        if s_new is not None:
            s_new = torch.where(rows[:, None], s_new, s)
    errors = main_memory_errors(k.unsqueeze(-2), v.unsqueeze(-2), w1c, w2c, objective, cfg["value_target"])
    eta_main = eta * curvature_scale(errors, w1c).squeeze(-1) if cfg["curvature_guard"] else eta
    features, e, g = (x.squeeze(-2) for x in (errors.features, errors.e, errors.g))
    w2, s2 = delta_rule_step(w2, s2, -eta_main.unsqueeze(-1) * g, k, dgd_coef, alpha, beta, step_valid, w2_anchor)
    w1, s1 = delta_rule_step(w1, s1, -eta_main.unsqueeze(-1) * e, features, torch.zeros_like(eta), alpha, beta,
                             step_valid, w1_anchor)
    o = q + (w1 @ F.silu(w2 @ q.unsqueeze(-1))).squeeze(-1)  # the read after the token's update
    w_end, g_end = chunk_ends(position + 1, cfg)
    zc, w1c, w2c = z_new if g_end else zc, w1 if w_end else w1c, w2 if w_end else w2c
    return o.to(out_dtype), DeepTitansState(zc, z_new, s_new, w1c, w1, s1, w2c, w2, s2, position + 1)
