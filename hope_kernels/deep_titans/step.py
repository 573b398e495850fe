"""Triton kernel of one decode token of the deep Titans memory (SPEC §2 "Deep memory", Eq. 91, §5).

`titans_deep_memory_step_triton` has the signature and semantics of `titans_deep_memory_step_reference`: the
per-token recurrence with every state-dependent term at the chunk-start state, and the chunk-start copies
replaced by the new state when the token completes a chunk. One launch, one program per (batch, head); no
autograd (decode). The adaptive rows reuse the linear step kernel's Triton helpers (`_step_reads`,
`_step_tile`, `_step_row`); the main memory's W1 (D x HD) and W2 (HD x D) tiles are updated in registers.

Constraints (ValueError otherwise): 1 <= d, h <= 128; q and a of one dtype among float32, float16, bfloat16;
CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, where half inputs are upcast to fp32 first). Arithmetic
and states are fp32; o is returned in the input dtype. Not run or timed on a GPU.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels.deep_titans.chunk import _kernel_inputs, _silu, _silu_grad, _start_states, check_deep_kernel_inputs
from hope_kernels.deep_titans.reference import DeepTitansState, _check_deep_inputs
from hope_kernels.titans.chunk import _next_pow2, _sum_combine
from hope_kernels.titans.reference import ADAPTIVE_NAMES, adaptive_row_mask
from hope_kernels.titans.step import _step_reads, _step_row, _step_tile

__all__ = ["titans_deep_memory_step_triton"]


@triton.jit
def _deep_step_kernel(
    q_ptr, a_ptr, valid_ptr,
    zc_ptr, z_ptr, s_ptr, w1c_ptr, w1_ptr, s1_ptr, w2c_ptr, w2_ptr, s2_ptr,
    zc_out_ptr, z_out_ptr, s_out_ptr, w1c_out_ptr, w1_out_ptr, s1_out_ptr, w2c_out_ptr, w2_out_ptr, s2_out_ptr,
    o_ptr, b_eta_ptr, b_alpha_ptr, beta_ptr,
    H, d, hd, eta_max, eps, boundary,
    D: tl.constexpr, HD: tl.constexpr, BR: tl.constexpr, MOM: tl.constexpr, OBJ_L2: tl.constexpr,
    VALUE: tl.constexpr, AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    AD = (2 * d + 2) * d
    WD = d * hd
    pid64 = pid.to(tl.int64)
    offs_d = tl.arange(0, D)
    offs_h = tl.arange(0, HD)
    offs_r = tl.arange(0, BR)
    md = offs_d < d
    mh = offs_h < hd
    q = tl.load(q_ptr + pid64 * d + offs_d, mask=md, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pid64 * d + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_MASK:
        valid = tl.load(valid_ptr + b).to(tl.float32)
    else:
        valid = tl.load(b_eta_ptr + h) * 0.0 + 1.0  # a runtime fp32 scalar, like the masked branch
    # The linear step helpers address a stacked Z whose adaptive rows start at row d: point d rows back.
    zc = zc_ptr + pid64 * AD - d * d
    z = z_ptr + pid64 * AD - d * d
    s = s_ptr + pid64 * AD - d * d
    zc_out = zc_out_ptr + pid64 * AD - d * d
    z_out = z_out_ptr + pid64 * AD - d * d
    s_out = s_out_ptr + pid64 * AD - d * d

    # Eq. 90: k, v, eta, alpha from the chunk-start adaptive rows; then the adaptive rows' linear update.
    k, v, eta, alpha, upd = _step_reads(a_ptr + pid64 * d, a, zc + d * d, d, offs_d, offs_r, md,
                                        tl.load(b_eta_ptr + h), tl.load(b_alpha_ptr + h), eta_max, valid, D, BR)
    beta = tl.load(beta_ptr + h)
    for rt in tl.static_range(0, D // BR):
        _step_tile(zc, z, s, zc_out, z_out, s_out, zc, d, rt * BR, d, offs_r, offs_d, k, v, a, q, o_ptr,
                   eta, alpha, beta, eps, upd, boundary, OBJ_L2, False, False, AD_K, MOM)
        _step_tile(zc, z, s, zc_out, z_out, s_out, zc, 2 * d, rt * BR, d, offs_r, offs_d, k, v, a, q, o_ptr,
                   eta, alpha, beta, eps, upd, boundary, OBJ_L2, False, False, AD_V, MOM)
    _step_row(zc, z, s, zc_out, z_out, s_out, 3 * d, d, offs_d, md, k, v, eta, alpha, beta, eps, upd, boundary,
              OBJ_L2, AD_E, MOM)
    _step_row(zc, z, s, zc_out, z_out, s_out, 3 * d + 1, d, offs_d, md, k, v, eta, alpha, beta, eps, upd, boundary,
              OBJ_L2, AD_A, MOM)

    # Deep main memory: rank-one inner gradients at the chunk start (no inner gradient through the target).
    off1 = pid64 * WD + offs_d[:, None] * hd + offs_h[None, :]  # W1: (d, h) row-major
    m1 = md[:, None] & mh[None, :]
    off2 = pid64 * WD + offs_h[:, None] * d + offs_d[None, :]  # W2: (h, d) row-major
    m2 = mh[:, None] & md[None, :]
    W1c = tl.load(w1c_ptr + off1, mask=m1, other=0.0)
    W2c = tl.load(w2c_ptr + off2, mask=m2, other=0.0)
    p = tl.reduce(W2c * k[None, :], 1, _sum_combine)  # (HD,) W2_c k
    r = _silu(p)
    if VALUE:
        tgt = v
    else:
        tgt = v + tl.reduce(W1c * _silu(tl.reduce(W2c * v[None, :], 1, _sum_combine))[None, :], 1, _sum_combine)
    if OBJ_L2:
        e = k + tl.reduce(W1c * r[None, :], 1, _sum_combine) - tgt
    else:
        e = -tgt
    g = _silu_grad(p) * tl.reduce(W1c * e[:, None], 0, _sum_combine)  # silu'(p) ⊙ W1_cᵀ e

    # Eq. 88 with momentum on both layers; DGD only on the input side W2 (eps eta W2_c k kᵀ).
    W1 = tl.load(w1_ptr + off1, mask=m1, other=0.0)
    W2 = tl.load(w2_ptr + off2, mask=m2, other=0.0)
    step1 = -eta * e[:, None] * r[None, :]
    step2 = -eta * g[:, None] * k[None, :]
    dgd2 = eps * eta * p[:, None] * k[None, :]
    if MOM:
        S1 = tl.load(s1_ptr + off1, mask=m1, other=0.0)
        S2 = tl.load(s2_ptr + off2, mask=m2, other=0.0)
        S1 = tl.where(upd, beta * S1 + step1, S1)
        S2 = tl.where(upd, beta * S2 + step2, S2)
        tl.store(s1_out_ptr + off1, S1, mask=m1)
        tl.store(s2_out_ptr + off2, S2, mask=m2)
        W1n = alpha * W1 + S1
        W2n = alpha * W2 - dgd2 + S2
    else:
        W1n = alpha * W1 + step1
        W2n = alpha * W2 - dgd2 + step2
    W1n = tl.where(upd, W1n, W1)
    W2n = tl.where(upd, W2n, W2)
    tl.store(w1_out_ptr + off1, W1n, mask=m1)
    tl.store(w2_out_ptr + off2, W2n, mask=m2)
    tl.store(w1c_out_ptr + off1, tl.where(boundary != 0, W1n, W1c), mask=m1)
    tl.store(w2c_out_ptr + off2, tl.where(boundary != 0, W2n, W2c), mask=m2)
    # Eq. 79: the read after the token's update, o = q + W1 silu(W2 q)
    hid = _silu(tl.reduce(W2n * q[None, :], 1, _sum_combine))
    o = q + tl.reduce(W1n * hid[None, :], 1, _sum_combine)
    tl.store(o_ptr + pid64 * d + offs_d, o.to(o_ptr.dtype.element_ty), mask=md)


def titans_deep_memory_step_triton(
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
    """One decode token on Triton; shapes and semantics as `titans_deep_memory_step_reference`.

    q, a: (B, H, d); mask: (B,). Returns o (B, H, d) in q.dtype and the fp32 state after the token.
    Not differentiable (decode only): the inputs are read detached.
    """
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective,
                       memory_target, adaptive, mask, state, token_dim=False)
    hidden = w1_0.shape[-1]
    check_deep_kernel_inputs(q, a, hidden, chunk_size, token_dim=False)
    B, H, d = q.shape
    f32 = torch.float32
    rows = adaptive_row_mask(adaptive, d)
    with torch.no_grad():
        states, position = _start_states(w1_0, w2_0, z0, state, B, q.device)
        st = [x.to(f32).contiguous() for x in states]
        outs = [torch.empty_like(x) for x in st]
        q_c, a_c = _kernel_inputs(q, a)
        valid = None if mask is None else mask.to(device=q.device, dtype=f32).contiguous()
        o = torch.empty_like(q_c)
        D = max(16, _next_pow2(d))
        _deep_step_kernel[(B * H,)](
            q_c, a_c, valid if valid is not None else q_c, *st, *outs, o,
            b_eta.to(f32).contiguous(), b_alpha.to(f32).contiguous(),
            torch.sigmoid(momentum_logit.to(f32)).contiguous(),
            H, d, hidden, float(eta_max), 1.0 if dgd else 0.0, int((position + 1) % chunk_size == 0),
            D=D, HD=max(16, _next_pow2(hidden)), BR=min(D, 32), MOM=bool(momentum), OBJ_L2=objective == "l2",
            VALUE=memory_target == "value",
            AD_K=bool(rows[d]), AD_V=bool(rows[2 * d]), AD_E=bool(rows[3 * d]), AD_A=bool(rows[3 * d + 1]),
            HAS_MASK=valid is not None, num_warps=4,
        )
        if not momentum:  # the kernel writes no momentum without it: it stays as it was
            outs[5], outs[8] = st[5], st[8]
    return o.to(q.dtype), DeepTitansState(*outs, position + 1)
