"""Triton kernels of one Continuum Memory System decode step (SPEC §3 v2, §5 cache); no autograd (decode).

Same signature and semantics as `cms_level_step_reference`: read θ_c for one token, add eta_t ∇ℓ_t(θ_c) and
m_t κ_t to the running sums (`CMSState.grad_*`, `curvature_sum`), and apply Eq. 31's update with the v2 step
θ_{c+1} = (1 - λ) θ_c + λ θ_0 - G / N_c when the token closes its chunk (λ only if the chunk held a valid token,
`CMSState.chunk_has_valid` or this one: SPEC §5, a chunk of padding changes no state).

Design: one token is matrix-vector work, memory-bound on reading θ_c and the running sums, so it is split over
(F tiles or D tiles) x B programs and three launches; the W_down products couple all F rows through e, and κ_t
sums over F:
  1. grid (F tiles, B): a = W_gate z, b = W_up z -> (B, F); the tile's partial sums of κ_t's two F-sums,
     Σ_f r_f² ‖W_down[:, f]‖² and Σ_f h_f² -> (B, F tiles) (deterministic: no atomics)
  2. grid (D tiles, B): y = W_down (silu(a) b); e = eta (y - target) -> y, e; tile 0 also closes κ_t and the
     running N_c = curvature_sum + m_t κ_t
  3. grid (F tiles, B): dh = W_downᵀ e, da, db; the new running sums, or, on a chunk boundary, the new θ.
target = z P_v and eta = eta_max σ(z·w_eta + b_eta)·mask come from PyTorch. Without a state, θ_0 is read with
batch stride 0. Arithmetic in fp32 (products and tl.sum, no tl.dot, so any D, F >= 1); y in z_t.dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels._dispatch import triton_interpreting
from hope_kernels.cms._common import check_index_range, check_kernel_inputs, launch, next_pow2, sigmoid
from hope_kernels.cms.reference import CMSState, _no_autocast, _shape_str, _validate

__all__ = ["cms_level_step_triton"]


@triton.jit
def _step_ab_kernel(z_ptr, wg_ptr, wu_ptr, wd_ptr, a_ptr, b_ptr, q_ptr, p_ptr, D, Fh, NFT, th_bstride,
                    BD: tl.constexpr, BF: tl.constexpr):
    ft = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    offs_f = ft * BF + tl.arange(0, BF)
    mf = offs_f < Fh
    acc_a = tl.zeros((BF,), dtype=tl.float32)
    acc_b = tl.zeros((BF,), dtype=tl.float32)
    col = tl.zeros((BF,), dtype=tl.float32)  # c_f = ‖W_down[:, f]‖²
    wg = wg_ptr + bi * th_bstride
    wu = wu_ptr + bi * th_bstride
    wd = wd_ptr + bi * th_bstride
    for dt in range(0, tl.cdiv(D, BD)):
        offs_d = dt * BD + tl.arange(0, BD)
        md = offs_d < D
        zv = tl.load(z_ptr + bi * D + offs_d, mask=md, other=0.0).to(tl.float32)
        off = offs_f[:, None] * D + offs_d[None, :]
        m = mf[:, None] & md[None, :]
        acc_a += tl.sum(tl.load(wg + off, mask=m, other=0.0) * zv[None, :], axis=1)
        acc_b += tl.sum(tl.load(wu + off, mask=m, other=0.0) * zv[None, :], axis=1)
        w = tl.load(wd + offs_d[:, None] * Fh + offs_f[None, :], mask=md[:, None] & mf[None, :], other=0.0)
        col += tl.sum(w * w, axis=0)
    tl.store(a_ptr + bi * Fh + offs_f, acc_a, mask=mf)
    tl.store(b_ptr + bi * Fh + offs_f, acc_b, mask=mf)
    sg = sigmoid(acc_a)
    s = acc_a * sg
    u = acc_b * (sg + s * (1.0 - sg))  # b ⊙ silu'(a)
    h = s * acc_b
    tl.store(q_ptr + bi * NFT + ft, tl.sum((s * s + u * u) * col, axis=0))
    tl.store(p_ptr + bi * NFT + ft, tl.sum(h * h, axis=0))


@triton.jit
def _step_y_kernel(a_ptr, b_ptr, wd_ptr, tg_ptr, eta_ptr, zz_ptr, mk_ptr, cv_ptr, q_ptr, p_ptr, y_ptr, e_ptr,
                   cvo_ptr, D, Fh, NFT, th_bstride, OBJ_L2: tl.constexpr, HAS_CV: tl.constexpr, BD: tl.constexpr,
                   BF: tl.constexpr, BN: tl.constexpr):
    dt = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    offs_d = dt * BD + tl.arange(0, BD)
    md = offs_d < D
    wd = wd_ptr + bi * th_bstride
    acc = tl.zeros((BD,), dtype=tl.float32)
    for ft in range(0, tl.cdiv(Fh, BF)):
        offs_f = ft * BF + tl.arange(0, BF)
        mf = offs_f < Fh
        a = tl.load(a_ptr + bi * Fh + offs_f, mask=mf, other=0.0)
        b = tl.load(b_ptr + bi * Fh + offs_f, mask=mf, other=0.0)
        h = a * sigmoid(a) * b
        w = tl.load(wd + offs_d[:, None] * Fh + offs_f[None, :], mask=md[:, None] & mf[None, :], other=0.0)
        acc += tl.sum(w * h[None, :], axis=1)
    tl.store(y_ptr + bi * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=md)
    tg = tl.load(tg_ptr + bi * D + offs_d, mask=md, other=0.0)
    eta = tl.load(eta_ptr + bi)
    if OBJ_L2:
        e = eta * (acc - tg)
    else:
        e = -eta * tg
    tl.store(e_ptr + bi * D + offs_d, e, mask=md)
    if dt == 0:
        # κ_t = ‖z_t‖² (1 + Σ_f r_f² c_f) + Σ_f h_f² (SPEC §3 v2); N_c += m_t κ_t
        qs = tl.zeros((BN,), dtype=tl.float32)
        ps = tl.zeros((BN,), dtype=tl.float32)
        for nt in range(0, tl.cdiv(NFT, BN)):
            offs = nt * BN + tl.arange(0, BN)
            qs += tl.load(q_ptr + bi * NFT + offs, mask=offs < NFT, other=0.0)
            ps += tl.load(p_ptr + bi * NFT + offs, mask=offs < NFT, other=0.0)
        kappa = tl.load(zz_ptr + bi) * (1.0 + tl.sum(qs, axis=0)) + tl.sum(ps, axis=0)
        cv = tl.load(mk_ptr + bi) * kappa
        if HAS_CV:
            cv += tl.load(cv_ptr + bi)
        tl.store(cvo_ptr + bi, cv)


@triton.jit
def _step_update_kernel(z_ptr, a_ptr, b_ptr, e_ptr, wg_ptr, wu_ptr, wd_ptr, gg_ptr, gu_ptr, gd_ptr,
                        w0g_ptr, w0u_ptr, w0d_ptr, og_ptr, ou_ptr, od_ptr, lam_ptr, cvo_ptr, D, Fh, th_bstride,
                        HAS_G: tl.constexpr, CLOSES: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """CLOSES: o* = new θ = (1-λ)θ + λ θ_0 - (G + p) / N_c (Eq. 31, SPEC §3 v2; λ (B,) per sequence); else
    o* = the new running sums G + p."""
    ft = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    FD = Fh * D
    offs_f = ft * BF + tl.arange(0, BF)
    mf = offs_f < Fh
    wg = wg_ptr + bi * th_bstride
    wu = wu_ptr + bi * th_bstride
    wd = wd_ptr + bi * th_bstride
    dh = tl.zeros((BF,), dtype=tl.float32)
    for dt in range(0, tl.cdiv(D, BD)):
        offs_d = dt * BD + tl.arange(0, BD)
        md = offs_d < D
        e = tl.load(e_ptr + bi * D + offs_d, mask=md, other=0.0)
        w = tl.load(wd + offs_d[:, None] * Fh + offs_f[None, :], mask=md[:, None] & mf[None, :], other=0.0)
        dh += tl.sum(w * e[:, None], axis=0)
    a = tl.load(a_ptr + bi * Fh + offs_f, mask=mf, other=0.0)
    b = tl.load(b_ptr + bi * Fh + offs_f, mask=mf, other=0.0)
    sg = sigmoid(a)
    s = a * sg
    h = s * b
    da = dh * b * (sg + s * (1.0 - sg))
    db = dh * s
    if CLOSES:
        lam = tl.load(lam_ptr + bi)  # 0 for a chunk without a valid token
        n_c = tl.load(cvo_ptr + bi)
        inv = 1.0 / tl.where(n_c > 0, n_c, 1.0)  # no valid token in the chunk: G = 0 too, divide by 1
    for dt in range(0, tl.cdiv(D, BD)):
        offs_d = dt * BD + tl.arange(0, BD)
        md = offs_d < D
        m = mf[:, None] & md[None, :]
        md_t = md[:, None] & mf[None, :]
        zv = tl.load(z_ptr + bi * D + offs_d, mask=md, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + bi * D + offs_d, mask=md, other=0.0)
        off = offs_f[:, None] * D + offs_d[None, :]  # (F, D) blocks of W_gate, W_up
        off_t = offs_d[:, None] * Fh + offs_f[None, :]  # (D, F) block of W_down
        pg = da[:, None] * zv[None, :]
        pu = db[:, None] * zv[None, :]
        pd = e[:, None] * h[None, :]
        if HAS_G:
            pg += tl.load(gg_ptr + bi * FD + off, mask=m, other=0.0)
            pu += tl.load(gu_ptr + bi * FD + off, mask=m, other=0.0)
            pd += tl.load(gd_ptr + bi * FD + off_t, mask=md_t, other=0.0)
        if CLOSES:
            pg = ((1.0 - lam) * tl.load(wg + off, mask=m, other=0.0)
                  + lam * tl.load(w0g_ptr + off, mask=m, other=0.0) - pg * inv)
            pu = ((1.0 - lam) * tl.load(wu + off, mask=m, other=0.0)
                  + lam * tl.load(w0u_ptr + off, mask=m, other=0.0) - pu * inv)
            pd = ((1.0 - lam) * tl.load(wd + off_t, mask=md_t, other=0.0)
                  + lam * tl.load(w0d_ptr + off_t, mask=md_t, other=0.0) - pd * inv)
        tl.store(og_ptr + bi * FD + off, pg, mask=m)
        tl.store(ou_ptr + bi * FD + off, pu, mask=m)
        tl.store(od_ptr + bi * FD + off_t, pd, mask=md_t)


def step_blocks(D: int, Fh: int) -> tuple[int, int]:
    """(BD, BF) of the step kernels: powers of two up to 64 (32 in the interpreter), capped by the dims."""
    cap = 32 if triton_interpreting() else 64
    return max(16, min(next_pow2(D), cap)), max(16, min(next_pow2(Fh), cap))


def step_launch_options() -> dict:
    """8 warps: at 4, the update kernel spilled 64 B per thread (offline sm_90a compile, benchmarks/cms_sm90_check.py)."""
    return dict(num_warps=4 if triton_interpreting() else 8, num_stages=1)


def cms_level_step_triton(
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
    mask: Optional[Tensor] = None,
    state: Optional[CMSState],
) -> tuple[Tensor, CMSState]:
    """One decode token on Triton; arguments, shapes and semantics as `cms_level_step_reference`.

    No autograd: the result is not differentiable (decode runs under torch.no_grad()); an input that requires
    grad while grad mode is on raises, so a training path cannot silently lose its gradient.
    """
    if not isinstance(z_t, Tensor) or z_t.dim() != 2:
        shape = _shape_str(z_t) if isinstance(z_t, Tensor) else type(z_t).__name__
        raise ValueError(f"z_t must be (B, D), got {shape}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 1):
        shape = _shape_str(mask) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be (B,) for one token, got {shape}")
    B, _, D, Fh = _validate(
        z_t.unsqueeze(1), w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size, eta_max, objective, decay,
        None if mask is None else mask.unsqueeze(1), state, step,
    )
    named = {"z_t": z_t, "w_gate": w_gate, "w_up": w_up, "w_down": w_down, "p_v": p_v, "w_eta": w_eta,
             "b_eta": b_eta}
    if state is not None:
        named.update({f"state.{k}": getattr(state, k) for k in CMSState._fields[:7]})
    check_kernel_inputs(named, z_t.device, op="cms_level_step")
    check_index_range(1, D, Fh, op="cms_level_step")
    if torch.is_grad_enabled() and any(t.requires_grad for t in named.values()):
        raise RuntimeError("cms_level_step_triton has no backward (decode): call it under torch.no_grad(), or "
                           "use kernel_backend='torch' for a differentiable decode step")
    f32, dev = torch.float32, z_t.device
    BD, BF = step_blocks(D, Fh)
    opts = step_launch_options()
    with _no_autocast(dev), torch.no_grad():
        z = z_t.contiguous()
        zf = z.to(f32)
        w0 = [w.to(f32).contiguous() for w in (w_gate, w_up, w_down)]
        tg = (zf @ p_v.to(f32)).contiguous()
        mk = torch.ones(B, device=dev, dtype=f32) if mask is None else mask.to(device=dev, dtype=f32).contiguous()
        eta = (eta_max * torch.sigmoid(zf @ w_eta.to(f32) + b_eta.to(f32).reshape(())) * mk).contiguous()
        zz = zf.pow(2).sum(-1).contiguous()
        if state is None:
            position, theta, grads, curv, bstride = 0, w0, None, None, 0
        else:
            position = int(state.position)
            theta = [t.to(f32).contiguous() for t in state[:3]]
            grads = [t.to(f32).contiguous() for t in state[3:6]]
            curv = state.curvature_sum.to(f32).contiguous()
            bstride = Fh * D
        closes = (position + 1) % chunk_size == 0
        prev = torch.zeros(B, dtype=torch.bool, device=dev) if state is None else state.chunk_has_valid
        seen = torch.ones_like(prev) if mask is None else prev | (mask != 0)
        lam = (float(decay) * seen.to(f32)).contiguous()  # Eq. 31's pull: only for a chunk with a valid token
        nft, ndt = triton.cdiv(Fh, BF), triton.cdiv(D, BD)
        a = torch.empty(B, Fh, device=dev, dtype=f32)
        b = torch.empty_like(a)
        qp = torch.empty(B, nft, device=dev, dtype=f32)
        pp = torch.empty_like(qp)
        y = torch.empty(B, D, device=dev, dtype=z_t.dtype)
        e = torch.empty(B, D, device=dev, dtype=f32)
        cvo = torch.empty(B, device=dev, dtype=f32)
        out = [torch.empty(B, Fh, D, device=dev, dtype=f32), torch.empty(B, Fh, D, device=dev, dtype=f32),
               torch.empty(B, D, Fh, device=dev, dtype=f32)]
        launch(_step_ab_kernel, (nft, B), z, *theta, a, b, qp, pp, D, Fh, nft, bstride, BD=BD, BF=BF, **opts)
        launch(_step_y_kernel, (ndt, B), a, b, theta[2], tg, eta, zz, mk, cvo if curv is None else curv, qp, pp, y,
               e, cvo, D, Fh, nft, bstride, OBJ_L2=objective == "l2", HAS_CV=curv is not None, BD=BD, BF=BF,
               BN=max(16, min(next_pow2(nft), 64)), **opts)
        g_in = grads if grads is not None else out  # unused when HAS_G is False
        launch(_step_update_kernel, (nft, B), z, a, b, e, *theta, *g_in, *w0, *out, lam, cvo, D, Fh, bstride,
               HAS_G=grads is not None, CLOSES=closes, BD=BD, BF=BF, **opts)
        if closes:
            final = CMSState(*out, *(torch.zeros_like(t) for t in out), torch.zeros_like(cvo), position=position + 1,
                             chunk_has_valid=torch.zeros_like(seen))
        else:
            if state is None:
                theta = [w.expand(B, -1, -1).contiguous() for w in w0]
            final = CMSState(*theta, *out, cvo, position=position + 1, chunk_has_valid=seen)
    return y, final
