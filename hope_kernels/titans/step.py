"""Triton kernel of one decode token of the self-modifying Titans memory (SPEC §2, §5).

`titans_memory_step_triton` has the signature and semantics of `titans_memory_step_reference`: the
per-token recurrence (Eq. 88 with momentum), every state-dependent term taken at the chunk-start
memories Z_c, and Z_c replaced by the new memories when the token completes a chunk. One launch, one
program per (batch, head); no autograd (decode).

Constraints (ValueError otherwise): 1 <= d <= 128; q and a of one dtype among float32, float16,
bfloat16; CUDA tensors (or CPU tensors under TRITON_INTERPRET=1). Arithmetic and states are fp32; o is
returned in the input dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels.titans.chunk import _sum_combine, check_kernel_inputs
from hope_kernels.titans.reference import (
    ADAPTIVE_NAMES,
    TitansState,
    _check_inputs,
    adaptive_row_mask,
    memory_rows,
)

__all__ = ["titans_memory_step_triton"]


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _step_tile(zc, z, s, zc_out, z_out, s_out, mv_ptr, blk0, t0, d, offs_r, offs_d, k, v, a, q, o_ptr, eta, alpha,
               beta, eps, upd, boundary, OBJ_L2: tl.constexpr, IS_M: tl.constexpr, VALUE_TARGET: tl.constexpr,
               ADAPT: tl.constexpr, MOM: tl.constexpr):
    """Rows t0 .. t0+BR of the (d, d) block of Z that starts at row blk0: new memory, momentum and chunk-start
    copy (and, for M, the read o). Row tiles keep every tensor at BR x D registers."""
    rmask = (t0 + offs_r) < d
    off = (blk0 + t0 + offs_r)[:, None] * d + offs_d[None, :]
    m = rmask[:, None] & (offs_d[None, :] < d)
    xc = tl.load(zc + off, mask=m, other=0.0)
    xz = tl.load(z + off, mask=m, other=0.0)
    xs = tl.load(s + off, mask=m, other=0.0)
    if ADAPT:
        pred = tl.reduce(xc * k[None, :], 1, _sum_combine)
        if VALUE_TARGET:  # Titans/DeltaNet target for M: v restricted to these rows, v_j = M_v[j] . a
            mv_off = (t0 + offs_r)[:, None] * d + offs_d[None, :]
            tgt = tl.reduce(tl.load(mv_ptr + mv_off, mask=m, other=0.0) * a[None, :], 1, _sum_combine)
        else:
            tgt = tl.reduce(xc * v[None, :], 1, _sum_combine)
        if OBJ_L2:
            err = pred - tgt
        else:
            err = -tgt
        step = -eta * err[:, None] * k[None, :]
        if MOM:
            s_new = tl.where(upd, beta * xs + step, xs)
            z_new = alpha * xz - eps * eta * pred[:, None] * k[None, :] + s_new
        else:
            s_new = xs
            z_new = alpha * xz - eps * eta * pred[:, None] * k[None, :] + step
        z_new = tl.where(upd, z_new, xz)
    else:
        s_new = xs
        z_new = xz
    tl.store(z_out + off, z_new, mask=m)
    tl.store(s_out + off, s_new, mask=m)
    tl.store(zc_out + off, tl.where(boundary != 0, z_new, xc), mask=m)
    if IS_M:  # Eq. 79: the read after the token's update
        o = tl.reduce(z_new * q[None, :], 1, _sum_combine)
        tl.store(o_ptr + t0 + offs_r, o.to(o_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _step_row(zc, z, s, zc_out, z_out, s_out, r, d, offs_d, md, k, v, eta, alpha, beta, eps, upd, boundary,
              OBJ_L2: tl.constexpr, ADAPT: tl.constexpr, MOM: tl.constexpr):
    xc = tl.load(zc + r * d + offs_d, mask=md, other=0.0)
    xz = tl.load(z + r * d + offs_d, mask=md, other=0.0)
    xs = tl.load(s + r * d + offs_d, mask=md, other=0.0)
    if ADAPT:
        pred = tl.reduce(xc * k, 0, _sum_combine)
        tgt = tl.reduce(xc * v, 0, _sum_combine)
        if OBJ_L2:
            err = pred - tgt
        else:
            err = -tgt
        step = -eta * err * k
        if MOM:
            s_new = tl.where(upd, beta * xs + step, xs)
            z_new = alpha * xz - eps * eta * pred * k + s_new
        else:
            s_new = xs
            z_new = alpha * xz - eps * eta * pred * k + step
        z_new = tl.where(upd, z_new, xz)
    else:
        s_new = xs
        z_new = xz
    tl.store(z_out + r * d + offs_d, z_new, mask=md)
    tl.store(s_out + r * d + offs_d, s_new, mask=md)
    tl.store(zc_out + r * d + offs_d, tl.where(boundary != 0, z_new, xc), mask=md)


@triton.jit
def _step_reads(a_ptr, a, adapt, d, offs_d, offs_r, md, b_eta, b_alpha, eta_max, valid, D: tl.constexpr,
                BR: tl.constexpr):
    """Eq. 90 for one token: k (normalised), v, eta, alpha and `upd` (valid > 0) from the chunk-start adaptive rows
    at `adapt` = [M_k ; M_v ; m_eta ; m_alpha] ((2d+2, d) row-major); a_ptr: the token's a, a: its (D,) fp32 tile.
    k_j = M_k[j] . a by column tiles of M_k (BR columns at a time)."""
    kr = tl.zeros([D], dtype=tl.float32)
    v = tl.zeros([D], dtype=tl.float32)
    for ct in tl.static_range(0, D // BR):
        cols = ct * BR + offs_r
        mc = cols < d
        a_t = tl.load(a_ptr + cols, mask=mc, other=0.0).to(tl.float32)
        off = offs_d[:, None] * d + cols[None, :]
        m = md[:, None] & mc[None, :]
        kr += tl.reduce(tl.load(adapt + off, mask=m, other=0.0) * a_t[None, :], 1, _sum_combine)
        v += tl.reduce(tl.load(adapt + d * d + off, mask=m, other=0.0) * a_t[None, :], 1, _sum_combine)
    k = kr / tl.maximum(tl.sqrt(tl.reduce(kr * kr, 0, _sum_combine)), 1e-12)
    me = tl.load(adapt + 2 * d * d + offs_d, mask=md, other=0.0)
    ma = tl.load(adapt + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
    eta = eta_max * _sigmoid(tl.reduce(me * a, 0, _sum_combine) + b_eta) * valid
    upd = valid > 0
    alpha = tl.where(upd, _sigmoid(tl.reduce(ma * a, 0, _sum_combine) + b_alpha), 1.0)
    return k, v, eta, alpha, upd


@triton.jit
def _titans_step_kernel(
    q_ptr, a_ptr, valid_ptr, zc_ptr, z_ptr, s_ptr, o_ptr, zc_out_ptr, z_out_ptr, s_out_ptr,
    b_eta_ptr, b_alpha_ptr, beta_ptr,
    H, d, eta_max, eps, boundary,
    D: tl.constexpr, BR: tl.constexpr, MOM: tl.constexpr, OBJ_L2: tl.constexpr, VALUE: tl.constexpr,
    AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    RD = (3 * d + 2) * d
    pid64 = pid.to(tl.int64)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, BR)
    md = offs_d < d
    q = tl.load(q_ptr + pid64 * d + offs_d, mask=md, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pid64 * d + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_MASK:
        valid = tl.load(valid_ptr + b).to(tl.float32)
    else:
        valid = tl.load(b_eta_ptr + h) * 0.0 + 1.0  # a runtime fp32 scalar, like the masked branch
    zc = zc_ptr + pid64 * RD
    z = z_ptr + pid64 * RD
    s = s_ptr + pid64 * RD
    zc_out = zc_out_ptr + pid64 * RD
    z_out = z_out_ptr + pid64 * RD
    s_out = s_out_ptr + pid64 * RD
    o_out = o_ptr + pid64 * d

    # Eq. 90: k, v, eta, alpha from the chunk-start memories.
    k, v, eta, alpha, upd = _step_reads(a_ptr + pid64 * d, a, zc + d * d, d, offs_d, offs_r, md,
                                        tl.load(b_eta_ptr + h), tl.load(b_alpha_ptr + h), eta_max, valid, D, BR)
    beta = tl.load(beta_ptr + h)

    for rt in tl.static_range(0, D // BR):
        _step_tile(zc, z, s, zc_out, z_out, s_out, zc + 2 * d * d, 0, rt * BR, d, offs_r, offs_d, k, v, a, q, o_out,
                   eta, alpha, beta, eps, upd, boundary, OBJ_L2, True, VALUE, True, MOM)
        _step_tile(zc, z, s, zc_out, z_out, s_out, zc, d, rt * BR, d, offs_r, offs_d, k, v, a, q, o_out,
                   eta, alpha, beta, eps, upd, boundary, OBJ_L2, False, False, AD_K, MOM)
        _step_tile(zc, z, s, zc_out, z_out, s_out, zc, 2 * d, rt * BR, d, offs_r, offs_d, k, v, a, q, o_out,
                   eta, alpha, beta, eps, upd, boundary, OBJ_L2, False, False, AD_V, MOM)
    _step_row(zc, z, s, zc_out, z_out, s_out, 3 * d, d, offs_d, md, k, v, eta, alpha, beta, eps, upd, boundary,
              OBJ_L2, AD_E, MOM)
    _step_row(zc, z, s, zc_out, z_out, s_out, 3 * d + 1, d, offs_d, md, k, v, eta, alpha, beta, eps, upd, boundary,
              OBJ_L2, AD_A, MOM)


def titans_memory_step_triton(
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
    """One decode token on Triton; shapes and semantics as `titans_memory_step_reference`.

    q, a: (B, H, d); mask: (B,). Returns o (B, H, d) in q.dtype and the fp32 state after the token.
    Not differentiable (decode only): the inputs are read detached.
    """
    _check_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective, memory_target,
                  adaptive, mask, state, token_dim=False)
    check_kernel_inputs(q, a, chunk_size, token_dim=False)
    B, H, d = q.shape
    R = memory_rows(d)
    f32 = torch.float32
    dev = q.device
    rows = adaptive_row_mask(adaptive, d)
    with torch.no_grad():
        if state is None:
            zc = z0.to(f32).unsqueeze(0).expand(B, H, R, d).contiguous()
            z = zc
            s = torch.zeros(B, H, R, d, device=dev, dtype=f32)
            position = 0
        else:
            for name, t in (("z_chunk", state.z_chunk), ("z", state.z), ("s", state.s)):
                if not t.is_floating_point() or t.device != dev:
                    raise ValueError(f"state.{name} must be a floating tensor on {dev}, got {t.dtype} on {t.device}")
            zc = state.z_chunk.to(f32).contiguous()
            z = state.z.to(f32).contiguous()
            s = state.s.to(f32).contiguous()
            position = int(state.position)
        valid = None if mask is None else mask.to(device=dev, dtype=f32).contiguous()
        q_c, a_c = q.contiguous(), a.contiguous()
        o = torch.empty_like(q_c)
        zc_out = torch.empty(B, H, R, d, device=dev, dtype=f32)
        z_out = torch.empty_like(zc_out)
        s_out = torch.empty_like(zc_out)
        beta = torch.sigmoid(momentum_logit.to(f32)).contiguous()
        D = max(16, 1 << max(0, (d - 1).bit_length()))
        _titans_step_kernel[(B * H,)](
            q_c, a_c, valid if valid is not None else q_c, zc, z, s, o, zc_out, z_out, s_out,
            b_eta.to(f32).contiguous(), b_alpha.to(f32).contiguous(), beta,
            H, d, float(eta_max), 1.0 if dgd else 0.0, int((position + 1) % chunk_size == 0),
            D=D, BR=min(D, 32), MOM=bool(momentum), OBJ_L2=objective == "l2",
            VALUE=memory_target == "value",
            AD_K=bool(rows[d]), AD_V=bool(rows[2 * d]), AD_E=bool(rows[3 * d]), AD_A=bool(rows[3 * d + 1]),
            HAS_MASK=valid is not None,
            num_warps=4,
        )
    return o, TitansState(zc_out, z_out, s_out, position + 1)
