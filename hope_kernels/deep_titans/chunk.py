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
  memory. Both walk the hidden units in BF-wide blocks (`hidden_block`), so that no (d, h) tile is ever whole.

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
    cotangent,
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
    _tri_rows,
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
def _curvature(p, w1sq):
    """The hidden units' part of N_t = ||silu(p_t)||² + Σ_f silu'(p_t)_f² ||W1_c[:, f]||² (`curvature_scale` of the
    reference), p (BC, BF) a block of them and w1sq (BF,) their ||W1_c[:, f]||²; the guarded writes take
    eta_t / max(1, N_t)."""
    s = p * sigmoid(p)
    sg = silu_grad(p)
    return tl.sum(s * s, 1) + tl.sum(sg * sg * w1sq[None, :], 1)


@device_fn
def _state_blocks(rows_f, mf, cols, mc, dd, hh):
    """The offsets and masks of the (rows_f, cols) block of an (h, d) state and of the (cols, rows_f) block of a
    (d, h) state (row strides dd, hh)."""
    return (rows_f[:, None] * dd + cols[None, :], mf[:, None] & mc[None, :], cols[:, None] * hh + rows_f[None, :],
            mc[:, None] & mf[None, :])


@device_fn
def _column_tile(c0, offs_c, mt, d, dd, BWO: tl.constexpr):
    """Head-dim columns c0 .. c0 + BWO - 1: their indices, which exist, and the mask and offsets of their (BC, BWO)
    tile of a segment's (BC, d) rows (row stride dd)."""
    cols = c0 + tl.arange(0, BWO)
    mc = cols < d
    return cols, mc, mt[:, None] & mc[None, :], offs_c[:, None] * dd + cols[None, :]


@device_fn
def _block_rows(f0, offs_c, offs_f, mt, hd, hh):
    """Hidden units f0 .. f0 + BF - 1: their indices, which exist, and the offsets and mask of their (BC, BF) tile
    of a (BC, h) scratch (row stride hh)."""
    rows_f = f0 + offs_f
    mf = rows_f < hd
    return rows_f, mf, offs_c[:, None] * hh + rows_f[None, :], mt[:, None] & mf[None, :]


@device_fn
def _decays(lg, offs_c, mt):
    """The (BC, BC) decays [t, j] = gamma_t / gamma_j for j <= t < L, else 0 (one compare with a segment-dependent
    bound), formed where each pass needs them rather than kept live across the passes (a (BC, BC) tile fewer in
    every loop between)."""
    causal = offs_c[None, :] <= tl.where(mt, offs_c, -1)[:, None]
    return tl.exp(tl.where(causal, lg[:, None] - lg[None, :], float("-inf")))


@device_fn
def _decayed_qk(q_seg, qs, k_seg, lg, offs_c, mt, d, dd, ds, BC: tl.constexpr, BWO: tl.constexpr,
                PREC: tl.constexpr, LOWP: tl.constexpr):
    """(Gamma ⊙ Q Kᵀ) (BC, BC) of a segment, summed over BWO-wide column tiles of q (row stride qs, from q_seg) and
    k (row stride ds, from k_seg)."""
    QK = tl.zeros([BC, BC], dtype=tl.float32)
    for c0 in range(0, dd, BWO):
        cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ds, BWO)
        QK += mm(tl.load(q_seg + offs_c[:, None] * qs + cols[None, :], mask=mtc, other=0.0),
                 tl.trans(tl.load(k_seg + tc, mask=mtc, other=0.0)), PREC, LOWP)
    return QK * _decays(lg, offs_c, mt)


@device_fn
def _block_writes(k_seg, e_seg, q_seg, qs, w1c, w2c, w2n, a2, dw1, dw2, rows_f, mf, offs_c, mt, eta, eta_m, kd_scale,
                  eps, d, dd, ds, hs, BC: tl.constexpr, BF: tl.constexpr, BWO: tl.constexpr, EVEN: tl.constexpr,
                  ANCHOR: tl.constexpr, CARRIED: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """Hidden block f's products over d, summed over BWO-wide column tiles of k, e (row stride ds, from k_seg,
    e_seg) and q (row stride qs, from q_seg), with the segment's start state W2 at w2n and the chunk start at w1c,
    w2c: p_f = K W2_c,fᵀ, the write Y2_f = -eta' g_f - diag(kd) K W2_0,fᵀ [- diag(ka) K W2_A,fᵀ] (g_f = silu'(p_f) ⊙
    (e W1_c,f); the retention anchor's DGD term sees the anchor too), Q D2_0,fᵀ and Q W2_A,fᵀ (ANCHOR, else zeros),
    and with CARRIED (the backward) e dW1_f and K dW2_fᵀ of the carried gradients at dw1, dw2 (else zeros); each
    (BC, BF)."""
    p = tl.zeros([BC, BF], dtype=tl.float32)
    eW = tl.zeros([BC, BF], dtype=tl.float32)
    kW = tl.zeros([BC, BF], dtype=tl.float32)
    kA = tl.zeros([BC, BF], dtype=tl.float32)
    qW = tl.zeros([BC, BF], dtype=tl.float32)  # Q D2_0,fᵀ
    qA = tl.zeros([BC, BF], dtype=tl.float32)
    edW = tl.zeros([BC, BF], dtype=tl.float32)
    kdW = tl.zeros([BC, BF], dtype=tl.float32)
    for c0 in range(0, dd, BWO):
        cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ds, BWO)
        w2b, m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, ds, hs)
        k_c = tl.load(k_seg + tc, mask=mtc, other=0.0)
        e_c = tl.load(e_seg + tc, mask=mtc, other=0.0)
        p += mm(k_c, tl.trans(_load_w(w2c, w2b, m2b, EVEN)), PREC, LOWP)
        eW += mm(e_c, _load_w(w1c, w1b, m1b, EVEN), PREC, LOWP)
        W2 = _load_w(w2n, w2b, m2b, EVEN)
        kW = tl.dot(k_c, tl.trans(W2), acc=kW, input_precision=PREC)
        q_c = tl.load(q_seg + offs_c[:, None] * qs + cols[None, :], mask=mtc, other=0.0).to(tl.float32)
        if ANCHOR:
            A2 = _load_w(a2, w2b, m2b, EVEN)
            kA = tl.dot(k_c, tl.trans(A2), acc=kA, input_precision=PREC)
            qA += mm(q_c, tl.trans(A2), PREC, LOWP)
            qW += mm(q_c, tl.trans(W2 - A2), PREC, LOWP)
        else:
            qW += mm(q_c, tl.trans(W2), PREC, LOWP)
        if CARRIED:
            edW += mm(e_c, _load_w(dw1, w1b, m1b, EVEN), PREC, LOWP)
            kdW += mm(k_c, tl.trans(_load_w(dw2, w2b, m2b, EVEN)), PREC, LOWP)
    Y2 = -eta_m[:, None] * (silu_grad(p) * eW) - kd_scale[:, None] * kW
    if ANCHOR:  # retention toward (W1_0, W2_0): the DGD term eps eta_t W2_{t-1} k_t sees the anchor too
        Y2 -= (eps * eta - kd_scale)[:, None] * kA
    return p, Y2, qW, qA, edW, kdW


@device_fn
def _chunk_start_errors(k_seg, v_seg, e_dst, x_tmp, mt, w1c, w2c, offs_c, offs_f, d, hd, dd, hh, BC: tl.constexpr,
                        BF: tl.constexpr, BWO: tl.constexpr, EVEN: tl.constexpr, OBJ_L2: tl.constexpr,
                        VALUE: tl.constexpr, GUARD: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """e = dℓ/dM at the chunk start (M_c(k) - target, target M_c(v) or v; -target for the dot objective), stored
    (BC, d) at e_dst, and the guard's N_t, (BC,) (zeros without GUARD): the reads W1_c silu(W2_c x) of the
    chunk-start states at w1c (d, h) and w2c (h, d). k_seg, v_seg: the segment's first rows of k, v. Two passes by
    BWO-wide column tiles of k, v and e (none is whole in registers): per hidden block f the pre-activations
    p_f = K W2_c,fᵀ summed over the column tiles and x_f = silu(p_f) - silu(P_v,f) parked at x_tmp (BC, h); then per
    column tile e's columns, Σ_f x_f W1_c[cols, f]ᵀ."""
    curv = tl.zeros([BC], dtype=tl.float32)
    for f0 in range(0, hh, BF):
        rows_f, mf, xoff, xm = _block_rows(f0, offs_c, offs_f, mt, hd, hh)
        p = tl.zeros([BC, BF], dtype=tl.float32)
        pv = tl.zeros([BC, BF], dtype=tl.float32)
        w1sq = tl.zeros([BF], dtype=tl.float32)
        for c0 in range(0, dd, BWO):
            cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, dd, BWO)
            w2b, m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, dd, hh)
            W2c = _load_w(w2c, w2b, m2b, EVEN)
            if OBJ_L2 or GUARD:
                p += mm(tl.load(k_seg + tc, mask=mtc, other=0.0), tl.trans(W2c), PREC, LOWP)
            if not VALUE:
                pv += mm(tl.load(v_seg + tc, mask=mtc, other=0.0), tl.trans(W2c), PREC, LOWP)
            if GUARD:
                W1c = _load_w(w1c, w1b, m1b, EVEN)
                w1sq += tl.sum(W1c * W1c, 0)
        if OBJ_L2 or not VALUE:
            x = tl.zeros([BC, BF], dtype=tl.float32)
            if OBJ_L2:
                x += p * sigmoid(p)
            if not VALUE:
                x -= pv * sigmoid(pv)
            tl.store(x_tmp + xoff, x, mask=xm)
        if GUARD:  # N_t sums over the hidden units
            curv += _curvature(p, w1sq)
    tl.debug_barrier()  # x is read back in another layout
    for c0 in range(0, dd, BWO):
        cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, dd, BWO)
        e = -tl.load(v_seg + tc, mask=mtc, other=0.0)
        if OBJ_L2:
            e += tl.load(k_seg + tc, mask=mtc, other=0.0)
        if OBJ_L2 or not VALUE:  # one product for both reads
            for f0 in range(0, hh, BF):
                rows_f, mf, xoff, xm = _block_rows(f0, offs_c, offs_f, mt, hd, hh)
                _w2b, _m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, dd, hh)
                e += mm(tl.load(x_tmp + xoff, mask=xm, other=0.0), tl.trans(_load_w(w1c, w1b, m1b, EVEN)), PREC,
                        LOWP)
        tl.store(e_dst + tc, e, mask=mtc)
    return curv


@device_fn
def _segment_states(n, bh, w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, w1_bh, w1_slot, w2_bh, w2_slot, wc_bh):
    """Segment n's start states W1, W2 (checkpoint slot n) and its chunk start: the call's own at n = 0 (a cached
    state may sit mid-chunk), else the start state itself."""
    w1n = w1_ptr + bh * w1_bh + n * w1_slot
    w2n = w2_ptr + bh * w2_bh + n * w2_slot
    if n == 0:
        w1c = w1c_ptr + bh * wc_bh
        w2c = w2c_ptr + bh * wc_bh
    else:
        w1c = w1n
        w2c = w2n
    return w1n, w2n, w1c, w2c


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
    scr_ptr, T, H, C, shift, NSEG, d, hd, eps, w1_bh, w1_slot, w2_bh, w2_slot, wc_bh,
    BC: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, BF: tl.constexpr, BWO: tl.constexpr, EVEN: tl.constexpr,
    OBJ_L2: tl.constexpr, VALUE: tl.constexpr, ANCHOR: tl.constexpr, GUARD: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr,
):
    """W1, W2 over the segments of one (batch, head): the reads o and a checkpoint of both after every segment
    (slot n+1 of w1, w2; slot 0 holds the call's start state). a1, a2: the heads' retention anchors W1_0, W2_0
    (ANCHOR, (H, d, h) and (H, h, d)). EVEN: d = D and h = HD.

    Each segment walks the hidden units f in BF-wide blocks and the head dim in BWO-wide column tiles
    (`column_tile`), in three passes behind barriers: (1) the chunk start's reads into e (BC, d), parked in the
    scratch se, and the guard's N (`_chunk_start_errors`); (2) per block, p, silu(p) and g again, then N2, the
    hidden pre-activations, W2's end block, with hid and s = silu(p) parked in the scratch (shid, ss: (BC, h));
    (3) HS = Σ_f hid_f s_fᵀ, then per column tile o's columns and W1's end blocks. The products over d sum over the
    column tiles of k, q and e, read back per tile, so no (BC, d) tile and no (d, h) tile is ever whole in
    registers: whole, the states and their products spilled and, at d = h = 128 in tf32, needed 288 KB of shared
    memory; with whole (BC, d) tiles the forward spilled 0.5-2.1 KB (benchmarks/NOTES.md).

    Addressing (offline sm_90a compile, benchmarks/NOTES.md): compile-time strides when EVEN (the offsets fold into
    the instructions), 64-bit bases and 32-bit offsets within the tiles, the start state read from its checkpoint
    slot block by block, the three scratch tiles in one buffer scr (one base address; three spilled more)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    dd = D if EVEN else d
    hh = HD if EVEN else hd
    offs_c = tl.arange(0, BC)
    offs_f = tl.arange(0, BF)
    a1 = a1_ptr + h * d * hd
    a2 = a2_ptr + h * d * hd
    shid = scr_ptr + bh * (2 * BC * hh + BC * dd)  # this program's scratch: (BC, h) tiles of hid and s, (BC, d) of e
    ss = shid + BC * hh
    se = ss + BC * hh
    for n in range(0, NSEG):
        start, L = _segment(n, C, shift, T)
        mt = offs_c < L
        row = bh * T + start  # the segment's first row of the (BH, T[, d]) buffers
        qbase = ((b * T + start) * H + h) * dd  # and of q and o
        w1n, w2n, w1c, w2c = _segment_states(n, bh, w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, w1_bh, w1_slot, w2_bh, w2_slot,
                                             wc_bh)
        # (1) e = dℓ/dM at the chunk start: M_c(k) - target (target M_c(v), or v), into the scratch
        curv = _chunk_start_errors(k_ptr + row * dd, v_ptr + row * dd, se, shid, mt, w1c,
                                   w2c, offs_c, offs_f, d, hd, dd, hh, BC, BF, BWO, EVEN, OBJ_L2, VALUE, GUARD, PREC,
                                   LOWP)
        eta = tl.load(eta_ptr + row + offs_c, mask=mt, other=0.0)
        if GUARD:  # the gradient writes take eta_t / max(1, N_t); the DGD transition keeps eta_t
            eta_m = eta / tl.maximum(curv, 1.0)
        else:
            eta_m = eta
        kd_scale = eps * eta * tl.exp(tl.load(lg_ptr + row + offs_c - 1, mask=mt & (offs_c > 0), other=0.0))
        lg = tl.load(lg_ptr + row + offs_c, mask=mt, other=0.0)
        lg_end = tl.sum(tl.where(offs_c == L - 1, lg, 0.0), 0)
        gamma_end = tl.exp(lg_end)
        gamma = tl.where(mt, tl.exp(lg), 0.0)
        kappa = tl.where(mt, tl.exp(lg_end - lg), 0.0)
        QK = _decayed_qk(q_ptr + qbase, H * dd, k_ptr + row * dd, lg, offs_c, mt, d, dd, dd, BC, BWO, PREC, LOWP)
        tm = tmat_ptr + (bh * NSEG + n) * BC * BC
        if LOWP:
            Tm = tl.load(tm + (offs_c[:, None] * BC + offs_c[None, :]))
        tl.debug_barrier()  # e is read back by column tiles
        # (2) per hidden block f: N2_f = T (-eta' g_f - diag(kd) K W2_0,fᵀ [- diag(ka) K W2_A,fᵀ]) (the row scalings
        # before T), Hp_f = [Q W2_A,fᵀ +] diag(gamma) Q D2_fᵀ + (Gamma ⊙ Q Kᵀ) N2_f and W2's end block; the
        # products over d are summed over BWO-wide column tiles of k, q and e, read back per tile, so none is live
        # whole
        for f0 in range(0, hh, BF):
            rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hh)
            p, Y2, qW, qA, _edW, _kdW = _block_writes(
                k_ptr + row * dd, se, q_ptr + qbase, H * dd, w1c, w2c, w2n, a2, w1c, w2c, rows_f, mf, offs_c, mt, eta,
                eta_m, kd_scale, eps, d, dd, dd, hh, BC, BF, BWO, EVEN, ANCHOR, False, PREC, LOWP)
            sp = p * sigmoid(p)
            if not LOWP:  # read per block in fp32 (spills 92 -> 16 B at d = 64), once per segment in bf16 (8 -> 80 B)
                Tm = tl.load(tm + f0 * tl.program_id(1) + (offs_c[:, None] * BC + offs_c[None, :]))
            N2 = tl.dot(Tm, Y2, input_precision=PREC)
            Hp = gamma[:, None] * qW + mm(QK, N2, PREC, LOWP)
            if ANCHOR:
                Hp += qA
            tl.store(shid + hoff, Hp * sigmoid(Hp), mask=hm)
            tl.store(ss + hoff, sp, mask=hm)
            kN2 = tl.trans(kappa[:, None] * N2)
            for c0 in range(0, dd, BWO):  # W2's end block [W2_A +] gamma_L D2_0 + N2ᵀ (kappa K)
                cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, dd, BWO)
                w2b, m2b, _w1b, _m1b = _state_blocks(rows_f, mf, cols, mc, dd, hh)
                k_c = tl.load(k_ptr + row * dd + tc, mask=mtc, other=0.0)
                W2 = _load_w(w2n, w2b, m2b, EVEN)
                if ANCHOR:
                    A2 = _load_w(a2, w2b, m2b, EVEN)
                    W2 = A2 + gamma_end * (W2 - A2)
                else:
                    W2 = gamma_end * W2
                _store_w(w2n + w2_slot, w2b, W2 + mm(kN2, k_c, PREC, LOWP), m2b, EVEN)
        tl.debug_barrier()  # hid and s are read back in other layouts
        HS = tl.zeros([BC, BC], dtype=tl.float32)  # Σ_f hid_f s_fᵀ
        for f0 in range(0, hh, BF):
            rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hh)
            HS += mm(tl.load(shid + hoff, mask=hm, other=0.0), tl.trans(tl.load(ss + hoff, mask=hm, other=0.0)),
                     PREC, LOWP)
        HS *= _decays(lg, offs_c, mt)
        # o = q + [hid W1_Aᵀ +] diag(gamma) hid D1ᵀ + (Gamma ⊙ hid sᵀ) E1, and W1's end blocks, by BWO-wide
        # column tiles of o (rows of W1): only a (BC, BWO) tile of o and of e is live, not two (BC, d) ones
        for c0 in range(0, dd, BWO):
            cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, dd, BWO)
            e_c = tl.load(se + tc, mask=mtc, other=0.0)
            o = tl.zeros([BC, BWO], dtype=tl.float32)
            for f0 in range(0, hh, BF):
                rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hh)
                _w2b, _m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, dd, hh)
                hid = tl.load(shid + hoff, mask=hm, other=0.0)
                W1 = _load_w(w1n, w1b, m1b, EVEN)
                if ANCHOR:
                    A1 = _load_w(a1, w1b, m1b, EVEN)
                    o += mm(hid, tl.trans(A1), PREC, LOWP) + gamma[:, None] * mm(hid, tl.trans(W1 - A1), PREC, LOWP)
                    W1 = A1 + gamma_end * (W1 - A1)
                else:
                    o += gamma[:, None] * mm(hid, tl.trans(W1), PREC, LOWP)
                    W1 = gamma_end * W1
                # W1's writes -eta' e with keys silu(p): the end block W1_f + (kappa E1)ᵀ s_f
                sp = tl.load(ss + hoff, mask=hm, other=0.0)
                _store_w(w1n + w1_slot, w1b, W1 + mm(tl.trans(-(kappa * eta_m)[:, None] * e_c), sp, PREC, LOWP), m1b,
                         EVEN)
            qc = qbase + offs_c[:, None] * (H * dd) + cols[None, :]
            o += tl.load(q_ptr + qc, mask=mtc, other=0.0).to(tl.float32) + mm(HS, -eta_m[:, None] * e_c, PREC, LOWP)
            tl.store(o_ptr + qc, o.to(o_ptr.dtype.element_ty), mask=mtc)
        tl.debug_barrier()  # slot n+1 is the next segment's start state


@triton.jit
def _deep_bwd_kernel(
    q_ptr, k_ptr, v_ptr, eta_ptr, lg_ptr, tmat_ptr, w1c_ptr, w2c_ptr, w1_ptr, w2_ptr, a1_ptr, a2_ptr, do_ptr,
    dw1_ptr, dw2_ptr, dzc1_ptr, dzc2_ptr, dw1c_ptr, dw2c_ptr, da1_ptr, da2_ptr,
    dq_ptr, dk_ptr, dv_ptr, deta_ptr, dlg_ptr, dla_ptr, scr_ptr,
    T, H, C, shift, NSEG, d, hd, eps, w1_bh, w1_slot, w2_bh, w2_slot, wc_bh, W_SLOT,
    BC: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, BF: tl.constexpr, BWO: tl.constexpr, EVEN: tl.constexpr,
    OBJ_L2: tl.constexpr, VALUE: tl.constexpr, ANCHOR: tl.constexpr, GUARD: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr,
):
    """The reverse of `_deep_fwd_kernel`, segment by segment from the last, in the forward's BF-wide hidden blocks:
    dq, and the gradients of k, v, eta, lg, la for the generating scan's backward. dw1, dw2: dW_end in, dW_0 out,
    and the carried dW1, dW2 in between (each block read and rewritten in place, never whole in registers).
    dzc1, dzc2: the cotangent of the final chunk start, which is the start state of segment W_SLOT (or -1); dw1c,
    dw2c (zeros on entry): the gradient of the input chunk start; da1, da2 (ANCHOR; zeros on entry): the gradients
    of the retention anchors W1_0, W2_0 of this (batch, head). With the anchor the decays act on the deviations
    D = W - W_0 (W_end = W_0 + gamma_L D_start + ...).

    Per segment, eight passes, each behind a barrier, over the hidden blocks f and BWO-wide column tiles of the
    head dim (`column_tile`), so that no (BC, d) tile is ever whole in registers: the products over d sum over the
    column tiles, and the (BC, d) results are formed one column tile at a time. Between the passes the (BC, h)
    tiles sit in this program's scratch (sn, sdn, sds, shp, sp: N2, dN2, ds, Hp then dHp, p = K W2_cᵀ, which 2a',
    2b, 3 and 4a read instead of recomputing; sn, sds, shp and ss carry 4a's results to 4b), e and de in se,
    sde (BC, d), dE1 in dv and the partial dk in dk:
      (1) the chunk start's reads into e and the guard's N (`_chunk_start_errors`, as the forward; its silu
          differences pass through sp);
      (2a) the writes N2_f and the reads Hp_f again (as the forward's pass 2), and the carried dW_end's sums over
          d, e dW1_e,f and K dW2_e,fᵀ;
      (2a') by column tiles: dE1 and dk from dW_end, the Gamma term of dE1, and the decays of dW1, dW2;
      (2b) the o part: dhid_f is whole within its block (the Gamma term needs only G1 = (dO E1ᵀ) ⊙ Gamma and s_f);
      (2c) the hid part, then by column tiles dq and dk's part Σ_f dHp_f N2_fᵀ;
      (3) through N2 = T Y2: dY2_f (parked in dN2's place), M = dN2 N2ᵀ, the DGD terms, and the sums over f
          that the chunk-start gradients need whole (de, and deta', which the guard's dN needs), then the chain
          through T, by BWO-wide column tiles of the head dim (`column_tile`);
      (4a) the chunk-start gradients by blocks: dp_f and the (BC, h) factors of dW1_c, dW2_c, their products
          over d by column tiles;
      (4b) by column tiles: dk's and dv's columns, and dW1_c, dW2_c by blocks, added to the carried dW1, dW2.
    Each pass reads its chunk tiles afresh and keeps its sums to itself (benchmarks/NOTES.md): whole (d, h) tiles
    spilled 28-29 KB at d = h = 128 and needed 352-577 KB of shared memory; tiles kept from one pass to the next
    held their shared-memory operand copies across all of them (416 KB at d = h = 128 in tf32); whole (BC, d)
    tiles in passes 2a-2c spilled 2.1-5.3 KB. Row scalings sit on the block's operand or on the product, never on a
    loop-invariant operand (each is one more copy); the (BC, BC) decays are formed where each pass needs them
    (`_decays`)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_f = tl.arange(0, BF)
    dd = D if EVEN else d
    hh = HD if EVEN else hd
    toff = offs_c[:, None] * BC + offs_c[None, :]
    a1 = a1_ptr + h * d * hd
    a2 = a2_ptr + h * d * hd
    dw1 = dw1_ptr + bh * d * hd
    dw2 = dw2_ptr + bh * d * hd
    da1 = da1_ptr + bh * d * hd
    da2 = da2_ptr + bh * d * hd
    # this program's scratch, one buffer (one base address): (BC, d) tiles of e and de, (BC, h) tiles of the rest
    se = scr_ptr + bh * (2 * BC * dd + 6 * BC * hh)
    sde = se + BC * dd
    sn = sde + BC * dd
    sdn = sn + BC * hh
    sds = sdn + BC * hh
    shp = sds + BC * hh
    sp = shp + BC * hh
    ss = sp + BC * hh
    for i in range(0, NSEG):
        n = NSEG - 1 - i
        start, L = _segment(n, C, shift, T)
        mt = offs_c < L
        row = bh * T + start  # the segment's first row of the (BH, T[, d]) buffers
        qbase = ((b * T + start) * H + h) * dd  # and of q, dO and dq
        # the tiles' row strides with an opaque zero (program_id(1) is 0; a multiple of 16 to the compiler, so the
        # loads stay vectorised): the tile offsets are formed in the segment, not hoisted out of the segment loop
        # and kept live across it (spills 1584 -> 1512 B at d = 64 fp32, 1408 -> 1276 B in bf16)
        opq = i * tl.program_id(1) * 16
        ddq = dd + opq
        hhq = hh + opq
        qs = H * dd + opq
        tm = tmat_ptr + (bh * NSEG + n) * BC * BC + toff
        w1n, w2n, w1c, w2c = _segment_states(n, bh, w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, w1_bh, w1_slot, w2_bh, w2_slot,
                                             wc_bh)
        eta = tl.load(eta_ptr + row + offs_c, mask=mt, other=0.0)
        lg = tl.load(lg_ptr + row + offs_c, mask=mt, other=0.0)
        lgb = tl.load(lg_ptr + row + offs_c - 1, mask=mt & (offs_c > 0), other=0.0)
        # ---- (1) e = dℓ/dM at the chunk start and N_t, summed over the hidden blocks
        curv = _chunk_start_errors(k_ptr + row * dd, v_ptr + row * dd, se, sp, mt, w1c,
                                   w2c, offs_c, offs_f, d, hd, dd, hh, BC, BF, BWO, EVEN, OBJ_L2, VALUE, GUARD, PREC,
                                   LOWP)
        if GUARD:
            cg = 1.0 / tl.maximum(curv, 1.0)
            eta_m = eta * cg
        else:
            eta_m = eta
        kd_scale = eps * eta * tl.exp(lgb)
        lg_end = tl.sum(tl.where(offs_c == L - 1, lg, 0.0), 0)
        gamma_end = tl.exp(lg_end)
        gamma = tl.where(mt, tl.exp(lg), 0.0)
        kappa = tl.where(mt, tl.exp(lg_end - lg), 0.0)
        tl.debug_barrier()
        # ---- (2a) per block: the writes N2_f and the reads Hp_f again (as the forward's pass 2, their products over
        # d summed over column tiles), and of the carried dW_end the sums over d that need the block: e dW1_e,f and
        # K dW2_e,fᵀ; W1_end = [W1_A +] gamma_L D1_0 + E1ᵀ (kappa s), W2_end = [W2_A +] gamma_L D2_0 + N2ᵀ (kappa K)
        Tm = tl.load(tm)
        QKd = _decayed_qk(q_ptr + qbase, qs, k_ptr + row * dd, lg, offs_c, mt, d, dd, ddq, BC, BWO, PREC, LOWP)
        HS = tl.zeros([BC, BC], dtype=tl.float32)  # Σ_f hid_f s_fᵀ
        cc = tl.zeros([BC], dtype=tl.float32)  # the end states' -dlg_t: kappa_t (s_t.E1dW_t + k_t.N2dW_t)
        for f0 in range(0, hh, BF):
            rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
            p, Y2, qW, qA, edW, kdW = _block_writes(
                k_ptr + row * dd, se, q_ptr + qbase, qs, w1c, w2c, w2n, a2, dw1, dw2, rows_f, mf, offs_c, mt, eta,
                eta_m, kd_scale, eps, d, dd, ddq, hhq, BC, BF, BWO, EVEN, ANCHOR, True, PREC, LOWP)
            s = p * sigmoid(p)
            N2 = tl.dot(Tm, Y2, input_precision=PREC)
            Hp = gamma[:, None] * qW + mm(QKd, N2, PREC, LOWP)
            if ANCHOR:
                Hp += qA
            HS += mm(Hp * sigmoid(Hp), tl.trans(s), PREC, LOWP)
            E1dW = -eta_m[:, None] * edW
            # k_t . (N2 dW2_e)_t = Σ_f N2_f ⊙ (K dW2_e,fᵀ): no (BC, d) product needed for cc
            cc += kappa * (tl.sum(s * E1dW, 1) + tl.sum(N2 * kdW, 1))
            tl.store(sn + hoff, N2, mask=hm)
            tl.store(shp + hoff, Hp, mask=hm)
            tl.store(sp + hoff, p, mask=hm)
            tl.store(sds + hoff, kappa[:, None] * E1dW, mask=hm)
            tl.store(sdn + hoff, kappa[:, None] * kdW, mask=hm)
        tl.debug_barrier()  # s (from p) and N2 are read back in other layouts; dW1, dW2 are rewritten
        # ---- (2a') by column tiles c: dE1_c = Σ_f (kappa s_f) dW1_e[c, f]ᵀ + (HS ⊙ Gamma)ᵀ dO_c (the o part's
        # Gamma term, HS now complete), dk_c = Σ_f (kappa N2_f) dW2_e[f, c], the deviations' part of dlg_end, and the
        # decays of dW1, dW2 (each block read once more, then rewritten)
        HSd = tl.trans(HS * _decays(lg, offs_c, mt))
        ddev = tl.zeros([BWO], dtype=tl.float32)  # Σ over the (d, h) entries of D1_0 ⊙ dW1_e + D2_0ᵀ ⊙ dW2_eᵀ
        for c0 in range(0, dd, BWO):
            cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
            dE1_c = mm(HSd, tl.load(do_ptr + qbase + offs_c[:, None] * qs + cols[None, :], mask=mtc,
                                    other=0.0), PREC, LOWP)
            dk_c = tl.zeros([BC, BWO], dtype=tl.float32)
            for f0 in range(0, hh, BF):
                rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
                w2b, m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                p = tl.load(sp + hoff, mask=hm, other=0.0)
                dW1e = _load_w(dw1, w1b, m1b, EVEN)
                dW2e = _load_w(dw2, w2b, m2b, EVEN)
                dE1_c += mm(kappa[:, None] * (p * sigmoid(p)), tl.trans(dW1e), PREC, LOWP)
                dk_c += mm(kappa[:, None] * tl.load(sn + hoff, mask=hm, other=0.0), dW2e, PREC, LOWP)
                W1 = _load_w(w1n, w1b, m1b, EVEN)
                W2 = _load_w(w2n, w2b, m2b, EVEN)
                if ANCHOR:
                    W1 -= _load_w(a1, w1b, m1b, EVEN)
                    W2 -= _load_w(a2, w2b, m2b, EVEN)
                    _store_w(da1, w1b, _load_w(da1, w1b, m1b, EVEN) + (1.0 - gamma_end) * dW1e, m1b, EVEN)
                    _store_w(da2, w2b, _load_w(da2, w2b, m2b, EVEN) + (1.0 - gamma_end) * dW2e, m2b, EVEN)
                ddev += tl.sum(W1 * dW1e, 1) + tl.sum(W2 * dW2e, 0)
                _store_w(dw1, w1b, gamma_end * dW1e, m1b, EVEN)
                _store_w(dw2, w2b, gamma_end * dW2e, m2b, EVEN)
            tl.store(dk_ptr + row * dd + tc, dk_c, mask=mtc)
            tl.store(dv_ptr + row * dd + tc, dE1_c, mask=mtc)  # dE1, for pass 3
        tl.debug_barrier()  # 2b and 2c update dW1, dW2 in other layouts
        dlg_end = tl.sum(cc, 0) + gamma_end * tl.sum(ddev, 0)
        # ---- (2b) o = q + [hid W1_Aᵀ +] diag(gamma) hid D1_0ᵀ + (Gamma ⊙ hid sᵀ) E1 with E1 = -eta' e: dhid_f is
        # whole within its block (G1 = (dO E1ᵀ) ⊙ Gamma), and dHp_f = dhid_f ⊙ silu'(Hp_f) replaces Hp_f; per block
        # dO W1_fᵀ summed over column tiles, then W1's and W1_A's gradient blocks by them
        G1 = tl.zeros([BC, BC], dtype=tl.float32)
        for c0 in range(0, dd, BWO):
            cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
            G1 += mm(tl.load(do_ptr + qbase + offs_c[:, None] * qs + cols[None, :], mask=mtc, other=0.0),
                     tl.trans(tl.load(se + tc, mask=mtc, other=0.0)), PREC, LOWP)
        G1 *= _decays(lg, offs_c, mt) * -eta_m[None, :]
        gd = G1 * HS
        dlg = tl.sum(gd, 1) - tl.sum(gd, 0) - cc
        for f0 in range(0, hh, BF):
            rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
            Hp = tl.load(shp + hoff, mask=hm, other=0.0)
            hid = Hp * sigmoid(Hp)
            dOW1 = tl.zeros([BC, BF], dtype=tl.float32)  # dO D1_0,f
            dOA1 = tl.zeros([BC, BF], dtype=tl.float32)
            for c0 in range(0, dd, BWO):
                cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
                _w2b, _m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                do_c = tl.load(do_ptr + qbase + offs_c[:, None] * qs + cols[None, :], mask=mtc, other=0.0)
                W1 = _load_w(w1n, w1b, m1b, EVEN)
                if ANCHOR:
                    A1 = _load_w(a1, w1b, m1b, EVEN)
                    dOW1 += mm(do_c, W1 - A1, PREC, LOWP)
                    dOA1 += mm(do_c, A1, PREC, LOWP)
                else:
                    dOW1 += mm(do_c, W1, PREC, LOWP)
            dhid = gamma[:, None] * dOW1 + dOA1
            p = tl.load(sp + hoff, mask=hm, other=0.0)
            dhid += mm(G1, p * sigmoid(p), PREC, LOWP)
            dlg += gamma * tl.sum(dOW1 * hid, 1)
            tl.store(sds + hoff, tl.load(sds + hoff, mask=hm, other=0.0) + mm(tl.trans(G1), hid, PREC, LOWP), mask=hm)
            tl.store(shp + hoff, dhid * silu_grad(Hp), mask=hm)
            for c0 in range(0, dd, BWO):
                cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
                _w2b, _m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                do_c = tl.load(do_ptr + qbase + offs_c[:, None] * qs + cols[None, :], mask=mtc, other=0.0)
                if ANCHOR:
                    _store_w(da1, w1b, _load_w(da1, w1b, m1b, EVEN)
                             + mm(tl.trans(do_c), (1.0 - gamma)[:, None] * hid, PREC, LOWP), m1b, EVEN)
                _store_w(dw1, w1b, _load_w(dw1, w1b, m1b, EVEN) + mm(tl.trans(do_c), gamma[:, None] * hid, PREC, LOWP),
                         m1b, EVEN)
        tl.debug_barrier()  # dHp is read back in other layouts
        # ---- (2c) hid = silu(Hp), Hp = diag(gamma) Q D2_0ᵀ [+ Q W2_Aᵀ] + (Gamma ⊙ Q Kᵀ) N2: per block Q D2_0,fᵀ
        # summed over column tiles, then W2's and W2_A's gradient blocks by them; then by column tiles dq's columns,
        # Σ_f dHp_f (gamma D2_0,f [+ W2_A,f]) + G2 K_c, and dk's part G2ᵀ Q_c
        QKd = _decayed_qk(q_ptr + qbase, qs, k_ptr + row * dd, lg, offs_c, mt, d, dd, ddq, BC, BWO, PREC, LOWP)
        G2 = tl.zeros([BC, BC], dtype=tl.float32)  # Σ_f dHp_f N2_fᵀ
        for f0 in range(0, hh, BF):
            rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
            dHp = tl.load(shp + hoff, mask=hm, other=0.0)
            qW = tl.zeros([BC, BF], dtype=tl.float32)  # Q D2_0,fᵀ
            for c0 in range(0, dd, BWO):
                cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
                w2b, m2b, _w1b, _m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                W2 = _load_w(w2n, w2b, m2b, EVEN)
                if ANCHOR:
                    W2 -= _load_w(a2, w2b, m2b, EVEN)
                qW += mm(tl.load(q_ptr + qbase + offs_c[:, None] * qs + cols[None, :], mask=mtc, other=0.0),
                         tl.trans(W2), PREC, LOWP)
            dlg += gamma * tl.sum(dHp * qW, 1)
            tl.store(sdn + hoff, tl.load(sdn + hoff, mask=hm, other=0.0) + mm(tl.trans(QKd), dHp, PREC, LOWP), mask=hm)
            G2 += mm(dHp, tl.trans(tl.load(sn + hoff, mask=hm, other=0.0)), PREC, LOWP)
            for c0 in range(0, dd, BWO):
                cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
                w2b, m2b, _w1b, _m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                q_c = tl.load(q_ptr + qbase + offs_c[:, None] * qs + cols[None, :], mask=mtc, other=0.0)
                if ANCHOR:
                    _store_w(da2, w2b, _load_w(da2, w2b, m2b, EVEN)
                             + mm(tl.trans((1.0 - gamma)[:, None] * dHp), q_c, PREC, LOWP), m2b, EVEN)
                _store_w(dw2, w2b, _load_w(dw2, w2b, m2b, EVEN) + mm(tl.trans(gamma[:, None] * dHp), q_c, PREC, LOWP),
                         m2b, EVEN)
        gd = G2 * QKd
        dlg += tl.sum(gd, 1) - tl.sum(gd, 0)
        G2 *= _decays(lg, offs_c, mt)
        for c0 in range(0, dd, BWO):
            cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
            qc = qbase + offs_c[:, None] * qs + cols[None, :]
            dq_c = tl.load(do_ptr + qc, mask=mtc, other=0.0).to(tl.float32)
            for f0 in range(0, hh, BF):
                rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
                w2b, m2b, _w1b, _m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                dHp = tl.load(shp + hoff, mask=hm, other=0.0)
                W2 = _load_w(w2n, w2b, m2b, EVEN)
                if ANCHOR:
                    A2 = _load_w(a2, w2b, m2b, EVEN)
                    dq_c += mm(gamma[:, None] * dHp, W2 - A2, PREC, LOWP) + mm(dHp, A2, PREC, LOWP)
                else:
                    dq_c += mm(gamma[:, None] * dHp, W2, PREC, LOWP)
            dq_c += mm(G2, tl.load(k_ptr + row * dd + tc, mask=mtc, other=0.0), PREC, LOWP)
            tl.store(dq_ptr + qc, dq_c.to(dq_ptr.dtype.element_ty), mask=mtc)
            tl.store(dk_ptr + row * dd + tc, tl.load(dk_ptr + row * dd + tc, mask=mtc, other=0.0)
                     + mm(tl.trans(G2), tl.load(q_ptr + qc, mask=mtc, other=0.0), PREC, LOWP), mask=mtc)
        tl.debug_barrier()
        # ---- (3) N2 = T Y2, Y2 = -eta' g - Kd W2_0ᵀ [- Ka W2_Aᵀ] (Kd W2_0 + Ka W2_A = Kd D2_0 + Ke W2_A), and the
        # sums over f of de and deta' (the gradient of the writes' step), by column tiles of the head dim: (3a) the
        # row sums and K Kᵀ over column tiles; (3b) per block dY2_f = Tᵀ dN2_f (parked in dN2's place for 4a), M,
        # the row sums of dKd_f . k and dKe_f . k as dY2_f ⊙ (K D2_fᵀ), and W2t's (h, d) blocks; (3c) per column
        # tile dk's and de's columns, summed over the blocks
        Tm = tl.load(tm)
        M = tl.zeros([BC, BC], dtype=tl.float32)
        kk = tl.zeros([BC, BC], dtype=tl.float32)  # K Kᵀ, for the chain through T
        deta_m = tl.zeros([BC], dtype=tl.float32)
        dks = tl.zeros([BC], dtype=tl.float32)  # Σ_f (dKd_f . k)
        deta = tl.zeros([BC], dtype=tl.float32)
        for c0 in range(0, dd, BWO):
            cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
            k_c = tl.load(k_ptr + row * dd + tc, mask=mtc, other=0.0)
            deta_m -= tl.sum(tl.load(dv_ptr + row * dd + tc, mask=mtc, other=0.0)
                             * tl.load(se + tc, mask=mtc, other=0.0), 1)  # dE1 . e
            kk = tl.dot(k_c, tl.trans(k_c), acc=kk, input_precision=PREC)
        for f0 in range(0, hh, BF):
            rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
            dN2 = tl.load(sdn + hoff, mask=hm, other=0.0)
            dY2 = tl.dot(tl.trans(Tm), dN2, input_precision=PREC)
            M += tl.dot(dN2, tl.trans(tl.load(sn + hoff, mask=hm, other=0.0)), input_precision=PREC)
            kD2 = tl.zeros([BC, BF], dtype=tl.float32)
            kA2 = tl.zeros([BC, BF], dtype=tl.float32)
            eW1 = tl.zeros([BC, BF], dtype=tl.float32)
            for c0 in range(0, dd, BWO):
                cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
                w2b, m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                k_c = tl.load(k_ptr + row * dd + tc, mask=mtc, other=0.0)
                W2t = _load_w(w2n, w2b, m2b, EVEN)
                if ANCHOR:
                    A2t = _load_w(a2, w2b, m2b, EVEN)
                    kA2 = tl.dot(k_c, tl.trans(A2t), acc=kA2, input_precision=PREC)
                    W2t -= A2t
                    _store_w(da2, w2b, _load_w(da2, w2b, m2b, EVEN)
                             - tl.dot(tl.trans((eps * eta - kd_scale)[:, None] * dY2), k_c, input_precision=PREC),
                             m2b, EVEN)
                kD2 = tl.dot(k_c, tl.trans(W2t), acc=kD2, input_precision=PREC)
                _store_w(dw2, w2b, _load_w(dw2, w2b, m2b, EVEN)
                         - tl.dot(tl.trans(kd_scale[:, None] * dY2), k_c, input_precision=PREC), m2b, EVEN)
                eW1 += mm(tl.load(se + tc, mask=mtc, other=0.0), _load_w(w1c, w1b, m1b, EVEN), PREC, LOWP)
            dks -= tl.sum(dY2 * kD2, 1)
            if ANCHOR:
                deta -= eps * tl.sum(dY2 * kA2, 1)
            deta_m -= tl.sum(dY2 * silu_grad(tl.load(sp + hoff, mask=hm, other=0.0)) * eW1, 1)
            tl.store(sdn + hoff, dY2, mask=hm)
        if GUARD:
            deta += deta_m * cg
            # d(1 / max(1, N)) = -dN / N² where N >= 1 (clamp_min passes the gradient at the bound)
            dcurv = tl.where(curv >= 1.0, -deta_m * eta * cg * cg, 0.0)
        else:
            deta += deta_m
        # T = (I + A)^-1 and Kd = diag(eps eta_t gamma_{t-1}) K
        dA = tl.where(offs_c[None, :] < offs_c[:, None], -tl.dot(tl.trans(Tm), M, input_precision=PREC), 0.0)
        dKKs, deta_a, dlg_a, dla = _tri_rows(dA, kk, eta, lg, lg - lgb, eps, offs_c)  # dk's part: dKKs K
        tl.debug_barrier()  # dY2 is read back in another layout
        for c0 in range(0, dd, BWO):
            cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
            de_c = -eta_m[:, None] * tl.load(dv_ptr + row * dd + tc, mask=mtc, other=0.0)  # dE1's part
            dk_c = tl.zeros([BC, BWO], dtype=tl.float32)
            for f0 in range(0, hh, BF):
                rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
                w2b, m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                dY2 = tl.load(sdn + hoff, mask=hm, other=0.0)
                W2t = _load_w(w2n, w2b, m2b, EVEN)
                if ANCHOR:
                    A2t = _load_w(a2, w2b, m2b, EVEN)
                    dk_c -= tl.dot((eps * eta)[:, None] * dY2, A2t, input_precision=PREC)
                    W2t -= A2t
                dk_c -= tl.dot(kd_scale[:, None] * dY2, W2t, input_precision=PREC)
                sg = silu_grad(tl.load(sp + hoff, mask=hm, other=0.0))
                de_c += mm(-eta_m[:, None] * dY2 * sg, tl.trans(_load_w(w1c, w1b, m1b, EVEN)), PREC, LOWP)
            if OBJ_L2:
                dk_c += de_c
            tl.store(sde + tc, de_c, mask=mtc)
            k_c = tl.load(k_ptr + row * dd + tc, mask=mtc, other=0.0)
            dk_c += tl.dot(dKKs, k_c, input_precision=PREC)
            tl.store(dk_ptr + row * dd + tc, tl.load(dk_ptr + row * dd + tc, mask=mtc, other=0.0) + dk_c, mask=mtc)
        tl.store(deta_ptr + row + offs_c, deta + deta_a + eps * tl.exp(lgb) * dks, mask=mt)
        tl.store(dlg_ptr + row + offs_c, dlg + dlg_a + dks * kd_scale + tl.where(offs_c == L - 1, dlg_end, 0.0),
                 mask=mt)
        tl.store(dla_ptr + row + offs_c, dla - dks * kd_scale, mask=mt)
        tl.debug_barrier()
        # ---- (4a) s = silu(p), g = silu'(p) ⊙ (e W1_c), e, the target, p = K W2_cᵀ [, N_t]: by blocks, dp_f (and
        # dpv_f) and the (BC, h) factors of dW1_c, dW2_c for 4b; the products over d by column tiles of e, de, v
        if n == 0:  # the input chunk start's gradient goes to dw1c, dw2c (zeros on entry), the others to dW1, dW2
            dst1 = dw1c_ptr + bh * d * hd
            dst2 = dw2c_ptr + bh * d * hd
        else:
            dst1 = dw1
            dst2 = dw2
        for f0 in range(0, hh, BF):
            rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
            eW = tl.zeros([BC, BF], dtype=tl.float32)
            deW = tl.zeros([BC, BF], dtype=tl.float32)
            pv = tl.zeros([BC, BF], dtype=tl.float32)
            w1sq = tl.zeros([BF], dtype=tl.float32)
            for c0 in range(0, dd, BWO):
                cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
                w2b, m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                W1ct = _load_w(w1c, w1b, m1b, EVEN)
                eW += mm(tl.load(se + tc, mask=mtc, other=0.0), W1ct, PREC, LOWP)
                if OBJ_L2 or not VALUE:
                    deW += mm(tl.load(sde + tc, mask=mtc, other=0.0), W1ct, PREC, LOWP)
                if not VALUE:
                    pv += mm(tl.load(v_ptr + row * dd + tc, mask=mtc, other=0.0),
                             tl.trans(_load_w(w2c, w2b, m2b, EVEN)), PREC, LOWP)
                if GUARD:
                    w1sq += tl.sum(W1ct * W1ct, 0)
            p = tl.load(sp + hoff, mask=hm, other=0.0)
            sg = silu_grad(p)
            s = p * sigmoid(p)
            dg = -eta_m[:, None] * tl.load(sdn + hoff, mask=hm, other=0.0)  # dY2_f, parked by pass 3
            ds = tl.load(sds + hoff, mask=hm, other=0.0)
            dsg = dg * eW
            if GUARD:
                ds += 2.0 * dcurv[:, None] * s
                dsg += 2.0 * dcurv[:, None] * sg * w1sq[None, :]
                gw = 2.0 * tl.sum(dcurv[:, None] * sg * sg, 0)
                for c0 in range(0, dd, BWO):
                    cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
                    w2b, m2b, w1b, m1b = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                    _store_w(dst1, w1b, _load_w(dst1, w1b, m1b, EVEN) + _load_w(w1c, w1b, m1b, EVEN) * gw[None, :],
                             m1b, EVEN)
            dp = ds * sg + dsg * silu_grad2(p)
            xs = tl.zeros([BC, BF], dtype=tl.float32)  # dW1_c = eᵀ (dg ⊙ sg) + deᵀ xs [+ the guard's term]
            if OBJ_L2:
                dp += deW * sg
                xs += s
            if not VALUE:  # target M_c(v) = v + W1_c silu(W2_c v), held constant in the inner loss
                xs -= pv * sigmoid(pv)
                tl.store(shp + hoff, -deW * silu_grad(pv), mask=hm)  # dpv
            tl.store(sn + hoff, dg * sg, mask=hm)
            tl.store(sds + hoff, dp, mask=hm)
            tl.store(ss + hoff, xs, mask=hm)
        tl.debug_barrier()
        # ---- (4b) by column tiles c of the head dim: dk_c += Σ_f dp_f W2_c[f, c] (and dv_c = -de_c + Σ_f dpv_f
        # W2_c[f, c]), and the blocks dW1_c[c, f] = e_cᵀ (dg ⊙ sg)_f + de_cᵀ xs_f, dW2_c[f, c] = dp_fᵀ K_c
        # [+ dpv_fᵀ V_c], onto dW1, dW2
        for c0 in range(0, dd, BWO):
            cols, mc, mtc, tc = _column_tile(c0, offs_c, mt, d, ddq, BWO)
            k_c = tl.load(k_ptr + row * dd + tc, mask=mtc, other=0.0)
            e_c = tl.load(se + tc, mask=mtc, other=0.0)
            de_c = tl.load(sde + tc, mask=mtc, other=0.0)
            dk_c = tl.zeros([BC, BWO], dtype=tl.float32)
            dv_c = -de_c
            if not VALUE:
                v_c = tl.load(v_ptr + row * dd + tc, mask=mtc, other=0.0)
            for f0 in range(0, hh, BF):
                rows_f, mf, hoff, hm = _block_rows(f0, offs_c, offs_f, mt, hd, hhq)
                w2t, m2t, w1t, m1t = _state_blocks(rows_f, mf, cols, mc, ddq, hhq)
                W2ct = _load_w(w2c, w2t, m2t, EVEN)
                dp = tl.load(sds + hoff, mask=hm, other=0.0)
                dk_c += mm(dp, W2ct, PREC, LOWP)
                dW1c = mm(tl.trans(e_c), tl.load(sn + hoff, mask=hm, other=0.0), PREC, LOWP)
                if OBJ_L2 or not VALUE:
                    dW1c += mm(tl.trans(de_c), tl.load(ss + hoff, mask=hm, other=0.0), PREC, LOWP)
                dW2c = mm(tl.trans(dp), k_c, PREC, LOWP)
                if not VALUE:
                    dpv = tl.load(shp + hoff, mask=hm, other=0.0)
                    dv_c += mm(dpv, W2ct, PREC, LOWP)
                    dW2c += mm(tl.trans(dpv), v_c, PREC, LOWP)
                if n == W_SLOT:  # the cotangent of the final chunk start, this segment's start state
                    dW1c += _load_w(dzc1_ptr + bh * d * hd, w1t, m1t, EVEN)
                    dW2c += _load_w(dzc2_ptr + bh * d * hd, w2t, m2t, EVEN)
                _store_w(dst1, w1t, _load_w(dst1, w1t, m1t, EVEN) + dW1c, m1t, EVEN)
                _store_w(dst2, w2t, _load_w(dst2, w2t, m2t, EVEN) + dW2c, m2t, EVEN)
            tl.store(dk_ptr + row * dd + tc, tl.load(dk_ptr + row * dd + tc, mask=mtc, other=0.0) + dk_c, mask=mtc)
            tl.store(dv_ptr + row * dd + tc, dv_c, mask=mtc)
        tl.debug_barrier()  # the next segment reads dW1, dW2 and the scratch in 2a's layouts


# ---------------------------------------------------------------------------------------------- python


def hidden_block(HD: int) -> int:
    """BF, the hidden units per block of the deep forward and backward: 16 (benchmarks/NOTES.md: 32 spilled more)."""
    return min(HD, 16)


def column_tile(D: int) -> int:
    """BWO, the head-dim columns per tile of k, v, q, e and o in the deep forward and the backward's pass 1: 16
    (benchmarks/NOTES.md: 32 and 64 spilled more)."""
    return min(D, 16)


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
    scratch = [torch.empty(B * H, cfg["BC"] * (2 * cfg["HD"] + cfg["D"]), device=dev, dtype=f32)]  # hid, s, e
    launch(_deep_fwd_kernel, (B * H,),
           q, k, v, eta, lg, tmat, w1c, w2c, w1buf, w2buf, a1, a2, o, *scratch, T, H, cfg["C"], cfg["shift"], nseg, d, hd,
           cfg["eps"], w1buf.stride(0), w1buf.stride(1), w2buf.stride(0), w2buf.stride(1), w1c.stride(0),
           BC=cfg["BC"], D=cfg["D"], HD=cfg["HD"], BF=hidden_block(cfg["HD"]), BWO=column_tile(cfg["D"]),
           EVEN=d == cfg["D"] and hd == cfg["HD"],
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
    dzc, dz, dw1c_end, dw1, dw2c_end, dw2 = (cotangent(g, s, dev) for g, s in zip(grads, shapes))
    w_slot, g_slot = _chunk_start_slots(T, cfg, nseg)
    if w_slot == nseg:
        dw1 += dw1c_end
        dw2 += dw2c_end
    dw1c = torch.zeros(B * H, d, hd, device=dev, dtype=f32)
    dw2c = torch.zeros(B * H, hd, d, device=dev, dtype=f32)
    g_anchor, a1, a2 = anchors if anchors is not None else (None, zc, zc)
    da1 = torch.zeros(B * H, d, hd, device=dev, dtype=f32) if anchors is not None else dw1c
    da2 = torch.zeros(B * H, hd, d, device=dev, dtype=f32) if anchors is not None else dw2c
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    deta, dlg, dla = torch.empty_like(eta), torch.empty_like(eta), torch.empty_like(eta)
    # per program, reused by every segment: e, de, then N2, dN2, ds, Hp (then dHp), p, and 4a's factor of dW1_c
    scratch = [torch.empty(B * H, cfg["BC"] * (2 * cfg["D"] + 6 * cfg["HD"]), device=dev, dtype=f32)]
    launch(_deep_bwd_kernel, (B * H,),
           q, k, v, eta, lg, tmat, w1c, w2c, w1buf, w2buf, a1, a2, do.contiguous(), dw1, dw2,
           dw1c_end, dw2c_end, dw1c, dw2c, da1, da2, dq, dk, dv, deta, dlg, dla, *scratch,
           T, H, cfg["C"], cfg["shift"], nseg, d, hd, cfg["eps"], w1buf.stride(0), w1buf.stride(1), w2buf.stride(0),
           w2buf.stride(1), w1c.stride(0), w_slot if w_slot is not None and 1 <= w_slot < nseg else -1,
           BC=cfg["BC"], D=cfg["D"], HD=cfg["HD"], BF=hidden_block(cfg["HD"]), BWO=column_tile(cfg["D"]),
           EVEN=d == cfg["D"] and hd == cfg["HD"],
           OBJ_L2=cfg["OBJ_L2"], VALUE=cfg["VALUE"], ANCHOR=anchors is not None, GUARD=cfg["GUARD"],
           PREC=dot_precision(), LOWP=lowp, **launch_options("serial", cfg["D"]))
    if w_slot is None:
        dw1c += dw1c_end
        dw2c += dw2c_end
    dg = dz
    if g_slot == nseg:
        dg += dzc
        acc = torch.zeros_like(dg)
    else:
        acc = dzc
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
