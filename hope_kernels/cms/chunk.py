"""Triton kernels of one Continuum Memory System level (SPEC §3), forward and exact backward.

Same signature and semantics as `cms_level_reference` (hope_kernels/cms/reference.py):
`cms_level_triton` returns y and, on request, the final `CMSState`. Inputs fp32 / fp16 / bf16; all arithmetic
is fp32 (inputs upcast on load, tl.dot with input_precision="ieee"), y in z.dtype, the state in fp32.

Design
------
* What does not depend on the fast weights is done by PyTorch/cuBLAS outside the recurrent kernel, over all
  tokens at once: target = z P_v (B, T, D) and eta = eta_max σ(z·w_eta + b_eta)·mask (B, T). Their outer
  gradients come back from the kernel as dL/dtarget and dL/deta, and autograd carries them to z, P_v, w_eta,
  b_eta. So the kernel sees e_t = eta_t (y_t - target_t) ("l2") or -eta_t target_t ("dot").
* The recurrence θ_c -> θ_{c+1} is nonlinear and couples every row of θ every chunk: y = H W_downᵀ reduces
  over F and a = z W_gateᵀ reduces over D, and e = y - target feeds all three inner gradients. Any split of
  θ over programs needs a grid-wide sync per chunk, which Triton does not give (and the interpreter, which
  runs programs one after another, cannot emulate). So there is ONE PROGRAM PER SEQUENCE (grid = (B,)),
  which loops over the segments of its sequence inside the kernel and over (token, F, D) tiles inside each
  segment; phases of a segment are ordered by `tl.debug_barrier()` (= __syncthreads, which also orders
  global memory inside the block). One launch for the forward, one for the backward.
* Segments are cut as in the reference: chunk phase counts from absolute position 0, so from a state at
  position p the first segment holds the C - p % C tokens that finish the chunk in progress (its running
  gradient sums come from the state), then full chunks, then a partial last one. Tiles are masked loads
  padded with zeros (tl.dot needs dims >= 16): padded tokens have z = target = eta = 0 and change nothing.
* θ lives in a global fp32 workspace. Without a backward, two ping-pong slots; with a backward, one slot per
  segment start (θ_n, the only thing saved: O(T/C · 3FD) per sequence) plus the final one. Per-segment
  activations (a, b, r = y - target, the inner-gradient intermediates) go to per-sequence scratch buffers
  of (C, F) / (C, D) and are recomputed in the backward from the saved θ_n.
* Backward of one segment (derived by hand, checked against float64 autograd of the reference; Ḡ is the
  adjoint of the segment's inner-gradient sum: -dL/dθ_{n+1} when it closes its chunk):
      dĀ = Z Ḡ_gateᵀ, dB̄ = Z Ḡ_upᵀ, dH̄ = dĀ⊙b⊙silu'(a) + dB̄⊙silu(a)
      Ē = H Ḡ_downᵀ + dH̄ W_downᵀ, ēta_t = <Ē_t, r_t>, R̄ = eta⊙Ē, Ȳ = dL/dy + R̄ (l2), target̄ = -R̄
      H̄ = E Ḡ_down + Ȳ W_down, Ā = H̄⊙b⊙silu' + dB̄⊙dH⊙silu' + dĀ⊙dH⊙b⊙silu'', B̄ = H̄⊙silu(a) + dĀ⊙dH⊙silu'
      W̄_gate = Āᵀ Z, W̄_up = B̄ᵀ Z, W̄_down = Ȳᵀ H + Eᵀ dH̄, Z̄ = Ā W_gate + B̄ W_up + dA Ḡ_gate + dB Ḡ_up
  plus the decay chain: dL/dθ_n = (1 - λ_n) dL/dθ_{n+1} + W̄, dL/dθ_0 += λ_n dL/dθ_{n+1}.
* λ_n is the per-(sequence, segment) retention pull of Eq. 31: decay if the chunk that segment n closes held a
  valid token of the sequence (in the segment, or for n = 0 before it, `CMSState.chunk_has_valid`), else 0:
  an all-padding chunk changes no state (SPEC §5). PyTorch computes it from the mask, a (B, NSEG) tensor
  that both kernels read; it is a constant of the graph (the mask has no gradient).
* A level that never updates within the call (no state, no final state requested, T <= chunk_size) is an
  ordinary SwiGLU FFN: three plain fp32 matmuls in PyTorch, no kernel, no gradient work.

Where Triton should beat cuBLAS, and where not (NO GPU MEASUREMENTS EXIST YET; this is expectation only):
* Versus the eager reference, the kernel saves the Python loop over chunks (T/C iterations of ~12 small
  batched matmuls and as many launches) and keeps the inner-gradient intermediates in one fused program;
  for small chunks (C <= 64) and small B·F·D the reference is launch-bound and the kernel should win clearly.
* For large chunks (C >= 512) and large D, F, the work is big matmuls; cuBLAS (or torch.compile) on all SMs
  wins, because this kernel runs only B programs (one per sequence) with fp32 "ieee" tl.dot, i.e. B of the
  GPU's ~132 SMs, without tensor cores. Splitting a sequence over several programs needs a grid barrier per
  chunk (cooperative launch); that is the next step for performance, not done.
* The decode step (step.py) is matrix-vector work, memory-bound on reading θ and the running sums; it is
  split over (B, F tiles) programs and should run near HBM bandwidth.

Constraints (ValueError otherwise): z, the parameters and the state tensors float32, float16 or bfloat16
(float64: use cms_level_reference); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Any D, F >= 1 and
chunk_size >= 1 (tiled). Workspace: B·(T/C + 2)·3FD fp32 for the saved θ when a backward follows.

Verification so far: the Triton interpreter on CPU (tests/hope_kernels/cms/test_chunk.py, test_step.py) and an
ahead-of-time compile of every kernel for sm_90 (triton.compile, no GPU): all compile; shared memory 32 KB
(forward) and 48 KB (backward) at 64-wide tiles. Never run on a real GPU yet.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as Fn
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels._dispatch import triton_interpreting
from hope_kernels.cms.reference import CMSState, _no_autocast, _validate

__all__ = ["cms_level_triton", "SUPPORTED_DTYPES", "check_kernel_inputs"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# tl.dot precision for fp32 operands; "ieee" keeps fp32 results within 1e-4 of the fp64 reference.
DOT_PRECISION = os.environ.get("HOPE_CMS_DOT_PRECISION", "ieee")


# No triton.autotune: the kernels read-modify-write their workspaces (running sums, the θ_0 gradient
# accumulator), so autotune's repeated benchmark launches would corrupt them. One fixed launch config;
# num_stages=1: no software pipelining of the tile loops (with 64-wide fp32 tiles, compiled ahead of time for
# sm_90, the backward needs 48 KB of shared memory at 1 stage and 144-256 KB at 2-3 stages).
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------- helpers


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # exp of non-positive numbers only
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _ld(ptr, r0, c0, nr, nc, stride, BR: tl.constexpr, BC: tl.constexpr):
    """(BR, BC) fp32 tile of a row-major matrix with `stride` per row; zeros outside (nr, nc)."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    m = (rows[:, None] < nr) & (cols[None, :] < nc)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _st(ptr, r0, c0, nr, nc, stride, x, BR: tl.constexpr, BC: tl.constexpr):
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    m = (rows[:, None] < nr) & (cols[None, :] < nc)
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _ldv(ptr, r0, nr, BR: tl.constexpr):
    rows = r0 + tl.arange(0, BR)
    return tl.load(ptr + rows, mask=rows < nr, other=0.0).to(tl.float32)


@triton.jit
def _update(cur, nxt, g, th0, r0, c0, nr, nc, stride, p, closes, lam, BR: tl.constexpr, BC: tl.constexpr):
    """Running sum += p; if the segment closes its chunk, θ_next = (1-λ)θ + λ θ_0 - sum (Eq. 31), sum = 0."""
    gs = _ld(g, r0, c0, nr, nc, stride, BR, BC) + p
    if closes:
        w = _ld(cur, r0, c0, nr, nc, stride, BR, BC)
        w0 = _ld(th0, r0, c0, nr, nc, stride, BR, BC)
        _st(nxt, r0, c0, nr, nc, stride, (1.0 - lam) * w + lam * w0 - gs, BR, BC)
        _st(g, r0, c0, nr, nc, stride, gs * 0.0, BR, BC)
    else:
        _st(g, r0, c0, nr, nc, stride, gs, BR, BC)


@triton.jit
def _phase_ab(zs, wg, wu, sa, sb, L, D, Fh, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
              PREC: tl.constexpr):
    """a = Z W_gateᵀ, b = Z W_upᵀ for the segment's tokens -> scratch (C, F)."""
    for tt in range(0, tl.cdiv(L, BT)):
        for ft in range(0, tl.cdiv(Fh, BF)):
            acc_a = tl.zeros((BT, BF), dtype=tl.float32)
            acc_b = tl.zeros((BT, BF), dtype=tl.float32)
            for dt in range(0, tl.cdiv(D, BD)):
                zt = _ld(zs, tt * BT, dt * BD, L, D, D, BT, BD)
                acc_a += tl.dot(zt, tl.trans(_ld(wg, ft * BF, dt * BD, Fh, D, D, BF, BD)), input_precision=PREC)
                acc_b += tl.dot(zt, tl.trans(_ld(wu, ft * BF, dt * BD, Fh, D, D, BF, BD)), input_precision=PREC)
            _st(sa, tt * BT, ft * BF, L, Fh, Fh, acc_a, BT, BF)
            _st(sb, tt * BT, ft * BF, L, Fh, Fh, acc_b, BT, BF)


@triton.jit
def _h_tile(sa, sb, tt, ft, L, Fh, BT: tl.constexpr, BF: tl.constexpr):
    a = _ld(sa, tt * BT, ft * BF, L, Fh, Fh, BT, BF)
    b = _ld(sb, tt * BT, ft * BF, L, Fh, Fh, BT, BF)
    sg = _sigmoid(a)
    s = a * sg
    return a, b, sg, s, s * b


@triton.jit
def _y_tile(sa, sb, wd, tt, dt, L, D, Fh, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
            PREC: tl.constexpr):
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for ft in range(0, tl.cdiv(Fh, BF)):
        a, b, sg, s, h = _h_tile(sa, sb, tt, ft, L, Fh, BT, BF)
        acc += tl.dot(h, tl.trans(_ld(wd, dt * BD, ft * BF, D, Fh, Fh, BD, BF)), input_precision=PREC)
    return acc


# --------------------------------------------------------------------------------------------- forward


@triton.jit
def _cms_fwd_kernel(
    z_ptr, tg_ptr, eta_ptr, lam_ptr, th0_ptr, th_ptr, g_ptr, y_ptr, sa_ptr, sb_ptr, sr_ptr, sda_ptr, sdb_ptr,
    T, D, Fh, C, shift, NSEG, NSLOT, CP, closes_last, learn_last,
    OBJ_L2: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    FD = Fh * D
    z_b = z_ptr + b * T * D
    tg_b = tg_ptr + b * T * D
    y_b = y_ptr + b * T * D
    eta_b = eta_ptr + b * T
    th_b = th_ptr + b * NSLOT * 3 * FD
    g_b = g_ptr + b * 3 * FD
    sa = sa_ptr + b * CP * Fh
    sb = sb_ptr + b * CP * Fh
    sda = sda_ptr + b * CP * Fh
    sdb = sdb_ptr + b * CP * Fh
    sr = sr_ptr + b * CP * D
    nft = tl.cdiv(Fh, BF)
    ndt = tl.cdiv(D, BD)
    for n in range(0, NSEG):
        s0 = tl.maximum(n * C - shift, 0)
        L = tl.minimum((n + 1) * C - shift, T) - s0
        ntt = tl.cdiv(L, BT)
        cur = th_b + (n % NSLOT) * 3 * FD
        nxt = th_b + ((n + 1) % NSLOT) * 3 * FD
        zs = z_b + s0 * D
        tgs = tg_b + s0 * D
        ys = y_b + s0 * D
        etas = eta_b + s0
        learn = (n < NSEG - 1) | (learn_last != 0)
        closes = (n < NSEG - 1) | (closes_last != 0)
        lam = tl.load(lam_ptr + b * NSEG + n)  # Eq. 31's pull for this sequence's chunk: 0 if all padding
        # ---- read: y = (silu(Z W_gateᵀ) * Z W_upᵀ) W_downᵀ with θ_n for every token of the segment
        _phase_ab(zs, cur, cur + FD, sa, sb, L, D, Fh, BT, BD, BF, PREC)
        tl.debug_barrier()
        for tt in range(0, ntt):
            for dt in range(0, ndt):
                y = _y_tile(sa, sb, cur + 2 * FD, tt, dt, L, D, Fh, BT, BD, BF, PREC)
                _st(ys, tt * BT, dt * BD, L, D, D, y, BT, BD)
                if learn:
                    tg = _ld(tgs, tt * BT, dt * BD, L, D, D, BT, BD)
                    if OBJ_L2:
                        r = y - tg
                    else:
                        r = -tg
                    _st(sr, tt * BT, dt * BD, L, D, D, r, BT, BD)
        tl.debug_barrier()
        # ---- learn: Σ_t eta_t ∇ℓ_t(θ_n), added to the running sums; Eq. 31's update if the chunk closes
        if learn:
            for ft in range(0, nft):
                for dt in range(0, ndt):
                    gd = tl.zeros((BD, BF), dtype=tl.float32)
                    for tt in range(0, ntt):
                        e = _ld(sr, tt * BT, dt * BD, L, D, D, BT, BD) * _ldv(etas, tt * BT, L, BT)[:, None]
                        a, bb, sg, s, h = _h_tile(sa, sb, tt, ft, L, Fh, BT, BF)
                        gd += tl.dot(tl.trans(e), h, input_precision=PREC)
                    _update(cur + 2 * FD, nxt + 2 * FD, g_b + 2 * FD, th0_ptr + 2 * FD, dt * BD, ft * BF, D, Fh, Fh,
                            gd, closes, lam, BD, BF)
                for tt in range(0, ntt):
                    dh = tl.zeros((BT, BF), dtype=tl.float32)
                    eta_t = _ldv(etas, tt * BT, L, BT)
                    for dt in range(0, ndt):
                        e = _ld(sr, tt * BT, dt * BD, L, D, D, BT, BD) * eta_t[:, None]
                        dh += tl.dot(e, _ld(cur + 2 * FD, dt * BD, ft * BF, D, Fh, Fh, BD, BF), input_precision=PREC)
                    a, bb, sg, s, h = _h_tile(sa, sb, tt, ft, L, Fh, BT, BF)
                    _st(sda, tt * BT, ft * BF, L, Fh, Fh, dh * bb * (sg + s * (1.0 - sg)), BT, BF)
                    _st(sdb, tt * BT, ft * BF, L, Fh, Fh, dh * s, BT, BF)
                tl.debug_barrier()
                for dt in range(0, ndt):
                    gg = tl.zeros((BF, BD), dtype=tl.float32)
                    gu = tl.zeros((BF, BD), dtype=tl.float32)
                    for tt in range(0, ntt):
                        zt = _ld(zs, tt * BT, dt * BD, L, D, D, BT, BD)
                        gg += tl.dot(tl.trans(_ld(sda, tt * BT, ft * BF, L, Fh, Fh, BT, BF)), zt, input_precision=PREC)
                        gu += tl.dot(tl.trans(_ld(sdb, tt * BT, ft * BF, L, Fh, Fh, BT, BF)), zt, input_precision=PREC)
                    _update(cur, nxt, g_b, th0_ptr, ft * BF, dt * BD, Fh, D, D, gg, closes, lam, BF, BD)
                    _update(cur + FD, nxt + FD, g_b + FD, th0_ptr + FD, ft * BF, dt * BD, Fh, D, D, gu, closes, lam,
                            BF, BD)
                tl.debug_barrier()
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------- backward


@triton.jit
def _cms_bwd_kernel(
    z_ptr, tg_ptr, eta_ptr, lam_ptr, th_ptr, gy_ptr, gbf_ptr, carry_ptr, th0b_ptr, gin_b_ptr,
    zb_ptr, tgb_ptr, etab_ptr,
    sa_ptr, sb_ptr, sr_ptr, sda_ptr, sdb_ptr, sdhb_ptr, sx1_ptr, sx2_ptr, syb_ptr,
    T, D, Fh, C, shift, NSEG, NSLOT, CP, closes_last,
    OBJ_L2: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    FD = Fh * D
    z_b = z_ptr + b * T * D
    tg_b = tg_ptr + b * T * D
    gy_b = gy_ptr + b * T * D
    zb_b = zb_ptr + b * T * D
    tgb_b = tgb_ptr + b * T * D
    eta_b = eta_ptr + b * T
    etab_b = etab_ptr + b * T
    th_b = th_ptr + b * NSLOT * 3 * FD
    gbf = gbf_ptr + b * 3 * FD
    carry = carry_ptr + b * 2 * 3 * FD
    th0b = th0b_ptr + b * 3 * FD
    gin_b = gin_b_ptr + b * 3 * FD
    sa = sa_ptr + b * CP * Fh
    sb = sb_ptr + b * CP * Fh
    sda = sda_ptr + b * CP * Fh
    sdb = sdb_ptr + b * CP * Fh
    sdhb = sdhb_ptr + b * CP * Fh
    sx1 = sx1_ptr + b * CP * Fh
    sx2 = sx2_ptr + b * CP * Fh
    sr = sr_ptr + b * CP * D
    syb = syb_ptr + b * CP * D
    nft = tl.cdiv(Fh, BF)
    ndt = tl.cdiv(D, BD)
    for i in range(0, NSEG):
        n = NSEG - 1 - i
        s0 = tl.maximum(n * C - shift, 0)
        L = tl.minimum((n + 1) * C - shift, T) - s0
        ntt = tl.cdiv(L, BT)
        cur = th_b + n * 3 * FD
        wg = cur
        wu = cur + FD
        wd = cur + 2 * FD
        nb = carry + ((n + 1) % 2) * 3 * FD  # dL/dθ_{n+1} (or dL/dθ_final for the last segment)
        ob = carry + (n % 2) * 3 * FD  # dL/dθ_n, written here
        closes = (n < NSEG - 1) | (closes_last != 0)
        lam = tl.load(lam_ptr + b * NSEG + n)  # the forward's per-(sequence, chunk) pull λ_n
        # Ḡ = gs * gp: the adjoint of this segment's inner-gradient sum; dirs: dθ_n gets dirs * dθ_{n+1}
        if closes:
            gp = nb
            gs = -1.0
            dirs = 1.0 - lam
        else:
            gp = gbf
            gs = 1.0
            dirs = 1.0
        zs = z_b + s0 * D
        tgs = tg_b + s0 * D
        gys = gy_b + s0 * D
        zbs = zb_b + s0 * D
        tgbs = tgb_b + s0 * D
        etas = eta_b + s0
        etabs = etab_b + s0
        # ---- B1, B2: recompute a, b, r = y - target from the saved θ_n
        _phase_ab(zs, wg, wu, sa, sb, L, D, Fh, BT, BD, BF, PREC)
        tl.debug_barrier()
        for tt in range(0, ntt):
            for dt in range(0, ndt):
                tg = _ld(tgs, tt * BT, dt * BD, L, D, D, BT, BD)
                if OBJ_L2:
                    r = _y_tile(sa, sb, wd, tt, dt, L, D, Fh, BT, BD, BF, PREC) - tg
                else:
                    r = -tg
                _st(sr, tt * BT, dt * BD, L, D, D, r, BT, BD)
        tl.debug_barrier()
        # ---- B3: dH, dA, dB (inner backprop) and their adjoints' (token, F) parts
        for tt in range(0, ntt):
            eta_t = _ldv(etas, tt * BT, L, BT)
            for ft in range(0, nft):
                dh = tl.zeros((BT, BF), dtype=tl.float32)
                dab = tl.zeros((BT, BF), dtype=tl.float32)
                dbb = tl.zeros((BT, BF), dtype=tl.float32)
                for dt in range(0, ndt):
                    e = _ld(sr, tt * BT, dt * BD, L, D, D, BT, BD) * eta_t[:, None]
                    dh += tl.dot(e, _ld(wd, dt * BD, ft * BF, D, Fh, Fh, BD, BF), input_precision=PREC)
                    zt = _ld(zs, tt * BT, dt * BD, L, D, D, BT, BD)
                    dab += tl.dot(zt, tl.trans(_ld(gp, ft * BF, dt * BD, Fh, D, D, BF, BD)), input_precision=PREC)
                    dbb += tl.dot(zt, tl.trans(_ld(gp + FD, ft * BF, dt * BD, Fh, D, D, BF, BD)),
                                  input_precision=PREC)
                dab = dab * gs
                dbb = dbb * gs
                a, bb, sg, s, h = _h_tile(sa, sb, tt, ft, L, Fh, BT, BF)
                sp = sg + s * (1.0 - sg)
                spp = sg * (1.0 - sg) * (2.0 + a * (1.0 - 2.0 * sg))
                _st(sda, tt * BT, ft * BF, L, Fh, Fh, dh * bb * sp, BT, BF)
                _st(sdb, tt * BT, ft * BF, L, Fh, Fh, dh * s, BT, BF)
                _st(sdhb, tt * BT, ft * BF, L, Fh, Fh, dab * bb * sp + dbb * s, BT, BF)
                _st(sx1, tt * BT, ft * BF, L, Fh, Fh, dbb * dh * sp + dab * dh * bb * spp, BT, BF)
                _st(sx2, tt * BT, ft * BF, L, Fh, Fh, dab * dh * sp, BT, BF)
        tl.debug_barrier()
        # ---- B4: Ē = H Ḡ_downᵀ + dH̄ W_downᵀ; ēta, target̄, Ȳ
        for tt in range(0, ntt):
            eta_t = _ldv(etas, tt * BT, L, BT)
            etab = tl.zeros((BT,), dtype=tl.float32)
            for dt in range(0, ndt):
                eb = tl.zeros((BT, BD), dtype=tl.float32)
                for ft in range(0, nft):
                    a, bb, sg, s, h = _h_tile(sa, sb, tt, ft, L, Fh, BT, BF)
                    eb += gs * tl.dot(h, tl.trans(_ld(gp + 2 * FD, dt * BD, ft * BF, D, Fh, Fh, BD, BF)),
                                      input_precision=PREC)
                    eb += tl.dot(_ld(sdhb, tt * BT, ft * BF, L, Fh, Fh, BT, BF),
                                 tl.trans(_ld(wd, dt * BD, ft * BF, D, Fh, Fh, BD, BF)), input_precision=PREC)
                r = _ld(sr, tt * BT, dt * BD, L, D, D, BT, BD)
                etab += tl.sum(eb * r, axis=1)
                rb = eb * eta_t[:, None]
                _st(tgbs, tt * BT, dt * BD, L, D, D, -rb, BT, BD)
                yb = _ld(gys, tt * BT, dt * BD, L, D, D, BT, BD)
                if OBJ_L2:
                    yb += rb
                _st(syb, tt * BT, dt * BD, L, D, D, yb, BT, BD)
            rows = tt * BT + tl.arange(0, BT)
            tl.store(etabs + rows, etab, mask=rows < L)
        tl.debug_barrier()
        # ---- B5: H̄ = E Ḡ_down + Ȳ W_down; Ā, B̄ (in place of X1, X2)
        for tt in range(0, ntt):
            eta_t = _ldv(etas, tt * BT, L, BT)
            for ft in range(0, nft):
                hb = tl.zeros((BT, BF), dtype=tl.float32)
                for dt in range(0, ndt):
                    e = _ld(sr, tt * BT, dt * BD, L, D, D, BT, BD) * eta_t[:, None]
                    hb += gs * tl.dot(e, _ld(gp + 2 * FD, dt * BD, ft * BF, D, Fh, Fh, BD, BF), input_precision=PREC)
                    hb += tl.dot(_ld(syb, tt * BT, dt * BD, L, D, D, BT, BD),
                                 _ld(wd, dt * BD, ft * BF, D, Fh, Fh, BD, BF), input_precision=PREC)
                a, bb, sg, s, h = _h_tile(sa, sb, tt, ft, L, Fh, BT, BF)
                sp = sg + s * (1.0 - sg)
                ab = hb * bb * sp + _ld(sx1, tt * BT, ft * BF, L, Fh, Fh, BT, BF)
                bbar = hb * s + _ld(sx2, tt * BT, ft * BF, L, Fh, Fh, BT, BF)
                _st(sx1, tt * BT, ft * BF, L, Fh, Fh, ab, BT, BF)
                _st(sx2, tt * BT, ft * BF, L, Fh, Fh, bbar, BT, BF)
        tl.debug_barrier()
        # ---- B6a: dL/dθ_n = dirs dL/dθ_{n+1} + (Āᵀ Z, B̄ᵀ Z, Ȳᵀ H + Eᵀ dH̄); decay anchor; Ḡ_in for n = 0
        for ft in range(0, nft):
            for dt in range(0, ndt):
                wgb = tl.zeros((BF, BD), dtype=tl.float32)
                wub = tl.zeros((BF, BD), dtype=tl.float32)
                wdb = tl.zeros((BD, BF), dtype=tl.float32)
                for tt in range(0, ntt):
                    zt = _ld(zs, tt * BT, dt * BD, L, D, D, BT, BD)
                    wgb += tl.dot(tl.trans(_ld(sx1, tt * BT, ft * BF, L, Fh, Fh, BT, BF)), zt, input_precision=PREC)
                    wub += tl.dot(tl.trans(_ld(sx2, tt * BT, ft * BF, L, Fh, Fh, BT, BF)), zt, input_precision=PREC)
                    a, bb, sg, s, h = _h_tile(sa, sb, tt, ft, L, Fh, BT, BF)
                    e = _ld(sr, tt * BT, dt * BD, L, D, D, BT, BD) * _ldv(etas, tt * BT, L, BT)[:, None]
                    wdb += tl.dot(tl.trans(_ld(syb, tt * BT, dt * BD, L, D, D, BT, BD)), h, input_precision=PREC)
                    wdb += tl.dot(tl.trans(e), _ld(sdhb, tt * BT, ft * BF, L, Fh, Fh, BT, BF), input_precision=PREC)
                nbg = _ld(nb, ft * BF, dt * BD, Fh, D, D, BF, BD)
                nbu = _ld(nb + FD, ft * BF, dt * BD, Fh, D, D, BF, BD)
                nbd = _ld(nb + 2 * FD, dt * BD, ft * BF, D, Fh, Fh, BD, BF)
                _st(ob, ft * BF, dt * BD, Fh, D, D, dirs * nbg + wgb, BF, BD)
                _st(ob + FD, ft * BF, dt * BD, Fh, D, D, dirs * nbu + wub, BF, BD)
                _st(ob + 2 * FD, dt * BD, ft * BF, D, Fh, Fh, dirs * nbd + wdb, BD, BF)
                if closes:
                    if lam != 0.0:
                        _st(th0b, ft * BF, dt * BD, Fh, D, D,
                            _ld(th0b, ft * BF, dt * BD, Fh, D, D, BF, BD) + lam * nbg, BF, BD)
                        _st(th0b + FD, ft * BF, dt * BD, Fh, D, D,
                            _ld(th0b + FD, ft * BF, dt * BD, Fh, D, D, BF, BD) + lam * nbu, BF, BD)
                        _st(th0b + 2 * FD, dt * BD, ft * BF, D, Fh, Fh,
                            _ld(th0b + 2 * FD, dt * BD, ft * BF, D, Fh, Fh, BD, BF) + lam * nbd, BD, BF)
                if n == 0:
                    _st(gin_b, ft * BF, dt * BD, Fh, D, D, gs * _ld(gp, ft * BF, dt * BD, Fh, D, D, BF, BD), BF, BD)
                    _st(gin_b + FD, ft * BF, dt * BD, Fh, D, D,
                        gs * _ld(gp + FD, ft * BF, dt * BD, Fh, D, D, BF, BD), BF, BD)
                    _st(gin_b + 2 * FD, dt * BD, ft * BF, D, Fh, Fh,
                        gs * _ld(gp + 2 * FD, dt * BD, ft * BF, D, Fh, Fh, BD, BF), BD, BF)
        # ---- B6b: Z̄ = Ā W_gate + B̄ W_up + dA Ḡ_gate + dB Ḡ_up
        for tt in range(0, ntt):
            for dt in range(0, ndt):
                zb = tl.zeros((BT, BD), dtype=tl.float32)
                for ft in range(0, nft):
                    zb += tl.dot(_ld(sx1, tt * BT, ft * BF, L, Fh, Fh, BT, BF),
                                 _ld(wg, ft * BF, dt * BD, Fh, D, D, BF, BD), input_precision=PREC)
                    zb += tl.dot(_ld(sx2, tt * BT, ft * BF, L, Fh, Fh, BT, BF),
                                 _ld(wu, ft * BF, dt * BD, Fh, D, D, BF, BD), input_precision=PREC)
                    zb += gs * tl.dot(_ld(sda, tt * BT, ft * BF, L, Fh, Fh, BT, BF),
                                      _ld(gp, ft * BF, dt * BD, Fh, D, D, BF, BD), input_precision=PREC)
                    zb += gs * tl.dot(_ld(sdb, tt * BT, ft * BF, L, Fh, Fh, BT, BF),
                                      _ld(gp + FD, ft * BF, dt * BD, Fh, D, D, BF, BD), input_precision=PREC)
                _st(zbs, tt * BT, dt * BD, L, D, D, zb, BT, BD)
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------- python


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _block_sizes(D: int, Fh: int, C: int) -> tuple[int, int, int]:
    cap = 32 if triton_interpreting() else 64
    return (max(16, min(_next_pow2(C), cap)), max(16, min(_next_pow2(D), cap)), max(16, min(_next_pow2(Fh), cap)))


def _num_segments(T: int, C: int, shift: int) -> int:
    return (T + shift + C - 1) // C if T > 0 else 0


def _segment_has_valid(mask: Optional[Tensor], chunk_has_valid: Tensor, T: int, C: int, shift: int) -> Tensor:
    """(B, NSEG) bool: whether the chunk that segment n belongs to has held a valid (mask = 1) token by the
    segment's end: one in the segment, or, for n = 0, one consumed before it (`chunk_has_valid`, (B,) bool).
    This decides Eq. 31's retention pull λ_n (SPEC §5: a chunk of padding changes no state)."""
    B = chunk_has_valid.shape[0]
    nseg = _num_segments(T, C, shift)
    valid = torch.ones(B, T, dtype=torch.bool, device=chunk_has_valid.device) if mask is None else mask != 0
    # Segment n covers the tokens [nC - shift, (n+1)C - shift): pad to whole chunks and reduce per chunk.
    valid = Fn.pad(valid, (shift, nseg * C - shift - T), value=False).reshape(B, nseg, C).any(-1)
    valid[:, 0] |= chunk_has_valid
    return valid


def check_kernel_inputs(tensors: dict, device: torch.device) -> None:
    """The constraints of the Triton kernels on top of the reference's own checks (ValueError)."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"cms Triton kernel: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16 "
                "(use cms_level_reference for float64)"
            )
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"cms Triton kernel: tensors are on {device.type}; the kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run on CPU tensors in Triton's interpreter)"
        )


class _CMSChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, tg, eta, lam, w_gate, w_up, w_down, s_wg, s_wu, s_wd, s_gg, s_gu, s_gd, cfg):
        B, T, D = z.shape
        Fh = w_gate.shape[0]
        C, pos = cfg["chunk_size"], cfg["position"]
        shift = pos % C
        nseg = _num_segments(T, C, shift)
        BT, BD, BF = _block_sizes(D, Fh, C)
        dev, f32 = z.device, torch.float32
        FD = Fh * D
        z_c = z.contiguous()
        th0 = torch.cat([w.detach().to(f32).reshape(-1) for w in (w_gate, w_up, w_down)]).contiguous()
        save = any(ctx.needs_input_grad)
        nslot = nseg + 1 if save else 2
        th = torch.empty(B, nslot, 3 * FD, device=dev, dtype=f32)
        g = torch.empty(B, 3 * FD, device=dev, dtype=f32)
        if s_wg is None:
            th[:, 0] = th0
            g.zero_()
        else:
            th[:, 0] = torch.cat([t.detach().to(f32).reshape(B, -1) for t in (s_wg, s_wu, s_wd)], 1)
            g.copy_(torch.cat([t.detach().to(f32).reshape(B, -1) for t in (s_gg, s_gu, s_gd)], 1))
        closes_last = (pos + T) % C == 0
        CP = triton.cdiv(min(C, T), BT) * BT
        sa = torch.empty(B, CP, Fh, device=dev, dtype=f32)
        sb, sda, sdb = torch.empty_like(sa), torch.empty_like(sa), torch.empty_like(sa)
        sr = torch.empty(B, CP, D, device=dev, dtype=f32)
        y = torch.empty(B, T, D, device=dev, dtype=z.dtype)
        _cms_fwd_kernel[(B,)](
            z_c, tg, eta, lam, th0, th, g, y, sa, sb, sr, sda, sdb,
            T, D, Fh, C, shift, nseg, nslot, CP, int(closes_last), int(cfg["learn_last"]),
            OBJ_L2=cfg["objective"] == "l2", BT=BT, BD=BD, BF=BF, PREC=DOT_PRECISION, num_warps=NUM_WARPS, num_stages=1,
        )
        fin = th[:, (nseg if closes_last else nseg - 1) % nslot]
        thf = [fin[:, :FD].reshape(B, Fh, D).clone(), fin[:, FD:2 * FD].reshape(B, Fh, D).clone(),
               fin[:, 2 * FD:].reshape(B, D, Fh).clone()]
        gf = [g[:, :FD].reshape(B, Fh, D), g[:, FD:2 * FD].reshape(B, Fh, D), g[:, 2 * FD:].reshape(B, D, Fh)]
        if save:
            ctx.save_for_backward(z_c, tg, eta, lam, th)
        ctx.cfg = cfg
        ctx.dims = (B, T, D, Fh, nseg, shift, nslot)
        ctx.has_state = s_wg is not None
        ctx.dtypes = (z.dtype, w_gate.dtype, w_up.dtype, w_down.dtype) + tuple(
            None if t is None else t.dtype for t in (s_wg, s_wu, s_wd, s_gg, s_gu, s_gd))
        return (y, *thf, *gf)

    @staticmethod
    def backward(ctx, gy, d_wg, d_wu, d_wd, d_gg, d_gu, d_gd):
        z, tg, eta, lam, th = ctx.saved_tensors
        cfg = ctx.cfg
        B, T, D, Fh, nseg, shift, nslot = ctx.dims
        C, pos = cfg["chunk_size"], cfg["position"]
        BT, BD, BF = _block_sizes(D, Fh, C)
        dev, f32 = z.device, torch.float32
        FD = Fh * D
        closes_last = (pos + T) % C == 0
        flat = lambda ts: torch.cat([t.to(f32).reshape(B, -1) for t in ts], 1).contiguous()  # noqa: E731
        carry = torch.empty(B, 2, 3 * FD, device=dev, dtype=f32)
        carry[:, nseg % 2] = flat((d_wg, d_wu, d_wd))
        gbf = flat((d_gg, d_gu, d_gd))
        th0b = torch.zeros(B, 3 * FD, device=dev, dtype=f32)
        gin_b = torch.empty(B, 3 * FD, device=dev, dtype=f32)
        zb = torch.empty(B, T, D, device=dev, dtype=f32)
        tgb = torch.empty_like(zb)
        etab = torch.empty(B, T, device=dev, dtype=f32)
        CP = triton.cdiv(min(C, T), BT) * BT
        sa = torch.empty(B, CP, Fh, device=dev, dtype=f32)
        sb, sda, sdb, sdhb, sx1, sx2 = (torch.empty_like(sa) for _ in range(6))
        sr = torch.empty(B, CP, D, device=dev, dtype=f32)
        syb = torch.empty_like(sr)
        _cms_bwd_kernel[(B,)](
            z, tg, eta, lam, th, gy.contiguous(), gbf, carry, th0b, gin_b, zb, tgb, etab,
            sa, sb, sr, sda, sdb, sdhb, sx1, sx2, syb,
            T, D, Fh, C, shift, nseg, nslot, CP, int(closes_last),
            OBJ_L2=cfg["objective"] == "l2", BT=BT, BD=BD, BF=BF, PREC=DOT_PRECISION, num_warps=NUM_WARPS, num_stages=1,
        )
        thb = carry[:, 0]  # dL/dθ of the first segment's start weights (segment 0 writes slot 0)
        split = lambda x: (x[:, :FD].reshape(-1, Fh, D), x[:, FD:2 * FD].reshape(-1, Fh, D),  # noqa: E731
                           x[:, 2 * FD:].reshape(-1, D, Fh))
        dt = ctx.dtypes
        p_grads = split(th0b.sum(0, keepdim=True))
        if ctx.has_state:
            s_grads = tuple(x.to(d) for x, d in zip(split(thb) + split(gin_b), dt[4:]))
            p_grads = tuple(x[0] for x in p_grads)
        else:
            s_grads = (None,) * 6
            p_grads = tuple(x[0] + y.sum(0) for x, y in zip(p_grads, split(thb)))
        return (zb.to(dt[0]), tgb, etab, None, p_grads[0].to(dt[1]), p_grads[1].to(dt[2]), p_grads[2].to(dt[3]),
                *s_grads, None)


def cms_level_triton(
    z: Tensor,
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
    mask: Optional[Tensor] = None,
    state: Optional[CMSState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[CMSState]]:
    """One CMS level on Triton; arguments, shapes and semantics as `cms_level_reference`.

    Differentiable (exactly, second-order terms included) in z, w_gate, w_up, w_down, p_v, w_eta, b_eta and
    the six tensors of `state`.
    """
    B, T, D, Fh = _validate(
        z, w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size, eta_max, objective, decay, mask, state
    )
    named = {"z": z, "w_gate": w_gate, "w_up": w_up, "w_down": w_down, "p_v": p_v, "w_eta": w_eta, "b_eta": b_eta}
    if state is not None:
        named.update({f"state.{k}": getattr(state, k) for k in CMSState._fields[:6]})
    check_kernel_inputs(named, z.device)
    f32 = torch.float32
    position = 0 if state is None else int(state.position)
    with _no_autocast(z.device):
        zf = z.to(f32)
        if T == 0:
            if not output_final_state:
                return z.new_zeros(B, 0, D), None
            if state is not None:
                same = {k: getattr(state, k).to(f32) for k in CMSState._fields[:6]}
                return z.new_zeros(B, 0, D), state._replace(**same)
            theta = [w.to(f32).expand(B, -1, -1).contiguous() for w in (w_gate, w_up, w_down)]
            return z.new_zeros(B, 0, D), CMSState(*theta, *(torch.zeros_like(w) for w in theta), position=0,
                                                  chunk_has_valid=torch.zeros(B, dtype=torch.bool, device=z.device))
        if state is None and not output_final_state and T <= chunk_size:
            # No update is ever read: an ordinary SwiGLU FFN with θ_0, at the cost of one.
            wg, wu, wd = (w.to(f32) for w in (w_gate, w_up, w_down))
            y = (Fn.silu(zf @ wg.mT) * (zf @ wu.mT)) @ wd.mT
            return y.to(z.dtype), None
        tg = (zf @ p_v.to(f32)).contiguous()
        eta = eta_max * torch.sigmoid(zf @ w_eta.to(f32) + b_eta.to(f32).reshape(()))
        if mask is not None:
            eta = eta * mask.to(device=z.device, dtype=f32)
        eta = eta.contiguous()
        seen = torch.zeros(B, dtype=torch.bool, device=z.device) if state is None else state.chunk_has_valid
        seg_valid = _segment_has_valid(mask, seen, T, chunk_size, position % chunk_size)  # (B, NSEG)
        # λ_n of Eq. 31 per (sequence, segment): decay, or 0 for a chunk with no valid token (SPEC §5).
        lam = (float(decay) * seg_valid.to(f32)).contiguous()
        cfg = dict(chunk_size=chunk_size, position=position, objective=objective, learn_last=bool(output_final_state))
        s = (None,) * 6 if state is None else tuple(state[:6])
        y, *fin = _CMSChunkFn.apply(z, tg, eta, lam, w_gate, w_up, w_down, *s, cfg)
    final = None
    if output_final_state:
        # the chunk in progress after the last token: none if it closed, else the last segment's
        seen = seg_valid[:, -1] & ((position + T) % chunk_size != 0)
        final = CMSState(*fin, position=position + T, chunk_has_valid=seen)
    return y, final
