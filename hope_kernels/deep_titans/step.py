"""Triton kernel of one decode token of the deep Titans memory, SPEC §2 v2 "Deep memory" and §5.

`titans_deep_memory_step_triton` has the signature and semantics of `titans_deep_memory_step_reference` (without
momentum): the generating rows as the linear op's step (`hope_kernels.titans.step.step_rows`), then, from the
chunk-start theta_c = (W1_c, W2_c): p = W2_c k, e = dℓ/dM, g = silu'(p) ⊙ W1_cᵀ e, the writes' step
eta' = eta / max(1, N) (memory_curvature_guard; N the curvature of `curvature_scale`) or eta,
    W2_t = W2_A + alpha (W2_{t-1} - W2_A) - eps eta W2_{t-1} k kᵀ - eta' g kᵀ,
    W1_t = W1_A + alpha (W1_{t-1} - W1_A) - eta' e silu(p)ᵀ,            o_t = q_t + W1_t silu(W2_t q_t),
with the anchors (W1_A, W2_A) = (W1_0, W2_0) under memory_retention="init" and 0 under "zero", and the chunk starts
moved when the token completes a chunk. One program per (batch, head), the d x h states in tiles of hidden units;
fp32; no autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels.deep_titans.chunk import MAX_HIDDEN, silu_grad
from hope_kernels.deep_titans.reference import DeepTitansState, _check_deep_inputs, _kwargs
from hope_kernels.titans._common import (
    block_sizes,
    check_kernel_inputs,
    check_no_momentum,
    launch,
    launch_options,
    next_pow2,
    sigmoid,
)
from hope_kernels.titans.reference import ADAPTIVE_NAMES, adaptive_row_mask
from hope_kernels.titans.reference import _config as reference_config
from hope_kernels.titans.step import step_reads, step_rows

__all__ = ["titans_deep_memory_step_triton"]


@triton.jit
def _deep_step_kernel(
    q_ptr, a_ptr, valid_ptr, zc_ptr, z_ptr, w1c_ptr, w1_ptr, w2c_ptr, w2_ptr, ga_ptr, a1_ptr, a2_ptr,
    zc_out_ptr, z_out_ptr, w1c_out_ptr, w1_out_ptr, w2c_out_ptr, w2_out_ptr, o_ptr, b_eta_ptr, b_alpha_ptr,
    H, d, hd, eta_max, eps, resid, move_w, move_g,
    D: tl.constexpr, BF: tl.constexpr, BR: tl.constexpr, OBJ_L2: tl.constexpr, VALUE: tl.constexpr,
    AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr, HAS_MASK: tl.constexpr,
    VNORM: tl.constexpr, ANCHOR: tl.constexpr, GUARD: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    G = 2 * d + 2
    offs_d = tl.arange(0, D)
    md = offs_d < d
    q = tl.load(q_ptr + bh * d + offs_d, mask=md, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + bh * d + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_MASK:
        valid = tl.load(valid_ptr + b)
    else:
        valid = 1.0
    zc = zc_ptr + bh * G * d
    k, v, eta, alpha = step_reads(a, valid, zc, tl.load(b_eta_ptr + h), tl.load(b_alpha_ptr + h), eta_max, resid,
                                  d, offs_d, md, VNORM)
    if OBJ_L2:
        u = k - v
    else:
        u = -v
    for r0 in range(d, 3 * d + 2, BR):  # the generating rows; never W's (the deep main memory is W1, W2)
        step_rows(zc, z_ptr + bh * G * d, zc_out_ptr + bh * G * d, z_out_ptr + bh * G * d, ga_ptr + h * G * d, o_ptr,
                  r0, d, d, k, v, u, q, eta, alpha, eps, resid, move_w, move_g, offs_d, md, BR, OBJ_L2, False, AD_K,
                  AD_V, AD_E, AD_A, ANCHOR)
    # 32-bit tile offsets from per-(b, h) base pointers: 64-bit tile offsets took the registers that spilled
    w1c_ptr += bh * d * hd
    w1_ptr += bh * d * hd
    w2c_ptr += bh * d * hd
    w2_ptr += bh * d * hd
    w1c_out_ptr += bh * d * hd
    w1_out_ptr += bh * d * hd
    w2c_out_ptr += bh * d * hd
    w2_out_ptr += bh * d * hd
    a1_ptr += h * d * hd
    a2_ptr += h * d * hd
    # The d x h states go in BF-wide tiles of the hidden units f, twice: whole states (four of them live at once)
    # spilled at d = h = 128. Pass 1 reads the chunk start (theta_c) into d-vectors and the guard's N, which every
    # hidden unit's write needs; pass 2 recomputes its tile's p, silu(p), g and writes both states.
    acc_e = tl.zeros([D], tl.float32)  # W1_c silu(p)
    acc_t = tl.zeros([D], tl.float32)  # W1_c silu(W2_c v), the self target's read
    acc_n = tl.zeros([BF], tl.float32)
    for f0 in range(0, hd, BF):
        offs_f = f0 + tl.arange(0, BF)
        mf = offs_f < hd
        W2c = tl.load(w2c_ptr + offs_f[:, None] * d + offs_d[None, :], mask=mf[:, None] & md[None, :], other=0.0)
        W1c = tl.load(w1c_ptr + offs_d[:, None] * hd + offs_f[None, :], mask=md[:, None] & mf[None, :], other=0.0)
        p = tl.sum(W2c * k[None, :], 1)
        s = p * sigmoid(p)
        acc_e += tl.sum(W1c * s[None, :], 1)
        if not VALUE:
            pv = tl.sum(W2c * v[None, :], 1)
            acc_t += tl.sum(W1c * (pv * sigmoid(pv))[None, :], 1)
        if GUARD:  # N = ||silu(p)||² + Σ_f silu'(p_f)² ||W1_c[:, f]||²
            sg = silu_grad(p)
            acc_n += s * s + sg * sg * tl.sum(W1c * W1c, 0)
    target = v + acc_t
    if OBJ_L2:
        e = k + acc_e - target
    else:
        e = -target
    if GUARD:
        eta_m = eta / tl.maximum(tl.sum(acc_n, 0), 1.0)
    else:
        eta_m = eta
    o = q
    for f0 in range(0, hd, BF):
        offs_f = f0 + tl.arange(0, BF)
        mf = offs_f < hd
        w2off = offs_f[:, None] * d + offs_d[None, :]
        w1off = offs_d[:, None] * hd + offs_f[None, :]
        w2m = mf[:, None] & md[None, :]
        w1m = md[:, None] & mf[None, :]
        W2c = tl.load(w2c_ptr + w2off, mask=w2m, other=0.0)
        W1c = tl.load(w1c_ptr + w1off, mask=w1m, other=0.0)
        p = tl.sum(W2c * k[None, :], 1)
        s = p * sigmoid(p)
        g = silu_grad(p) * tl.sum(W1c * e[:, None], 0)
        W2 = tl.load(w2_ptr + w2off, mask=w2m, other=0.0)
        W2 = alpha * W2 - (eps * eta * tl.sum(W2 * k[None, :], 1) + eta_m * g)[:, None] * k[None, :]
        if ANCHOR:
            W2 += (1.0 - alpha) * tl.load(a2_ptr + w2off, mask=w2m, other=0.0)
        hid = tl.sum(W2 * q[None, :], 1)
        tl.store(w2_out_ptr + w2off, W2, mask=w2m)
        tl.store(w2c_out_ptr + w2off, tl.where(move_w != 0, W2, W2c), mask=w2m)
        W1 = alpha * tl.load(w1_ptr + w1off, mask=w1m, other=0.0) - eta_m * e[:, None] * s[None, :]
        if ANCHOR:
            W1 += (1.0 - alpha) * tl.load(a1_ptr + w1off, mask=w1m, other=0.0)
        o += tl.sum(W1 * (hid * sigmoid(hid))[None, :], 1)  # the read after the token's update
        tl.store(w1_out_ptr + w1off, W1, mask=w1m)
        tl.store(w1c_out_ptr + w1off, tl.where(move_w != 0, W1, W1c), mask=w1m)
    tl.store(o_ptr + bh * d + offs_d, o.to(o_ptr.dtype.element_ty), mask=md)


def titans_deep_memory_step_triton(
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
    """One decode token on Triton; shapes and semantics as `titans_deep_memory_step_reference` (momentum=False).
    q, a: (B, H, d); mask: (B,). Returns o (B, H, d) in q.dtype and the fp32 state after the token."""
    kwargs = _kwargs(chunk_size, adaptive_chunk_size, eta_max, momentum, objective, memory_target, adaptive, mask)
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, state, False, kwargs)
    check_no_momentum(momentum, op="deep_titans")
    check_kernel_inputs(q, a, chunk_size, op="deep_titans")
    B, H, d = q.shape
    hd = w1_0.shape[-1]
    if hd > MAX_HIDDEN:
        raise ValueError(f"deep_titans Triton kernel: memory_hidden h={hd} is not supported; need h <= {MAX_HIDDEN}")
    if state is None:
        init = [x.float().unsqueeze(0).expand(B, *x.shape) for x in (z0, w1_0, w2_0)]
        tensors = [init[0], init[0], init[1], init[1], init[2], init[2]]
        position = 0
    else:
        tensors = [state.z_chunk, state.z, state.w1_chunk, state.w1, state.w2_chunk, state.w2]
        position = int(state.position)
    tensors = [x.float().contiguous() for x in tensors]
    outs = [torch.empty_like(x) for x in tensors]
    ref = reference_config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
                           memory_value_norm, memory_retention, memory_curvature_guard)
    ca = ref["adaptive_chunk_size"]
    anchors = [x.detach().float().contiguous() for x in (z0, w1_0, w2_0)] if ref["anchored"] else tensors[:1] * 3
    rows = adaptive_row_mask(adaptive, d)
    D, _ = block_sizes(d, chunk_size)
    valid = None if mask is None else mask.detach().to(device=q.device, dtype=torch.float32).contiguous()
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    launch(_deep_step_kernel, (B * H,),
           q.contiguous(), a.contiguous(), valid if valid is not None else q, *tensors, *anchors, *outs, o,
           b_eta.detach().float().contiguous(), b_alpha.detach().float().contiguous(), H, d, hd, float(eta_max),
           1.0 if dgd else 0.0, 1.0 if memory_residual else 0.0, int((position + 1) % chunk_size == 0),
           int((position + 1) % ca == 0),
           D=D, BF=min(32, max(16, next_pow2(hd))), BR=min(D, 32), OBJ_L2=objective == "l2", VALUE=memory_target == "value",
           AD_K=bool(rows[d]), AD_V=bool(rows[2 * d]), AD_E=bool(rows[3 * d]), AD_A=bool(rows[3 * d + 1]),
           HAS_MASK=valid is not None, VNORM=ref["value_norm"], ANCHOR=ref["anchored"], GUARD=ref["curvature_guard"],
           **launch_options("deep_step", D))
    zc, z, w1c, w1, w2c, w2 = outs
    return o, DeepTitansState(zc, z, None, w1c, w1, None, w2c, w2, None, position + 1)
