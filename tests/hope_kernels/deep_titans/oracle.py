"""Token-by-token oracle of the deep Titans memory (SPEC §2 v2, "Deep memory"): every per-token state is built
explicitly, the main memory's inner gradients come from torch.autograd of the inner loss at the chunk start (not
from the rank-one formulas), and each layer follows its printed rule:
    W2_t = W2_{t-1}(alpha_t I - eps eta_t k_t k_tᵀ) - eta_t ∇W2 ℓ_t(θ_c),   W1_t = alpha_t W1_{t-1} - eta_t ∇W1 ℓ_t(θ_c)
(with momentum S_t = beta S_{t-1} - eta_t ∇, W_t = W_{t-1}(...) + S_t); memory_retention="init" pulls the alpha_t
retention toward the initial state (+ (1 - alpha_t) W_0) and memory_value_norm l2-normalises v_t. Outer gradients
flow through it. Tests only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALL = ("k", "v", "eta", "alpha")


def _outer(x, y):
    return x.unsqueeze(-1) * y.unsqueeze(-2)


def deep_titans_oracle(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit=None, *, chunk_size, eta_max,
                       adaptive_chunk_size=None, momentum=False, dgd=True, objective="l2", memory_target="self",
                       memory_residual=True, memory_value_norm=True, memory_retention="init", adaptive=ALL, mask=None, state=None, output_final_state=False):
    """Same signature and outputs as `titans_deep_memory_reference`, vectorised over (B, H), float64."""
    B, T, H, d = q.shape
    f64 = torch.float64
    Ca = adaptive_chunk_size or chunk_size
    r = 1.0 if memory_residual else 0.0
    eps = 1.0 if dgd else 0.0
    eye = torch.eye(d, dtype=f64)
    if state is None:
        def init(x):
            x = x.to(f64).unsqueeze(0).expand(B, *x.shape)
            return x, x, torch.zeros_like(x)
        (gc, g, sg), (w1c, w1, s1), (w2c, w2, s2) = init(z0), init(w1_0), init(w2_0)
        position = 0
    else:
        gc, g, sg, w1c, w1, s1, w2c, w2, s2 = (None if t is None else t.to(f64) for t in state[:9])
        if sg is None:
            sg, s1, s2 = torch.zeros_like(g), torch.zeros_like(w1), torch.zeros_like(w2)
        position = state.position
    beta = torch.sigmoid(momentum_logit.to(f64))[None, :, None, None] if momentum else None
    learns = torch.tensor([("k" in adaptive)] * d + [("v" in adaptive)] * d + ["eta" in adaptive, "alpha" in adaptive])
    E_gen = torch.cat([r * eye, r * eye, torch.zeros(2, d, dtype=f64)])  # (2d+2, d): residual square blocks
    outputs = []
    for t in range(T):
        qt, at = q[:, t].to(f64), a[:, t].to(f64)  # (B, H, d)
        valid = torch.ones(B, dtype=f64) if mask is None else mask[:, t].to(f64)
        keep = (valid > 0)[:, None, None, None]
        Wk, Wv, w_eta, w_alpha = gc[:, :, :d], gc[:, :, d:2 * d], gc[:, :, 2 * d], gc[:, :, 2 * d + 1]
        k = F.normalize(r * at + (Wk @ at.unsqueeze(-1)).squeeze(-1), dim=-1)
        v = r * at + (Wv @ at.unsqueeze(-1)).squeeze(-1)
        if memory_value_norm:
            v = F.normalize(v, dim=-1)
        eta = (eta_max * torch.sigmoid((w_eta * at).sum(-1) + b_eta.to(f64)))[..., None, None]
        alpha = torch.sigmoid((w_alpha * at).sum(-1) + b_alpha.to(f64))[..., None, None]
        P = alpha * eye - eps * eta * _outer(k, k)  # (B, H, d, d)

        def advance(x, sx, grad, transition, x_init):
            retained = x @ transition if transition is not None else alpha * x
            if memory_retention == "init":
                retained = retained + (1 - alpha) * x_init.to(f64)
            if momentum:
                sx_new = beta * sx - eta * grad
                x_new = retained + sx_new
            else:
                sx_new = sx
                x_new = retained - eta * grad
            return torch.where(keep, x_new, x), torch.where(keep, sx_new, sx)

        # Generating memories: g = (E + G_c) u kᵀ, the rule of the linear op.
        u = k - v if objective == "l2" else -v
        grad_g = _outer(((E_gen + gc) @ u.unsqueeze(-1)).squeeze(-1), k)
        g_new, sg_new = advance(g, sg, grad_g, P, z0)
        rows = learns[:, None]
        g, sg = torch.where(rows, g_new, g), torch.where(rows, sg_new, sg)

        # Main memory: autograd of the inner loss at θ_c, the target held constant.
        with torch.enable_grad():
            p1 = w1c.detach().clone().requires_grad_() if not w1c.requires_grad else w1c.clone()
            p2 = w2c.detach().clone().requires_grad_() if not w2c.requires_grad else w2c.clone()
            pred = k + (p1 @ F.silu(p2 @ k.unsqueeze(-1))).squeeze(-1)
            target = v if memory_target == "value" else v + (w1c @ F.silu(w2c @ v.unsqueeze(-1))).squeeze(-1)
            loss = 0.5 * (pred - target).square().sum() if objective == "l2" else -(pred * target).sum()
            g1, g2 = torch.autograd.grad(loss, (p1, p2), create_graph=torch.is_grad_enabled())
        w2, s2 = advance(w2, s2, g2, P, w2_0)
        w1, s1 = advance(w1, s1, g1, None, w1_0)
        outputs.append(qt + (w1 @ F.silu(w2 @ qt.unsqueeze(-1))).squeeze(-1))
        pos = position + t + 1
        if pos % chunk_size == 0:
            w1c, w2c = w1, w2
        if pos % Ca == 0:
            gc = g
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(q.shape, dtype=f64)
    final = None
    if output_final_state:
        from hope_kernels.deep_titans import DeepTitansState

        if not momentum:
            sg = s1 = s2 = None
        final = DeepTitansState(gc, g, sg, w1c, w1, s1, w2c, w2, s2, position + T)
    return o, final
