"""Triton kernel of one decode token of the self-modifying Titans memory, SPEC §2 v2 and §5 (linear memories).

`titans_memory_step_triton` has the signature and semantics of `titans_memory_step_reference` (without momentum):
k, v, eta, alpha from the chunk-start generating memories (v l2-normalised with `memory_value_norm`), every row's
write -eta_t (E_X + X_c) u_t at the chunk start (W: value target on request), the running-state DGD
X_t = X_A + alpha_t (X_{t-1} - X_A) - eps eta_t X_{t-1} k_t k_tᵀ + w_t k_tᵀ (X_A = Z_0 with
memory_retention="init", 0 with "zero"), the read o_t = E q_t + W_t q_t after the update, and the chunk starts
moved when the token completes a chunk (W's every chunk_size tokens, the generating memories' every
adaptive_chunk_size). One program per (batch, head), Z's 3d+2 rows in BR-row tiles; fp32 arithmetic and states;
no autograd (decode).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels.titans._common import (
    block_sizes,
    check_kernel_inputs,
    check_no_momentum,
    device_fn,
    launch,
    launch_options,
    log_sigmoid,
    sigmoid,
)
from hope_kernels.titans.reference import (
    ADAPTIVE_NAMES,
    TitansState,
    adaptive_row_mask,
    check_memory_inputs,
    check_state,
    memory_rows,
)
from hope_kernels.titans.reference import _config as reference_config

__all__ = ["titans_memory_step_triton"]


@device_fn
def step_reads(a, valid, gc, b_eta, b_alpha, eta_max, resid, d, offs_d, md, VNORM: tl.constexpr):
    """k, v, eta, alpha of one token from the chunk-start generating memories gc ((2d+2, d) row-major)."""
    boff = offs_d[:, None] * d + offs_d[None, :]
    bm = md[:, None] & md[None, :]
    k = resid * a + tl.sum(tl.load(gc + boff, mask=bm, other=0.0) * a[None, :], 1)
    k = k / tl.maximum(tl.sqrt(tl.sum(k * k, 0)), 1e-12)
    v = resid * a + tl.sum(tl.load(gc + d * d + boff, mask=bm, other=0.0) * a[None, :], 1)
    if VNORM:
        v = v / tl.maximum(tl.sqrt(tl.sum(v * v, 0)), 1e-12)
    w_eta = tl.load(gc + 2 * d * d + offs_d, mask=md, other=0.0)
    w_alpha = tl.load(gc + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
    eta = eta_max * sigmoid(tl.sum(a * w_eta, 0) + b_eta) * valid
    alpha = tl.exp(log_sigmoid(tl.sum(a * w_alpha, 0) + b_alpha) * valid)
    return k, v, eta, alpha


@device_fn
def pick(x, rloc, offs_d):
    """x[rloc] for a register vector x (D,) and row indices rloc (BR,): a masked reduction (no register gather)."""
    return tl.sum(tl.where(rloc[:, None] == offs_d[None, :], x[None, :], 0.0), 1)


@device_fn
def step_rows(zc, z, zc_out, z_out, anc, o_ptr, r0, base, d, k, v, u, q, eta, alpha, eps, resid, move_w, move_g,
              offs_d, md, BR: tl.constexpr, OBJ_L2: tl.constexpr, VALUE: tl.constexpr, AD_K: tl.constexpr,
              AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr, ANCHOR: tl.constexpr):
    """Rows [r0, r0 + BR) of Z = [W ; W_k ; W_v ; w_eta ; w_alpha] through one token (row indices of the full
    (3d+2, d) stack; the buffers, the retention anchor `anc` (ANCHOR) included, start at row `base`: 0 for the
    linear op, d for the deep op's generating rows)."""
    rows = r0 + tl.arange(0, BR)
    mr = rows < 3 * d + 2
    off = (rows - base)[:, None] * d + offs_d[None, :]
    m = mr[:, None] & md[None, :]
    Xc = tl.load(zc + off, mask=m, other=0.0)
    X = tl.load(z + off, mask=m, other=0.0)
    rloc = rows % d
    is_w = rows < d
    # the write -eta (E_X + X_c) u (Eq. 91 at the chunk start); W's value target regresses on v
    err = tl.where(rows < 3 * d, resid * pick(u, rloc, offs_d), 0.0) + tl.sum(Xc * u[None, :], 1)
    if VALUE:
        if OBJ_L2:
            err_w = resid * pick(k, rloc, offs_d) + tl.sum(Xc * k[None, :], 1) - pick(v, rloc, offs_d)
        else:
            err_w = -pick(v, rloc, offs_d)
        err = tl.where(is_w, err_w, err)
    Xk = tl.sum(X * k[None, :], 1)
    X_new = alpha * X + (-eps * eta * Xk - eta * err)[:, None] * k[None, :]
    if ANCHOR:
        X_new += (1.0 - alpha) * tl.load(anc + off, mask=m, other=0.0)
    learn = is_w | ((rows >= d) & (rows < 2 * d) & AD_K) | ((rows >= 2 * d) & (rows < 3 * d) & AD_V)
    learn = learn | ((rows == 3 * d) & AD_E) | ((rows == 3 * d + 1) & AD_A)
    X_new = tl.where(learn[:, None], X_new, X)
    tl.store(z_out + off, X_new, mask=m)
    move = tl.where(is_w, move_w, move_g) != 0
    tl.store(zc_out + off, tl.where(move[:, None], X_new, Xc), mask=m)
    if r0 < d:  # the read after the token's update, o = E q + W_t q
        o = resid * pick(q, rloc, offs_d) + tl.sum(X_new * q[None, :], 1)
        tl.store(o_ptr + rows, o.to(o_ptr.dtype.element_ty), mask=is_w)


@triton.jit
def _titans_step_kernel(
    q_ptr, a_ptr, valid_ptr, zc_ptr, z_ptr, anc_ptr, zc_out_ptr, z_out_ptr, o_ptr, b_eta_ptr, b_alpha_ptr,
    H, d, eta_max, eps, resid, move_w, move_g,
    D: tl.constexpr, BR: tl.constexpr, OBJ_L2: tl.constexpr, VALUE: tl.constexpr,
    AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr, HAS_MASK: tl.constexpr,
    VNORM: tl.constexpr, ANCHOR: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    R = 3 * d + 2
    offs_d = tl.arange(0, D)
    md = offs_d < d
    q = tl.load(q_ptr + bh * d + offs_d, mask=md, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + bh * d + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_MASK:
        valid = tl.load(valid_ptr + b)
    else:
        valid = 1.0
    zc = zc_ptr + bh * R * d
    k, v, eta, alpha = step_reads(a, valid, zc + d * d, tl.load(b_eta_ptr + h), tl.load(b_alpha_ptr + h), eta_max,
                                  resid, d, offs_d, md, VNORM)
    if OBJ_L2:
        u = k - v
    else:
        u = -v
    for r0 in range(0, R, BR):
        step_rows(zc, z_ptr + bh * R * d, zc_out_ptr + bh * R * d, z_out_ptr + bh * R * d, anc_ptr + h * R * d,
                  o_ptr + bh * d, r0, 0, d, k, v, u, q, eta, alpha, eps, resid, move_w, move_g, offs_d, md, BR, OBJ_L2,
                  VALUE, AD_K, AD_V, AD_E, AD_A, ANCHOR)


def titans_memory_step_triton(
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
    """One decode token on Triton; shapes and semantics as `titans_memory_step_reference` (momentum=False).
    q, a: (B, H, d); mask: (B,). Returns o (B, H, d) in q.dtype and the fp32 state after the token."""
    check_memory_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size=chunk_size,
                        adaptive_chunk_size=adaptive_chunk_size, eta_max=eta_max, momentum=momentum,
                        objective=objective, memory_target=memory_target, adaptive=adaptive, mask=mask,
                        token_dim=False)
    check_no_momentum(momentum, op="titans")
    check_kernel_inputs(q, a, chunk_size, op="titans")
    B, H, d = q.shape
    R = memory_rows(d)
    if state is None:
        zc = z = z0.float().unsqueeze(0).expand(B, H, R, d).contiguous()
        position = 0
    else:
        check_state(state, dict(z_chunk=(B, H, R, d), z=(B, H, R, d), s=(B, H, R, d)), momentum)
        zc, z, position = state.z_chunk.float().contiguous(), state.z.float().contiguous(), int(state.position)
    ref = reference_config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
                           memory_value_norm, memory_retention)
    ca = ref["adaptive_chunk_size"]
    anchor = z0.detach().float().contiguous() if ref["anchored"] else None
    rows = adaptive_row_mask(adaptive, d)
    D, _ = block_sizes(d, chunk_size)
    valid = None if mask is None else mask.detach().to(device=q.device, dtype=torch.float32).contiguous()
    z_out, zc_out = torch.empty_like(z), torch.empty_like(zc)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    launch(_titans_step_kernel, (B * H,),
           q.contiguous(), a.contiguous(), valid if valid is not None else q, zc, z, zc if anchor is None else anchor,
           zc_out, z_out, o,
           b_eta.detach().float().contiguous(), b_alpha.detach().float().contiguous(), H, d, float(eta_max),
           1.0 if dgd else 0.0, 1.0 if memory_residual else 0.0, int((position + 1) % chunk_size == 0),
           int((position + 1) % ca == 0),
           D=D, BR=min(D, 32), OBJ_L2=objective == "l2", VALUE=memory_target == "value",
           AD_K=bool(rows[d]), AD_V=bool(rows[2 * d]), AD_E=bool(rows[3 * d]), AD_A=bool(rows[3 * d + 1]),
           HAS_MASK=valid is not None, VNORM=ref["value_norm"], ANCHOR=anchor is not None,
           **launch_options("step", D))
    return o, TitansState(zc_out, z_out, None, position + 1)
