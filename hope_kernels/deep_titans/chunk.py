"""Triton kernels of the chunked deep Titans memory (SPEC §2 "Deep memory", Eq. 91, memory_depth=2), forward
and backward.

`titans_deep_memory_triton` has the signature and semantics of `titans_deep_memory_reference`
(hope_kernels/deep_titans/reference.py): it returns the reads o_t = q_t + W1_t silu(W2_t q_t) and, on request,
the final `DeepTitansState`.

Design (as the linear kernel, hope_kernels/titans/chunk.py, whose Triton helpers it imports):

* One launch, one program per (batch, head); the chunk recurrence runs inside the kernel. Segments as in the
  reference: chunk phase from position 0, so a state at position p first finishes its chunk (C - p % C tokens).
* Each segment is padded to BC = max(16, next_pow2(C)) token rows (padded tokens have valid = 0: alpha = 1,
  eta = 0, no momentum step); d to D = max(16, next_pow2(d)) and h to HD = max(16, next_pow2(h)) with zeros
  (silu(0) = 0, so padded hidden units stay 0).
* Per segment: k, v, eta, alpha and the log-space decay matrices from the chunk-start adaptive rows (the linear
  kernel's `_coeffs`), the adaptive rows' new state (`_advance_adaptive`), then the TTT-MLP dual form of the
  reference's `_deep_segment`: p = K W2_cᵀ, the errors E and back-propagated G = silu'(P) ⊙ E W1_c at the chunk
  start; the reads H = silu(γ Q W2_sᵀ + σ Q S2_sᵀ - Wdᵀ P - Wgᵀ G),
  O = Q + γ H W1_sᵀ + σ H S1_sᵀ - W1gᵀ E;
  then the state after the segment. All masked BC x BC and BC x D (BC x HD) tl.dots.
* The state lives in fp32 ping-pong workspaces (two slots per (b, h)); `tl.debug_barrier()` orders a
  segment's stores before the next segment's loads.
* With a backward to follow, the forward keeps every segment's end state (one slot per segment: the saved
  chunk-start states, O(T/C (2d+2+2h) d) per (b, h)). The backward kernel walks the segments in reverse,
  recomputes each one from its saved start state and carries dL/d(state) in two ping-pong slots. Its deep part
  is the hand-derived gradient of the reference's `_deep_segment` (checked against float64 autograd); the
  adaptive rows, the scalar decay chain and the k, v, eta, alpha inputs reuse the linear kernel's helpers.

Constraints (ValueError otherwise): 1 <= d, h <= 128; 1 <= chunk_size <= 128; q and a of one dtype among
float32, float16, bfloat16; CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, where half inputs are upcast
to fp32 first). States and sums are fp32; o comes back in the input dtype. tl.dot precision and the
launch retry at the other tensor-core precision are the linear kernel's (`dot_precision`, `_launch`): a launch
that fits at neither raises a RuntimeError (kernel_backend="triton" never falls back).

GPU resources (no GPU was at hand: nothing here has been run or timed on one; shared memory as reported by an
offline compile for sm_90a with triton 3.7.1, bf16 inputs, num_warps=8): the forward needs 112 KB at
d = h = C = 64 and the decode step 0.5 KB; the backward at d = h = C = 64 needs 224 KB at tf32 and 208 KB at
tf32x3, just inside the H200's 227 KB (at most 212 KB at d = h = 64, C = 32). That fit comes from re-loading
W1_c, W2_c and a (and recomputing k, v) behind a barrier in the backward's later passes, so that the shared-memory
copies of the recomputation's tl.dot operands are not kept live (288 KB without). Larger d, h or C may not fit:
a launch that fits at neither precision raises. Registers and speed are unmeasured.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels._dispatch import triton_interpreting
from hope_kernels.deep_titans.reference import (
    DeepTitansState,
    _check_deep_inputs,
)
from hope_kernels.titans.chunk import (
    MAX_HEAD_DIM,
    _adaptive_out_grads,
    _adaptive_state_grads,
    _advance_adaptive,
    _block_sizes,
    _coeffs,
    _configs,
    _input_grads,
    _launch,
    _next_pow2,
    _num_segments,
    _prune_configs,
    _scalar_chain,
    _sigmoid,
    _sum_combine,
    _targets,
    check_kernel_inputs,
    dot_precision,
)
from hope_kernels.titans.reference import ADAPTIVE_NAMES, adaptive_row_mask

__all__ = ["titans_deep_memory_triton"]


@triton.jit
def _silu(x):
    return x * _sigmoid(x)


@triton.jit
def _silu_grad(x):
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.autotune(configs=_configs(), key=["D", "HD", "BC", "MOM", "VALUE", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _deep_fwd_kernel(
    q_ptr, a_ptr, valid_ptr,
    zc_ptr, z_ptr, s_ptr, w1c_ptr, w1_ptr, s1_ptr, w2c_ptr, w2_ptr, s2_ptr,
    wz_ptr, ws_ptr, ww1_ptr, ws1_ptr, ww2_ptr, ws2_ptr,
    o_ptr, b_eta_ptr, b_alpha_ptr, log_beta_ptr,
    T, H, d, hd, C, shift, NSEG, NSLOT, eta_max, eps,
    BC: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, MOM: tl.constexpr, OBJ_L2: tl.constexpr,
    VALUE: tl.constexpr, AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    AD = (2 * d + 2) * d  # adaptive rows per (b, h)
    WD = d * hd  # W1 / W2 entries per (b, h)
    pid64 = pid.to(tl.int64)
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    offs_h = tl.arange(0, HD)
    md = offs_d < d
    mh = offs_h < hd
    boff = offs_d[:, None] * d + offs_d[None, :]  # (D, D) block of a row-major (., d) state
    bm = md[:, None] & md[None, :]
    off1 = offs_d[:, None] * hd + offs_h[None, :]  # W1: (d, h) row-major
    m1 = md[:, None] & mh[None, :]
    off2 = offs_h[:, None] * d + offs_d[None, :]  # W2: (h, d) row-major
    m2w = mh[:, None] & md[None, :]
    b_eta = tl.load(b_eta_ptr + h)
    b_alpha = tl.load(b_alpha_ptr + h)
    log_beta = tl.load(log_beta_ptr + h)
    tok_stride = H * d
    row0 = b.to(tl.int64) * T

    for n in range(0, NSEG):
        seg_start = tl.maximum(n * C - shift, 0)
        seg_len = tl.minimum((n + 1) * C - shift, T) - seg_start
        if n == 0:
            zc = zc_ptr + pid64 * AD
            zs = z_ptr + pid64 * AD
            ss = s_ptr + pid64 * AD
            w1c = w1c_ptr + pid64 * WD
            w1s = w1_ptr + pid64 * WD
            s1s = s1_ptr + pid64 * WD
            w2c = w2c_ptr + pid64 * WD
            w2s = w2_ptr + pid64 * WD
            s2s = s2_ptr + pid64 * WD
        else:  # every later segment starts at a chunk boundary: its start state is its chunk-start state
            slot = (n - 1) % NSLOT
            zs = wz_ptr + (pid64 * NSLOT + slot) * AD
            ss = ws_ptr + (pid64 * NSLOT + slot) * AD
            w1s = ww1_ptr + (pid64 * NSLOT + slot) * WD
            s1s = ws1_ptr + (pid64 * NSLOT + slot) * WD
            w2s = ww2_ptr + (pid64 * NSLOT + slot) * WD
            s2s = ws2_ptr + (pid64 * NSLOT + slot) * WD
            zc = zs
            w1c = w1s
            w2c = w2s
        slot_e = n % NSLOT
        ze = wz_ptr + (pid64 * NSLOT + slot_e) * AD
        se = ws_ptr + (pid64 * NSLOT + slot_e) * AD
        w1e_p = ww1_ptr + (pid64 * NSLOT + slot_e) * WD
        s1e_p = ws1_ptr + (pid64 * NSLOT + slot_e) * WD
        w2e_p = ww2_ptr + (pid64 * NSLOT + slot_e) * WD
        s2e_p = ws2_ptr + (pid64 * NSLOT + slot_e) * WD

        mt = offs_c < seg_len
        tok = row0 + seg_start + offs_c
        offs_x = tok[:, None] * tok_stride + h * d + offs_d[None, :]
        mx = mt[:, None] & md[None, :]
        q = tl.load(q_ptr + offs_x, mask=mx, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_x, mask=mx, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = tl.load(valid_ptr + tok, mask=mt, other=0.0).to(tl.float32)
        else:
            valid = tl.where(mt, 1.0, 0.0)

        # Eq. 90 and the decay coefficients: the linear kernel's `_coeffs` reads M_k at row d of its stacked Z,
        # our adaptive block starts at M_k, hence the pointer d rows back.
        (me, ma, kr, nrm, nn, k, v, sig_e, eta, al_pre, dec, gamma, dlast, gL,
         mo, c, wexp, sigma, clast, molast, sL, bL) = _coeffs(
            a, valid, zc - d * d, d, b_eta, b_alpha, log_beta, eta_max, eps, offs_c, offs_d, D, MOM, PREC)
        e_d = eps * eta * dlast
        e_g = eta * clast
        e_m = eta * molast

        # ---- adaptive rows: the linear rule with self targets (u = k - v or -v)
        u, u_unused = _targets(k, v, OBJ_L2, False)
        _advance_adaptive(zs, zc, ss, ze, se, me, ma, e_d[:, None] * k + e_g[:, None] * u, e_m[:, None] * u, k,
                          gL, sL, bL, d, boff, bm, offs_d, md, AD_K, AD_V, AD_E, AD_A, MOM, PREC)

        # ---- deep main memory: inner-loss pieces at the chunk start (no inner gradient through the target)
        W1c = tl.load(w1c + off1, mask=m1, other=0.0)  # (D, HD)
        W2c = tl.load(w2c + off2, mask=m2w, other=0.0)  # (HD, D)
        p = tl.dot(k, tl.trans(W2c), input_precision=PREC)  # (BC, HD): W2_c k_i
        r = _silu(p)
        if VALUE:
            tgt = v
        else:
            tgt = v + tl.dot(_silu(tl.dot(v, tl.trans(W2c), input_precision=PREC)), tl.trans(W1c),
                             input_precision=PREC)
        if OBJ_L2:
            e = k + tl.dot(r, tl.trans(W1c), input_precision=PREC) - tgt  # M_c(k) - target
        else:
            e = -tgt
        g = _silu_grad(p) * tl.dot(e, W1c, input_precision=PREC)  # (BC, HD): silu'(p) ⊙ W1_cᵀ e

        # ---- reads (TTT-MLP dual form): first layer W2_t q_t, then W1_t silu(.)
        kq = tl.dot(k, tl.trans(q), input_precision=PREC)  # [i, t] = k_i . q_t
        wd = eps * eta[:, None] * kq * dec
        wg = eta[:, None] * kq * c
        W2s = tl.load(w2s + off2, mask=m2w, other=0.0)
        pre = gamma[:, None] * tl.dot(q, tl.trans(W2s), input_precision=PREC)
        pre -= tl.dot(tl.trans(wd), p, input_precision=PREC) + tl.dot(tl.trans(wg), g, input_precision=PREC)
        if MOM:
            S2s = tl.load(s2s + off2, mask=m2w, other=0.0)
            pre += sigma[:, None] * tl.dot(q, tl.trans(S2s), input_precision=PREC)
        hid = _silu(pre)  # (BC, HD)
        w1g = eta[:, None] * tl.dot(r, tl.trans(hid), input_precision=PREC) * c  # [i, t] eta_i c_it r_i . h_t
        W1s = tl.load(w1s + off1, mask=m1, other=0.0)
        o = q + gamma[:, None] * tl.dot(hid, tl.trans(W1s), input_precision=PREC)
        o -= tl.dot(tl.trans(w1g), e, input_precision=PREC)
        if MOM:
            S1s = tl.load(s1s + off1, mask=m1, other=0.0)
            o += sigma[:, None] * tl.dot(hid, tl.trans(S1s), input_precision=PREC)
        tl.store(o_ptr + offs_x, o.to(o_ptr.dtype.element_ty), mask=mx)

        # ---- state after the segment: W_L = gL W_s + sL S_s - Σ_i eta_i (eps gL/g_i D_i + c_iL G_i)
        W1e = gL * W1s - tl.dot(tl.trans(e_g[:, None] * e), r, input_precision=PREC)
        W2e = gL * W2s - tl.dot(tl.trans(e_g[:, None] * g + e_d[:, None] * p), k, input_precision=PREC)
        if MOM:
            W1e += sL * S1s
            W2e += sL * S2s
            tl.store(s1e_p + off1, bL * S1s - tl.dot(tl.trans(e_m[:, None] * e), r, input_precision=PREC), mask=m1)
            tl.store(s2e_p + off2, bL * S2s - tl.dot(tl.trans(e_m[:, None] * g), k, input_precision=PREC), mask=m2w)
        tl.store(w1e_p + off1, W1e, mask=m1)
        tl.store(w2e_p + off2, W2e, mask=m2w)
        # the next segment reads what this one stored
        tl.debug_barrier()


# -------------------------------------------------------------------------------------------- backward


@triton.jit
def _silu_grad2(x):
    """d²/dx² x sigmoid(x) = s (1 - s) (2 + x (1 - 2 s))."""
    s = _sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


@triton.jit
def _store_w_grads(n, nxt_w, nxt_s, dwc_out, dw_out, ds_out, off, m, gwc, gws, gss, MOM: tl.constexpr):
    """A main-memory layer's gradients w.r.t. the segment's chunk-start, start and start-momentum state: into the
    carry for the previous segment (whose end is this start, and for n > 0 also this chunk start) or, for the first
    segment, into the outputs."""
    if n > 0:
        tl.store(nxt_w + off, gwc + gws, mask=m)
        if MOM:
            tl.store(nxt_s + off, gss, mask=m)
    else:
        tl.store(dwc_out + off, gwc, mask=m)
        tl.store(dw_out + off, gws, mask=m)
        if MOM:
            tl.store(ds_out + off, gss, mask=m)


@triton.autotune(configs=_configs(), key=["D", "HD", "BC", "MOM", "VALUE", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _deep_bwd_kernel(
    q_ptr, a_ptr, valid_ptr, do_ptr,
    zc_ptr, z_ptr, s_ptr, w1c_ptr, w1_ptr, s1_ptr, w2c_ptr, w2_ptr, s2_ptr,
    wz_ptr, ws_ptr, ww1_ptr, ws1_ptr, ww2_ptr, ws2_ptr,
    gz_init, gs_init, g1_init, gs1_init, g2_init, gs2_init, gzc_last, g1c_last, g2c_last,
    cz_ptr, cs_ptr, c1_ptr, cs1_ptr, c2_ptr, cs2_ptr,
    dq_ptr, da_ptr, dzc_out, dz_out, ds_out, dw1c_out, dw1_out, ds1_out, dw2c_out, dw2_out, ds2_out, dpar_ptr,
    b_eta_ptr, b_alpha_ptr, log_beta_ptr,
    T, H, d, hd, C, shift, NSEG, eta_max, eps, extra_last,
    BC: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, MOM: tl.constexpr, OBJ_L2: tl.constexpr,
    VALUE: tl.constexpr, AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """Segments in reverse, recomputed from the saved segment-start states; carries dL/d(state) (two ping-pong
    slots). The deep part is the hand-derived gradient of the reference's `_deep_segment` (checked against float64
    autograd); the adaptive rows, the scalar chain and the k, v, eta, alpha inputs reuse the linear kernel's
    helpers."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    AD = (2 * d + 2) * d
    WD = d * hd
    pid64 = pid.to(tl.int64)
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    offs_h = tl.arange(0, HD)
    md = offs_d < d
    mh = offs_h < hd
    boff = offs_d[:, None] * d + offs_d[None, :]
    bm = md[:, None] & md[None, :]
    off1 = offs_d[:, None] * hd + offs_h[None, :]  # W1: (d, h)
    m1 = md[:, None] & mh[None, :]
    off2 = offs_h[:, None] * d + offs_d[None, :]  # W2: (h, d)
    m2w = mh[:, None] & md[None, :]
    b_eta = tl.load(b_eta_ptr + h)
    b_alpha = tl.load(b_alpha_ptr + h)
    log_beta = tl.load(log_beta_ptr + h)
    tok_stride = H * d
    row0 = b.to(tl.int64) * T
    rev = offs_c[None, :] >= offs_c[:, None]  # [s, t]: t >= s
    acc_beta = b_eta * 0.0
    acc_balpha = b_eta * 0.0
    acc_lbeta = b_eta * 0.0
    dzc_o = dzc_out + pid64 * AD
    dz_o = dz_out + pid64 * AD
    ds_o = ds_out + pid64 * AD
    dw1c_o = dw1c_out + pid64 * WD
    dw1_o = dw1_out + pid64 * WD
    ds1_o = ds1_out + pid64 * WD
    dw2c_o = dw2c_out + pid64 * WD
    dw2_o = dw2_out + pid64 * WD
    ds2_o = ds2_out + pid64 * WD

    for i in range(0, NSEG):
        n = NSEG - 1 - i
        seg_start = tl.maximum(n * C - shift, 0)
        seg_len = tl.minimum((n + 1) * C - shift, T) - seg_start
        if n == 0:
            zc = zc_ptr + pid64 * AD
            zs = z_ptr + pid64 * AD
            ss = s_ptr + pid64 * AD
            w1c = w1c_ptr + pid64 * WD
            w1s = w1_ptr + pid64 * WD
            s1s = s1_ptr + pid64 * WD
            w2c = w2c_ptr + pid64 * WD
            w2s = w2_ptr + pid64 * WD
            s2s = s2_ptr + pid64 * WD
        else:  # the saved end of segment n - 1: this segment's start and chunk start
            zs = wz_ptr + (pid64 * NSEG + n - 1) * AD
            ss = ws_ptr + (pid64 * NSEG + n - 1) * AD
            w1s = ww1_ptr + (pid64 * NSEG + n - 1) * WD
            s1s = ws1_ptr + (pid64 * NSEG + n - 1) * WD
            w2s = ww2_ptr + (pid64 * NSEG + n - 1) * WD
            s2s = ws2_ptr + (pid64 * NSEG + n - 1) * WD
            zc = zs
            w1c = w1s
            w2c = w2s
        if i == 0:
            cz = gz_init + pid64 * AD
            cs = gs_init + pid64 * AD
            c1 = g1_init + pid64 * WD
            cs1 = gs1_init + pid64 * WD
            c2 = g2_init + pid64 * WD
            cs2 = gs2_init + pid64 * WD
        else:
            cz = cz_ptr + (pid64 * 2 + (i - 1) % 2) * AD
            cs = cs_ptr + (pid64 * 2 + (i - 1) % 2) * AD
            c1 = c1_ptr + (pid64 * 2 + (i - 1) % 2) * WD
            cs1 = cs1_ptr + (pid64 * 2 + (i - 1) % 2) * WD
            c2 = c2_ptr + (pid64 * 2 + (i - 1) % 2) * WD
            cs2 = cs2_ptr + (pid64 * 2 + (i - 1) % 2) * WD
        nz = cz_ptr + (pid64 * 2 + i % 2) * AD
        ns = cs_ptr + (pid64 * 2 + i % 2) * AD
        n1 = c1_ptr + (pid64 * 2 + i % 2) * WD
        ns1 = cs1_ptr + (pid64 * 2 + i % 2) * WD
        n2 = c2_ptr + (pid64 * 2 + i % 2) * WD
        ns2 = cs2_ptr + (pid64 * 2 + i % 2) * WD

        mt = offs_c < seg_len
        tok = row0 + seg_start + offs_c
        offs_x = tok[:, None] * tok_stride + h * d + offs_d[None, :]
        mx = mt[:, None] & md[None, :]
        q = tl.load(q_ptr + offs_x, mask=mx, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_x, mask=mx, other=0.0).to(tl.float32)
        dO = tl.load(do_ptr + offs_x, mask=mx, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = tl.load(valid_ptr + tok, mask=mt, other=0.0).to(tl.float32)
        else:
            valid = tl.where(mt, 1.0, 0.0)

        (me, ma, kr, nrm, nn, k, v, sig_e, eta, al_pre, dec, gamma, dlast, gL,
         mo, c, wexp, sigma, clast, molast, sL, bL) = _coeffs(
            a, valid, zc - d * d, d, b_eta, b_alpha, log_beta, eta_max, eps, offs_c, offs_d, D, MOM, PREC)
        u, u_unused = _targets(k, v, OBJ_L2, False)
        e_d = eps * eta * dlast
        e_g = eta * clast
        e_m = eta * molast
        W = e_d[:, None] * k + e_g[:, None] * u
        Ws = e_m[:, None] * u

        # ---- recompute the deep forward of the segment (reference `_deep_segment`)
        W1c = tl.load(w1c + off1, mask=m1, other=0.0)
        W2c = tl.load(w2c + off2, mask=m2w, other=0.0)
        P = tl.dot(k, tl.trans(W2c), input_precision=PREC)
        R = _silu(P)
        if VALUE:
            TV = v
        else:
            Vh = tl.dot(v, tl.trans(W2c), input_precision=PREC)
            TV = v + tl.dot(_silu(Vh), tl.trans(W1c), input_precision=PREC)
        if OBJ_L2:
            E = k + tl.dot(R, tl.trans(W1c), input_precision=PREC) - TV
        else:
            E = -TV
        GE = tl.dot(E, W1c, input_precision=PREC)
        Gs = _silu_grad(P)
        G = Gs * GE
        KQ = tl.dot(k, tl.trans(q), input_precision=PREC)
        WDm = eps * eta[:, None] * KQ * dec
        WGm = eta[:, None] * KQ * c
        W2s = tl.load(w2s + off2, mask=m2w, other=0.0)
        QW2 = tl.dot(q, tl.trans(W2s), input_precision=PREC)
        PRE = gamma[:, None] * QW2 - tl.dot(tl.trans(WDm), P, input_precision=PREC)
        PRE -= tl.dot(tl.trans(WGm), G, input_precision=PREC)
        if MOM:
            S2s = tl.load(s2s + off2, mask=m2w, other=0.0)
            QS2 = tl.dot(q, tl.trans(S2s), input_precision=PREC)
            PRE += sigma[:, None] * QS2
        HID = _silu(PRE)
        RH = tl.dot(R, tl.trans(HID), input_precision=PREC)
        W1G = eta[:, None] * RH * c
        W1s = tl.load(w1s + off1, mask=m1, other=0.0)

        # ---- backward of the reads: second layer O = Q + gamma HID W1sᵀ + sigma HID S1sᵀ - W1Gᵀ E
        dQ = dO
        dHID = gamma[:, None] * tl.dot(dO, W1s, input_precision=PREC)
        dgamma = tl.reduce(dO * tl.dot(HID, tl.trans(W1s), input_precision=PREC), 1, _sum_combine)
        gW1s = tl.dot(tl.trans(gamma[:, None] * dO), HID, input_precision=PREC)
        if MOM:
            S1s = tl.load(s1s + off1, mask=m1, other=0.0)
            dHID += sigma[:, None] * tl.dot(dO, S1s, input_precision=PREC)
            dsigma = tl.reduce(dO * tl.dot(HID, tl.trans(S1s), input_precision=PREC), 1, _sum_combine)
            gS1s = tl.dot(tl.trans(sigma[:, None] * dO), HID, input_precision=PREC)
        else:
            dsigma = dgamma * 0.0
        dW1G = -tl.dot(E, tl.trans(dO), input_precision=PREC)
        dE = -tl.dot(W1G, dO, input_precision=PREC)
        dRH = eta[:, None] * c * dW1G
        dc = eta[:, None] * RH * dW1G
        deta = tl.reduce(RH * c * dW1G, 1, _sum_combine)
        dR = tl.dot(dRH, HID, input_precision=PREC)
        dHID += tl.dot(tl.trans(dRH), R, input_precision=PREC)
        dPRE = dHID * _silu_grad(PRE)
        # first layer PRE = gamma Q W2sᵀ + sigma Q S2sᵀ - WDᵀ P - WGᵀ G
        dQ += gamma[:, None] * tl.dot(dPRE, W2s, input_precision=PREC)
        gW2s = tl.dot(tl.trans(gamma[:, None] * dPRE), q, input_precision=PREC)
        dgamma += tl.reduce(dPRE * QW2, 1, _sum_combine)
        if MOM:
            dQ += sigma[:, None] * tl.dot(dPRE, S2s, input_precision=PREC)
            gS2s = tl.dot(tl.trans(sigma[:, None] * dPRE), q, input_precision=PREC)
            dsigma += tl.reduce(dPRE * QS2, 1, _sum_combine)
        dWD = -tl.dot(P, tl.trans(dPRE), input_precision=PREC)
        dWG = -tl.dot(G, tl.trans(dPRE), input_precision=PREC)
        dP = -tl.dot(WDm, dPRE, input_precision=PREC)
        dG = -tl.dot(WGm, dPRE, input_precision=PREC)
        dKQ = eps * eta[:, None] * dec * dWD + eta[:, None] * c * dWG
        ddec = eps * eta[:, None] * KQ * dWD
        dc += eta[:, None] * KQ * dWG
        deta += tl.reduce(eps * KQ * dec * dWD + KQ * c * dWG, 1, _sum_combine)
        dk = tl.dot(dKQ, q, input_precision=PREC)
        dQ += tl.dot(tl.trans(dKQ), k, input_precision=PREC)

        # ---- backward of the end state: W1e = gL W1s + sL S1s - (e_g E)ᵀ R,  W2e = ... - (e_g G + e_d P)ᵀ K
        dW1e = tl.load(c1 + off1, mask=m1, other=0.0)
        dW2e = tl.load(c2 + off2, mask=m2w, other=0.0)
        RdW1 = tl.dot(R, tl.trans(dW1e), input_precision=PREC)  # (BC, D): dW1e r_i
        dE -= e_g[:, None] * RdW1
        dR -= e_g[:, None] * tl.dot(E, dW1e, input_precision=PREC)
        de_g = -tl.reduce(E * RdW1, 1, _sum_combine)
        KdW2 = tl.dot(k, tl.trans(dW2e), input_precision=PREC)  # (BC, HD): dW2e k_i
        dG -= e_g[:, None] * KdW2
        dP -= e_d[:, None] * KdW2
        dk -= tl.dot(e_g[:, None] * G + e_d[:, None] * P, dW2e, input_precision=PREC)
        de_g -= tl.reduce(G * KdW2, 1, _sum_combine)
        de_d = -tl.reduce(P * KdW2, 1, _sum_combine)
        gW1s += gL * dW1e
        gW2s += gL * dW2e
        dgL = tl.reduce(tl.reduce(dW1e * W1s, 1, _sum_combine), 0, _sum_combine)
        dgL += tl.reduce(tl.reduce(dW2e * W2s, 1, _sum_combine), 0, _sum_combine)
        if MOM:
            dS1e = tl.load(cs1 + off1, mask=m1, other=0.0)
            dS2e = tl.load(cs2 + off2, mask=m2w, other=0.0)
            gS1s += sL * dW1e + bL * dS1e
            gS2s += sL * dW2e + bL * dS2e
            dsL = tl.reduce(tl.reduce(dW1e * S1s, 1, _sum_combine), 0, _sum_combine)
            dsL += tl.reduce(tl.reduce(dW2e * S2s, 1, _sum_combine), 0, _sum_combine)
            dbL = tl.reduce(tl.reduce(dS1e * S1s, 1, _sum_combine), 0, _sum_combine)
            dbL += tl.reduce(tl.reduce(dS2e * S2s, 1, _sum_combine), 0, _sum_combine)
            RdS1 = tl.dot(R, tl.trans(dS1e), input_precision=PREC)
            KdS2 = tl.dot(k, tl.trans(dS2e), input_precision=PREC)
            dE -= e_m[:, None] * RdS1
            dR -= e_m[:, None] * tl.dot(E, dS1e, input_precision=PREC)
            de_m = -tl.reduce(E * RdS1, 1, _sum_combine)
            dG -= e_m[:, None] * KdS2
            dk -= tl.dot(e_m[:, None] * G, dS2e, input_precision=PREC)
            de_m -= tl.reduce(G * KdS2, 1, _sum_combine)
        else:
            dsL = dgL * 0.0
            dbL = dgL * 0.0
            de_m = de_g * 0.0
            gS1s = gW1s * 0.0
            gS2s = gW2s * 0.0

        # ---- back through G = silu'(P) ⊙ E W1_c, E, the target and P = K W2_cᵀ (all at the chunk start)
        # Fresh loads behind a barrier (no CSE with the copies above) so that the shared-memory copies of the
        # tl.dot operands W1_c, W2_c, k, v made for the recomputation do not stay live down to here.
        tl.debug_barrier()
        W1c = tl.load(w1c + off1, mask=m1, other=0.0)
        W2c = tl.load(w2c + off2, mask=m2w, other=0.0)
        a = tl.load(a_ptr + offs_x, mask=mx, other=0.0).to(tl.float32)
        k = tl.dot(a, tl.trans(tl.load(zc + boff, mask=bm, other=0.0)), input_precision=PREC) / nn[:, None]
        v = tl.dot(a, tl.trans(tl.load(zc + d * d + boff, mask=bm, other=0.0)), input_precision=PREC)
        dGE = dG * Gs
        dP += dG * GE * _silu_grad2(P)
        dE += tl.dot(dGE, tl.trans(W1c), input_precision=PREC)
        gW1c = tl.dot(tl.trans(E), dGE, input_precision=PREC)
        if OBJ_L2:
            dk += dE
            dR += tl.dot(dE, W1c, input_precision=PREC)
            gW1c += tl.dot(tl.trans(dE), R, input_precision=PREC)
        dv = -dE  # target TV = v (+ W1_c silu(W2_c v)): dTV = -dE
        if VALUE:
            gW2c = W2c * 0.0
        else:
            gW1c -= tl.dot(tl.trans(dE), _silu(Vh), input_precision=PREC)
            dVh = -tl.dot(dE, W1c, input_precision=PREC) * _silu_grad(Vh)
            dv += tl.dot(dVh, W2c, input_precision=PREC)
            gW2c = tl.dot(tl.trans(dVh), v, input_precision=PREC)
        dP += dR * Gs
        dk += tl.dot(dP, W2c, input_precision=PREC)
        gW2c += tl.dot(tl.trans(dP), k, input_precision=PREC)

        # ---- adaptive rows (linear rule), scalar chain, inputs: the linear kernel's helpers
        dW_R, dWs_R, dk, dgL, dsL, dbL = _adaptive_state_grads(
            zs, zc, ss, cz, cs, me, ma, k, W, Ws, dk, dgL, dsL, dbL, d, boff, bm, offs_d, md,
            AD_K, AD_V, AD_E, AD_A, MOM, PREC)
        de_d += tl.reduce(dW_R * k, 1, _sum_combine)
        de_g += tl.reduce(dW_R * u, 1, _sum_combine)
        dk += e_d[:, None] * dW_R
        du = e_g[:, None] * dW_R
        if MOM:
            de_m += tl.reduce(dWs_R * u, 1, _sum_combine)
            du += e_m[:, None] * dWs_R
        de_pre, dal_pre, dlbeta = _scalar_chain(
            deta, de_d, de_g, de_m, dgL, dsL, dbL, dgamma, dsigma, ddec, dc, eta, eps, eta_max, valid, sig_e, al_pre,
            dec, gamma, dlast, gL, mo, wexp, clast, molast, bL, rev, MOM, PREC)
        acc_beta += tl.reduce(de_pre, 0, _sum_combine)
        acc_balpha += tl.reduce(dal_pre, 0, _sum_combine)
        acc_lbeta += dlbeta
        if OBJ_L2:  # u = k - v (l2) or -v (dot)
            dk += du
        dv -= du
        dkr, da = _input_grads(dk, dv, k, nn, nrm, zc, de_pre, dal_pre, me, ma, d, boff, bm, PREC)
        tl.store(dq_ptr + offs_x, dQ, mask=mx)
        tl.store(da_ptr + offs_x, da, mask=mx)

        # ---- state gradients: into the carry (n > 0) or the outputs (n = 0). Fresh loads and a recomputation of
        # k, v, u, W (as the linear kernel's pass B): these tl.dot operands then share no shared-memory copy with
        # the ones above, which keeps the kernel's shared-memory footprint smaller.
        a = tl.load(a_ptr + offs_x, mask=mx, other=0.0).to(tl.float32)
        k = tl.dot(a, tl.trans(tl.load(zc + boff, mask=bm, other=0.0)), input_precision=PREC) / nn[:, None]
        v = tl.dot(a, tl.trans(tl.load(zc + d * d + boff, mask=bm, other=0.0)), input_precision=PREC)
        u, u_unused = _targets(k, v, OBJ_L2, False)
        W = e_d[:, None] * k + e_g[:, None] * u
        Ws = e_m[:, None] * u
        xl = tl.where(n == NSEG - 1, extra_last, 0.0)  # the final chunk-start state is this segment's start
        _adaptive_out_grads(n, cz, cs, gzc_last + pid64 * AD, nz, ns, dzc_o, dz_o, ds_o, k, u, a, W, Ws, dkr, dv,
                            de_pre, dal_pre, e_d, e_g, e_m, gL, sL, bL, xl, d, offs_d, md, boff, bm,
                            AD_K, AD_V, AD_E, AD_A, D, MOM, PREC)
        gW1c += xl * tl.load(g1c_last + pid64 * WD + off1, mask=m1, other=0.0)
        gW2c += xl * tl.load(g2c_last + pid64 * WD + off2, mask=m2w, other=0.0)
        _store_w_grads(n, n1, ns1, dw1c_o, dw1_o, ds1_o, off1, m1, gW1c, gW1s, gS1s, MOM)
        _store_w_grads(n, n2, ns2, dw2c_o, dw2_o, ds2_o, off2, m2w, gW2c, gW2s, gS2s, MOM)
        # the next (earlier) segment reads the carry this one stored
        tl.debug_barrier()

    tl.store(dpar_ptr + pid64 * 3 + 0, acc_beta)
    tl.store(dpar_ptr + pid64 * 3 + 1, acc_balpha)
    tl.store(dpar_ptr + pid64 * 3 + 2, acc_lbeta)


# ---------------------------------------------------------------------------------------------- python

_STATE_NAMES = DeepTitansState._fields[:9]


def check_deep_kernel_inputs(q: Tensor, a: Tensor, hidden: int, chunk_size: int, *, token_dim: bool = True) -> None:
    """The linear kernel's constraints (dtypes, d, chunk_size, device) plus 1 <= h <= 128 (ValueError)."""
    check_kernel_inputs(q, a, chunk_size, token_dim=token_dim)
    if not 1 <= hidden <= MAX_HEAD_DIM:
        raise ValueError(f"deep titans Triton kernel: memory_hidden h={hidden} is not supported; need 1 <= h <= "
                         f"{MAX_HEAD_DIM}")


def _kernel_inputs(q: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous q, a; half inputs are upcast to fp32 under the interpreter (its bf16/fp16 numerics are wrong)."""
    if triton_interpreting() and q.dtype != torch.float32:
        q, a = q.float(), a.float()
    return q.contiguous(), a.contiguous()


def _start_states(w1_0: Tensor, w2_0: Tensor, z0: Tensor, state: Optional[DeepTitansState], batch: int,
                  device: torch.device) -> tuple[list[Tensor], int]:
    """The nine start-state tensors (DeepTitansState order; views of the parameters without a state) and the
    position."""
    if state is None:
        tensors = []
        for init in (z0, w1_0, w2_0):
            x = init.unsqueeze(0).expand(batch, *init.shape)
            tensors += [x, x, torch.zeros(x.shape, device=device, dtype=torch.float32)]
        return tensors, 0
    for name in _STATE_NAMES:
        t = getattr(state, name)
        if not t.is_floating_point() or t.device != device:
            raise ValueError(f"state.{name} must be a floating tensor on {device}, got {t.dtype} on {t.device}")
    return list(state[:9]), int(state.position)


def _flags(cfg: dict, masked: bool) -> dict:
    return dict(MOM=cfg["momentum"], OBJ_L2=cfg["objective"] == "l2", VALUE=cfg["memory_target"] == "value",
                AD_K=cfg["ad"][0], AD_V=cfg["ad"][1], AD_E=cfg["ad"][2], AD_A=cfg["ad"][3], HAS_MASK=masked)


def _params(b_eta: Tensor, b_alpha: Tensor, momentum_logit: Tensor) -> Tensor:
    f32 = torch.float32
    return torch.stack([b_eta.detach().to(f32), b_alpha.detach().to(f32),
                        F.logsigmoid(momentum_logit.detach().to(f32))]).contiguous()


def _deep_forward(q: Tensor, a: Tensor, valid: Optional[Tensor], st: Sequence[Tensor], params: Tensor, cfg: dict,
                  save: bool) -> tuple[Tensor, list[Tensor], list[Tensor], int]:
    """Launch the forward kernel on contiguous q, a and fp32 start states `st`. Returns o (q's dtype), the nine
    final state tensors (fp32), the workspaces [A, S_A, W1, S1, W2, S2] (one slot per segment when `save`: the
    segment-start states the backward recomputes from) and the number of segments."""
    B, T, H, d = q.shape
    hid = st[3].shape[-1]
    C, pos = cfg["chunk_size"], cfg["position"]
    shift = pos % C
    nseg = _num_segments(T, C, shift)
    D, BC = _block_sizes(d, C)
    nslot = max(nseg if save else min(nseg, 2), 1)
    o = torch.empty_like(q)
    work = [torch.empty(B * H, nslot, *st[i].shape[2:], device=q.device, dtype=torch.float32)
            for i in (1, 2, 4, 5, 7, 8)]
    if nseg == 0:
        return o, [x.clone() for x in st], work, 0
    _launch(_deep_fwd_kernel, (B * H,), (
        q, a, valid if valid is not None else q, *st, *work, o, params[0], params[1], params[2],
        T, H, d, hid, C, shift, nseg, nslot, float(cfg["eta_max"]), cfg["eps"],
    ), dict(BC=BC, D=D, HD=max(16, _next_pow2(hid)), **_flags(cfg, valid is not None)), dot_precision(q.dtype))
    last, before = (nseg - 1) % nslot, (nseg - 2) % nslot
    final = []
    for i, (cur, mom) in enumerate(((work[0], work[1]), (work[2], work[3]), (work[4], work[5]))):
        shape = st[3 * i].shape
        cur = cur.view(shape[0], shape[1], nslot, *shape[2:])
        x_f = cur[:, :, last].clone()
        s_f = mom.view(cur.shape)[:, :, last].clone() if cfg["momentum"] else st[3 * i + 2].clone()
        if (pos + T) % C == 0:
            xc_f = x_f.clone()
        elif nseg >= 2:  # the last segment started at a chunk boundary: its start is the previous segment's end
            xc_f = cur[:, :, before].clone()
        else:
            xc_f = st[3 * i].clone()
        final += [xc_f, x_f, s_f]
    return o, final, work, nseg


def _deep_backward(q, a, valid, do, st, work, params, dfinal, cfg, nseg):
    """Launch the backward kernel. dfinal: the nine gradients of the final state (fp32, zeros where unused).
    Returns dq, da (fp32), the nine start-state gradients (fp32) and the (B, H, 3) per-head parameter sums."""
    B, T, H, d = q.shape
    hid = st[3].shape[-1]
    C, pos = cfg["chunk_size"], cfg["position"]
    mom = cfg["momentum"]
    dev, f32 = q.device, torch.float32
    D, BC = _block_sizes(d, C)
    boundary = (pos + T) % C == 0
    if nseg == 0:
        return torch.zeros_like(q, dtype=f32), torch.zeros_like(a, dtype=f32), list(dfinal), \
            torch.zeros(B, H, 3, device=dev, dtype=f32)
    dzc_f, dz_f, ds_f, dw1c_f, dw1_f, ds1_f, dw2c_f, dw2_f, ds2_f = dfinal
    # When the sequence ends on a chunk boundary the final chunk-start state is the final state itself.
    inits = [dz_f + dzc_f if boundary else dz_f, ds_f, dw1_f + dw1c_f if boundary else dw1_f, ds1_f,
             dw2_f + dw2c_f if boundary else dw2_f, ds2_f]
    carry = [torch.empty(B * H, 2, *x.shape[2:], device=dev, dtype=f32) for x in inits]
    outs = [torch.empty_like(x) for x in dfinal]
    dq = torch.empty(q.shape, device=dev, dtype=f32)
    da = torch.empty(a.shape, device=dev, dtype=f32)
    dpar = torch.zeros(B, H, 3, device=dev, dtype=f32)
    _launch(_deep_bwd_kernel, (B * H,), (
        q, a, valid if valid is not None else q, do, *st, *work, *inits, dzc_f, dw1c_f, dw2c_f, *carry, dq, da,
        *outs, dpar, params[0], params[1], params[2],
        T, H, d, hid, C, pos % C, nseg, float(cfg["eta_max"]), cfg["eps"], 0.0 if boundary else 1.0,
    ), dict(BC=BC, D=D, HD=max(16, _next_pow2(hid)), **_flags(cfg, valid is not None)), dot_precision(q.dtype))
    if not mom:  # without momentum S never changes and nothing reads it: its gradient passes straight through
        outs[2], outs[5], outs[8] = ds_f, ds1_f, ds2_f
    return dq, da, outs, dpar


class _DeepChunkFn(torch.autograd.Function):
    """Forward and backward on the Triton kernels; the backward recomputes each segment from the saved
    segment-start states."""

    @staticmethod
    def forward(ctx, q, a, b_eta, b_alpha, momentum_logit, valid, cfg, *states):
        q_c, a_c = _kernel_inputs(q.detach(), a.detach())
        st = [x.detach().to(torch.float32).contiguous() for x in states]
        params = _params(b_eta, b_alpha, momentum_logit)
        save = any(ctx.needs_input_grad)
        o, final, work, nseg = _deep_forward(q_c, a_c, valid, st, params, cfg, save)
        if save:
            ctx.save_for_backward(q_c, a_c, valid, params, momentum_logit, *st, *work)
        ctx.cfg, ctx.nseg = cfg, nseg
        ctx.dtypes = [x.dtype for x in (q, a, b_eta, b_alpha, momentum_logit, *states)]
        return (o.to(q.dtype), *final)

    @staticmethod
    def backward(ctx, do, *dfinal):
        q, a, valid, params, momentum_logit, *rest = ctx.saved_tensors
        st, work = rest[:9], rest[9:]
        f32 = torch.float32
        dfinal = [torch.zeros_like(x) if g is None else g.to(f32).contiguous() for g, x in zip(dfinal, st)]
        do = torch.zeros_like(q) if do is None else do.to(q.dtype).contiguous()
        dq, da, dstates, dpar = _deep_backward(q, a, valid, do, st, work, params, dfinal, ctx.cfg, ctx.nseg)
        dpar = dpar.sum(0)
        if ctx.cfg["momentum"]:
            dml = dpar[:, 2] * torch.sigmoid(-momentum_logit.detach().to(f32))
        else:
            dml = torch.zeros_like(dpar[:, 2])
        grads = [dq, da, dpar[:, 0], dpar[:, 1], dml, *dstates]
        grads = [g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*grads[:5], None, None, *grads[5:])


def titans_deep_memory_triton(
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
    """Chunked deep Titans memory on Triton; shapes and semantics as `titans_deep_memory_reference`.
    Differentiable in q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit and the tensors of `state`."""
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective,
                       memory_target, adaptive, mask, state)
    check_deep_kernel_inputs(q, a, w1_0.shape[-1], chunk_size)
    B, T, H, d = q.shape
    rows = adaptive_row_mask(adaptive, d)
    states, position = _start_states(w1_0, w2_0, z0, state, B, q.device)
    valid = None if mask is None else mask.detach().to(device=q.device, dtype=torch.float32).contiguous()
    cfg = dict(chunk_size=chunk_size, position=position, eta_max=float(eta_max), eps=1.0 if dgd else 0.0,
               momentum=bool(momentum), objective=objective, memory_target=memory_target, adaptive=tuple(adaptive),
               ad=(bool(rows[d]), bool(rows[2 * d]), bool(rows[3 * d]), bool(rows[3 * d + 1])))
    o, *final = _DeepChunkFn.apply(q, a, b_eta, b_alpha, momentum_logit, valid, cfg, *states)
    return o, (DeepTitansState(*final, position + T) if output_final_state else None)
