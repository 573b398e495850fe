"""Triton kernels of the chunked self-modifying Titans memory, SPEC §2 v2, linear memories: forward and backward.

Same signature and semantics as `titans_memory_reference` (hope_kernels/titans/reference.py), without momentum.

The split (derived here from the reference's unrolled gated delta rule, `delta_rule_corrections`)
---------------------------------------------------------------------------------------------------
Per (batch, head) the state is Z = [W ; G], G = [W_k ; W_v ; w_eta ; w_alpha] ((2d+2) x d). A call is cut into
segments exactly as the reference does (chunk phase counts from position 0; segment n holds tokens
[max(nC - p%C, 0), min((n+1)C - p%C, T)) for a call that starts at position p). In a segment of L tokens every row
block X follows X_t = X_A + alpha_t (X_{t-1} - X_A) - eps eta_t X_{t-1} k_t k_tᵀ + w_t k_tᵀ with writes w_t known at
the segment start; X_A is the retention anchor (the block of z0 under memory_retention="init", 0 under "zero").
With lg_t = Σ_{s<=t} log alpha_s (within the segment), gamma_t = exp(lg_t) and n_j = w_j - eps eta_j X_{j-1} k_j:

    X_t = X_A + gamma_t (X_0 - X_A) + Σ_{j<=t} (gamma_t/gamma_j) n_j k_jᵀ,
    n_t = w_t - eps eta_t [gamma_{t-1} X_0 + (1 - gamma_{t-1}) X_A] k_t - Σ_{j<t} A[t,j] n_j,
    A[t,j] = eps eta_t (gamma_{t-1}/gamma_j) k_j.k_t,

so, rows t of the L x R matrices N, Wr (writes) and with T = (I + A)^-1 (one unit-lower-triangular inverse per
segment, shared by every row of Z: same keys, same transition),

    N = T Wr - (T Kd) X_0ᵀ - (T Ka) X_Aᵀ,   Kd = diag(eps eta_t gamma_{t-1}) K,   Ka = diag(eps eta_t) K - Kd,
    X_end = gamma_L X_0 + (1 - gamma_L) X_A + Nᵀ (diag(gamma_L/gamma) K).

The anchor only adds terms that are constant in the state (the checkpoints hold full states, not deviations), so
the split below is unchanged; its gradient is summed per segment (B3, B3', B4) and over the batch.

(a) The generating rows G evolve on their own: k, v, eta, alpha and G's writes -eta_t (E_G + G_c) u_t all come from
    the adaptive-chunk-start G_c (v l2-normalised with `memory_value_norm`). So `_gen_fwd_kernel` is a serial scan over segments per (batch, head) (B x H
    programs; self-modification makes the segments sequential): it emits k, v, eta, lg for every token and T for
    every segment, and advances G (checkpointed at every segment start: the backward recomputes from there).
(b) Given those, W's write w_t = V0_t + W_c p_t is affine in the chunk-start W_c: V0 = -eta r u, p = -eta u (self
    target), V0 = -eta (r k - v), p = -eta k (value target, "l2"), V0 = eta v, p = 0 (value, "dot"); r = 1 with
    `memory_residual`, else 0. For a segment that starts on a chunk boundary W_c = W_0, so in FLA's layout
    (h = Wᵀ) N^W = u' - w' h_0 with
        u' = T (V0 - Ka W_Aᵀ),   w' = T (Kd - P)     (`_main_prep_kernel`, parallel over segments and BW-wide
                                                                     column tiles: 64 wide, two tiles at d = 128)
    and the first segment of a call (whose W_c is the cached chunk start, not W_0) has
    u' = T (V0 + P W_cᵀ - Ka W_Aᵀ), w' = T Kd. Without DGD (eps = 0) A = 0 and T = I. Every row of W is independent, so `_main_state_fwd_kernel`
    passes W's state over the segments with W's rows split into BV-wide tiles across programs (the state tile
    stays in registers; checkpoints go to memory), storing N^W = v_new; `_main_out_fwd_kernel` forms
        o_t = r q_t + W_A q_t + gamma_t (W_0 - W_A) q_t + Σ_{j<=t} (gamma_t/gamma_j) (k_j.q_t) n_j
    in parallel over (segment, batch, head, tile). The reference evaluates the same closed form
    (`delta_rule_read`), so both agree to rounding. The anchor's term of u', -T Ka W_Aᵀ, is added by
    `_main_anchor_fwd_kernel` (parallel, the same column tiles), which keeps `_main_prep_kernel` within its
    registers.
(c) The backward mirrors it: `_main_dv_bwd_kernel` (dv_new from o, parallel), `_main_state_bwd_kernel` (dW over the
    segments in reverse, BV tiles, dW checkpoints), `_main_chunk_bwd_kernel` (dq, the k / lg parts of the reads and
    W's update, dw', parallel), `_main_wy_bwd_kernel` (through w', u' and T's A, parallel: dA = -Tᵀ Σ dX Xᵀ over
    the products X = T Y), `_main_anchor_bwd_kernel` (B3a, parallel: every term of W's retention anchor, which
    B3 and B3' leave out), `_gen_bwd_kernel` (B4, the reverse serial scan of G: k, v, eta, lg, T and the norms of
    k_raw, v_raw are read back from K1, G from its checkpoints) and `_gen_da_kernel` (B5, parallel: da from the
    gradients of k_raw, v_raw and the logits that B4 leaves in its work buffers). Memory: O(T/C (3d+2) d)
    checkpoints plus O(T d) per-token buffers and O(T C) for T, per (batch, head).

Where T is needed the products involving it run in fp32 (tf32); the state products take 16-bit operands for 16-bit
inputs (hope_kernels/titans/_common.py). Decays are exp of non-positive log sums only (no 1/gamma).

Constraints (ValueError otherwise): momentum=False; 1 <= d <= 128; 1 <= chunk_size <= 128; q and a of one dtype
among float32, float16, bfloat16; CUDA tensors (or CPU tensors under TRITON_INTERPRET=1). o and the input
gradients come back in the input dtype, the states and their gradients in fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels.titans._common import (
    block_sizes,
    block_v,
    check_kernel_inputs,
    check_no_momentum,
    cotangent,
    device_fn,
    dot_precision,
    launch,
    launch_options,
    log_sigmoid,
    low_precision_dots,
    mm,
    num_segments,
    sigmoid,
    unit_lower_inverse,
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

__all__ = ["titans_memory_triton"]


# ------------------------------------------------------------------------------------- segment geometry


@device_fn
def _segment(n, C, shift, T):
    """First token and length of segment n."""
    start = tl.maximum(n * C - shift, 0)
    return start, tl.minimum((n + 1) * C - shift, T) - start


@device_fn
def _gc_slot(n, C, CA, phase, shift, T):
    """Which generating state segment n reads: -1 for the call's input chunk start, else the checkpoint slot of the
    last adaptive-chunk boundary inside the call (boundaries are chunk boundaries, so they start segments). phase:
    the call's start position modulo CA, all the slot depends on (the position itself overflows int32 arithmetic
    within 2^31 tokens of a cached sequence; the phase stays below CA)."""
    start, _ = _segment(n, C, shift, T)
    pb = ((phase + start) // CA) * CA
    slot = (pb - (phase - shift)) // C
    return tl.where(pb > phase, slot, -1)


# ------------------------------------------------------------------------ (a) the generating memories


@device_fn
def _gen_reads(a, a_row, valid, gc, k_row, v_row, mt, b_eta, b_alpha, eta_max, resid, d, offs_d, md,
               BC: tl.constexpr, D: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
               VNORM: tl.constexpr):
    """k, v, eta, log alpha of a segment's tokens from the chunk-start generating memories gc (Eq. 90, residual;
    v l2-normalised with `memory_value_norm`), and the norms of the unnormalised k and v (for the backward). k and v
    go to their buffers (rows k_row, v_row: (BC,) pointers) in BW-wide column tiles, unnormalised first, then
    scaled in place once the norms are known: whole (D, D) blocks of W_k and W_v with both (BC, D) products live
    spilled at d = 128. a: (BC, D) fp32, a_row its (BC,) row pointers (the residual's columns are read back). The
    residual's identity is added after the product, a (W + r I)ᵀ = a Wᵀ + r a: no identity tile, which the
    compiler would keep live across the scan's segments."""
    w_eta = tl.load(gc + 2 * d * d + offs_d, mask=md, other=0.0)
    w_alpha = tl.load(gc + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
    sig_eta = sigmoid(tl.sum(a * w_eta[None, :], 1) + b_eta)
    pre_alpha = tl.sum(a * w_alpha[None, :], 1) + b_alpha
    if BW == D:  # one tile: a constant trip count, which the compiler folds away (a runtime one spilled at d = 64)
        hi = D
    else:  # a runtime loop (a constant bound spilled more at d = 128)
        hi = d
    ksq = tl.zeros([BC], dtype=tl.float32)
    vsq = tl.zeros([BC], dtype=tl.float32)
    for c0 in range(0, hi, BW):
        cols = c0 + tl.arange(0, BW)
        mc = cols < d
        m2 = mt[:, None] & mc[None, :]
        woff = cols[:, None] * d + offs_d[None, :]
        wm = mc[:, None] & md[None, :]
        k_raw = mm(a, tl.trans(tl.load(gc + woff, mask=wm, other=0.0)), PREC, LOWP)
        v = mm(a, tl.trans(tl.load(gc + d * d + woff, mask=wm, other=0.0)), PREC, LOWP)
        ra = resid * tl.load(a_row[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        k_raw += ra  # after both products: the two accumulators are not live together with the adds
        v += ra
        ksq += tl.sum(k_raw * k_raw, 1)
        vsq += tl.sum(v * v, 1)
        tl.store(k_row[:, None] + cols[None, :], k_raw, mask=m2)
        tl.store(v_row[:, None] + cols[None, :], v, mask=m2)
    nrm = tl.sqrt(ksq)
    vnrm = tl.sqrt(vsq)
    tl.debug_barrier()  # the tiles are read back by other threads
    for c0 in range(0, hi, BW):
        cols = c0 + tl.arange(0, BW)
        m2 = mt[:, None] & (cols < d)[None, :]
        k_raw = tl.load(k_row[:, None] + cols[None, :], mask=m2, other=0.0)
        tl.store(k_row[:, None] + cols[None, :], k_raw / tl.maximum(nrm, 1e-12)[:, None], mask=m2)
        if VNORM:
            v = tl.load(v_row[:, None] + cols[None, :], mask=m2, other=0.0)
            tl.store(v_row[:, None] + cols[None, :], v / tl.maximum(vnrm, 1e-12)[:, None], mask=m2)
    return eta_max * sig_eta * valid, log_sigmoid(pre_alpha) * valid, nrm, vnrm


@device_fn
def _delta_coefficients(k, eta, la, eps, offs_c, PREC: tl.constexpr):
    """A of the segment (strictly lower), lg (within-segment log gamma) and lg_end; the row scalings that use them
    (Kd's eps eta_t gamma_{t-1}, gamma_L / gamma_t) are formed per row tile (`_gen_tile_fwd`)."""
    lg = tl.cumsum(la, 0)
    lg_end = tl.sum(la, 0)
    before = offs_c[None, :] < offs_c[:, None]  # [t, j]: j < t
    kk = tl.dot(k, tl.trans(k), input_precision=PREC)
    A = tl.where(before, eps * eta[:, None] * tl.exp(tl.where(before, (lg - la)[:, None] - lg[None, :], 0.0)) * kk,
                 0.0)
    return A, lg, lg_end


@device_fn
def _gen_tile_rows(t, NRT: tl.constexpr, BR: tl.constexpr, r_sq, d, resid, AD_K: tl.constexpr, AD_V: tl.constexpr,
                   AD_E: tl.constexpr, AD_A: tl.constexpr):
    """Row tile t of the generating state G = [W_k ; W_v ; w_eta ; w_alpha] in K1's and B4's tile loops: tiles
    0 .. 2 NRT - 1 cover W_k and W_v in BR rows, the last covers w_eta and w_alpha (two rows used). Returns the
    block (0, 1, 2), the rows within it (BR,), which exist, which learn (the adaptive rows) and the block's identity
    weight (resid for the square blocks, 0 for w_eta, w_alpha)."""
    blk = t // NRT
    rloc = (t % NRT) * BR + r_sq
    sq = blk < 2
    mr = rloc < tl.where(sq, d, 2)
    learns = ((blk == 0) & AD_K) | ((blk == 1) & AD_V)
    learn = mr & (learns | ((blk == 2) & (((rloc == 0) & AD_E) | ((rloc == 1) & AD_A))))
    return blk, rloc, mr, learn, tl.where(sq, resid, 0.0)


@device_fn
def _gen_tile_fwd(gc, g0, g1, anc, rloc, mr, learn, er, d, k_ptr, v_ptr, eta_ptr, lg_ptr, kt_ptr, bh, T, start, lg_end,
                  eps, offs_c, mt, offs_d, md, opq, D: tl.constexpr, OBJ_L2: tl.constexpr, ANCHOR: tl.constexpr,
                  PREC: tl.constexpr, LOWP: tl.constexpr):
    """One row tile of G through a segment, with the writes Wr = -eta U (E + X_c)ᵀ = EU (E + X_c)ᵀ,
    Y = Wr - diag(kd) K X_0ᵀ [- diag(ka) K X_Aᵀ] and N = T Y (= T Wr - (T Kd) X_0ᵀ - (T Ka) X_Aᵀ):
    X_end = gamma_L X_0 [+ (1 - gamma_L) X_A] + (diag(kappa) N)ᵀ K = gamma_L X_0 [+ (1 - gamma_L) X_A] + Yᵀ K~ with
    K~ = Tᵀ diag(kappa) K, formed once per segment (`_gen_fwd_kernel`). So the tile forms Yᵀ (rows of the tile x
    tokens) and Yᵀ K~, two chained products as in attention, the row scalings folded into the keys and the sum into
    the accumulator (rows that do not learn keep X_0; the bracketed terms are the retention anchor X_A of
    memory_retention="init"). k, v, eta, lg and K~ are read back per tile from the buffers the scan stored them in,
    so that nothing of the segment's reads stays live across the tiles (see `_gen_fwd_kernel`). gc, g0, g1, anc
    point at the tile's block in the chunk-start, segment-start, segment-end and anchor states; rloc (BR,) are the
    rows within the block, er the identity weight of the block (resid for square blocks, 0 for w_eta, w_alpha); opq
    is 0, but the compiler cannot know it (it keeps the tile's address tiles inside the tile loop)."""
    row = bh * T + start + opq + offs_c
    m2 = mt[:, None] & md[None, :]
    Kt = tl.load(kt_ptr + (offs_c[:, None] + opq) * D + offs_d[None, :])
    k = tl.load(k_ptr + row[:, None] * d + offs_d[None, :], mask=m2, other=0.0)
    v = tl.load(v_ptr + row[:, None] * d + offs_d[None, :], mask=m2, other=0.0)
    eta = tl.load(eta_ptr + row, mask=mt, other=0.0)
    lg_prev = _lg_before(lg_ptr, bh, T, start + opq, offs_c, mt)
    if OBJ_L2:
        EU = -eta[:, None] * (k - v)
    else:
        EU = eta[:, None] * v
    kd_scale = eps * eta * tl.exp(lg_prev)
    gamma_end = tl.exp(lg_end)
    xoff = rloc[:, None] * d + offs_d[None, :]
    m = mr[:, None] & md[None, :]
    Xh = tl.load(gc + xoff, mask=m, other=0.0) + tl.where(m & (rloc[:, None] == offs_d[None, :]), er, 0.0)
    X0 = tl.load(g0 + xoff, mask=m, other=0.0)
    Yt = tl.dot(X0, tl.trans(-kd_scale[:, None] * k), acc=mm(Xh, tl.trans(EU), PREC, LOWP), input_precision=PREC)
    Xe = gamma_end * X0
    if ANCHOR:
        # Ka = diag(eps eta_t (1 - gamma_{t-1})) K: the anchor's part of the DGD term
        XA = tl.load(anc + xoff, mask=m, other=0.0)
        Yt = tl.dot(XA, tl.trans((kd_scale - eps * eta)[:, None] * k), acc=Yt, input_precision=PREC)
        Xe += (1.0 - gamma_end) * XA
    Xe = tl.dot(Yt, Kt, acc=Xe, input_precision=PREC)  # K~ holds T: fp32 (tf32), as every product with T
    tl.store(g1 + xoff, tl.where(learn[:, None], Xe, X0), mask=m)


@triton.jit
def _gen_fwd_kernel(
    a_ptr, valid_ptr, gc_in_ptr, g_ptr, anc_ptr, k_ptr, v_ptr, eta_ptr, lg_ptr, nrm_ptr, tmat_ptr, kt_ptr,
    b_eta_ptr, b_alpha_ptr,
    T, H, d, C, CA, phase, shift, NSEG, eta_max, eps, resid, gc_bh, g_bh, g_slot, anc_h,
    BC: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr, OBJ_L2: tl.constexpr,
    AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
    HAS_MASK: tl.constexpr, VNORM: tl.constexpr, ANCHOR: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """K1: serial scan of the generating memories over the segments of one (batch, head). Slot 0 of g holds the
    call's start state; slot n+1 receives the state after segment n. anc: the heads' retention anchors G_0
    (ANCHOR), anc_h apart. kt: this program's (BC, D) buffer of the segment's K~ = Tᵀ diag(kappa) K, read back by
    the row tiles."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    b_eta = tl.load(b_eta_ptr + h)
    b_alpha = tl.load(b_alpha_ptr + h)
    g_base = g_ptr + bh * g_bh
    anc = anc_ptr + h * anc_h
    r_sq = tl.arange(0, BR)
    kt = kt_ptr + bh * BC * D
    for n in range(0, NSEG):
        start, L = _segment(n, C, shift, T)
        mt = offs_c < L
        tok = start + offs_c
        m2 = mt[:, None] & md[None, :]
        a_row = a_ptr + ((b * T + tok) * H + h) * d
        a = tl.load(a_row[:, None] + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = tl.load(valid_ptr + b * T + tok, mask=mt, other=0.0)
        else:
            valid = tl.where(mt, 1.0, 0.0)
        slot = _gc_slot(n, C, CA, phase, shift, T)
        if slot < 0:
            gc = gc_in_ptr + bh * gc_bh
        else:
            gc = g_base + slot * g_slot
        g0 = g_base + n * g_slot
        g1 = g0 + g_slot

        row = (bh * T + tok)
        eta, la, knrm, vnrm = _gen_reads(a, a_row, valid, gc, k_ptr + row * d, v_ptr + row * d, mt, b_eta, b_alpha,
                                         eta_max, resid, d, offs_d, md, BC, D, BW, PREC, LOWP, VNORM)
        # k read back from its buffer (`_gen_reads` stores it there, by column tiles) for A and, after the
        # inverse, for K~: a load, not a product's result, so it takes no wide layout and is not live across the
        # inverse (see `unit_lower_inverse`)
        tl.debug_barrier()
        A, lg, lg_end = _delta_coefficients(tl.load(k_ptr + row[:, None] * d + offs_d[None, :], mask=m2, other=0.0),
                                            eta, la, eps, offs_c, PREC)
        tl.store(eta_ptr + row, eta, mask=mt)
        tl.store(lg_ptr + row, lg, mask=mt)
        tl.store(nrm_ptr + 2 * row, knrm, mask=mt)
        tl.store(nrm_ptr + 2 * row + 1, vnrm, mask=mt)
        tm = tmat_ptr + (bh * NSEG + n) * BC * BC
        Tm = unit_lower_inverse(A, tm, offs_c, BC, PREC)
        # K~ = Tᵀ diag(kappa) K, kappa_t = gamma_L / gamma_t: the tiles' X_end = ... + Yᵀ K~ (`_gen_tile_fwd`)
        k = tl.load(k_ptr + row[:, None] * d + offs_d[None, :], mask=m2, other=0.0)  # the inverse's barriers order it
        Kt = tl.dot(tl.trans(Tm), tl.exp(lg_end - lg)[:, None] * k, input_precision=PREC)
        tl.store(kt + offs_c[:, None] * D + offs_d[None, :], Kt)
        tl.debug_barrier()  # the row tiles read back k, v, eta, lg and K~, stored above by other threads
        # One runtime loop over the row tiles of W_k, W_v and, in a last tile of which two rows are used, w_eta and
        # w_alpha (rows of a block that does not learn are stored unchanged), not an unrolled one, reading the
        # segment's k, v, eta, lg and K~ back per tile, with addresses that depend on the tile through `opq` (always
        # 0: the grid is 1-D): otherwise the compiler interleaves the tiles or hoists their loop-invariant (BC, D)
        # tiles out of the loop. A single tile body also keeps one set of the tensor-core operand descriptors, which
        # the compiler holds across the whole scan (figures: benchmarks/NOTES.md, results/sm90_check.md).
        NRT: tl.constexpr = D // BR
        for t in range(0, 2 * NRT + 1):
            blk, rloc, mr, learn, er = _gen_tile_rows(t, NRT, BR, r_sq, d, resid, AD_K, AD_V, AD_E, AD_A)
            opq = t * tl.program_id(1)
            _gen_tile_fwd(gc + blk * d * d, g0 + blk * d * d, g1 + blk * d * d, anc + blk * d * d, rloc, mr,
                          learn, er, d, k_ptr, v_ptr, eta_ptr, lg_ptr, kt, bh, T, start,
                          lg_end, eps, offs_c, mt, offs_d, md, opq, D, OBJ_L2, ANCHOR, PREC, LOWP)
        tl.debug_barrier()  # the next segment reads the state (and maybe its chunk start) stored here


# ------------------------------------------------------------------------------- (b) the main memory W


@device_fn
def _main_writes(k, v, eta, resid, OBJ_L2: tl.constexpr, VALUE: tl.constexpr):
    """W's write w_t = V0_t + W_c p_t (SPEC §2; value target: M regresses on v_t)."""
    if OBJ_L2:
        U = k - v
    else:
        U = -v
    if VALUE:
        if OBJ_L2:
            V0 = -eta[:, None] * (resid * k - v)
            P = -eta[:, None] * k
        else:
            V0 = eta[:, None] * v
            P = v * 0.0
    else:
        V0 = -eta[:, None] * resid * U
        P = -eta[:, None] * U
    return V0, P


@device_fn
def _load_tokens(ptr, bh, T, start, offs_c, mt, offs_d, md, d):
    """A (BC, D) tile of a (BH, T, d) fp32 buffer."""
    row = bh * T + start + offs_c
    return tl.load(ptr + row[:, None] * d + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)


@device_fn
def _lg_before(lg_ptr, bh, T, start, offs_c, mt):
    """lg_{t-1} within the segment (0 at its first token)."""
    row = bh * T + start + offs_c
    return tl.load(lg_ptr + row - 1, mask=mt & (offs_c > 0), other=0.0)


@triton.jit
def _main_prep_kernel(
    k_ptr, v_ptr, eta_ptr, lg_ptr, tmat_ptr, wc_ptr, wp_ptr, up_ptr,
    T, C, shift, NSEG, d, eps, resid, wc_bh,
    BC: tl.constexpr, D: tl.constexpr, BW: tl.constexpr, OBJ_L2: tl.constexpr, VALUE: tl.constexpr,
    PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """w', u' of one segment, columns [iw BW, (iw+1) BW) (parallel over segments and column tiles): N^W = u' - w' h_0.
    Every term but the call's first segment's P W_cᵀ is column-wise, so at d = 128 two 64-wide tiles keep a C x d
    product and its operands out of each program's registers."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BW + tl.arange(0, BW)
    mc = cols < d
    offs_c = tl.arange(0, BC)
    start, L = _segment(n, C, shift, T)
    mt = offs_c < L
    k = _load_tokens(k_ptr, bh, T, start, offs_c, mt, cols, mc, d)
    v = _load_tokens(v_ptr, bh, T, start, offs_c, mt, cols, mc, d)
    row = bh * T + start + offs_c
    eta = tl.load(eta_ptr + row, mask=mt, other=0.0)
    Tm = tl.load(tmat_ptr + (bh * NSEG + n) * BC * BC + offs_c[:, None] * BC + offs_c[None, :])
    V0, P = _main_writes(k, v, eta, resid, OBJ_L2, VALUE)
    Kd = (eps * eta * tl.exp(_lg_before(lg_ptr, bh, T, start, offs_c, mt)))[:, None] * k
    if n == 0:  # the call's own chunk-start W_c (a cached state may sit mid-chunk): W_c's rows `cols`, all of P
        offs_d = tl.arange(0, D)
        md = offs_d < d
        if BW == D:
            P_all = P
        else:
            k_all = _load_tokens(k_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
            v_all = _load_tokens(v_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
            _v0, P_all = _main_writes(k_all, v_all, eta, resid, OBJ_L2, VALUE)
        Wc = tl.load(wc_ptr + bh * wc_bh + cols[:, None] * d + offs_d[None, :], mask=mc[:, None] & md[None, :],
                     other=0.0)
        up = tl.dot(Tm, V0 + mm(P_all, tl.trans(Wc), PREC, LOWP), input_precision=PREC)
        wp = tl.dot(Tm, Kd, input_precision=PREC)
    else:
        up = tl.dot(Tm, V0, input_precision=PREC)
        wp = tl.dot(Tm, Kd - P, input_precision=PREC)
    out = row[:, None] * d + cols[None, :]
    m2 = mt[:, None] & mc[None, :]
    tl.store(up_ptr + out, up, mask=m2)
    tl.store(wp_ptr + out, wp, mask=m2)


@triton.jit
def _main_anchor_fwd_kernel(
    k_ptr, eta_ptr, lg_ptr, tmat_ptr, anc_ptr, up_ptr,
    T, H, C, shift, NSEG, d, eps, anc_h,
    BC: tl.constexpr, D: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """The retention anchor's term of u' (memory_retention="init"), columns [iw BW, (iw+1) BW), parallel over
    (segment, batch-head, column tile): u' -= T Ka W_Aᵀ, Ka = diag(eps eta_t (1 - gamma_{t-1})) K, the anchor's part
    of the DGD term eps eta_t W_{t-1} k_t. Kept out of `_main_prep_kernel`, whose registers it would overflow."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BW + tl.arange(0, BW)
    mc = cols < d
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    start, L = _segment(n, C, shift, T)
    mt = offs_c < L
    row = bh * T + start + offs_c
    k = _load_tokens(k_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
    eta = tl.load(eta_ptr + row, mask=mt, other=0.0)
    ka = eps * eta * (1.0 - tl.exp(_lg_before(lg_ptr, bh, T, start, offs_c, mt)))
    Wa = tl.load(anc_ptr + (bh % H) * anc_h + cols[:, None] * d + offs_d[None, :], mask=mc[:, None] & md[None, :],
                 other=0.0)
    KaW = mm(ka[:, None] * k, tl.trans(Wa), PREC, LOWP)
    Tm = tl.load(tmat_ptr + (bh * NSEG + n) * BC * BC + offs_c[:, None] * BC + offs_c[None, :])
    out = row[:, None] * d + cols[None, :]
    m2 = mt[:, None] & mc[None, :]
    up = tl.load(up_ptr + out, mask=m2, other=0.0) - tl.dot(Tm, KaW, input_precision=PREC)
    tl.store(up_ptr + out, up, mask=m2)


@triton.jit
def _main_state_fwd_kernel(
    k_ptr, lg_ptr, wp_ptr, up_ptr, z_ptr, anc_ptr, vn_ptr,
    T, H, C, shift, NSEG, d, z_bh, z_slot, anc_h,
    BC: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, ANCHOR: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr,
):
    """K2: W's rows [iv BV, (iv+1) BV) over the segments (state in registers); v_new = u' - w' h_0 stored for the
    output and the backward, the state after every segment stored in slot n+1 of z. The retention anchor W_A
    (ANCHOR) adds (1 - gamma_L) W_A to every segment's end state."""
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    rows = iv * BV + tl.arange(0, BV)
    mr = rows < d
    woff = rows[:, None] * d + offs_d[None, :]
    wm = mr[:, None] & md[None, :]
    z_base = z_ptr + bh * z_bh
    W = tl.load(z_base + woff, mask=wm, other=0.0)
    if ANCHOR:
        Wa = tl.load(anc_ptr + (bh % H) * anc_h + woff, mask=wm, other=0.0)
    for n in range(0, NSEG):
        start, L = _segment(n, C, shift, T)
        mt = offs_c < L
        row = bh * T + start + offs_c
        k = _load_tokens(k_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
        wp = _load_tokens(wp_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
        vm = mt[:, None] & mr[None, :]
        up = tl.load(up_ptr + row[:, None] * d + rows[None, :], mask=vm, other=0.0)
        lg = tl.load(lg_ptr + row, mask=mt, other=0.0)
        lg_end = tl.sum(tl.where(offs_c == L - 1, lg, 0.0), 0)
        vn = up - mm(wp, tl.trans(W), PREC, LOWP)
        tl.store(vn_ptr + row[:, None] * d + rows[None, :], vn, mask=vm)
        Kt = tl.where(mt, tl.exp(lg_end - lg), 0.0)[:, None] * k
        if ANCHOR:
            W = Wa + tl.exp(lg_end) * (W - Wa) + mm(tl.trans(vn), Kt, PREC, LOWP)
        else:
            W = tl.exp(lg_end) * W + mm(tl.trans(vn), Kt, PREC, LOWP)
        tl.store(z_base + (n + 1) * z_slot + woff, W, mask=wm)


@triton.jit
def _main_out_fwd_kernel(
    q_ptr, k_ptr, lg_ptr, vn_ptr, z_ptr, anc_ptr, o_ptr,
    T, H, C, shift, d, z_bh, z_slot, anc_h, resid,
    BC: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, ANCHOR: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr,
):
    """K3: o_t = r q_t + gamma_t W_0 q_t + Σ_{j<=t} (gamma_t/gamma_j)(k_j.q_t) n_j, parallel over segments; with
    the retention anchor W_A, gamma_t W_0 q_t becomes W_A q_t + gamma_t (W_0 - W_A) q_t."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    rows = iv * BV + tl.arange(0, BV)
    mr = rows < d
    start, L = _segment(n, C, shift, T)
    mt = offs_c < L
    tok = (b * T + start + offs_c) * H + h
    q = tl.load(q_ptr + tok[:, None] * d + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0).to(tl.float32)
    vm = mt[:, None] & mr[None, :]
    q_tile = tl.load(q_ptr + tok[:, None] * d + rows[None, :], mask=vm, other=0.0).to(tl.float32)
    k = _load_tokens(k_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
    row = bh * T + start + offs_c
    lg = tl.load(lg_ptr + row, mask=mt, other=0.0)
    vn = tl.load(vn_ptr + row[:, None] * d + rows[None, :], mask=vm, other=0.0)
    woff = rows[:, None] * d + offs_d[None, :]
    wm = mr[:, None] & md[None, :]
    W0 = tl.load(z_ptr + bh * z_bh + n * z_slot + woff, mask=wm, other=0.0)
    causal = (offs_c[None, :] <= offs_c[:, None]) & mt[:, None]  # [t, j]: j <= t < L
    qk = mm(q, tl.trans(k), PREC, LOWP)
    decay = tl.exp(tl.where(causal, lg[:, None] - lg[None, :], float("-inf")))
    o = resid * q_tile + mm(qk * decay, vn, PREC, LOWP)
    if ANCHOR:
        Wa = tl.load(anc_ptr + h * anc_h + woff, mask=wm, other=0.0)
        o += mm(q, tl.trans(Wa), PREC, LOWP) + tl.exp(lg)[:, None] * mm(q, tl.trans(W0 - Wa), PREC, LOWP)
    else:
        o += tl.exp(lg)[:, None] * mm(q, tl.trans(W0), PREC, LOWP)
    tl.store(o_ptr + tok[:, None] * d + rows[None, :], o.to(o_ptr.dtype.element_ty), mask=vm)



# ------------------------------------------------------------------------------------------- backward


@triton.jit
def _main_dv_bwd_kernel(
    q_ptr, k_ptr, lg_ptr, do_ptr, dv_ptr,
    T, H, C, shift, d,
    BC: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """B1: dv_new from the reads, (Gamma ⊙ Q Kᵀ)ᵀ dO, parallel over (segment, batch-head, tile)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    rows = iv * BV + tl.arange(0, BV)
    mr = rows < d
    start, L = _segment(n, C, shift, T)
    mt = offs_c < L
    tok = (b * T + start + offs_c) * H + h
    vm = mt[:, None] & mr[None, :]
    q = tl.load(q_ptr + tok[:, None] * d + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + tok[:, None] * d + rows[None, :], mask=vm, other=0.0).to(tl.float32)
    k = _load_tokens(k_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
    row = bh * T + start + offs_c
    lg = tl.load(lg_ptr + row, mask=mt, other=0.0)
    causal = (offs_c[None, :] <= offs_c[:, None]) & mt[:, None]  # [t, j]: j <= t < L
    kq = mm(k, tl.trans(q), PREC, LOWP)  # [j, t]
    decay = tl.exp(tl.where(tl.trans(causal), lg[None, :] - lg[:, None], float("-inf")))  # [j, t]
    tl.store(dv_ptr + row[:, None] * d + rows[None, :], mm(kq * decay, do, PREC, LOWP), mask=vm)


@triton.jit
def _main_state_bwd_kernel(
    q_ptr, k_ptr, lg_ptr, wp_ptr, do_ptr, dv_ptr, dw_init_ptr, dzc_w_ptr, dwbuf_ptr, dw_out_ptr,
    T, H, C, shift, NSEG, d, W_SLOT,
    BC: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """B2: gradient of W's state over the segments in reverse (rows tiled by BV). Stores dW_{n+1} (slot n of dwbuf)
    for B3, turns dv from the reads into the total dv_new (in place), and returns dW_0. W_SLOT: the segment whose
    start state is the final chunk start (it receives that state's cotangent dzc_w), or -1."""
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    rows = iv * BV + tl.arange(0, BV)
    mr = rows < d
    woff = rows[:, None] * d + offs_d[None, :]
    wm = mr[:, None] & md[None, :]
    dW = tl.load(dw_init_ptr + bh * d * d + woff, mask=wm, other=0.0)
    for i in range(0, NSEG):
        n = NSEG - 1 - i
        start, L = _segment(n, C, shift, T)
        mt = offs_c < L
        row = bh * T + start + offs_c
        tok = (b * T + start + offs_c) * H + h
        vm = mt[:, None] & mr[None, :]
        tl.store(dwbuf_ptr + (bh * NSEG + n) * d * d + woff, dW, mask=wm)
        k = _load_tokens(k_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
        wp = _load_tokens(wp_ptr, bh, T, start, offs_c, mt, offs_d, md, d)
        q = tl.load(q_ptr + tok[:, None] * d + offs_d[None, :], mask=mt[:, None] & md[None, :],
                    other=0.0).to(tl.float32)
        do = tl.load(do_ptr + tok[:, None] * d + rows[None, :], mask=vm, other=0.0).to(tl.float32)
        lg = tl.load(lg_ptr + row, mask=mt, other=0.0)
        lg_end = tl.sum(tl.where(offs_c == L - 1, lg, 0.0), 0)
        Kt = tl.where(mt, tl.exp(lg_end - lg), 0.0)[:, None] * k
        dv = tl.load(dv_ptr + row[:, None] * d + rows[None, :], mask=vm, other=0.0) + mm(Kt, tl.trans(dW), PREC, LOWP)
        tl.store(dv_ptr + row[:, None] * d + rows[None, :], dv, mask=vm)
        gamma = tl.where(mt, tl.exp(lg), 0.0)
        dW = tl.exp(lg_end) * dW - mm(tl.trans(dv), wp, PREC, LOWP) + mm(tl.trans(gamma[:, None] * do), q, PREC, LOWP)
        if n == W_SLOT:
            dW += tl.load(dzc_w_ptr + bh * d * d + woff, mask=wm, other=0.0)
    tl.store(dw_out_ptr + bh * d * d + woff, dW, mask=wm)


@device_fn
def _tri_rows(dA, kk, eta, lg, la, eps, offs_c):
    """Gradients through A[t,j] = eps eta_t exp(lg_{t-1} - lg_j) k_j.k_t (j < t) given dA (already strictly lower)
    and kk = K Kᵀ: returns dKK + dKKᵀ (dk = (dKK + dKKᵀ) k), deta, dlg, dla. lg_{t-1} = lg_t - la_t routes the row
    terms to lg_t and (minus) la_t."""
    lgb = lg - la
    before = offs_c[None, :] < offs_c[:, None]
    F_ = tl.where(before, eps * tl.exp(tl.where(before, lgb[:, None] - lg[None, :], 0.0)), 0.0)
    dKK = eta[:, None] * F_ * dA
    deta = tl.sum(dA * F_ * kk, 1)
    GA = dKK * kk  # = dA ⊙ A
    row = tl.sum(GA, 1)
    return dKK + tl.trans(dKK), deta, row - tl.sum(GA, 0), -row


@triton.jit
def _main_chunk_bwd_kernel(
    q_ptr, k_ptr, lg_ptr, vn_ptr, dv_ptr, do_ptr, z_ptr, dwbuf_ptr, dq_ptr, dk_ptr, dlg_ptr, dwp_ptr,
    T, H, C, shift, NSEG, d, z_bh, z_slot, resid,
    BC: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """B3, parallel over (segment, batch-head), W's rows in BV tiles: dq, the gradients of k and lg through the reads
    and W's state update, and dw' = -dv_new W_0 (for `_main_wy_bwd_kernel`)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    start, L = _segment(n, C, shift, T)
    mt = offs_c < L
    m2 = mt[:, None] & md[None, :]
    row = bh * T + start + offs_c
    # 64-bit bases of the segment's tiles, 32-bit offsets within them: (BH, T, d) buffers, (B, T, H, d) q and dO
    base = (bh * T + start) * d
    qbase = ((b * T + start) * H + h) * d
    z_n = z_ptr + bh * z_bh + n * z_slot
    dwe_n = dwbuf_ptr + (bh * NSEG + n) * d * d

    dq_state = tl.zeros([BC, D], dtype=tl.float32)  # Σ_tiles dO W_n (before the gamma_t weight)
    dS = tl.zeros([BC, BC], dtype=tl.float32)  # [t, j] = dO_t . v_new_j
    dKt = tl.zeros([BC, D], dtype=tl.float32)
    dwp = tl.zeros([BC, D], dtype=tl.float32)
    dgamma_end = 0.0
    for iv in range(0, tl.cdiv(d, BV)):
        rows = iv * BV + tl.arange(0, BV)
        mr = rows < d
        vm = mt[:, None] & mr[None, :]
        wm = mr[:, None] & md[None, :]
        woff = rows[:, None] * d + offs_d[None, :]
        Wn = tl.load(z_n + woff, mask=wm, other=0.0)
        dWe = tl.load(dwe_n + woff, mask=wm, other=0.0)
        vn = tl.load(vn_ptr + base + (offs_c[:, None] * d + rows[None, :]), mask=vm, other=0.0)
        dvt = tl.load(dv_ptr + base + (offs_c[:, None] * d + rows[None, :]), mask=vm, other=0.0)
        do = tl.load(do_ptr + qbase + (offs_c[:, None] * (H * d) + rows[None, :]), mask=vm, other=0.0).to(tl.float32)
        dq_state += mm(do, Wn, PREC, LOWP)
        dS += mm(do, tl.trans(vn), PREC, LOWP)
        dKt += mm(vn, dWe, PREC, LOWP)
        dgamma_end += tl.sum(tl.sum(Wn * dWe, 1), 0)
        dwp -= mm(dvt, Wn, PREC, LOWP)
    out = offs_c[:, None] * d + offs_d[None, :]
    qout = offs_c[:, None] * (H * d) + offs_d[None, :]
    tl.store(dwp_ptr + base + out, dwp, mask=m2)
    lg = tl.load(lg_ptr + row, mask=mt, other=0.0)
    lg_end = tl.sum(tl.where(offs_c == L - 1, lg, 0.0), 0)
    k = tl.load(k_ptr + base + out, mask=m2, other=0.0)
    # W's update, Σ_j (gamma_L / gamma_j) n_j k_jᵀ: its k part kappa dKt and lg part c, formed first so that dKt dies
    kappa = tl.where(mt, tl.exp(lg_end - lg), 0.0)
    c = kappa * tl.sum(k * dKt, 1)
    dk = kappa[:, None] * dKt
    causal = (offs_c[None, :] <= offs_c[:, None]) & mt[:, None]
    decay = tl.exp(tl.where(causal, lg[:, None] - lg[None, :], float("-inf")))
    dSd = dS * decay  # the gradient of (Q Kᵀ)[t, j]
    q = tl.load(q_ptr + qbase + qout, mask=m2, other=0.0).to(tl.float32)
    gamma = tl.where(mt, tl.exp(lg), 0.0)
    dlg = gamma * tl.sum(dq_state * q, 1)
    dq_state = gamma[:, None] * dq_state + resid * tl.load(do_ptr + qbase + qout, mask=m2, other=0.0).to(tl.float32)
    dq = dq_state + mm(dSd, k, PREC, LOWP)
    tl.store(dq_ptr + qbase + qout, dq.to(dq_ptr.dtype.element_ty), mask=m2)
    gd = dSd * mm(q, tl.trans(k), PREC, LOWP)
    dlg += tl.sum(gd, 1) - tl.sum(gd, 0) - c
    dlg += tl.where(offs_c == L - 1, tl.sum(c, 0) + tl.exp(lg_end) * dgamma_end, 0.0)
    tl.store(dlg_ptr + row, dlg, mask=mt)
    tl.store(dk_ptr + base + out, mm(tl.trans(dSd), q, PREC, LOWP) + dk, mask=m2)


@triton.jit
def _main_wy_bwd_kernel(
    k_ptr, v_ptr, eta_ptr, lg_ptr, tmat_ptr, wp_ptr, up_ptr, dv_ptr, dwp_ptr, wc_ptr,
    dk_ptr, dvx_ptr, deta_ptr, dlg_ptr, dla_ptr, dwc_ptr,
    T, C, shift, NSEG, d, wc_bh, eps, resid,
    BC: tl.constexpr, D: tl.constexpr, BW: tl.constexpr, OBJ_L2: tl.constexpr, VALUE: tl.constexpr,
    PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """B3', parallel over (segment, batch-head): the main memory's gradient through w' = T (Kd - P) (first segment:
    T Kd), u' = T (V0 [+ P W_cᵀ]) and T = (I + A)^-1, added to B3's dk, dlg; writes dv, deta, dla (and dW_c of the
    first segment). The (BC, d) tiles go in BW-wide column tiles, twice: the C x C products (dA's M and K Kᵀ) sum
    over every column before any column's gradient; whole tiles spilled at d = 128."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BC)
    start, L = _segment(n, C, shift, T)
    mt = offs_c < L
    row = bh * T + start + offs_c
    # the segment's tiles of the (BH, T, d) buffers: a 64-bit base, 32-bit offsets within the tile
    base = (bh * T + start) * d
    Tm = tl.load(tmat_ptr + (bh * NSEG + n) * BC * BC + (offs_c[:, None] * BC + offs_c[None, :]))
    # through T = (I + A)^-1: dA = -Tᵀ Σ dX Xᵀ over the products X = T Y (w', u'), and K Kᵀ for A's own gradient
    M = tl.zeros([BC, BC], dtype=tl.float32)
    kk = tl.zeros([BC, BC], dtype=tl.float32)
    for c0 in range(0, d, BW):
        cols = c0 + tl.arange(0, BW)
        m2 = mt[:, None] & (cols < d)[None, :]
        out = offs_c[:, None] * d + cols[None, :]
        M += tl.dot(tl.load(dwp_ptr + base + out, mask=m2, other=0.0),
                    tl.trans(tl.load(wp_ptr + base + out, mask=m2, other=0.0)), input_precision=PREC)
        M += tl.dot(tl.load(dv_ptr + base + out, mask=m2, other=0.0),
                    tl.trans(tl.load(up_ptr + base + out, mask=m2, other=0.0)), input_precision=PREC)
        kc = tl.load(k_ptr + base + out, mask=m2, other=0.0)
        kk += tl.dot(kc, tl.trans(kc), input_precision=PREC)
    before = offs_c[None, :] < offs_c[:, None]
    dA = tl.where(before, -tl.dot(tl.trans(Tm), M, input_precision=PREC), 0.0)
    eta = tl.load(eta_ptr + row, mask=mt, other=0.0)
    lg = tl.load(lg_ptr + row, mask=mt, other=0.0)
    lgb = _lg_before(lg_ptr, bh, T, start, offs_c, mt)
    dKKs, deta, dlg, dla = _tri_rows(dA, kk, eta, lg, lg - lgb, eps, offs_c)
    dlg += tl.load(dlg_ptr + row, mask=mt, other=0.0)
    kd_scale = eps * eta * tl.exp(lgb)  # Kd = diag(eps eta_t gamma_{t-1}) K
    if n == 0:  # dU' W_c, parked in dv's tiles (read back, as a dot operand, before dv overwrites them): as a row
        # loop inside the column loop below it spilled
        for c0 in range(0, d, BW):
            cols = c0 + tl.arange(0, BW)
            mc = cols < d
            dUW = tl.zeros([BC, BW], dtype=tl.float32)
            for r0 in range(0, d, BW):
                rws = r0 + tl.arange(0, BW)
                mr = rws < d
                dUW += mm(tl.load(dv_ptr + base + (offs_c[:, None] * d + rws[None, :]),
                                  mask=mt[:, None] & mr[None, :], other=0.0),
                          tl.load(wc_ptr + bh * wc_bh + (rws[:, None] * d + cols[None, :]),
                                  mask=mr[:, None] & mc[None, :], other=0.0), PREC, LOWP)
            tl.store(dvx_ptr + base + (offs_c[:, None] * d + cols[None, :]), dUW, mask=mt[:, None] & mc[None, :])
        tl.debug_barrier()
    for c0 in range(0, d, BW):
        cols = c0 + tl.arange(0, BW)
        mc = cols < d
        m2 = mt[:, None] & mc[None, :]
        out = offs_c[:, None] * d + cols[None, :]
        k = tl.load(k_ptr + base + out, mask=m2, other=0.0)
        dYw = tl.dot(tl.trans(Tm), tl.load(dwp_ptr + base + out, mask=m2, other=0.0), input_precision=PREC)
        dk = (tl.load(dk_ptr + base + out, mask=m2, other=0.0) + tl.dot(dKKs, k, input_precision=PREC)
              + kd_scale[:, None] * dYw)
        dks = tl.sum(dYw * k, 1)
        deta += eps * tl.exp(lgb) * dks
        dlg += dks * kd_scale
        dla -= dks * kd_scale
        dYu = tl.dot(tl.trans(Tm), tl.load(dv_ptr + base + out, mask=m2, other=0.0), input_precision=PREC)
        if n == 0:  # dP = dY_u W_c = Tᵀ (dU' W_c)
            dP = tl.dot(tl.trans(Tm), tl.load(dvx_ptr + base + out, mask=m2, other=0.0), input_precision=PREC)
        else:
            dP = -dYw
        dV0 = dYu
        v = tl.load(v_ptr + base + out, mask=m2, other=0.0)
        dv = v * 0.0
        if VALUE:
            if OBJ_L2:  # V0 = -eta (r k - v), P = -eta k
                dk -= eta[:, None] * (resid * dV0 + dP)
                dv += eta[:, None] * dV0
                deta -= tl.sum(dV0 * (resid * k - v), 1) + tl.sum(dP * k, 1)
            else:  # V0 = eta v
                dv += eta[:, None] * dV0
                deta += tl.sum(dV0 * v, 1)
        else:  # V0 = -eta r U, P = -eta U
            if OBJ_L2:
                U = k - v
            else:
                U = -v
            dUs = resid * dV0 + dP
            deta -= tl.sum(dUs * U, 1)
            dU = -eta[:, None] * dUs
            if OBJ_L2:
                dk += dU
            dv -= dU
        if n == 0:  # every thread has read its dU' W_c from this tile (not left to the dot's own barrier)
            tl.debug_barrier()
        tl.store(dk_ptr + base + out, dk, mask=m2)
        tl.store(dvx_ptr + base + out, dv, mask=m2)
    tl.store(deta_ptr + row, deta, mask=mt)
    tl.store(dlg_ptr + row, dlg, mask=mt)
    tl.store(dla_ptr + row, dla, mask=mt)
    if n == 0:  # dW_c = dY_uᵀ P = dU'ᵀ (T P), in (BW, BW) tiles
        for c0 in range(0, d, BW):
            cols = c0 + tl.arange(0, BW)
            mc = cols < d
            m2 = mt[:, None] & mc[None, :]
            out = offs_c[:, None] * d + cols[None, :]
            _, P = _main_writes(tl.load(k_ptr + base + out, mask=m2, other=0.0),
                                tl.load(v_ptr + base + out, mask=m2, other=0.0), eta, resid, OBJ_L2, VALUE)
            TP = tl.dot(Tm, P, input_precision=PREC)
            for r0 in range(0, d, BW):
                rws = r0 + tl.arange(0, BW)
                mr = rws < d
                dup = tl.load(dv_ptr + base + (offs_c[:, None] * d + rws[None, :]), mask=mt[:, None] & mr[None, :],
                              other=0.0)
                tl.store(dwc_ptr + bh * d * d + (rws[:, None] * d + cols[None, :]), mm(tl.trans(dup), TP, PREC, LOWP),
                         mask=mr[:, None] & mc[None, :])


@triton.jit
def _main_anchor_bwd_kernel(
    q_ptr, k_ptr, eta_ptr, lg_ptr, tmat_ptr, do_ptr, dv_ptr, anc_ptr, dq32_ptr,
    dq_ptr, dk_ptr, rows_ptr, dwbuf_ptr,
    T, H, C, shift, NSEG, d, eps, anc_h, rows_iw,
    BC: tl.constexpr, D: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """B3a, parallel over (segment, batch-head, column tile): every gradient term of the main memory's retention
    anchor W_A (memory_retention="init"), after B3 and B3', which run the anchor-free algebra on the full states.
    With D_0 = W_0 - W_A the anchor adds to the reads W_A q_t - gamma_t W_A q_t, to W's end state (1 - gamma_L) W_A
    and to u' the term -T Ka W_Aᵀ (`_main_anchor_fwd_kernel`). So: dq (B3's fp32 part in dq32) gets
    (1 - gamma) dO W_A, dlg the decay terms of -gamma W_A q and of -gamma_L W_A in the end state, dk, deta, dlg, dla
    those of Ka, and slot n of dwbuf (dW_end of the segment, read by B3) is replaced by the segment's part of dW_A.
    W_A, dW_end, dW_A, dq and dk go by the column tile [iw BW, (iw+1) BW) of W_A (index j; at d = 128 the three
    d x d tiles of one program spilled 3 KB): every term is column-wise but the row sums over j in deta, dlg, dla,
    whose tile's part goes to slot iw of rows_ptr (iw, 3, BH, T), summed over the tiles by the caller."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    iw = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    cols = iw * BW + tl.arange(0, BW)
    mc = cols < d
    start, L = _segment(n, C, shift, T)
    mt = offs_c < L
    m2 = mt[:, None] & md[None, :]
    mtc = mt[:, None] & mc[None, :]
    bm = md[:, None] & mc[None, :]
    row = bh * T + start + offs_c
    # 64-bit bases of the segment's tiles, 32-bit offsets within them: (BH, T, d) buffers, (B, T, H, d) q, dO, dq
    base = (bh * T + start) * d
    qbase = ((b * T + start) * H + h) * d
    tok = offs_c[:, None] * (H * d) + cols[None, :]
    tcol = offs_c[:, None] * d + cols[None, :]
    boff = offs_d[:, None] * d + cols[None, :]
    lg = tl.load(lg_ptr + row, mask=mt, other=0.0)
    lg_end = tl.sum(tl.where(offs_c == L - 1, lg, 0.0), 0)
    gamma = tl.where(mt, tl.exp(lg), 0.0)
    do = tl.load(do_ptr + qbase + (offs_c[:, None] * (H * d) + offs_d[None, :]), mask=m2, other=0.0).to(tl.float32)
    Wa = tl.load(anc_ptr + h * anc_h + boff, mask=bm, other=0.0)
    slot = dwbuf_ptr + (bh * NSEG + n) * d * d + boff
    # the reads r q_t + W_A q_t + gamma_t (W_0 - W_A) q_t and the end state W_A + gamma_L (W_0 - W_A) + ...
    doWa = mm(do, Wa, PREC, LOWP)
    dq = tl.load(dq32_ptr + qbase + tok, mask=mtc, other=0.0) + (1.0 - gamma)[:, None] * doWa
    tl.store(dq_ptr + qbase + tok, dq.to(dq_ptr.dtype.element_ty), mask=mtc)
    q = tl.load(q_ptr + qbase + tok, mask=mtc, other=0.0).to(tl.float32)
    dlg = -gamma * tl.sum(doWa * q, 1)
    dWe = tl.load(slot, mask=bm, other=0.0)
    dlg -= tl.where(offs_c == L - 1, tl.exp(lg_end) * tl.sum(tl.sum(Wa * dWe, 1), 0), 0.0)
    dWa = (1.0 - tl.exp(lg_end)) * dWe + mm(tl.trans((1.0 - gamma)[:, None] * do), q, PREC, LOWP)
    # u' -= T Ka W_Aᵀ, Ka = diag(eps eta_t - kd_t) K, kd_t = eps eta_t gamma_{t-1}; with dY_u = Tᵀ dv the products
    # dKa = -dY_u W_A and dY_uᵀ Ka are formed as -Tᵀ (dv W_A) and dvᵀ (T Ka): C x BW, not C x d, intermediates
    tm = tmat_ptr + (bh * NSEG + n) * BC * BC + (offs_c[:, None] * BC + offs_c[None, :])
    dv = dv_ptr + base + (offs_c[:, None] * d + offs_d[None, :])
    dKa = -tl.dot(tl.trans(tl.load(tm)), mm(tl.load(dv, mask=m2, other=0.0), Wa, PREC, LOWP), input_precision=PREC)
    k = tl.load(k_ptr + base + tcol, mask=mtc, other=0.0)
    eta = tl.load(eta_ptr + row, mask=mt, other=0.0)
    kd = eps * eta * tl.exp(_lg_before(lg_ptr, bh, T, start, offs_c, mt))
    ka = eps * eta - kd
    dkas = tl.sum(dKa * k, 1)
    tl.store(dk_ptr + base + tcol, tl.load(dk_ptr + base + tcol, mask=mtc, other=0.0) + ka[:, None] * dKa, mask=mtc)
    rows = rows_ptr + iw.to(tl.int64) * 3 * rows_iw + row
    tl.store(rows, eps * (1.0 - tl.exp(_lg_before(lg_ptr, bh, T, start, offs_c, mt))) * dkas, mask=mt)  # deta
    tl.store(rows + rows_iw, dlg - dkas * kd, mask=mt)  # dlg
    tl.store(rows + 2 * rows_iw, dkas * kd, mask=mt)  # dla
    dWa -= mm(tl.trans(tl.load(dv, mask=m2, other=0.0)), tl.dot(tl.load(tm), ka[:, None] * k, input_precision=PREC),
              PREC, LOWP)
    tl.store(slot, dWa, mask=bm)


@device_fn
def _gen_tile_cols(c0, row, rloc, mt, mr, d, opq, BWB: tl.constexpr):
    """Head-dim columns c0 .. c0 + BWB - 1 of B4's row tile: their indices, the offsets and mask of their (BC, BWB)
    tile of the segment's (BH, T, d) rows (opq in the row stride, see `_gen_tile_bwd`) and of their (BR, BWB) tile
    of the state's rows rloc."""
    cols = c0 + tl.arange(0, BWB)
    mc = cols < d
    return (cols, row[:, None] * (d + opq) + cols[None, :], mt[:, None] & mc[None, :],
            rloc[:, None] * d + cols[None, :], mr[:, None] & mc[None, :])


@device_fn
def _gen_tile_bwd(gc, g0, dg, acc, anc, danc, rloc, mr, learn, er, d, k_ptr, v_ptr, eta_ptr, lg_ptr, tm_ptr, dk_ptr,
                  dv_ptr, bh, T, start, lg_end, eps, offs_c, mt, opq, deta, dks, dkt, dgamma_end, M,
                  BC: tl.constexpr, BR: tl.constexpr, D: tl.constexpr, BWB: tl.constexpr, OBJ_L2: tl.constexpr,
                  ANCHOR: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """Backward of `_gen_tile_fwd` for one row tile: dg holds dX_end on entry and dX_0 on return (in place); acc
    (the chunk-start gradient) gets dX_c, danc (ANCHOR) the anchor's gradient. The tile's parts of dk and dv (dKd
    and dK~, scaled, and the writes' dU) are added to the segment's rows of dk_ptr and dv_ptr, keeping only their
    row sums with k (dks, dkt: the decay and eta terms). Two passes over BWB-wide column tiles of the head dim:
    the (BC, BR) products over d (U X_hᵀ, K X_0ᵀ, K X_Aᵀ, K dX_eᵀ) summed first, then, once N, dN and dY are
    known, every (BC, d) and (BR, d) result by column tiles: no (BC, D) tile is whole in registers. k, v, eta, lg
    and T are read back per tile from K1's buffers and the row scalings (kd, ka, kappa) formed per tile, as in the
    forward (opq: see `_gen_tile_fwd`; here a multiple of 16, added to the row stride of the (BC, d) tiles, as in
    the kernel's `sopq`). With the anchor X_A the decay terms see the deviation D_0 = X_0 - X_A (X_end = X_A +
    gamma_L D_0 + ..., the DGD term eps eta_t (X_A + D_{t-1}) k_t)."""
    row = bh * T + start + opq + offs_c
    eta = tl.load(eta_ptr + row, mask=mt, other=0.0)
    kd_scale = eps * eta * tl.exp(_lg_before(lg_ptr, bh, T, start + opq, offs_c, mt))
    ka_scale = eps * eta - kd_scale
    kappa = tl.exp(lg_end - tl.load(lg_ptr + row, mask=mt, other=0.0))
    gamma_end = tl.exp(lg_end)
    UXt = tl.zeros([BC, BR], dtype=tl.float32)
    KX0 = tl.zeros([BC, BR], dtype=tl.float32)
    KXA = tl.zeros([BC, BR], dtype=tl.float32)
    KdX = tl.zeros([BC, BR], dtype=tl.float32)
    for c0 in range(0, D, BWB):
        cols, out, m2, xoff, m = _gen_tile_cols(c0, row, rloc, mt, mr, d, opq, BWB)
        k = tl.load(k_ptr + out, mask=m2, other=0.0)
        if OBJ_L2:
            U = k - tl.load(v_ptr + out, mask=m2, other=0.0)
        else:
            U = -tl.load(v_ptr + out, mask=m2, other=0.0)
        Xh = tl.load(gc + xoff, mask=m, other=0.0) + tl.where(m & (rloc[:, None] == cols[None, :]), er, 0.0)
        UXt += mm(U, tl.trans(Xh), PREC, LOWP)
        X0 = tl.load(g0 + xoff, mask=m, other=0.0)
        KX0 = tl.dot(k, tl.trans(X0), acc=KX0, input_precision=PREC)
        dXe = tl.where(learn[:, None], tl.load(dg + xoff, mask=m, other=0.0), 0.0)
        KdX += mm(k, tl.trans(dXe), PREC, LOWP)
        if ANCHOR:
            XA = tl.load(anc + xoff, mask=m, other=0.0)
            KXA = tl.dot(k, tl.trans(XA), acc=KXA, input_precision=PREC)
            X0 -= XA
        dgamma_end += tl.sum(tl.sum(X0 * dXe, 1), 0)  # the deviation D_0's part
    Y = -eta[:, None] * UXt - kd_scale[:, None] * KX0
    if ANCHOR:
        Y -= ka_scale[:, None] * KXA
    Tm = tl.load(tm_ptr + (offs_c[:, None] + opq) * BC + offs_c[None, :])
    N = tl.dot(Tm, Y, input_precision=PREC)
    dN = kappa[:, None] * KdX
    dY = tl.dot(tl.trans(Tm), dN, input_precision=PREC)
    M += tl.dot(dN, tl.trans(N), input_precision=PREC)
    deta -= tl.sum(dY * UXt, 1)
    edY = eta[:, None] * dY
    tl.debug_barrier()  # dg is overwritten below, by tiles that other threads may have read above
    for c0 in range(0, D, BWB):
        cols, out, m2, xoff, m = _gen_tile_cols(c0, row, rloc, mt, mr, d, opq, BWB)
        k = tl.load(k_ptr + out, mask=m2, other=0.0)
        dXe_all = tl.load(dg + xoff, mask=m, other=0.0)
        dXe = tl.where(learn[:, None], dXe_all, 0.0)
        dKt = mm(N, dXe, PREC, LOWP)
        D0 = tl.load(g0 + xoff, mask=m, other=0.0)
        if ANCHOR:
            XA = tl.load(anc + xoff, mask=m, other=0.0)
            D0 -= XA
        dKd = -tl.dot(dY, D0, input_precision=PREC)
        dks += tl.sum(dKd * k, 1)
        dkt += tl.sum(dKt * k, 1)
        dk = kd_scale[:, None] * dKd + kappa[:, None] * dKt
        if ANCHOR:  # Kd X_0 + Ka X_A = Kd D_0 + Ke X_A with Ke = diag(eps eta) K
            dKe = -tl.dot(dY, XA, input_precision=PREC)
            dk += (eps * eta)[:, None] * dKe
            deta += eps * tl.sum(dKe * k, 1)
            dXA = (1.0 - gamma_end) * dXe - tl.dot(tl.trans(ka_scale[:, None] * dY), k, input_precision=PREC)
            tl.store(danc + xoff, tl.load(danc + xoff, mask=m, other=0.0) + dXA, mask=m)
        dX0 = gamma_end * dXe - tl.dot(tl.trans(kd_scale[:, None] * dY), k, input_precision=PREC) + (dXe_all - dXe)
        Xh = tl.load(gc + xoff, mask=m, other=0.0) + tl.where(m & (rloc[:, None] == cols[None, :]), er, 0.0)
        dU = -mm(edY, Xh, PREC, LOWP)
        if OBJ_L2:  # U = k - v
            dk += dU
            U = k - tl.load(v_ptr + out, mask=m2, other=0.0)
        else:
            U = -tl.load(v_ptr + out, mask=m2, other=0.0)
        tl.store(dk_ptr + out, tl.load(dk_ptr + out, mask=m2, other=0.0) + dk, mask=m2)
        tl.store(dv_ptr + out, tl.load(dv_ptr + out, mask=m2, other=0.0) - dU, mask=m2)
        tl.store(dg + xoff, dX0, mask=m)
        tl.store(acc + xoff, tl.load(acc + xoff, mask=m, other=0.0) - mm(tl.trans(edY), U, PREC, LOWP), mask=m)
    return deta, dks, dkt, dgamma_end, M


@triton.jit
def _gen_bwd_kernel(
    a_ptr, valid_ptr, gc_in_ptr, g_ptr, anc_ptr, k_ptr, v_ptr, eta_ptr, lg_ptr, nrm_ptr, tmat_ptr, b_eta_ptr,
    b_alpha_ptr, dk_ptr, dv_ptr, deta_ptr, dlg_ptr, dla_ptr, dg_ptr, acc_ptr, danc_ptr,
    T, H, d, C, CA, phase, shift, NSEG, eta_max, eps, resid, gc_bh, g_bh, g_slot, dg_bh, anc_h,
    BC: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BWB: tl.constexpr, OBJ_L2: tl.constexpr,
    AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
    HAS_MASK: tl.constexpr, VNORM: tl.constexpr, ANCHOR: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """B4: the generating scan in reverse. dk..dla hold the main memory's gradients of every token's k, v, eta, lg
    and la (from B3); dg holds dG_end on entry and dG_0 on return; acc holds the cotangent of the final chunk-start G
    on entry and dG_c of the call's input chunk start on return; danc (ANCHOR, zeros on entry, dg_bh apart) gets the
    gradient of the retention anchor G_0. On return dk and dv hold the gradients of the unnormalised k_raw and
    v_raw, deta and dla those of eta's and alpha's logits: what `_gen_da_kernel` turns into da in parallel.

    Per segment, three stages that pass their results through those buffers (this program's rows), so that each
    keeps a small live set: (1) the row tiles of the state update, one runtime loop, reading the segment's k, v,
    eta, lg and T back from K1's buffers per tile (as `_gen_fwd_kernel` does, and why), each tile in two passes
    over BWB-wide column tiles of the head dim (`_gen_tile_bwd`); (2) the chain through T = (I + A)^-1, the
    decays and the normalisations, per token, its sums over d by column tiles; (3) the reads' outer products into
    acc (dW_k += dk_rawᵀ a, ...), by row and column tiles. Stage 3 is in the scan because with
    adaptive_chunk_size = chunk_size (the default) every segment reads its own start state, so its gradient joins
    dG_0 before the previous segment."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    b_eta = tl.load(b_eta_ptr + h)
    b_alpha = tl.load(b_alpha_ptr + h)
    g_base = g_ptr + bh * g_bh
    dg = dg_ptr + bh * dg_bh
    acc = acc_ptr + bh * dg_bh
    anc = anc_ptr + h * anc_h
    danc = danc_ptr + bh * dg_bh
    r_sq = tl.arange(0, BR)
    NRT: tl.constexpr = D // BR
    for i in range(0, NSEG):
        n = NSEG - 1 - i
        start, L = _segment(n, C, shift, T)
        mt = offs_c < L
        tok = start + offs_c
        # sopq (stage 3: opq) is 0, a multiple of 16 to the compiler (the loads stay vectorised), added to the row
        # strides: an opaque offset added to the address is reassociated and the invariant part (row offsets,
        # 64-bit row pointers) hoisted out of the loops and spilled; within the stride it cannot be split off
        sopq = i * tl.program_id(1) * 16
        if HAS_MASK:
            valid = tl.load(valid_ptr + b * T + tok, mask=mt, other=0.0)
        else:
            valid = tl.where(mt, 1.0, 0.0)
        slot = _gc_slot(n, C, CA, phase, shift, T)
        if slot < 0:
            gc = gc_in_ptr + bh * gc_bh
        else:
            gc = g_base + slot * g_slot
        g0 = g_base + n * g_slot
        lg_end = tl.load(lg_ptr + bh * T + start + L - 1)
        row = bh * T + tok
        tm = tmat_ptr + (bh * NSEG + n) * BC * BC
        # (1) the state update's row tiles; only M = Σ dN Nᵀ and row vectors are carried across them
        deta = tl.load(deta_ptr + row, mask=mt, other=0.0)
        dks = tl.zeros([BC], dtype=tl.float32)
        dkt = tl.zeros([BC], dtype=tl.float32)
        dgamma_end = lg_end * 0.0
        M = tl.zeros([BC, BC], dtype=tl.float32)
        # one runtime loop over the row tiles of W_k, W_v and, in a last tile of which two rows are used, w_eta and
        # w_alpha: one tile body, as in K1 (a separate call for the last tile held a second set of its addresses)
        for t in range(0, 2 * NRT + 1):
            blk, rloc, mr, learn, er = _gen_tile_rows(t, NRT, BR, r_sq, d, resid, AD_K, AD_V, AD_E, AD_A)
            deta, dks, dkt, dgamma_end, M = _gen_tile_bwd(
                gc + blk * d * d, g0 + blk * d * d, dg + blk * d * d, acc + blk * d * d, anc + blk * d * d,
                danc + blk * d * d, rloc, mr, learn, er, d, k_ptr, v_ptr, eta_ptr, lg_ptr, tm,
                dk_ptr, dv_ptr, bh, T, start, lg_end, eps, offs_c, mt, t * tl.program_id(1) * 16, deta,
                dks, dkt, dgamma_end, M, BC, BR, D, BWB, OBJ_L2, ANCHOR, PREC, LOWP)
            tl.debug_barrier()  # the next tile adds to the dk and dv rows stored here, with another layout
        # (2) eta and the decays from their logits (row sums with a), then the chain through T = (I + A)^-1:
        # dA = -Tᵀ (Σ dX Xᵀ) for every product X = T Y; the sums over d (a's with w_eta and w_alpha, K Kᵀ, the
        # normalisations' k . dk and v . dv) by BWB-wide column tiles, as the tiles of stage 1
        pre_eta = tl.zeros([BC], dtype=tl.float32) + b_eta
        pre_alpha = tl.zeros([BC], dtype=tl.float32) + b_alpha
        kk = tl.zeros([BC, BC], dtype=tl.float32)
        for c0 in range(0, D, BWB):
            cols = c0 + tl.arange(0, BWB)
            mc = cols < d
            mtc = mt[:, None] & mc[None, :]
            a = tl.load(a_ptr + ((b * T + tok) * H + h)[:, None] * (d + sopq) + cols[None, :], mask=mtc,
                        other=0.0).to(tl.float32)
            pre_eta += tl.sum(a * tl.load(gc + 2 * d * d + cols, mask=mc, other=0.0)[None, :], 1)
            pre_alpha += tl.sum(a * tl.load(gc + (2 * d + 1) * d + cols, mask=mc, other=0.0)[None, :], 1)
            k = tl.load(k_ptr + row[:, None] * (d + sopq) + cols[None, :], mask=mtc, other=0.0)
            kk = tl.dot(k, tl.trans(k), acc=kk, input_precision=PREC)
        sig_eta = sigmoid(pre_eta)
        eta = eta_max * sig_eta * valid
        la = log_sigmoid(pre_alpha) * valid
        lg = tl.cumsum(la, 0)
        kd_scale = eps * eta * tl.exp(lg - la)
        kappa = tl.exp(lg_end - lg)
        Tm = tl.load(tm + offs_c[:, None] * (BC + sopq) + offs_c[None, :])
        before = offs_c[None, :] < offs_c[:, None]
        dA = tl.where(before, -tl.dot(tl.trans(Tm), M, input_precision=PREC), 0.0)
        dKKs, deta_a, dlg_a, dla_a = _tri_rows(dA, kk, eta, lg, la, eps, offs_c)  # dk's part: dKKs K
        deta += deta_a + eps * tl.exp(lg - la) * dks
        c = kappa * dkt
        dlg = tl.load(dlg_ptr + row, mask=mt, other=0.0) + dlg_a + dks * kd_scale - c
        dla = tl.load(dla_ptr + row, mask=mt, other=0.0) + dla_a - dks * kd_scale
        dlg += tl.where(offs_c == L - 1, tl.sum(c, 0) + tl.exp(lg_end) * dgamma_end, 0.0)
        # la = logsigmoid(pre_alpha) valid: dla_s += Σ_{t >= s} dlg_t
        dla += tl.sum(dlg, 0) - tl.cumsum(dlg, 0) + dlg
        dpre_alpha = dla * valid * sigmoid(-pre_alpha)
        dpre_eta = deta * valid * eta_max * sig_eta * (1.0 - sig_eta)
        # k = k_raw / ||k_raw||: dk_raw = (dk - (k . dk) k) / ||k_raw|| (the norms from K1); likewise v
        kdk = tl.zeros([BC], dtype=tl.float32)
        vdv = tl.zeros([BC], dtype=tl.float32)
        for c0 in range(0, D, BWB):
            cols = c0 + tl.arange(0, BWB)
            mtc = mt[:, None] & (cols < d)[None, :]
            oc = row[:, None] * (d + sopq) + cols[None, :]
            k = tl.load(k_ptr + oc, mask=mtc, other=0.0)
            dk = tl.dot(dKKs, k, input_precision=PREC) + tl.load(dk_ptr + oc, mask=mtc, other=0.0)
            kdk += tl.sum(k * dk, 1)
            if VNORM:
                vdv += tl.sum(tl.load(v_ptr + oc, mask=mtc, other=0.0) * tl.load(dv_ptr + oc, mask=mtc, other=0.0), 1)
        knrm = tl.load(nrm_ptr + 2 * row, mask=mt, other=1.0)
        nn = tl.maximum(knrm, 1e-12)
        kdk = tl.where(knrm > 1e-12, kdk / nn, 0.0)
        vnrm = tl.load(nrm_ptr + 2 * row + 1, mask=mt, other=1.0)
        vn = tl.maximum(vnrm, 1e-12)
        vdv = tl.where(vnrm > 1e-12, vdv / vn, 0.0)
        tl.debug_barrier()  # dk, dv: read above by other threads; acc: written by the tiles
        flush = slot == n
        for c0 in range(0, D, BWB):
            cols = c0 + tl.arange(0, BWB)
            mc = cols < d
            mtc = mt[:, None] & mc[None, :]
            oc = row[:, None] * (d + sopq) + cols[None, :]
            k = tl.load(k_ptr + oc, mask=mtc, other=0.0)
            dk = tl.dot(dKKs, k, input_precision=PREC) + tl.load(dk_ptr + oc, mask=mtc, other=0.0)
            tl.store(dk_ptr + oc, dk / nn[:, None] - kdk[:, None] * k, mask=mtc)
            if VNORM:
                dv = tl.load(dv_ptr + oc, mask=mtc, other=0.0)
                tl.store(dv_ptr + oc, dv / vn[:, None] - vdv[:, None] * tl.load(v_ptr + oc, mask=mtc, other=0.0),
                         mask=mtc)
            a = tl.load(a_ptr + ((b * T + tok) * H + h)[:, None] * (d + sopq) + cols[None, :], mask=mtc,
                        other=0.0).to(tl.float32)
            e_eta = tl.load(acc + 2 * d * d + cols, mask=mc, other=0.0) + tl.sum(dpre_eta[:, None] * a, 0)
            e_alpha = tl.load(acc + (2 * d + 1) * d + cols, mask=mc, other=0.0) + tl.sum(dpre_alpha[:, None] * a, 0)
            if flush:
                de = dg + 2 * d * d + cols
                tl.store(de, tl.load(de, mask=mc, other=0.0) + e_eta, mask=mc)
                tl.store(de + d, tl.load(de + d, mask=mc, other=0.0) + e_alpha, mask=mc)
                e_eta = e_eta * 0.0
                e_alpha = e_alpha * 0.0
            tl.store(acc + 2 * d * d + cols, e_eta, mask=mc)
            tl.store(acc + (2 * d + 1) * d + cols, e_alpha, mask=mc)
        tl.store(deta_ptr + row, dpre_eta, mask=mt)
        tl.store(dla_ptr + row, dpre_alpha, mask=mt)
        tl.debug_barrier()
        # (3) k_raw = a (I + W_k)ᵀ, v_raw = a (I + W_v)ᵀ: dW_k += dk_rawᵀ a, dW_v += dv_rawᵀ a, by row tiles and
        # column tiles; a segment that starts on an adaptive-chunk boundary read its own start state, so there acc
        # joins dg
        for blk in tl.static_range(2):
            if blk == 0:
                src = dk_ptr
            else:
                src = dv_ptr
            for rt in range(0, NRT):
                opq = (blk * NRT + rt) * tl.program_id(1) * 16
                rloc = rt * BR + r_sq
                mr = rloc < d
                dX = tl.load(src + row[:, None] * (d + opq) + rloc[None, :], mask=mt[:, None] & mr[None, :],
                             other=0.0)
                for c0 in range(0, D, BWB):
                    cols = c0 + tl.arange(0, BWB)
                    mc = cols < d
                    a = tl.load(a_ptr + ((b * T + tok) * H + h)[:, None] * (d + opq) + cols[None, :],
                                mask=mt[:, None] & mc[None, :], other=0.0).to(tl.float32)
                    xoff = blk * d * d + rloc[:, None] * (d + opq) + cols[None, :]
                    xm = mr[:, None] & mc[None, :]
                    dW = tl.load(acc + xoff, mask=xm, other=0.0) + mm(tl.trans(dX), a, PREC, LOWP)
                    if flush:
                        tl.store(dg + xoff, tl.load(dg + xoff, mask=xm, other=0.0) + dW, mask=xm)
                        dW = dW * 0.0
                    tl.store(acc + xoff, dW, mask=xm)
        tl.debug_barrier()  # the next segment's tiles read dg and acc


@triton.jit
def _gen_da_kernel(
    gc_in_ptr, g_ptr, dk_ptr, dv_ptr, deta_ptr, dla_ptr, da_ptr,
    T, H, d, C, CA, phase, shift, NSEG, resid, gc_bh, g_bh, g_slot,
    BC: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """B5, parallel over (segment, batch-head, BV-wide column tiles of a): da = dk_raw (I + W_k) + dv_raw (I + W_v)
    + dpre_eta w_etaᵀ + dpre_alpha w_alphaᵀ, from the gradients B4 left in dk, dv, deta and dla and the generating
    memories the segment read."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    cols = tl.program_id(2) * BV + tl.arange(0, BV)
    mcol = cols < d
    start, L = _segment(n, C, shift, T)
    mt = offs_c < L
    slot = _gc_slot(n, C, CA, phase, shift, T)
    if slot < 0:
        gc = gc_in_ptr + bh * gc_bh
    else:
        gc = g_ptr + bh * g_bh + slot * g_slot
    row = bh * T + start + offs_c
    m2 = mt[:, None] & md[None, :]
    woff = offs_d[:, None] * d + cols[None, :]
    wm = md[:, None] & mcol[None, :]
    eye = tl.where(wm & (offs_d[:, None] == cols[None, :]), resid, 0.0)
    dk_raw = tl.load(dk_ptr + row[:, None] * d + offs_d[None, :], mask=m2, other=0.0)
    da = mm(dk_raw, tl.load(gc + woff, mask=wm, other=0.0) + eye, PREC, LOWP)
    dv_raw = tl.load(dv_ptr + row[:, None] * d + offs_d[None, :], mask=m2, other=0.0)
    da += mm(dv_raw, tl.load(gc + d * d + woff, mask=wm, other=0.0) + eye, PREC, LOWP)
    dpre_eta = tl.load(deta_ptr + row, mask=mt, other=0.0)
    dpre_alpha = tl.load(dla_ptr + row, mask=mt, other=0.0)
    da += dpre_eta[:, None] * tl.load(gc + 2 * d * d + cols, mask=mcol, other=0.0)[None, :]
    da += dpre_alpha[:, None] * tl.load(gc + (2 * d + 1) * d + cols, mask=mcol, other=0.0)[None, :]
    tok = start + offs_c
    a_off = ((b * T + tok) * H + h)[:, None] * d + cols[None, :]
    tl.store(da_ptr + a_off, da.to(da_ptr.dtype.element_ty), mask=mt[:, None] & mcol[None, :])


# ---------------------------------------------------------------------------------------------- python


def _config(d: int, chunk_size: int, adaptive_chunk_size: Optional[int], position: int, eta_max: float, dgd: bool,
            objective: str, memory_target: str, memory_residual: bool, memory_value_norm: bool,
            memory_retention: str, adaptive: Sequence[str], memory_curvature_guard: bool = False) -> dict:
    """The kernels' launch constants; the flag values are checked by the reference's own `_config`."""
    ref = reference_config(chunk_size, adaptive_chunk_size, eta_max, dgd, objective, memory_target, memory_residual,
                           memory_value_norm, memory_retention, memory_curvature_guard)
    rows = adaptive_row_mask(adaptive, d)
    D, BC = block_sizes(d, chunk_size)
    return dict(C=chunk_size, CA=ref["adaptive_chunk_size"], pos=position,
                phase=position % ref["adaptive_chunk_size"], shift=position % chunk_size,
                eta_max=float(eta_max), eps=1.0 if dgd else 0.0, resid=1.0 if memory_residual else 0.0,
                OBJ_L2=objective == "l2", VALUE=memory_target == "value", VNORM=ref["value_norm"],
                ANCHOR=ref["anchored"], GUARD=ref["curvature_guard"],
                ad=(bool(rows[d]), bool(rows[2 * d]), bool(rows[3 * d]), bool(rows[3 * d + 1])),
                # BR: K1's row tiles (`_gen_fwd_kernel`; 16 rows at d = 128, where 32 spilled at 8 warps); BWR: the
                # column tiles of K1's reads k = a (W_k + r I)ᵀ, v likewise (`_gen_reads`; 16 at d = 128, where 64
                # spilled 28 B in bf16 and took 112 KB of shared memory in fp32); BW: the column tiles of u', w', the
                # anchor's terms and B3' (`_main_prep_kernel`, `_main_anchor_fwd_kernel`, `_main_anchor_bwd_kernel`,
                # `_main_wy_bwd_kernel`)
                D=D, BC=BC, BR=min(D, 32) if D <= 64 else 16, BWR=D if D <= 64 else 16, BW=min(D, 64))


def _anchor_arg(anchor: Optional[Tensor], fallback: Tensor) -> tuple[Tensor, int]:
    """(pointer tensor, per-head stride) of an (H, rows, d) anchor view; a dummy pointer without an anchor."""
    return (fallback, 0) if anchor is None else (anchor, anchor.stride(0))


def generating_forward(a: Tensor, valid: Optional[Tensor], gc_in: Tensor, g: Tensor, anchor: Optional[Tensor],
                       b_eta: Tensor, b_alpha: Tensor, cfg: dict, nseg: int,
                       lowp: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run K1. a: (B, T, H, d) contiguous; gc_in: (BH, *, d) view whose rows 0.. are the input chunk-start G;
    g: (BH, nseg+1, *, d) view whose rows 0.. are G (slot 0 filled with the start state); anchor: (H, *, d) fp32
    view whose rows 0.. are the retention anchor G_0, or None (retention toward 0). Returns k, v (BH, T, d), eta,
    lg (BH, T), T (BH, nseg, BC, BC) and the norms of the unnormalised k and v (BH, T, 2), all fp32."""
    B, T, H, d = a.shape
    BC, dev, f32 = cfg["BC"], a.device, torch.float32
    k = torch.empty(B * H, T, d, device=dev, dtype=f32)
    v = torch.empty_like(k)
    eta = torch.empty(B * H, T, device=dev, dtype=f32)
    lg = torch.empty_like(eta)
    norms = torch.empty(B * H, T, 2, device=dev, dtype=f32)
    tmat = torch.empty(B * H, nseg, BC, BC, device=dev, dtype=f32)
    kt = torch.empty(B * H, BC, cfg["D"], device=dev, dtype=f32)
    anc, anc_h = _anchor_arg(anchor, gc_in)
    launch(_gen_fwd_kernel, (B * H,),
           a, valid if valid is not None else a, gc_in, g, anc, k, v, eta, lg, norms, tmat, kt, b_eta, b_alpha,
           T, H, d, cfg["C"], cfg["CA"], cfg["phase"], cfg["shift"], nseg, cfg["eta_max"], cfg["eps"], cfg["resid"],
           gc_in.stride(0), g.stride(0), g.stride(1), anc_h,
           BC=BC, D=cfg["D"], BR=cfg["BR"], BW=cfg["BWR"], OBJ_L2=cfg["OBJ_L2"], AD_K=cfg["ad"][0],
           AD_V=cfg["ad"][1], AD_E=cfg["ad"][2], AD_A=cfg["ad"][3], HAS_MASK=valid is not None, VNORM=cfg["VNORM"],
           ANCHOR=anchor is not None, PREC=dot_precision(), LOWP=lowp, **launch_options("serial", cfg["D"]))
    return k, v, eta, lg, tmat, norms


def _chunk_start_slots(T: int, cfg: dict, nseg: int) -> tuple[Optional[int], Optional[int]]:
    """Slots of the final chunk starts: (W's, G's); None = the call's input chunk start."""
    C, CA, pos, shift = cfg["C"], cfg["CA"], cfg["pos"], cfg["shift"]
    end = pos + T

    def slot(size: int) -> Optional[int]:
        boundary = (end // size) * size
        return None if boundary <= pos else (boundary - (pos - shift)) // C

    return slot(C), slot(CA)


def _forward(q, a, zc, z, anchor, b_eta, b_alpha, valid, cfg, save: bool):
    B, T, H, d = q.shape
    R = memory_rows(d)
    C, BC, D = cfg["C"], cfg["BC"], cfg["D"]
    nseg = num_segments(T, C, cfg["shift"])
    dev, f32 = q.device, torch.float32
    lowp = low_precision_dots(q.dtype)
    BV = block_v(D, lowp)
    prec = dot_precision()
    zbuf = torch.empty(B * H, nseg + 1, R, d, device=dev, dtype=f32)
    zbuf[:, 0] = z.reshape(B * H, R, d)
    zc = zc.reshape(B * H, R, d).contiguous()
    k, v, eta, lg, tmat, norms = generating_forward(a, valid, zc[:, d:], zbuf[:, :, d:],
                                             None if anchor is None else anchor[:, d:], b_eta, b_alpha, cfg, nseg,
                                             lowp)
    anc, anc_h = _anchor_arg(anchor, zc)
    ANCHOR = anchor is not None
    wp = torch.empty_like(k)
    up = torch.empty_like(k)
    BW = cfg["BW"]
    nw = triton.cdiv(d, BW)
    launch(_main_prep_kernel, (nseg, B * H, nw),
           k, v, eta, lg, tmat, zc, wp, up, T, C, cfg["shift"], nseg, d, cfg["eps"], cfg["resid"], zc.stride(0),
           BC=BC, D=D, BW=BW, OBJ_L2=cfg["OBJ_L2"], VALUE=cfg["VALUE"], PREC=prec, LOWP=lowp,
           **launch_options("tile", D))
    if ANCHOR:
        launch(_main_anchor_fwd_kernel, (nseg, B * H, nw), k, eta, lg, tmat, anc, up, T, H, C, cfg["shift"], nseg,
               d, cfg["eps"], anc_h, BC=BC, D=D, BW=BW, PREC=prec, LOWP=lowp, **launch_options("tile", D))
    vn = torch.empty_like(k)
    nv = triton.cdiv(d, BV)
    launch(_main_state_fwd_kernel, (B * H, nv),
           k, lg, wp, up, zbuf, anc, vn, T, H, C, cfg["shift"], nseg, d, zbuf.stride(0), zbuf.stride(1), anc_h,
           BC=BC, D=D, BV=BV, ANCHOR=ANCHOR, PREC=prec, LOWP=lowp, **launch_options("tile", D))
    o = torch.empty_like(q)
    launch(_main_out_fwd_kernel, (nseg, B * H, nv),
           q, k, lg, vn, zbuf, anc, o, T, H, C, cfg["shift"], d, zbuf.stride(0), zbuf.stride(1), anc_h, cfg["resid"],
           BC=BC, D=D, BV=BV, ANCHOR=ANCHOR, PREC=prec, LOWP=lowp, **launch_options("tile", D))
    z_end = zbuf[:, nseg]
    w_slot, g_slot = _chunk_start_slots(T, cfg, nseg)
    zc_end = torch.cat([zc[:, :d] if w_slot is None else zbuf[:, w_slot, :d],
                        zc[:, d:] if g_slot is None else zbuf[:, g_slot, d:]], dim=1)
    saved = (k, v, eta, lg, tmat, norms, wp, up, vn, zbuf, zc) if save else None
    return o, zc_end.reshape(B, H, R, d), z_end.reshape(B, H, R, d).clone(), saved, nseg


def _gen_bwd_rows(D: int) -> int:
    """Rows per generating-state tile in B4: 32 up to d = 64, 16 at d = 128, at 8 warps (`launch_options`).
    64 rows at d = 64 and 16 warps with 32 (bf16 operands) or 16 (fp32) rows at d = 128 spilled 2.3-2.9 KB and
    4.7-6.5 KB per thread, these 1.9-2.1 and 3.6-3.7 KB, before stage 1 became one tile body (sm90_check; 64 rows
    at d = 128 needed 288-400 KB of shared memory)."""
    return min(D, 32) if D <= 64 else 16


def _gen_bwd_cols(D: int) -> int:
    """Columns per tile of the head dim in B4 (the tile body `_gen_tile_bwd`, stages 2 and 3): 16. With whole
    (BC, D) tiles it spilled 1140 / 1084 B at d = 64 and 2632 / 2040 B at d = 128 (fp32 / bf16); the tile body by
    32 columns 652 / 728 and 1344 / 1168 B, by 16 612 / 528 and 1340 / 1060 B, stages 2 and 3 too 432 / 516 and
    344 / 412 B (sm90_check)."""
    return min(D, 16)


def generating_backward(a, valid, gc_in, g, anchor, k, v, eta, lg, tmat, norms, b_eta, b_alpha, dk, dv, deta, dlg,
                        dla, dg, acc, cfg, nseg, lowp):
    """Run B4, then B5. k, v, eta, lg, tmat, norms: K1's outputs (`generating_forward`); dk..dla: the main memory's
    gradients of k, v (BH, T, d), eta, lg, la (BH, T), used as B4's work space (overwritten); dg (BH, 2d+2, d): dG_end
    in, dG_0 out; acc (BH, 2d+2, d): the final chunk-start cotangent in, dG_c of the input chunk start out; anchor:
    as `generating_forward`. Returns da (B, T, H, d) in a's dtype, (db_eta, db_alpha) (BH, 2) and the anchor's
    gradient (BH, 2d+2, d) (None without an anchor)."""
    B, T, H, d = a.shape
    D = cfg["D"]
    danc = None if anchor is None else torch.zeros_like(dg)
    anc, anc_h = _anchor_arg(anchor, gc_in)
    common = (T, H, d, cfg["C"], cfg["CA"], cfg["phase"], cfg["shift"], nseg)
    launch(_gen_bwd_kernel, (B * H,),
           a, valid if valid is not None else a, gc_in, g, anc, k, v, eta, lg, norms, tmat, b_eta, b_alpha, dk, dv,
           deta, dlg, dla, dg, acc, dg if danc is None else danc, *common, cfg["eta_max"], cfg["eps"], cfg["resid"],
           gc_in.stride(0), g.stride(0), g.stride(1), dg.stride(0), anc_h,
           BC=cfg["BC"], D=D, BR=_gen_bwd_rows(D), BWB=_gen_bwd_cols(D), OBJ_L2=cfg["OBJ_L2"],
           AD_K=cfg["ad"][0], AD_V=cfg["ad"][1], AD_E=cfg["ad"][2], AD_A=cfg["ad"][3], HAS_MASK=valid is not None,
           VNORM=cfg["VNORM"],
           ANCHOR=anchor is not None, PREC=dot_precision(), LOWP=lowp, **launch_options("serial", D))
    # B4 left the gradients of k_raw, v_raw and of eta's and alpha's logits in dk, dv, deta and dla
    da = torch.empty_like(a)
    BV = block_v(D, lowp)
    launch(_gen_da_kernel, (nseg, B * H, triton.cdiv(d, BV)),
           gc_in, g, dk, dv, deta, dla, da, *common, cfg["resid"], gc_in.stride(0), g.stride(0), g.stride(1),
           BC=cfg["BC"], D=D, BV=BV, PREC=dot_precision(), LOWP=lowp, **launch_options("tile", D))
    return da, torch.stack([deta.sum(1), dla.sum(1)], dim=1), danc


def _backward(q, a, valid, anchor, b_eta, b_alpha, k, v, eta, lg, tmat, norms, wp, up, vn, zbuf, zc, do, dzc_end,
              dz_end,
              cfg, nseg):
    B, T, H, d = q.shape
    R = memory_rows(d)
    BC, D = cfg["BC"], cfg["D"]
    dev, f32 = q.device, torch.float32
    lowp = low_precision_dots(q.dtype)
    BV = block_v(D, lowp)
    prec = dot_precision()
    do = do.contiguous()
    dzc_end = cotangent(dzc_end, (B * H, R, d), dev)
    dz_end = cotangent(dz_end, (B * H, R, d), dev)
    w_slot, g_slot = _chunk_start_slots(T, cfg, nseg)
    nv = triton.cdiv(d, BV)
    shift = cfg["shift"]
    anc, anc_h = _anchor_arg(anchor, zc)
    ANCHOR = anchor is not None
    # main memory: dv_new from the reads, then W's state in reverse, then the per-segment gradients
    dvn = torch.empty_like(k)
    launch(_main_dv_bwd_kernel, (nseg, B * H, nv), q, k, lg, do, dvn, T, H, cfg["C"], shift, d,
           BC=BC, D=D, BV=BV, PREC=prec, LOWP=lowp, **launch_options("tile", D))
    dw_init = dz_end[:, :d].contiguous()
    if w_slot == nseg:
        dw_init += dzc_end[:, :d]
    dzc_w = dzc_end[:, :d].contiguous()
    dwbuf = torch.empty(B * H, nseg, d, d, device=dev, dtype=f32)
    dw0 = torch.empty(B * H, d, d, device=dev, dtype=f32)
    launch(_main_state_bwd_kernel, (B * H, nv), q, k, lg, wp, do, dvn, dw_init, dzc_w, dwbuf, dw0,
           T, H, cfg["C"], shift, nseg, d, w_slot if w_slot is not None and 1 <= w_slot < nseg else -1,
           BC=BC, D=D, BV=BV, PREC=prec, LOWP=lowp, **launch_options("tile", D))
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    deta, dlg, dla = torch.empty_like(eta), torch.empty_like(eta), torch.empty_like(eta)
    dwc = torch.empty(B * H, d, d, device=dev, dtype=f32)
    dwp = torch.empty_like(k)
    dq32 = torch.empty(q.shape, device=dev, dtype=f32) if ANCHOR else dq  # B3a finishes dq with the anchor's part
    launch(_main_chunk_bwd_kernel, (nseg, B * H),
           q, k, lg, vn, dvn, do, zbuf, dwbuf, dq32, dk, dlg, dwp, T, H, cfg["C"], shift, nseg, d, zbuf.stride(0),
           zbuf.stride(1), cfg["resid"], BC=BC, D=D, BV=BV, PREC=prec, LOWP=lowp, **launch_options("tile", D))
    launch(_main_wy_bwd_kernel, (nseg, B * H),
           k, v, eta, lg, tmat, wp, up, dvn, dwp, zc, dk, dv, deta, dlg, dla, dwc, T, cfg["C"], shift, nseg, d,
           zc.stride(0), cfg["eps"], cfg["resid"], BC=BC, D=D, BW=cfg["BW"], OBJ_L2=cfg["OBJ_L2"], VALUE=cfg["VALUE"],
           PREC=prec, LOWP=lowp, **launch_options("tile", D))
    if ANCHOR:
        # W_A's columns in BW-wide tiles: at d = 128 the three d x d tiles of one program spilled
        nw = triton.cdiv(d, cfg["BW"])
        rows = torch.empty(nw, 3, B * H, T, device=dev, dtype=f32)  # each column tile's part of deta, dlg, dla
        launch(_main_anchor_bwd_kernel, (nseg, B * H, nw),
               q, k, eta, lg, tmat, do, dvn, anc, dq32, dq, dk, rows, dwbuf, T, H, cfg["C"], shift, nseg, d,
               cfg["eps"], anc_h, B * H * T, BC=BC, D=D, BW=cfg["BW"], PREC=prec, LOWP=lowp,
               **launch_options("tile", D))
        rows = rows.sum(0)  # over the tiles, in a fixed order
        deta += rows[0]
        dlg += rows[1]
        dla += rows[2]
    # the generating rows, in reverse
    dg = dz_end[:, d:].contiguous()
    if g_slot == nseg:
        dg += dzc_end[:, d:]
        acc = torch.zeros_like(dg)
    else:
        acc = dzc_end[:, d:].contiguous()
    da, dbias, dganc = generating_backward(a, valid, zc[:, d:], zbuf[:, :, d:],
                                           None if anchor is None else anchor[:, d:], k, v, eta, lg, tmat, norms,
                                           b_eta.detach().float().contiguous(), b_alpha.detach().float().contiguous(),
                                           dk, dv, deta, dlg, dla, dg, acc, cfg, nseg, lowp)
    if w_slot is None:
        dwc += dzc_end[:, :d]
    dzc = torch.cat([dwc, acc], dim=1).reshape(B, H, R, d)
    dz = torch.cat([dw0, dg], dim=1).reshape(B, H, R, d)
    dbias = dbias.reshape(B, H, 2).sum(0)
    danchor = None
    if anchor is not None:  # dwbuf's slots hold the segments' parts of dW_A (B3a); B4 gave G_0's
        danchor = torch.cat([dwbuf.sum(1), dganc], dim=1).reshape(B, H, R, d).sum(0)
    return dq, da, dzc, dz, danchor, dbias[:, 0], dbias[:, 1]


class _TitansChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, a, zc, z, anchor, b_eta, b_alpha, valid, cfg):
        anchor32 = None if anchor is None else anchor.detach().float().contiguous()
        o, zc_end, z_end, saved, nseg = _forward(q, a, zc.detach().float(), z.detach().float(), anchor32,
                                                 b_eta.detach().float().contiguous(),
                                                 b_alpha.detach().float().contiguous(), valid, cfg,
                                                 save=any(ctx.needs_input_grad))
        if saved is not None:
            ctx.save_for_backward(q, a, valid, anchor32, b_eta, b_alpha, *saved)
        ctx.cfg, ctx.nseg = cfg, nseg
        ctx.dtypes = (q.dtype, a.dtype, zc.dtype, z.dtype, None if anchor is None else anchor.dtype, b_eta.dtype,
                      b_alpha.dtype)
        return o, zc_end, z_end

    @staticmethod
    def backward(ctx, do, dzc_end, dz_end):
        q, a, valid, anchor, b_eta, b_alpha, k, v, eta, lg, tmat, norms, wp, up, vn, zbuf, zc = ctx.saved_tensors
        cfg, nseg = ctx.cfg, ctx.nseg
        grads = _backward(q, a, valid, anchor, b_eta, b_alpha, k, v, eta, lg, tmat, norms, wp, up, vn, zbuf, zc, do,
                          dzc_end, dz_end, cfg, nseg)
        out = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*out, None, None)


def titans_memory_triton(
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
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[TitansState]]:
    """Chunked self-modifying Titans memory on Triton; shapes and semantics as `titans_memory_reference`
    (momentum=False only). Differentiable in q, a, z0 (initial state and retention anchor), b_eta, b_alpha and the
    tensors of `state`."""
    check_memory_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size=chunk_size,
                        adaptive_chunk_size=adaptive_chunk_size, eta_max=eta_max, momentum=momentum,
                        objective=objective, memory_target=memory_target, adaptive=adaptive, mask=mask)
    check_no_momentum(momentum, op="titans")
    check_kernel_inputs(q, a, chunk_size, op="titans")
    B, T, H, d = q.shape
    R = memory_rows(d)
    if state is None:
        zc = z = z0.unsqueeze(0).expand(B, H, R, d)
        position = 0
    else:
        check_state(state, dict(z_chunk=(B, H, R, d), z=(B, H, R, d), s=(B, H, R, d)), momentum)
        zc, z, position = state.z_chunk, state.z, int(state.position)
    cfg = _config(d, chunk_size, adaptive_chunk_size, position, eta_max, dgd, objective, memory_target,
                  memory_residual, memory_value_norm, memory_retention, adaptive)
    valid = None if mask is None else mask.detach().to(device=q.device, dtype=torch.float32).contiguous()
    if T == 0:
        o = q.new_zeros(q.shape)
        final = TitansState(zc.float().clone(), z.float().clone(), None, position) if output_final_state else None
        return o, final
    anchor = z0 if cfg["ANCHOR"] else None
    o, zc_end, z_end = _TitansChunkFn.apply(q.contiguous(), a.contiguous(), zc, z, anchor, b_eta, b_alpha, valid, cfg)
    return o, (TitansState(zc_end, z_end, None, position + T) if output_final_state else None)
