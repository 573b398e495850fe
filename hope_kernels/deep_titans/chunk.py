"""Triton kernels of the chunked deep Titans memory, SPEC §2 v2 "Deep memory" (memory_depth=2): forward, backward.

Same signature and semantics as `titans_deep_memory_reference` (hope_kernels/deep_titans/reference.py), without
momentum. Per (batch, head) and segment (the linear op's segments, hope_kernels/titans/chunk.py):

* The generating memories G = [W_k ; W_v ; w_eta ; w_alpha] are those of the linear op: the same serial scan
  (`generating_forward`, K1) emits k, v, eta, lg (within-segment log gamma) for every token and the segment's
  T = (I + A)^-1; its reverse (`generating_backward`, B4) takes this module's gradients of k, v, eta, lg and la.
* W2 (input side, h x d) is a gated delta rule with G's keys and transition, so it shares T: with the chunk-start
  theta_c = (W1_c, W2_c), p = K W2_cᵀ, e = dℓ/dM (M_c(k) - target, or -target), g = silu'(p) ⊙ (e W1_c) and the
  writes' step eta'_t = eta_t / max(1, N_t) (memory_curvature_guard, N_t from theta_c: `_curvature`) or eta_t,
      N2 = T (-eta' g) - (T Kd) W2_0ᵀ - (T Ka) W2_Aᵀ,   W2_end = gamma_L W2_0 + (1 - gamma_L) W2_A + N2ᵀ (kappa K),
      W2_t q_t = W2_A q_t + gamma_t (W2_0 - W2_A) q_t + Σ_{j<=t} (gamma_t/gamma_j)(k_j.q_t) n2_j
  (Kd, Ka, kappa as the linear op; the anchors (W1_A, W2_A) = (W1_0, W2_0) under memory_retention="init", else 0).
* W1 (output side, d x h) has retention only: decayed linear attention with keys s = silu(p) and writes -eta' e,
      o_t = q_t + W1_A hid_t + gamma_t (W1_0 - W1_A) hid_t + Σ_{j<=t} (gamma_t/gamma_j)(s_j.hid_t)(-eta'_j e_j),
  hid = silu(W2_t q_t).
  The writes are nonlinear in (W1_c, W2_c) and couple every row, so `_deep_fwd_kernel` runs the segments serially
  per (batch, head) (B x H programs), storing a checkpoint per segment and reading each segment's start state
  back from it; `_deep_bwd_kernel` recomputes each segment from its checkpoint in reverse, carrying dW1, dW2 in
  registers.

Constraints: as the linear op (momentum=False, d <= 128, chunk_size <= 128), and memory_hidden h <= 128.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels.deep_titans.reference import DeepTitansState, _check_deep_inputs, _kwargs, adaptive_rows
from hope_kernels.titans._common import (
    check_kernel_inputs,
    check_no_momentum,
    device_fn,
    dot_precision,
    launch,
    launch_options,
    low_precision_dots,
    mm,
    next_pow2,
    num_segments,
    sigmoid,
)
from hope_kernels.titans.chunk import (
    _chunk_start_slots,
    _config,
    _segment,
    _tri_chain,
    generating_backward,
    generating_forward,
)
from hope_kernels.titans.reference import ADAPTIVE_NAMES

__all__ = ["titans_deep_memory_triton", "MAX_HIDDEN"]

MAX_HIDDEN = 128


@device_fn
def silu_grad(x):
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@device_fn
def silu_grad2(x):
    s = sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


@device_fn
def _curvature(p, sg, W1c):
    """N_t = ||silu(p_t)||² + Σ_f silu'(p_t)_f² ||W1_c[:, f]||² (`curvature_scale` of the reference) and the step
    scale 1 / max(1, N_t) of the guarded main-memory writes (memory_curvature_guard)."""
    s = p * sigmoid(p)
    col = tl.sum(W1c * W1c, 0)
    curv = tl.sum(s * s, 1) + tl.sum(sg * sg * col[None, :], 1)
    return curv, 1.0 / tl.maximum(curv, 1.0), col


@device_fn
def _errors(k, v, W1c, W2c, OBJ_L2: tl.constexpr, VALUE: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """p = K W2_cᵀ and e = dℓ/dM at the chunk start (target M_c(v), or v with value targets), (BC, HD), (BC, D)."""
    p = mm(k, tl.trans(W2c), PREC, LOWP)
    pv = mm(v, tl.trans(W2c), PREC, LOWP)
    if VALUE:
        target = v
    else:
        target = v + mm(pv * sigmoid(pv), tl.trans(W1c), PREC, LOWP)
    if OBJ_L2:
        e = k + mm(p * sigmoid(p), tl.trans(W1c), PREC, LOWP) - target
    else:
        e = -target
    return p, pv, e


@device_fn
def _load_w(ptr, off, mask, EVEN: tl.constexpr):
    """A (d, h) or (h, d) state tile; whole (no mask) when EVEN (d = D and h = HD)."""
    if EVEN:
        return tl.load(ptr + off)
    else:
        return tl.load(ptr + off, mask=mask, other=0.0)


@device_fn
def _store_w(ptr, off, x, mask, EVEN: tl.constexpr):
    """The store of `_load_w`'s tiles."""
    if EVEN:
        tl.store(ptr + off, x)
    else:
        tl.store(ptr + off, x, mask=mask)


@triton.jit
def _deep_fwd_kernel(
    q_ptr, k_ptr, v_ptr, eta_ptr, lg_ptr, tmat_ptr, w1c_ptr, w2c_ptr, w1_ptr, w2_ptr, a1_ptr, a2_ptr, o_ptr,
    T, H, C, shift, NSEG, d, hd, eps, w1_bh, w1_slot, w2_bh, w2_slot, wc_bh,
    BC: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, BF: tl.constexpr, EVEN: tl.constexpr,
    OBJ_L2: tl.constexpr, VALUE: tl.constexpr, ANCHOR: tl.constexpr, GUARD: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr,
):
    """W1, W2 over the segments of one (batch, head): the reads o and a checkpoint of both after every segment
    (slot n+1 of w1, w2; slot 0 holds the call's start state). a1, a2: the heads' retention anchors W1_0, W2_0
    (ANCHOR, (H, d, h) and (H, h, d)). EVEN: d = D and h = HD.

    Each segment walks the hidden units f in BF-wide blocks, twice: (1) the chunk start's reads, summed over f into
    e (BC, d) and the guard's N; (2) per block, p, silu(p) and g again, then N2, the hidden pre-activations, both
    states' end blocks and the block's part of o and of hid sᵀ. No (d, h) tile is ever whole: whole, the states
    and their products spilled and, at d = h = 128 in tf32, needed 288 KB of shared memory.

    Addressing (offline sm_90a compile, benchmarks/NOTES.md): compile-time strides when EVEN (the offsets fold into
    the instructions), 64-bit bases and 32-bit offsets within the tiles, the start state read from its checkpoint
    slot block by block."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    dd = D if EVEN else d
    hh = HD if EVEN else hd
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    offs_f = tl.arange(0, BF)
    md = offs_d < d
    out = offs_c[:, None] * dd + offs_d[None, :]
    qout = offs_c[:, None] * (H * dd) + offs_d[None, :]
    a1 = a1_ptr + h * d * hd
    a2 = a2_ptr + h * d * hd
    for n in range(0, NSEG):
        start, L = _segment(n, C, shift, T)
        mt = offs_c < L
        m2 = mt[:, None] if EVEN else mt[:, None] & md[None, :]
        row = bh * T + start  # the segment's first row of the (BH, T[, d]) buffers
        qbase = ((b * T + start) * H + h) * dd  # and of q and o
        w1n = w1_ptr + bh * w1_bh + n * w1_slot
        w2n = w2_ptr + bh * w2_bh + n * w2_slot
        if n == 0:  # the call's own chunk start (a cached state may sit mid-chunk)
            w1c = w1c_ptr + bh * wc_bh
            w2c = w2c_ptr + bh * wc_bh
        else:
            w1c = w1n
            w2c = w2n
        k = tl.load(k_ptr + row * dd + out, mask=m2, other=0.0)
        # (1) e = dℓ/dM at the chunk start: M_c(k) - target (target M_c(v), or v), summed over the hidden blocks
        v = tl.load(v_ptr + row * dd + out, mask=m2, other=0.0)
        read_k = tl.zeros([BC, D], dtype=tl.float32)  # W1_c silu(W2_c k)
        read_v = tl.zeros([BC, D], dtype=tl.float32)  # W1_c silu(W2_c v)
        curv = tl.zeros([BC], dtype=tl.float32)
        for f0 in range(0, hh, BF):
            rows_f = f0 + offs_f
            w2b = rows_f[:, None] * dd + offs_d[None, :]  # (BF, D) block of an (h, d) state
            w1b = offs_d[:, None] * hh + rows_f[None, :]  # (D, BF) block of a (d, h) state
            m2b = (rows_f < hd)[:, None] & md[None, :]
            m1b = md[:, None] & (rows_f < hd)[None, :]
            W2c = _load_w(w2c, w2b, m2b, EVEN)
            W1c = _load_w(w1c, w1b, m1b, EVEN)
            p = mm(k, tl.trans(W2c), PREC, LOWP)
            sp = p * sigmoid(p)
            read_k += mm(sp, tl.trans(W1c), PREC, LOWP)
            if not VALUE:
                pv = mm(v, tl.trans(W2c), PREC, LOWP)
                read_v += mm(pv * sigmoid(pv), tl.trans(W1c), PREC, LOWP)
            if GUARD:  # N_t sums over the hidden units: `_curvature` of the block is its part
                curv_f, _cg, _col = _curvature(p, silu_grad(p), W1c)
                curv += curv_f
        if OBJ_L2:
            e = k + read_k - v - read_v
        else:
            e = -(v + read_v)
        eta = tl.load(eta_ptr + row + offs_c, mask=mt, other=0.0)
        if GUARD:  # the gradient writes take eta_t / max(1, N_t); the DGD transition keeps eta_t
            eta_m = eta / tl.maximum(curv, 1.0)
        else:
            eta_m = eta
        kd_scale = eps * eta * tl.exp(tl.load(lg_ptr + row + offs_c - 1, mask=mt & (offs_c > 0), other=0.0))
        lg = tl.load(lg_ptr + row + offs_c, mask=mt, other=0.0)
        lg_end = tl.sum(tl.where(offs_c == L - 1, lg, 0.0), 0)
        gamma_end = tl.exp(lg_end)
        # [t, j] = gamma_t / gamma_j for j <= t < L, else 0 (one compare with a segment-dependent bound), formed
        # twice (for Q Kᵀ here and hid sᵀ after the blocks) rather than kept live across them
        causal = offs_c[None, :] <= tl.where(mt, offs_c, -1)[:, None]
        gamma = tl.where(mt, tl.exp(lg), 0.0)
        kappa = tl.where(mt, tl.exp(lg_end - lg), 0.0)
        q = tl.load(q_ptr + qbase + qout, mask=m2, other=0.0).to(tl.float32)
        QK = mm(q, tl.trans(k), PREC, LOWP) * tl.exp(tl.where(causal, lg[:, None] - lg[None, :], float("-inf")))
        Tm = tl.load(tmat_ptr + (bh * NSEG + n) * BC * BC + (offs_c[:, None] * BC + offs_c[None, :]))
        # (2) per hidden block f: N2_f = T (-eta' g_f - diag(kd) K W2_0,fᵀ [- diag(ka) K W2_A,fᵀ]) (the row scalings
        # before T), Hp_f = [Q W2_A,fᵀ +] diag(gamma) Q D2_fᵀ + (Gamma ⊙ Q Kᵀ) N2_f, the end blocks, o's and HS's parts
        o = tl.zeros([BC, D], dtype=tl.float32)
        HS = tl.zeros([BC, BC], dtype=tl.float32)  # Σ_f hid_f s_fᵀ
        for f0 in range(0, hh, BF):
            rows_f = f0 + offs_f
            w2b = rows_f[:, None] * dd + offs_d[None, :]
            w1b = offs_d[:, None] * hh + rows_f[None, :]
            m2b = (rows_f < hd)[:, None] & md[None, :]
            m1b = md[:, None] & (rows_f < hd)[None, :]
            p = mm(k, tl.trans(_load_w(w2c, w2b, m2b, EVEN)), PREC, LOWP)
            sp = p * sigmoid(p)
            g = silu_grad(p) * mm(e, _load_w(w1c, w1b, m1b, EVEN), PREC, LOWP)
            W2 = _load_w(w2n, w2b, m2b, EVEN)
            Y2 = -eta_m[:, None] * g - kd_scale[:, None] * tl.dot(k, tl.trans(W2), input_precision=PREC)
            if ANCHOR:  # retention toward (W1_0, W2_0): the DGD term eps eta_t W2_{t-1} k_t sees the anchor too
                A2 = _load_w(a2, w2b, m2b, EVEN)
                Y2 -= (eps * eta - kd_scale)[:, None] * tl.dot(k, tl.trans(A2), input_precision=PREC)
                Hp = mm(q, tl.trans(A2), PREC, LOWP) + gamma[:, None] * mm(q, tl.trans(W2 - A2), PREC, LOWP)
                W2 = A2 + gamma_end * (W2 - A2)
            else:
                Hp = gamma[:, None] * mm(q, tl.trans(W2), PREC, LOWP)
                W2 = gamma_end * W2
            N2 = tl.dot(Tm, Y2, input_precision=PREC)
            Hp += mm(QK, N2, PREC, LOWP)
            _store_w(w2n + w2_slot, w2b, W2 + mm(tl.trans(kappa[:, None] * N2), k, PREC, LOWP), m2b, EVEN)
            hid = Hp * sigmoid(Hp)
            HS += mm(hid, tl.trans(sp), PREC, LOWP)
            W1 = _load_w(w1n, w1b, m1b, EVEN)
            if ANCHOR:
                A1 = _load_w(a1, w1b, m1b, EVEN)
                o += mm(hid, tl.trans(A1), PREC, LOWP) + gamma[:, None] * mm(hid, tl.trans(W1 - A1), PREC, LOWP)
                W1 = A1 + gamma_end * (W1 - A1)
            else:
                o += gamma[:, None] * mm(hid, tl.trans(W1), PREC, LOWP)
                W1 = gamma_end * W1
            # W1's writes -eta' e with keys silu(p): the end block W1_f + (kappa E1)ᵀ s_f
            _store_w(w1n + w1_slot, w1b, W1 + mm(tl.trans(-(kappa * eta_m)[:, None] * e), sp, PREC, LOWP), m1b,
                     EVEN)
        # o = q + [hid W1_Aᵀ +] diag(gamma) hid D1ᵀ + (Gamma ⊙ hid sᵀ) E1
        HS *= tl.exp(tl.where(causal, lg[:, None] - lg[None, :], float("-inf")))
        o += tl.load(q_ptr + qbase + qout, mask=m2, other=0.0).to(tl.float32) + mm(HS, -eta_m[:, None] * e, PREC, LOWP)
        tl.store(o_ptr + qbase + qout, o.to(o_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()  # slot n+1 is the next segment's start state


@triton.jit
def _deep_bwd_kernel(
    q_ptr, k_ptr, v_ptr, eta_ptr, lg_ptr, tmat_ptr, w1c_ptr, w2c_ptr, w1_ptr, w2_ptr, a1_ptr, a2_ptr, do_ptr,
    dw1_ptr, dw2_ptr, dzc1_ptr, dzc2_ptr, dw1c_ptr, dw2c_ptr, da1_ptr, da2_ptr,
    dq_ptr, dk_ptr, dv_ptr, deta_ptr, dlg_ptr, dla_ptr, sn_ptr, sdn_ptr, sds_ptr, shp_ptr, shid_ptr,
    T, H, C, shift, NSEG, d, hd, eps, w1_bh, w1_slot, w2_bh, w2_slot, wc_bh, W_SLOT,
    BC: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, EVEN: tl.constexpr, OBJ_L2: tl.constexpr,
    VALUE: tl.constexpr, ANCHOR: tl.constexpr, GUARD: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """The reverse of `_deep_fwd_kernel`: dW1, dW2 carried in registers (dw1, dw2: dW_end in, dW_0 out), dq, and the
    gradients of k, v, eta, lg, la for the generating scan's backward. dzc1, dzc2: the cotangent of the final chunk
    start, which is the start state of segment W_SLOT (or -1); dw1c, dw2c: the gradient of the input chunk start;
    da1, da2 (ANCHOR; zeros on entry): the gradients of the retention anchors W1_0, W2_0 of this (batch, head).
    With the anchor the decays act on the deviations D = W - W_0 (W_end = W_0 + gamma_L D_start + ...).
    Tile addressing as the forward's (EVEN: compile-time strides; 64-bit bases, 32-bit offsets within the tiles)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    offs_h = tl.arange(0, HD)
    dd = D if EVEN else d
    hh = HD if EVEN else hd
    md = offs_d < d
    mh = offs_h < hd
    w1off = offs_d[:, None] * hh + offs_h[None, :]
    w1m = md[:, None] & mh[None, :]
    w2off = offs_h[:, None] * dd + offs_d[None, :]
    w2m = mh[:, None] & md[None, :]
    out = offs_c[:, None] * dd + offs_d[None, :]
    hout = offs_c[:, None] * hh + offs_h[None, :]
    qo = offs_c[:, None] * (H * dd) + offs_d[None, :]
    before = offs_c[None, :] < offs_c[:, None]
    dW1e = _load_w(dw1_ptr + bh * d * hd, w1off, w1m, EVEN)
    dW2e = _load_w(dw2_ptr + bh * d * hd, w2off, w2m, EVEN)
    for i in range(0, NSEG):
        n = NSEG - 1 - i
        start, L = _segment(n, C, shift, T)
        mt = offs_c < L
        m2 = mt[:, None] if EVEN else mt[:, None] & md[None, :]
        hm = mt[:, None] if EVEN else mt[:, None] & mh[None, :]
        row = bh * T + start  # the segment's first row of the (BH, T[, d or h]) buffers
        tb = row * dd
        hb = row * hh
        qb = ((b * T + start) * H + h) * dd  # and of q, dO and dq
        k = tl.load(k_ptr + tb + out, mask=m2, other=0.0)
        v = tl.load(v_ptr + tb + out, mask=m2, other=0.0)
        eta = tl.load(eta_ptr + row + offs_c, mask=mt, other=0.0)
        lg = tl.load(lg_ptr + row + offs_c, mask=mt, other=0.0)
        lgb = tl.load(lg_ptr + row + offs_c - 1, mask=mt & (offs_c > 0), other=0.0)
        Tm = tl.load(tmat_ptr + (bh * NSEG + n) * BC * BC + (offs_c[:, None] * BC + offs_c[None, :]))
        W2n = _load_w(w2_ptr + bh * w2_bh + n * w2_slot, w2off, w2m, EVEN)
        if n == 0:
            W1c = _load_w(w1c_ptr + bh * wc_bh, w1off, w1m, EVEN)
            W2c = _load_w(w2c_ptr + bh * wc_bh, w2off, w2m, EVEN)
        else:
            W1c = _load_w(w1_ptr + bh * w1_bh + n * w1_slot, w1off, w1m, EVEN)
            W2c = W2n
        # ---- phase A1: recompute the segment's writes
        p, pv, e = _errors(k, v, W1c, W2c, OBJ_L2, VALUE, PREC, LOWP)
        sg = silu_grad(p)
        s = p * sigmoid(p)
        eW = mm(e, W1c, PREC, LOWP)
        g = sg * eW
        if GUARD:
            _curv, cg, _col = _curvature(p, sg, W1c)
            eta_m = eta * cg
        else:
            eta_m = eta
        kd_scale = eps * eta * tl.exp(lgb)
        Y2 = -eta_m[:, None] * g - kd_scale[:, None] * tl.dot(k, tl.trans(W2n), input_precision=PREC)
        if ANCHOR:
            A2 = _load_w(a2_ptr + h * d * hd, w2off, w2m, EVEN)
            Y2 -= (eps * eta - kd_scale)[:, None] * tl.dot(k, tl.trans(A2), input_precision=PREC)
        N2 = tl.dot(Tm, Y2, input_precision=PREC)
        # ---- phase A2, the reads and the state update, from stored N2, s, E1 behind a barrier (shorter live ranges)
        tl.store(sn_ptr + hb + hout, N2, mask=hm)
        tl.store(sds_ptr + hb + hout, s, mask=hm)
        tl.store(dv_ptr + tb + out, -eta_m[:, None] * e, mask=m2)
        tl.debug_barrier()
        N2 = tl.load(sn_ptr + hb + hout, mask=hm, other=0.0)
        s = tl.load(sds_ptr + hb + hout, mask=hm, other=0.0)
        E1 = tl.load(dv_ptr + tb + out, mask=m2, other=0.0)
        q = tl.load(q_ptr + qb + qo, mask=m2, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + tb + out, mask=m2, other=0.0)
        do = tl.load(do_ptr + qb + qo, mask=m2, other=0.0).to(tl.float32)
        W1n = _load_w(w1_ptr + bh * w1_bh + n * w1_slot, w1off, w1m, EVEN)
        W2n = _load_w(w2_ptr + bh * w2_bh + n * w2_slot, w2off, w2m, EVEN)
        if ANCHOR:  # the deviations from the anchors, which the decays act on
            A1 = _load_w(a1_ptr + h * d * hd, w1off, w1m, EVEN)
            A2 = _load_w(a2_ptr + h * d * hd, w2off, w2m, EVEN)
            D1 = W1n - A1
            D2 = W2n - A2
        else:
            D1 = W1n
            D2 = W2n
        lg_end = tl.sum(tl.where(offs_c == L - 1, lg, 0.0), 0)
        gamma_end = tl.exp(lg_end)
        causal = (offs_c[None, :] <= offs_c[:, None]) & mt[:, None]
        decay = tl.exp(tl.where(causal, lg[:, None] - lg[None, :], float("-inf")))
        gamma = tl.where(mt, tl.exp(lg), 0.0)
        kappa = tl.where(mt, tl.exp(lg_end - lg), 0.0)
        qk = mm(q, tl.trans(k), PREC, LOWP)
        Hp = gamma[:, None] * mm(q, tl.trans(D2), PREC, LOWP) + mm(qk * decay, N2, PREC, LOWP)
        if ANCHOR:
            Hp += mm(q, tl.trans(A2), PREC, LOWP)
        hid = Hp * sigmoid(Hp)
        # ---- the carried dW1_end, dW2_end first: all their uses together, so that they die early.
        # W1_end = [W1_A +] gamma_L D1_0 + E1ᵀ (kappa s), W2_end = [W2_A +] gamma_L D2_0 + N2ᵀ (kappa K)
        dE1 = mm(kappa[:, None] * s, tl.trans(dW1e), PREC, LOWP)
        E1dW = mm(E1, dW1e, PREC, LOWP)
        dN2 = mm(kappa[:, None] * k, tl.trans(dW2e), PREC, LOWP)
        N2dW = mm(N2, dW2e, PREC, LOWP)
        dW1n = gamma_end * dW1e
        dW2n = gamma_end * dW2e
        ds = kappa[:, None] * E1dW
        c = kappa * tl.sum(s * E1dW, 1)
        dk = kappa[:, None] * N2dW
        c2 = kappa * tl.sum(k * N2dW, 1)
        dlg = -c - c2
        dlg_end = tl.sum(c, 0) + tl.sum(c2, 0) + gamma_end * (tl.sum(tl.sum(D1 * dW1e, 1), 0)
                                                              + tl.sum(tl.sum(D2 * dW2e, 1), 0))
        # ---- o = q + diag(gamma) hid D1_0ᵀ [+ hid W1_Aᵀ] + (Gamma ⊙ hid sᵀ) E1
        dOW1 = mm(do, D1, PREC, LOWP)
        dhid = gamma[:, None] * dOW1
        if ANCHOR:  # W1_A's gradient from the end state and the reads, added to memory at once (short live range)
            dhid += mm(do, A1, PREC, LOWP)
            dA1 = (1.0 - gamma_end) * dW1e + mm(tl.trans((1.0 - gamma)[:, None] * do), hid, PREC, LOWP)
            _store_w(da1_ptr + bh * d * hd, w1off, _load_w(da1_ptr + bh * d * hd, w1off, w1m, EVEN) + dA1, w1m, EVEN)
        dlg += gamma * tl.sum(dOW1 * hid, 1)
        dW1n += mm(tl.trans(gamma[:, None] * do), hid, PREC, LOWP)
        # the Gamma term behind a barrier, with do, E1, s and hid read back (their first copies die here)
        tl.store(shid_ptr + hb + hout, hid, mask=hm)
        tl.debug_barrier()
        hid = tl.load(shid_ptr + hb + hout, mask=hm, other=0.0)
        s = tl.load(sds_ptr + hb + hout, mask=hm, other=0.0)
        do = tl.load(do_ptr + qb + qo, mask=m2, other=0.0).to(tl.float32)
        hs = mm(hid, tl.trans(s), PREC, LOWP)
        G1 = mm(do, tl.trans(E1), PREC, LOWP) * decay
        dE1 += mm(tl.trans(hs * decay), do, PREC, LOWP)
        dhid += mm(G1, s, PREC, LOWP)
        ds += mm(tl.trans(G1), hid, PREC, LOWP)
        gd = G1 * hs
        dlg += tl.sum(gd, 1) - tl.sum(gd, 0)
        # ---- phase A3, behind a barrier as A2: the parts of dk, dv, dN2, ds, dlg so far and dHp go to memory, so
        # that the o part's tiles (and their shared-memory copies) are not live in the hid part (sm90_check, d = h =
        # 64 fp32, with the split of the o part below: 304 -> 192 KB of shared memory)
        tl.store(dk_ptr + tb + out, dk, mask=m2)
        tl.store(dv_ptr + tb + out, dE1, mask=m2)
        tl.store(sdn_ptr + hb + hout, dN2, mask=hm)
        tl.store(sds_ptr + hb + hout, ds, mask=hm)
        tl.store(shp_ptr + hb + hout, dhid * silu_grad(Hp), mask=hm)
        tl.store(dlg_ptr + row + offs_c, dlg, mask=mt)
        tl.debug_barrier()
        # ---- hid = silu(Hp), Hp = diag(gamma) Q D2_0ᵀ [+ Q W2_Aᵀ] + (Gamma ⊙ Q Kᵀ) N2
        dHp = tl.load(shp_ptr + hb + hout, mask=hm, other=0.0)
        q = tl.load(q_ptr + qb + qo, mask=m2, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + tb + out, mask=m2, other=0.0)
        N2 = tl.load(sn_ptr + hb + hout, mask=hm, other=0.0)
        D2 = _load_w(w2_ptr + bh * w2_bh + n * w2_slot, w2off, w2m, EVEN)
        if ANCHOR:
            A2 = _load_w(a2_ptr + h * d * hd, w2off, w2m, EVEN)
            D2 -= A2
        qk = mm(q, tl.trans(k), PREC, LOWP)
        dHW2 = mm(dHp, D2, PREC, LOWP)
        dq = tl.load(do_ptr + qb + qo, mask=m2, other=0.0).to(tl.float32)
        dq += gamma[:, None] * dHW2
        if ANCHOR:
            dq += mm(dHp, A2, PREC, LOWP)
            dA2 = (1.0 - gamma_end) * dW2e + mm(tl.trans((1.0 - gamma)[:, None] * dHp), q, PREC, LOWP)
            _store_w(da2_ptr + bh * d * hd, w2off, _load_w(da2_ptr + bh * d * hd, w2off, w2m, EVEN) + dA2, w2m, EVEN)
        dlg = tl.load(dlg_ptr + row + offs_c, mask=mt, other=0.0) + gamma * tl.sum(dHW2 * q, 1)
        dW2n += mm(tl.trans(gamma[:, None] * dHp), q, PREC, LOWP)
        dN2 = tl.load(sdn_ptr + hb + hout, mask=hm, other=0.0) + mm(tl.trans(qk * decay), dHp, PREC, LOWP)
        G2 = mm(dHp, tl.trans(N2), PREC, LOWP) * decay
        dq += mm(G2, k, PREC, LOWP)
        tl.store(dq_ptr + qb + qo, dq.to(dq_ptr.dtype.element_ty), mask=m2)
        dk = tl.load(dk_ptr + tb + out, mask=m2, other=0.0) + mm(tl.trans(G2), q, PREC, LOWP)
        gd = G2 * qk
        dlg += tl.sum(gd, 1) - tl.sum(gd, 0)
        # ---- phase B: the chunk-start pieces. Its operands are stored here and re-loaded behind a barrier, so that
        # the compiler keeps phase A's tiles (and their shared-memory copies) out of it (dv, sn and sds already
        # hold dE1, N2 and ds).
        tl.debug_barrier()  # dk, dlg and dN2 were read above in another layout
        tl.store(dk_ptr + tb + out, dk, mask=m2)
        tl.store(dlg_ptr + row + offs_c, dlg, mask=mt)
        tl.store(sdn_ptr + hb + hout, dN2, mask=hm)
        tl.debug_barrier()
        k = tl.load(k_ptr + tb + out, mask=m2, other=0.0)
        v = tl.load(v_ptr + tb + out, mask=m2, other=0.0)
        Tm = tl.load(tmat_ptr + (bh * NSEG + n) * BC * BC + offs_c[:, None] * BC + offs_c[None, :])
        if n == 0:
            W1c = _load_w(w1c_ptr + bh * wc_bh, w1off, w1m, EVEN)
            W2c = _load_w(w2c_ptr + bh * wc_bh, w2off, w2m, EVEN)
        else:
            W1c = _load_w(w1_ptr + bh * w1_bh + n * w1_slot, w1off, w1m, EVEN)
            W2c = _load_w(w2_ptr + bh * w2_bh + n * w2_slot, w2off, w2m, EVEN)
        p, pv, e = _errors(k, v, W1c, W2c, OBJ_L2, VALUE, PREC, LOWP)
        sg = silu_grad(p)
        s = p * sigmoid(p)
        eW = mm(e, W1c, PREC, LOWP)
        g = sg * eW
        dN2 = tl.load(sdn_ptr + hb + hout, mask=hm, other=0.0)
        dE1 = tl.load(dv_ptr + tb + out, mask=m2, other=0.0)
        dk = k * 0.0  # phase A's part is in dk_ptr
        # ---- N2 = T (-eta_m g) - (T Kd) W2_0ᵀ [- (T Ka) W2_Aᵀ]: Kd W2_0 + Ka W2_A = Kd D2_0 + Ke W2_A
        dY2 = tl.dot(tl.trans(Tm), dN2, input_precision=PREC)
        M = tl.dot(dN2, tl.trans(tl.load(sn_ptr + hb + hout, mask=hm, other=0.0)), input_precision=PREC)
        W2n = _load_w(w2_ptr + bh * w2_bh + n * w2_slot, w2off, w2m, EVEN)
        deta = eta * 0.0
        if ANCHOR:
            A2 = _load_w(a2_ptr + h * d * hd, w2off, w2m, EVEN)
            dKd = -tl.dot(dY2, W2n - A2, input_precision=PREC)
            dKe = -tl.dot(dY2, A2, input_precision=PREC)
            dk += (eps * eta)[:, None] * dKe
            deta += eps * tl.sum(dKe * k, 1)
            _store_w(da2_ptr + bh * d * hd, w2off, _load_w(da2_ptr + bh * d * hd, w2off, w2m, EVEN)
                     - tl.dot(tl.trans(dY2), (eps * eta - kd_scale)[:, None] * k, input_precision=PREC), w2m, EVEN)
        else:
            dKd = -tl.dot(dY2, W2n, input_precision=PREC)
        dW2n -= tl.dot(tl.trans(kd_scale[:, None] * dY2), k, input_precision=PREC)
        deta_m = -tl.sum(dY2 * g, 1) - tl.sum(dE1 * e, 1)  # the gradient of the writes' step eta_m
        if GUARD:
            curv, cg, col = _curvature(p, sg, W1c)
            eta_m = eta * cg
            deta += deta_m * cg
            # d(1 / max(1, N)) = -dN / N² where N >= 1 (clamp_min passes the gradient at the bound)
            dcurv = tl.where(curv >= 1.0, -deta_m * eta * cg * cg, 0.0)
            dcol = tl.sum(dcurv[:, None] * sg * sg, 0)
        else:
            eta_m = eta
            deta += deta_m
        dg = -eta_m[:, None] * dY2
        de = -eta_m[:, None] * dE1
        # ---- s = silu(p), g = silu'(p) ⊙ (e W1_c), e, the target, p = K W2_cᵀ [, N_t]
        ds = tl.load(sds_ptr + hb + hout, mask=hm, other=0.0)
        dsg = dg * eW
        if GUARD:
            ds += 2.0 * dcurv[:, None] * s
            dsg += 2.0 * dcurv[:, None] * sg * col[None, :]
        dp = ds * sg + dsg * silu_grad2(p)
        dgw = dg * sg
        de += mm(dgw, tl.trans(W1c), PREC, LOWP)
        dW1c = mm(tl.trans(e), dgw, PREC, LOWP)
        if GUARD:
            dW1c += 2.0 * W1c * dcol[None, :]
        if OBJ_L2:
            dk += de
            dp += mm(de, W1c, PREC, LOWP) * sg
            dW1c += mm(tl.trans(de), s, PREC, LOWP)
        dv = -de
        dW2c = mm(tl.trans(dp), k, PREC, LOWP)
        if not VALUE:  # target M_c(v) = v + W1_c silu(W2_c v), held constant in the inner loss
            dpv = mm(-de, W1c, PREC, LOWP) * silu_grad(pv)
            dW1c += mm(tl.trans(-de), pv * sigmoid(pv), PREC, LOWP)
            dv += mm(dpv, W2c, PREC, LOWP)
            dW2c += mm(tl.trans(dpv), v, PREC, LOWP)
        dk += mm(dp, W2c, PREC, LOWP)
        # ---- T = (I + A)^-1 and Kd = diag(eps eta_t gamma_{t-1}) K
        dA = tl.where(before, -tl.dot(tl.trans(Tm), M, input_precision=PREC), 0.0)
        dk_a, deta_a, dlg_a, dla = _tri_chain(dA, k, eta, lg, lg - lgb, eps, offs_c, PREC)
        dk += dk_a + kd_scale[:, None] * dKd + tl.load(dk_ptr + tb + out, mask=m2, other=0.0)
        dks = tl.sum(dKd * k, 1)
        deta += deta_a + eps * tl.exp(lgb) * dks
        dlg = tl.load(dlg_ptr + row + offs_c, mask=mt, other=0.0) + dlg_a + dks * kd_scale
        dlg += tl.where(offs_c == L - 1, dlg_end, 0.0)
        dla -= dks * kd_scale
        tl.store(dk_ptr + tb + out, dk, mask=m2)
        tl.store(dv_ptr + tb + out, dv, mask=m2)
        tl.store(deta_ptr + row + offs_c, deta, mask=mt)
        tl.store(dlg_ptr + row + offs_c, dlg, mask=mt)
        tl.store(dla_ptr + row + offs_c, dla, mask=mt)
        if n == 0:
            _store_w(dw1c_ptr + bh * d * hd, w1off, dW1c, w1m, EVEN)
            _store_w(dw2c_ptr + bh * d * hd, w2off, dW2c, w2m, EVEN)
            dW1c = dW1c * 0.0
            dW2c = dW2c * 0.0
        dW1e = dW1n + dW1c
        dW2e = dW2n + dW2c
        if n == W_SLOT:
            dW1e += _load_w(dzc1_ptr + bh * d * hd, w1off, w1m, EVEN)
            dW2e += _load_w(dzc2_ptr + bh * d * hd, w2off, w2m, EVEN)
    _store_w(dw1_ptr + bh * d * hd, w1off, dW1e, w1m, EVEN)
    _store_w(dw2_ptr + bh * d * hd, w2off, dW2e, w2m, EVEN)


# ---------------------------------------------------------------------------------------------- python


def _forward(q, a, w1c, w1, w2c, w2, zc, z, anchors, b_eta, b_alpha, valid, cfg, save: bool):
    B, T, H, d = q.shape
    hd = w1.shape[-1]
    G = adaptive_rows(d)
    nseg = num_segments(T, cfg["C"], cfg["shift"])
    dev, f32 = q.device, torch.float32
    lowp = low_precision_dots(q.dtype)
    gbuf = torch.empty(B * H, nseg + 1, G, d, device=dev, dtype=f32)
    gbuf[:, 0] = z.reshape(B * H, G, d)
    zc = zc.reshape(B * H, G, d).contiguous()
    g_anchor, a1, a2 = anchors if anchors is not None else (None, zc, zc)
    k, v, eta, lg, tmat, norms = generating_forward(a, valid, zc, gbuf, g_anchor, b_eta, b_alpha, cfg, nseg, lowp)
    w1buf = torch.empty(B * H, nseg + 1, d, hd, device=dev, dtype=f32)
    w2buf = torch.empty(B * H, nseg + 1, hd, d, device=dev, dtype=f32)
    w1buf[:, 0] = w1.reshape(B * H, d, hd)
    w2buf[:, 0] = w2.reshape(B * H, hd, d)
    w1c = w1c.reshape(B * H, d, hd).contiguous()
    w2c = w2c.reshape(B * H, hd, d).contiguous()
    o = torch.empty_like(q)
    launch(_deep_fwd_kernel, (B * H,),
           q, k, v, eta, lg, tmat, w1c, w2c, w1buf, w2buf, a1, a2, o, T, H, cfg["C"], cfg["shift"], nseg, d, hd,
           cfg["eps"], w1buf.stride(0), w1buf.stride(1), w2buf.stride(0), w2buf.stride(1), w1c.stride(0),
           BC=cfg["BC"], D=cfg["D"], HD=cfg["HD"], BF=min(cfg["HD"], 16), EVEN=d == cfg["D"] and hd == cfg["HD"],
           OBJ_L2=cfg["OBJ_L2"], VALUE=cfg["VALUE"], ANCHOR=anchors is not None, GUARD=cfg["GUARD"],
           PREC=dot_precision(), LOWP=lowp, **launch_options("serial", cfg["D"]))
    w_slot, g_slot = _chunk_start_slots(T, cfg, nseg)
    finals = [
        zc if g_slot is None else gbuf[:, g_slot], gbuf[:, nseg],
        w1c if w_slot is None else w1buf[:, w_slot], w1buf[:, nseg],
        w2c if w_slot is None else w2buf[:, w_slot], w2buf[:, nseg],
    ]
    shapes = [(B, H, G, d)] * 2 + [(B, H, d, hd)] * 2 + [(B, H, hd, d)] * 2
    finals = [x.reshape(shape).clone() for x, shape in zip(finals, shapes)]
    saved = (k, v, eta, lg, tmat, norms, gbuf, zc, w1buf, w2buf, w1c, w2c) if save else None
    return o, finals, saved, nseg


def _backward(q, a, valid, anchors, b_eta, b_alpha, k, v, eta, lg, tmat, norms, gbuf, zc, w1buf, w2buf, w1c, w2c,
              do, grads, cfg, nseg):
    B, T, H, d = q.shape
    hd = w1buf.shape[-1]
    G = adaptive_rows(d)
    dev, f32 = q.device, torch.float32
    lowp = low_precision_dots(q.dtype)
    shapes = [(B * H, G, d)] * 2 + [(B * H, d, hd)] * 2 + [(B * H, hd, d)] * 2
    dzc, dz, dw1c_end, dw1_end, dw2c_end, dw2_end = (
        torch.zeros(s, device=dev, dtype=f32) if g is None else g.float().reshape(s) for g, s in zip(grads, shapes))
    w_slot, g_slot = _chunk_start_slots(T, cfg, nseg)
    dw1 = dw1_end.contiguous()
    dw2 = dw2_end.contiguous()
    if w_slot == nseg:
        dw1 += dw1c_end
        dw2 += dw2c_end
    dw1c = torch.empty(B * H, d, hd, device=dev, dtype=f32)
    dw2c = torch.empty(B * H, hd, d, device=dev, dtype=f32)
    g_anchor, a1, a2 = anchors if anchors is not None else (None, zc, zc)
    da1 = torch.zeros(B * H, d, hd, device=dev, dtype=f32) if anchors is not None else dw1c
    da2 = torch.zeros(B * H, hd, d, device=dev, dtype=f32) if anchors is not None else dw2c
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    deta, dlg, dla = torch.empty_like(eta), torch.empty_like(eta), torch.empty_like(eta)
    scratch = [torch.empty(B * H, T, hd, device=dev, dtype=f32) for _ in range(5)]
    launch(_deep_bwd_kernel, (B * H,),
           q, k, v, eta, lg, tmat, w1c, w2c, w1buf, w2buf, a1, a2, do.contiguous(), dw1, dw2,
           dw1c_end.contiguous(), dw2c_end.contiguous(), dw1c, dw2c, da1, da2, dq, dk, dv, deta, dlg, dla, *scratch,
           T, H, cfg["C"], cfg["shift"], nseg, d, hd, cfg["eps"], w1buf.stride(0), w1buf.stride(1), w2buf.stride(0),
           w2buf.stride(1), w1c.stride(0), w_slot if w_slot is not None and 1 <= w_slot < nseg else -1,
           BC=cfg["BC"], D=cfg["D"], HD=cfg["HD"], EVEN=d == cfg["D"] and hd == cfg["HD"], OBJ_L2=cfg["OBJ_L2"],
           VALUE=cfg["VALUE"], ANCHOR=anchors is not None, GUARD=cfg["GUARD"], PREC=dot_precision(), LOWP=lowp,
           **launch_options("serial", cfg["D"]))
    if w_slot is None:
        dw1c += dw1c_end
        dw2c += dw2c_end
    dg = dz.contiguous()
    if g_slot == nseg:
        dg += dzc
        acc = torch.zeros_like(dg)
    else:
        acc = dzc.contiguous()
    da, dbias, dganc = generating_backward(a, valid, zc, gbuf, g_anchor, k, v, eta, lg, tmat, norms,
                                           b_eta.detach().float().contiguous(), b_alpha.detach().float().contiguous(),
                                           dk, dv, deta, dlg, dla, dg, acc, cfg, nseg, lowp)
    dbias = dbias.reshape(B, H, 2).sum(0)
    out = [acc.reshape(B, H, G, d), dg.reshape(B, H, G, d), dw1c.reshape(B, H, d, hd), dw1.reshape(B, H, d, hd),
           dw2c.reshape(B, H, hd, d), dw2.reshape(B, H, hd, d)]
    danchors = [None, None, None]
    if anchors is not None:
        danchors = [dganc.reshape(B, H, G, d).sum(0), da1.reshape(B, H, d, hd).sum(0), da2.reshape(B, H, hd, d).sum(0)]
    return dq, da, out, danchors, dbias[:, 0], dbias[:, 1]


class _DeepChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, a, zc, z, w1c, w1, w2c, w2, g_anchor, w1_anchor, w2_anchor, b_eta, b_alpha, valid, cfg):
        anchors = None
        if g_anchor is not None:
            anchors = tuple(x.detach().float().contiguous() for x in (g_anchor, w1_anchor, w2_anchor))
        o, finals, saved, nseg = _forward(q, a, w1c.detach().float(), w1.detach().float(), w2c.detach().float(),
                                          w2.detach().float(), zc.detach().float(), z.detach().float(), anchors,
                                          b_eta.detach().float().contiguous(), b_alpha.detach().float().contiguous(),
                                          valid, cfg, save=any(ctx.needs_input_grad))
        if saved is not None:
            ctx.save_for_backward(q, a, valid, *(anchors or (None, None, None)), b_eta, b_alpha, *saved)
        ctx.cfg, ctx.nseg = cfg, nseg
        ctx.dtypes = [None if t is None else t.dtype
                      for t in (q, a, zc, z, w1c, w1, w2c, w2, g_anchor, w1_anchor, w2_anchor, b_eta, b_alpha)]
        return (o, *finals)

    @staticmethod
    def backward(ctx, do, *grads):
        q, a, valid, g_anchor, w1_anchor, w2_anchor, b_eta, b_alpha, *saved = ctx.saved_tensors
        anchors = None if g_anchor is None else (g_anchor, w1_anchor, w2_anchor)
        dq, da, dstate, danchors, db_eta, db_alpha = _backward(q, a, valid, anchors, b_eta, b_alpha, *saved, do, grads,
                                                               ctx.cfg, ctx.nseg)
        out = [dq, da] + dstate + danchors + [db_eta, db_alpha]
        return (*(None if g is None else g.to(dt) for g, dt in zip(out, ctx.dtypes)), None, None)


def titans_deep_memory_triton(
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
    """Chunked deep Titans memory on Triton; shapes and semantics as `titans_deep_memory_reference`
    (momentum=False only). Differentiable in q, a, w1_0, w2_0, z0 (initial state and retention anchor), b_eta,
    b_alpha and the tensors of `state`."""
    kwargs = _kwargs(chunk_size, adaptive_chunk_size, eta_max, momentum, objective, memory_target, adaptive, mask)
    _check_deep_inputs(q, a, w1_0, w2_0, z0, b_eta, b_alpha, momentum_logit, state, True, kwargs)
    check_no_momentum(momentum, op="deep_titans")
    check_kernel_inputs(q, a, chunk_size, op="deep_titans")
    hd = w1_0.shape[-1]
    if hd > MAX_HIDDEN:
        raise ValueError(f"deep_titans Triton kernel: memory_hidden h={hd} is not supported; need h <= {MAX_HIDDEN}")
    B, T, H, d = q.shape
    if state is None:
        zc = z = z0.unsqueeze(0).expand(B, *z0.shape)
        w1c = w1 = w1_0.unsqueeze(0).expand(B, *w1_0.shape)
        w2c = w2 = w2_0.unsqueeze(0).expand(B, *w2_0.shape)
        position = 0
    else:
        zc, z, w1c, w1, w2c, w2 = state.z_chunk, state.z, state.w1_chunk, state.w1, state.w2_chunk, state.w2
        position = int(state.position)
    cfg = _config(d, chunk_size, adaptive_chunk_size, position, eta_max, dgd, objective, memory_target,
                  memory_residual, memory_value_norm, memory_retention, adaptive, memory_curvature_guard)
    cfg["HD"] = max(16, next_pow2(hd))
    valid = None if mask is None else mask.detach().to(device=q.device, dtype=torch.float32).contiguous()
    if T == 0:
        o = q.new_zeros(q.shape)
        if not output_final_state:
            return o, None
        x = [t.float().clone() for t in (zc, z, w1c, w1, w2c, w2)]
        return o, DeepTitansState(x[0], x[1], None, x[2], x[3], None, x[4], x[5], None, position)
    anchors = (z0, w1_0, w2_0) if cfg["ANCHOR"] else (None, None, None)
    o, *x = _DeepChunkFn.apply(q.contiguous(), a.contiguous(), zc, z, w1c, w1, w2c, w2, *anchors, b_eta, b_alpha,
                               valid, cfg)
    if not output_final_state:
        return o, None
    return o, DeepTitansState(x[0], x[1], None, x[2], x[3], None, x[4], x[5], None, position + T)
