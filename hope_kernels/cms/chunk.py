"""Triton kernels of one Continuum Memory System level (SPEC §3 v2), forward and exact backward.

Same signature and semantics as `cms_level_reference` (hope_kernels/cms/reference.py, the contract is
docs/cms/README.md §5): `cms_level_triton` returns y and, on request, the final `CMSState`. Inputs fp32 / fp16 /
bf16; fast weights, inner-gradient sums and the step normaliser N_c in fp32 (SPEC §5); products on tensor cores
(tf32 for fp32 inputs, bf16 operands for 16-bit inputs, fp32 accumulation; `_common.py`); y in z.dtype.

Design
------
* Outside the recurrence, PyTorch computes over all tokens at once what does not depend on the fast weights:
  target = z P_v, eta = eta_max σ(z·w_eta + b_eta)·mask, ‖z_t‖² (the Levenberg-Marquardt term of κ_t) and the
  per-(sequence, chunk) retention pull λ_n. Their outer gradients come back from the kernels and autograd carries
  them to z, P_v, w_eta, b_eta.
* Parallel over (sequence x tiles of F): grid (F / BF, B), 80 programs at the 340M shape (D = 1024, F = 640,
  BF = 64, B = 8) and 168 at 1.3B in the forward, twice that in the backward (BF = 32, `block_sizes`).
  Program (j, b) owns rows [jBF, (j+1)BF) of W_gate and W_up and the same columns
  of W_down of sequence b: everything the chunk step does is local to that slice (A = Z W_gateᵀ and B = Z W_upᵀ
  reduce over D, which the program holds whole; G_gate = dAᵀ Z, G_up = dBᵀ Z and G_down = Eᵀ H are the slice's
  own blocks; the column norms c_f of W_down are the slice's own columns), except two reductions over F: the
  read Y = H W_downᵀ (so E = eta (Y - target), which every slice needs whole), and κ_t's partial sums
  Σ_f R²_tf c_f and Σ_f H_tf² (so N_c). Both are one cross-tile reduction per chunk, done with fp32 atomics into
  (B, T, D) and (B, T) buffers (`atomic_acc`: one atomic per 2·BF FLOPs of the read, one per ~14·BF FLOPs of
  the chunk; the summation order, and so the last bits of y, vary from run to run, as in flash-attention's dQ).
* One launch per chunk, no device-wide barrier. Launch n runs, in every program, the second half of segment n-1
  (E from the reduced Y, dH = E W_down, the update of the program's slice of θ, i.e. θ written once per chunk)
  and then the first half of segment n (A, B, H with the θ just written, Y's and κ's partial sums): the first
  half of a chunk needs only the program's own slice of the new θ, so the launch boundary is the only sync and it
  falls where the reduction is. NSEG + 1 launches per forward, NSEG + 1 per backward (same fusion, reversed).
  Why not a persistent kernel with a per-sequence spin barrier: (1) a spin barrier deadlocks unless every
  program is resident at once, which nothing guarantees while other kernels (NCCL under FSDP) hold SMs, and
  Triton's interpreter runs programs one after another, so that path could never be tested here; (2) what it
  would save is a launch (~3-5 µs, ~1-2 µs inside a CUDA graph) per chunk, against a chunk that costs, at
  B = 8 and the 340M shape, ~45 µs at the memory floor (C <= 128: ten fp32 passes over the slice's θ, below)
  and ~50 µs of tensor-core work at C = 512: a few percent at C >= 512 and ~10 % at C = 16, and the barrier
  itself costs a few µs of atomics round trips. The launches take only Python ints and preallocated buffers (no
  host sync), so a CUDA graph can capture a whole forward or backward; what stays nondeterministic is the
  atomics' order. NOT MEASURED ON A GPU: this is the reasoning, the GPU suite times it (benchmarks/).
* Saved state (SPEC §3 v2, no θ per chunk): per token the pre-activations A, B and dH = E W_down (B, T, F each,
  fp32, bf16 for 16-bit inputs), the reduced Y (B, T, D, fp32, from which E = eta (Y - target)), κ's sum
  q_t = Σ_f R²_tf c_f (B, T); per chunk N_c (B, NSEG); and θ every K chunks (`checkpoint_every`: K = 256 at
  λ = 0, 37 at the default λ = 0.05, 1 for λ >= 0.9). The backward rebuilds θ_n from θ_{n+1} by inverting the
  update with Δ_n recomputed from the factors (dA = dH ⊙ B ⊙ silu'(A), dB = dH ⊙ silu(A), E, H): the same code
  and operands as the forward's update, so Δ_n equals the forward's up to the order of its token sums (the
  backward's token tile is smaller) and the rebuilt θ_n differs from the forward's by rounding only (at most
  K (1 - λ)^-K roundings since the last checkpoint). Bytes at the 340M shape:
  docs/cms/README.md §5.
* Backward of segment n (derived in docs/cms/README.md §5; checked against float64 autograd of the reference):
  with Ḡ = -θ̄_{n+1} / N_c the adjoint of the chunk's gradient sum (or the final state's running-sum cotangent),
  launch part 1 (B1) rebuilds θ_n, computes dĀ = Z Ḡ_gateᵀ, dB̄ = Z Ḡ_upᵀ, E Ḡ_down and the partial sums over F
  of Ē = H Ḡ_downᵀ + dH̄ W_downᵀ (dH̄ = dĀ ⊙ B ⊙ silu'(A) + dB̄ ⊙ silu(A)) and of ⟨Ḡ, G⟩ (so
  N̄ = -⟨Ḡ, G⟩ / N_c); after the launch boundary, part 2 (B2) forms H̄, Ā, B̄ (with κ's terms κ̄_t = m_t N̄) and
  the weight gradients W̄_gate = Āᵀ Z, W̄_up = B̄ᵀ Z, W̄_down = Ȳᵀ H + Eᵀ dH̄ + 2 W_down ⊙ c̄, the partial sums of
  Z̄ = Ā W_gate + B̄ W_up + dA Ḡ_gate + dB Ḡ_up, and θ̄_n = (1 - λ) θ̄_{n+1} + W̄, θ̄_0 += λ θ̄_{n+1}.
* A level that never updates within the call (no state, no final state requested, T <= chunk_size) is an
  ordinary SwiGLU FFN: three matmuls in PyTorch, no kernel.

Constraints (ValueError otherwise): z, the parameters and the state tensors float32, float16 or bfloat16
(float64: use cms_level_reference); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Any D, F, chunk_size >= 1.
Verified in the interpreter (tests/hope_kernels/cms/test_chunk.py) and by an offline sm_90a compile
(benchmarks/cms_sm90_check.py); never run on a GPU yet.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as Fn
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels._dispatch import triton_interpreting
from hope_kernels.cms._common import (
    atomic_acc,
    check_index_range,
    check_kernel_inputs,
    checkpoint_every,
    device_fn,
    dot_precision,
    launch,
    ld,
    ld_raw,
    ldv,
    low_precision_dots,
    mm,
    next_pow2,
    num_segments,
    segment_has_valid,
    sigmoid,
    st,
)
from hope_kernels.cms.reference import CMSState, _no_autocast, _validate

__all__ = ["cms_level_triton"]

# (BT, BD, BF): token tile, D block, F tile (= the program's slice of θ), for the forward and the backward
# separately (the backward reads only full-width saved factors, so its F tiling need not be the forward's).
# Chosen with the offline sm_90a compile (benchmarks/cms_sm90_check.py, docs/cms/README.md §5.1): the forward at
# (64, 64, 64) spilled 12-24 B at C = 128, and keeps its 64-token tile with D blocks of 32; the backward's
# elementwise adjoints keep ~12 (BT, BF) fp32 tensors live, which spilled at BF = 64 (32-124 B, bf16 and C = 128),
# so it takes (32, 64, 32), which also doubles its programs (160 at the 340M shape, B = 8). The interpreter's are
# smaller so that tiny test shapes still have several F tiles (the cross-tile reduction) and several blocks along
# every axis.
GPU_FWD_BLOCKS = (64, 32, 64)
GPU_BWD_BLOCKS = (32, 64, 32)
INTERPRETER_FWD_BLOCKS = INTERPRETER_BWD_BLOCKS = (32, 32, 16)


def block_sizes(C: int, D: int, Fh: int, backward: bool = False) -> tuple[int, int, int]:
    """(BT, BD, BF), powers of two >= 16 (tl.dot's minimum), capped by the dims."""
    if triton_interpreting():
        cap_t, cap_d, cap_f = INTERPRETER_BWD_BLOCKS if backward else INTERPRETER_FWD_BLOCKS
    else:
        cap_t, cap_d, cap_f = GPU_BWD_BLOCKS if backward else GPU_FWD_BLOCKS
    return (max(16, min(next_pow2(C), cap_t)), max(16, min(next_pow2(D), cap_d)), max(16, min(next_pow2(Fh), cap_f)))


def launch_options() -> dict:
    """num_warps / num_stages, chosen with the offline sm_90a compile (benchmarks/cms_sm90_check.py, docs/cms/README.md
    §5): 8 warps and 1 stage for fp32 and bf16 operands alike. 4 warps spill 0.1-3 KB per thread, 16 warps spill
    more than 8, and every extra stage (software pipelining of the tile loops) adds spills and shared memory, e.g.
    the bf16 backward at C = 128 goes from 52 B to 928 B of spill stores at 2 stages. The interpreter takes one
    config (it cannot autotune, and autotune's repeated launches would corrupt the workspaces these kernels read
    and write)."""
    if triton_interpreting():
        return dict(num_warps=4, num_stages=1)
    return dict(num_warps=8, num_stages=1)


# --------------------------------------------------------------------------------------------- device parts


@device_fn
def _e_tile(y_s, tg_s, eta_s, t0, d0, L, D, OBJ_L2: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """E = eta ⊙ (Y - target) ("l2") or -eta ⊙ target ("dot"): dℓ_t/dy_t weighted by eta_t, (BT, BD) fp32."""
    eta = ldv(eta_s, t0, L, BT)
    tg = ld(tg_s, t0, d0, L, D, D, BT, BD)
    if OBJ_L2:
        r = ld(y_s, t0, d0, L, D, D, BT, BD) - tg
    else:
        r = -tg
    return r * eta[:, None]


@device_fn
def _ybar_tile(gy_s, eb_s, eta_s, t0, d0, L, D, OBJ_L2: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Ȳ = dL/dy + eta ⊙ Ē ("l2": E depends on Y) or dL/dy ("dot"), (BT, BD) fp32."""
    yb = ld(gy_s, t0, d0, L, D, D, BT, BD)
    if OBJ_L2:
        yb += ld(eb_s, t0, d0, L, D, D, BT, BD) * ldv(eta_s, t0, L, BT)[:, None]
    return yb


@device_fn
def _operands(fa_s, fb_s, fdh_s, s1, s2, s3, L, Fh, f0, BT: tl.constexpr, BF: tl.constexpr):
    """dA = dH ⊙ B ⊙ silu'(A), dB = dH ⊙ silu(A), H = silu(A) ⊙ B from the saved factors -> the dot-operand scratch.
    Forward and backward both form them here, from the same stored values, so Δ_n is the same in both up to the
    order of the token sums (their token tiles differ)."""
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        a = ld(fa_s, t0, f0, L, Fh, Fh, BT, BF)
        bm = ld(fb_s, t0, f0, L, Fh, Fh, BT, BF)
        dh = ld(fdh_s, t0, f0, L, Fh, Fh, BT, BF)
        sg = sigmoid(a)
        s = a * sg
        st(s1, t0, f0, L, Fh, Fh, dh * bm * (sg + s * (1.0 - sg)), BT, BF)
        st(s2, t0, f0, L, Fh, Fh, dh * s, BT, BF)
        st(s3, t0, f0, L, Fh, Fh, s * bm, BT, BF)


@device_fn
def _g_gate_up(z_s, s1, s2, L, D, Fh, f0, d0, LOWP: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
               BD: tl.constexpr, BF: tl.constexpr):
    """The slice's (F, D) blocks at column d0 of G_gate = dAᵀ Z and G_up = dBᵀ Z: Σ_t eta_t ∇ℓ_t(θ_c) over the
    segment (paper Eq. 31)."""
    gg = tl.zeros((BF, BD), dtype=tl.float32)
    gu = tl.zeros((BF, BD), dtype=tl.float32)
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        zt = ld_raw(z_s, t0, d0, L, D, D, BT, BD)
        gg += mm(tl.trans(ld_raw(s1, t0, f0, L, Fh, Fh, BT, BF)), zt, PREC, LOWP)
        gu += mm(tl.trans(ld_raw(s2, t0, f0, L, Fh, Fh, BT, BF)), zt, PREC, LOWP)
    return gg, gu


@device_fn
def _g_down(y_s, tg_s, eta_s, s3, L, D, Fh, f0, d0, OBJ_L2: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
            BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """The slice's (D, F) block at row d0 of G_down = Eᵀ H (a pass of its own: fewer live registers)."""
    gd = tl.zeros((BD, BF), dtype=tl.float32)
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        e = _e_tile(y_s, tg_s, eta_s, t0, d0, L, D, OBJ_L2, BT, BD)
        gd += mm(tl.trans(e), ld_raw(s3, t0, f0, L, Fh, Fh, BT, BF), PREC, LOWP)
    return gd


@device_fn
def _copy_theta(src, th_b, cb_b, D, Fh, f0, BD: tl.constexpr, BF: tl.constexpr):
    """The slice of θ from `src` (a checkpoint or the call's start) into the workspace, and its c_f = ‖W_down[:, f]‖²."""
    FD = Fh * D
    c = tl.zeros((BF,), dtype=tl.float32)
    for dt in range(0, tl.cdiv(D, BD)):
        d0 = dt * BD
        st(th_b, f0, d0, Fh, D, D, ld(src, f0, d0, Fh, D, D, BF, BD), BF, BD)
        st(th_b + FD, f0, d0, Fh, D, D, ld(src + FD, f0, d0, Fh, D, D, BF, BD), BF, BD)
        wd = ld(src + 2 * FD, d0, f0, D, Fh, Fh, BD, BF)
        st(th_b + 2 * FD, d0, f0, D, Fh, Fh, wd, BD, BF)
        c += tl.sum(wd * wd, axis=0)
    cols = f0 + tl.arange(0, BF)
    tl.store(cb_b + cols, c, mask=cols < Fh)


@device_fn
def _fwd_read(z_s, y_s, q_s, p_s, fa_s, fb_s, th_b, cb_b, L, D, Fh, f0, LOWP: tl.constexpr, PREC: tl.constexpr,
              BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """First half of a segment: A = Z W_gateᵀ, B = Z W_upᵀ (saved), H = silu(A) ⊙ B, and the slice's partial sums
    over F of Y = H W_downᵀ, q_t = Σ_f R²_tf c_f and p_t = Σ_f H²_tf (κ_t = ‖z_t‖² (1 + q_t) + p_t)."""
    FD = Fh * D
    cols = f0 + tl.arange(0, BF)
    c = tl.load(cb_b + cols, mask=cols < Fh, other=0.0)
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        acc_a = tl.zeros((BT, BF), dtype=tl.float32)
        acc_b = tl.zeros((BT, BF), dtype=tl.float32)
        for dt in range(0, tl.cdiv(D, BD)):
            zt = ld_raw(z_s, t0, dt * BD, L, D, D, BT, BD)
            acc_a += mm(zt, tl.trans(ld_raw(th_b, f0, dt * BD, Fh, D, D, BF, BD)), PREC, LOWP)
            acc_b += mm(zt, tl.trans(ld_raw(th_b + FD, f0, dt * BD, Fh, D, D, BF, BD)), PREC, LOWP)
        st(fa_s, t0, f0, L, Fh, Fh, acc_a, BT, BF)
        st(fb_s, t0, f0, L, Fh, Fh, acc_b, BT, BF)
        sg = sigmoid(acc_a)
        s = acc_a * sg
        u = acc_b * (sg + s * (1.0 - sg))  # B ⊙ silu'(A)
        h = s * acc_b
        rows = t0 + tl.arange(0, BT)
        tl.atomic_add(q_s + rows, tl.sum((s * s + u * u) * c[None, :], axis=1), mask=rows < L, sem="relaxed")
        tl.atomic_add(p_s + rows, tl.sum(h * h, axis=1), mask=rows < L, sem="relaxed")
        for dt in range(0, tl.cdiv(D, BD)):
            yp = mm(h, tl.trans(ld_raw(th_b + 2 * FD, dt * BD, f0, D, Fh, Fh, BD, BF)), PREC, LOWP)
            atomic_acc(y_s, t0, dt * BD, L, D, D, yp, BT, BD)


@device_fn
def _fwd_learn(z_s, tg_s, y_s, eta_s, zz_s, mk_s, q_s, p_s, fa_s, fb_s, fdh_s, s1, s2, s3, th_b, th0_ptr, gin_b,
               nin_b, gout_b, ck_s, cb_b, nb_b, lam_b, n, j, L, D, Fh, f0, closes, store_ck,
               OBJ_L2: tl.constexpr, HAS_GIN: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
               BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """Second half of segment n: N_c, dH = E W_down (saved), and θ_{n+1} = (1 - λ) θ_n + λ θ_0 - G / N_c for the
    slice (Eq. 31, SPEC §3 v2), or the running sums G if the segment does not close its chunk."""
    FD = Fh * D
    # N_c = Σ_t m_t κ_t (+ the state's running sum for the call's first segment)
    acc = tl.zeros((BT,), dtype=tl.float32)
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        acc += ldv(mk_s, t0, L, BT) * (ldv(zz_s, t0, L, BT) * (1.0 + ldv(q_s, t0, L, BT)) + ldv(p_s, t0, L, BT))
    ntot = tl.sum(acc, axis=0)
    if HAS_GIN:
        if n == 0:
            ntot += tl.load(nin_b)
    if j == 0:
        tl.store(nb_b + n, ntot)
    nprime = tl.where(ntot > 0, ntot, 1.0)  # no valid token: G = 0 too, divide by 1
    # dH = E W_down over the whole chunk (E needs the reduced Y: this is after the launch boundary)
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        dh = tl.zeros((BT, BF), dtype=tl.float32)
        for dt in range(0, tl.cdiv(D, BD)):
            e = _e_tile(y_s, tg_s, eta_s, t0, dt * BD, L, D, OBJ_L2, BT, BD)
            dh += mm(e, ld_raw(th_b + 2 * FD, dt * BD, f0, D, Fh, Fh, BD, BF), PREC, LOWP)
        st(fdh_s, t0, f0, L, Fh, Fh, dh, BT, BF)
    tl.debug_barrier()
    _operands(fa_s, fb_s, fdh_s, s1, s2, s3, L, Fh, f0, BT, BF)
    tl.debug_barrier()
    lam = tl.load(lam_b + n)  # Eq. 31's pull for this sequence's chunk: 0 if the chunk is all padding
    cnew = tl.zeros((BF,), dtype=tl.float32)
    for dt in range(0, tl.cdiv(D, BD)):
        d0 = dt * BD
        gg, gu = _g_gate_up(z_s, s1, s2, L, D, Fh, f0, d0, LOWP, PREC, BT, BD, BF)
        if HAS_GIN:
            if n == 0:
                gg += ld(gin_b, f0, d0, Fh, D, D, BF, BD)
                gu += ld(gin_b + FD, f0, d0, Fh, D, D, BF, BD)
        if closes:
            wg = (1.0 - lam) * ld(th_b, f0, d0, Fh, D, D, BF, BD) + lam * ld(th0_ptr, f0, d0, Fh, D, D, BF, BD)
            wg = wg - gg / nprime
            st(th_b, f0, d0, Fh, D, D, wg, BF, BD)
            wu = (1.0 - lam) * ld(th_b + FD, f0, d0, Fh, D, D, BF, BD) + lam * ld(th0_ptr + FD, f0, d0, Fh, D, D,
                                                                                  BF, BD)
            wu = wu - gu / nprime
            st(th_b + FD, f0, d0, Fh, D, D, wu, BF, BD)
            if store_ck:
                st(ck_s, f0, d0, Fh, D, D, wg, BF, BD)
                st(ck_s + FD, f0, d0, Fh, D, D, wu, BF, BD)
        else:
            st(gout_b, f0, d0, Fh, D, D, gg, BF, BD)
            st(gout_b + FD, f0, d0, Fh, D, D, gu, BF, BD)
        gd = _g_down(y_s, tg_s, eta_s, s3, L, D, Fh, f0, d0, OBJ_L2, LOWP, PREC, BT, BD, BF)
        if HAS_GIN:
            if n == 0:
                gd += ld(gin_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF)
        if closes:
            wd = (1.0 - lam) * ld(th_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF) + lam * ld(th0_ptr + 2 * FD, d0, f0, D,
                                                                                       Fh, Fh, BD, BF)
            wd = wd - gd / nprime
            st(th_b + 2 * FD, d0, f0, D, Fh, Fh, wd, BD, BF)
            if store_ck:
                st(ck_s + 2 * FD, d0, f0, D, Fh, Fh, wd, BD, BF)
            cnew += tl.sum(wd * wd, axis=0)
        else:
            st(gout_b + 2 * FD, d0, f0, D, Fh, Fh, gd, BD, BF)
    if closes:
        cols = f0 + tl.arange(0, BF)
        tl.store(cb_b + cols, cnew, mask=cols < Fh)


@triton.jit(do_not_specialize=["n_prev", "n_cur", "shift", "closes_last"])  # one binary for every launch of a call
def _cms_fwd_kernel(
    z_ptr, tg_ptr, eta_ptr, zz_ptr, mk_ptr, lam_ptr, th0_ptr, gin_ptr, nin_ptr,
    th_ptr, ck_ptr, gout_ptr, cb_ptr, y_ptr, q_ptr, p_ptr, fa_ptr, fb_ptr, fdh_ptr, s1_ptr, s2_ptr, s3_ptr, nb_ptr,
    n_prev, n_cur, T, D, Fh, C, shift, NSEG, CP, NCK, KCK, closes_last,
    OBJ_L2: tl.constexpr, HAS_GIN: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
):
    """Launch n: the second half of segment n_prev (if >= 0), then the first half of segment n_cur (if < NSEG)."""
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    f0 = j * BF
    FD = Fh * D
    th_b = th_ptr + b * 3 * FD
    cb_b = cb_ptr + b * Fh
    if n_prev >= 0:
        n = n_prev
        s0 = tl.maximum(n * C - shift, 0)
        L = tl.minimum((n + 1) * C - shift, T) - s0
        tok = b * T + s0
        closes = (n < NSEG - 1) | (closes_last != 0)
        store_ck = ((n + 1) % KCK == 0) & (n + 1 < NSEG)
        _fwd_learn(z_ptr + tok * D, tg_ptr + tok * D, y_ptr + tok * D, eta_ptr + tok, zz_ptr + tok, mk_ptr + tok,
                   q_ptr + tok, p_ptr + tok, fa_ptr + tok * Fh, fb_ptr + tok * Fh, fdh_ptr + tok * Fh,
                   s1_ptr + b * CP * Fh, s2_ptr + b * CP * Fh, s3_ptr + b * CP * Fh, th_b, th0_ptr,
                   gin_ptr + b * 3 * FD, nin_ptr + b, gout_ptr + b * 3 * FD,
                   ck_ptr + (b * NCK + (n + 1) // KCK - 1) * 3 * FD, cb_b, nb_ptr + b * NSEG, lam_ptr + b * NSEG,
                   n, j, L, D, Fh, f0, closes, store_ck, OBJ_L2, HAS_GIN, LOWP, PREC, BT, BD, BF)
        tl.debug_barrier()
    if n_cur < NSEG:
        n = n_cur
        s0 = tl.maximum(n * C - shift, 0)
        L = tl.minimum((n + 1) * C - shift, T) - s0
        tok = b * T + s0
        _fwd_read(z_ptr + tok * D, y_ptr + tok * D, q_ptr + tok, p_ptr + tok, fa_ptr + tok * Fh, fb_ptr + tok * Fh,
                  th_b, cb_b, L, D, Fh, f0, LOWP, PREC, BT, BD, BF)


@device_fn
def _bwd_prepare(z_s, tg_s, y_s, eta_s, fa_s, fb_s, fdh_s, eb_s, s1, s2, s3, x1, x2, x3, th_b, thb_b, gsb_b, th0_ptr,
                 ts_b, ck_b, gin_b, cb_b, gdot_b, nb_b, lam_b, n, L, D, Fh, f0, KCK, closes,
                 OBJ_L2: tl.constexpr, HAS_GIN: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """B1 of segment n: θ_n into the workspace, then dĀ = Z Ḡ_gateᵀ, dB̄ = Z Ḡ_upᵀ, E Ḡ_down (kept for B2) and the
    slice's partial sums of Ē = H Ḡ_downᵀ + dH̄ W_downᵀ and of ⟨Ḡ, G⟩ (N̄ = -⟨Ḡ, G⟩ / N_c)."""
    FD = Fh * D
    lam = tl.load(lam_b + n)
    ntot = tl.load(nb_b + n)
    nprime = tl.where(ntot > 0, ntot, 1.0)
    _operands(fa_s, fb_s, fdh_s, s1, s2, s3, L, Fh, f0, BT, BF)
    tl.debug_barrier()
    # θ_n: the call's start, a checkpoint, or the forward's update inverted (θ_{n+1} is in the workspace)
    if n == 0:
        _copy_theta(ts_b, th_b, cb_b, D, Fh, f0, BD, BF)
    elif n % KCK == 0:
        _copy_theta(ck_b + (n // KCK - 1).to(tl.int64) * 3 * FD, th_b, cb_b, D, Fh, f0, BD, BF)
    elif closes:
        inv = 1.0 / (1.0 - lam)
        c = tl.zeros((BF,), dtype=tl.float32)
        for dt in range(0, tl.cdiv(D, BD)):
            d0 = dt * BD
            gg, gu = _g_gate_up(z_s, s1, s2, L, D, Fh, f0, d0, LOWP, PREC, BT, BD, BF)
            wg = (ld(th_b, f0, d0, Fh, D, D, BF, BD) - lam * ld(th0_ptr, f0, d0, Fh, D, D, BF, BD) + gg / nprime) * inv
            st(th_b, f0, d0, Fh, D, D, wg, BF, BD)
            wu = (ld(th_b + FD, f0, d0, Fh, D, D, BF, BD) - lam * ld(th0_ptr + FD, f0, d0, Fh, D, D, BF, BD)
                  + gu / nprime) * inv
            st(th_b + FD, f0, d0, Fh, D, D, wu, BF, BD)
            gd = _g_down(y_s, tg_s, eta_s, s3, L, D, Fh, f0, d0, OBJ_L2, LOWP, PREC, BT, BD, BF)
            wd = (ld(th_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF) - lam * ld(th0_ptr + 2 * FD, d0, f0, D, Fh, Fh, BD, BF)
                  + gd / nprime) * inv
            st(th_b + 2 * FD, d0, f0, D, Fh, Fh, wd, BD, BF)
            c += tl.sum(wd * wd, axis=0)
        cols = f0 + tl.arange(0, BF)
        tl.store(cb_b + cols, c, mask=cols < Fh)
    tl.debug_barrier()
    # Ḡ = gs * src: -θ̄_{n+1} / N_c when the segment closes its chunk, else the final running sums' cotangent
    if closes:
        src = thb_b
        gs = -1.0 / nprime
    else:
        src = gsb_b
        gs = ntot * 0.0 + 1.0
    dotp = tl.zeros((BT,), dtype=tl.float32)
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        dab = tl.zeros((BT, BF), dtype=tl.float32)
        dbb = tl.zeros((BT, BF), dtype=tl.float32)
        egd = tl.zeros((BT, BF), dtype=tl.float32)
        for dt in range(0, tl.cdiv(D, BD)):
            d0 = dt * BD
            zt = ld_raw(z_s, t0, d0, L, D, D, BT, BD)
            dab += mm(zt, tl.trans(ld(src, f0, d0, Fh, D, D, BF, BD)), PREC, LOWP)
            dbb += mm(zt, tl.trans(ld(src + FD, f0, d0, Fh, D, D, BF, BD)), PREC, LOWP)
        dab = dab * gs
        dbb = dbb * gs
        st(x1, t0, f0, L, Fh, Fh, dab, BT, BF)
        st(x2, t0, f0, L, Fh, Fh, dbb, BT, BF)
        for dt in range(0, tl.cdiv(D, BD)):
            d0 = dt * BD
            e = _e_tile(y_s, tg_s, eta_s, t0, d0, L, D, OBJ_L2, BT, BD)
            egd += mm(e, ld(src + 2 * FD, d0, f0, D, Fh, Fh, BD, BF), PREC, LOWP)
        egd = egd * gs
        st(x3, t0, f0, L, Fh, Fh, egd, BT, BF)
        a = ld(fa_s, t0, f0, L, Fh, Fh, BT, BF)
        bm = ld(fb_s, t0, f0, L, Fh, Fh, BT, BF)
        dh = ld(fdh_s, t0, f0, L, Fh, Fh, BT, BF)
        sg = sigmoid(a)
        s = a * sg
        u = bm * (sg + s * (1.0 - sg))
        h = s * bm
        dotp += tl.sum(dh * u * dab + dh * s * dbb + h * egd, axis=1)  # ⟨Ḡ, G⟩ = Σ dA ⊙ dĀ + dB ⊙ dB̄ + H ⊙ E Ḡ_down
        dhb = dab * u + dbb * s
        for dt in range(0, tl.cdiv(D, BD)):
            d0 = dt * BD
            eb = mm(h, tl.trans(ld(src + 2 * FD, d0, f0, D, Fh, Fh, BD, BF)), PREC, LOWP) * gs
            eb += mm(dhb, tl.trans(ld_raw(th_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF)), PREC, LOWP)
            atomic_acc(eb_s, t0, d0, L, D, D, eb, BT, BD)
    dsum = tl.sum(dotp, axis=0)
    if HAS_GIN:
        if n == 0:  # the state's running sums are part of this chunk's G
            for dt in range(0, tl.cdiv(D, BD)):
                d0 = dt * BD
                part = ld(gin_b, f0, d0, Fh, D, D, BF, BD) * ld(src, f0, d0, Fh, D, D, BF, BD)
                part += ld(gin_b + FD, f0, d0, Fh, D, D, BF, BD) * ld(src + FD, f0, d0, Fh, D, D, BF, BD)
                dsum += gs * tl.sum(tl.sum(part, axis=1), axis=0)
                part2 = ld(gin_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF) * ld(src + 2 * FD, d0, f0, D, Fh, Fh, BD, BF)
                dsum += gs * tl.sum(tl.sum(part2, axis=1), axis=0)
    if closes:
        tl.atomic_add(gdot_b + n, dsum, sem="relaxed")


@device_fn
def _bwd_finish(z_s, tg_s, y_s, eta_s, zz_s, mk_s, gy_s, fa_s, fb_s, fdh_s, eb_s, zb_s, s1, s2, s3, s4, s5, s6,
                x1, x2, x3, th_b, thb_b, gsb_b, th0b_b, ginb_b, cb_b, gdot_b, nb_b, nbar_b, lam_b, dcv_b,
                n, j, L, D, Fh, f0, closes,
                OBJ_L2: tl.constexpr, HAS_GIN: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    """B2 of segment n (Ē and ⟨Ḡ, G⟩ reduced): N̄, H̄, Ā, B̄, the partial sums of Z̄, and θ̄_n of the slice."""
    FD = Fh * D
    lam = tl.load(lam_b + n)
    ntot = tl.load(nb_b + n)
    nprime = tl.where(ntot > 0, ntot, 1.0)
    if closes:
        src = thb_b
        gs = -1.0 / nprime
        dirs = 1.0 - lam
        nbar = tl.where(ntot > 0, -tl.load(gdot_b + n) / nprime, 0.0)  # N̄ = -⟨Δ̄, G⟩ / N_c² = -⟨Ḡ, G⟩ / N_c
    else:
        src = gsb_b
        gs = ntot * 0.0 + 1.0
        dirs = ntot * 0.0 + 1.0
        nbar = tl.load(dcv_b)  # the final state's curvature_sum cotangent
    if j == 0:
        tl.store(nbar_b + n, nbar)
    cols = f0 + tl.arange(0, BF)
    c = tl.load(cb_b + cols, mask=cols < Fh, other=0.0)
    cbar = tl.zeros((BF,), dtype=tl.float32)
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        hb = tl.zeros((BT, BF), dtype=tl.float32)  # H̄ = Ȳ W_down + E Ḡ_down + ∂κ/∂H
        for dt in range(0, tl.cdiv(D, BD)):
            d0 = dt * BD
            yb = _ybar_tile(gy_s, eb_s, eta_s, t0, d0, L, D, OBJ_L2, BT, BD)
            hb += mm(yb, ld_raw(th_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF), PREC, LOWP)
        kb = ldv(mk_s, t0, L, BT) * nbar  # κ̄_t = m_t N̄
        zc = kb * ldv(zz_s, t0, L, BT)  # κ̄_t ‖z_t‖²
        a = ld(fa_s, t0, f0, L, Fh, Fh, BT, BF)
        bm = ld(fb_s, t0, f0, L, Fh, Fh, BT, BF)
        sg = sigmoid(a)
        s = a * sg
        sp = sg + s * (1.0 - sg)
        spp = sg * (1.0 - sg) * (2.0 + a * (1.0 - 2.0 * sg))  # silu''
        u = bm * sp
        hb += ld(x3, t0, f0, L, Fh, Fh, BT, BF) + 2.0 * kb[:, None] * (s * bm)
        dh = ld(fdh_s, t0, f0, L, Fh, Fh, BT, BF)
        dab = ld(x1, t0, f0, L, Fh, Fh, BT, BF)
        dbb = ld(x2, t0, f0, L, Fh, Fh, BT, BF)
        r2b = zc[:, None] * c[None, :]  # adjoint of R² = S² + U²
        ab = hb * u + dab * dh * bm * spp + dbb * dh * sp + r2b * (2.0 * s * sp + 2.0 * u * bm * spp)
        bb = hb * s + dab * dh * sp + r2b * 2.0 * u * sp
        cbar += tl.sum(zc[:, None] * (s * s + u * u), axis=0)
        st(s4, t0, f0, L, Fh, Fh, ab, BT, BF)
        st(s5, t0, f0, L, Fh, Fh, bb, BT, BF)
        st(s6, t0, f0, L, Fh, Fh, dab * u + dbb * s, BT, BF)  # dH̄
    tl.debug_barrier()
    # Z̄ partial sums: Ā W_gate + B̄ W_up + dA Ḡ_gate + dB Ḡ_up (reads θ̄_{n+1}: before it is overwritten)
    for tt in range(0, tl.cdiv(L, BT)):
        t0 = tt * BT
        for dt in range(0, tl.cdiv(D, BD)):
            d0 = dt * BD
            zb = mm(ld_raw(s4, t0, f0, L, Fh, Fh, BT, BF), ld_raw(th_b, f0, d0, Fh, D, D, BF, BD), PREC, LOWP)
            zb += mm(ld_raw(s5, t0, f0, L, Fh, Fh, BT, BF), ld_raw(th_b + FD, f0, d0, Fh, D, D, BF, BD), PREC, LOWP)
            zg = mm(ld_raw(s1, t0, f0, L, Fh, Fh, BT, BF), ld(src, f0, d0, Fh, D, D, BF, BD), PREC, LOWP)
            zg += mm(ld_raw(s2, t0, f0, L, Fh, Fh, BT, BF), ld(src + FD, f0, d0, Fh, D, D, BF, BD), PREC, LOWP)
            atomic_acc(zb_s, t0, d0, L, D, D, zb + gs * zg, BT, BD)
    tl.debug_barrier()
    # W̄ of the slice, θ̄_n = (1 - λ) θ̄_{n+1} + W̄, θ̄_0 += λ θ̄_{n+1}
    for dt in range(0, tl.cdiv(D, BD)):
        d0 = dt * BD
        wgb = tl.zeros((BF, BD), dtype=tl.float32)
        wub = tl.zeros((BF, BD), dtype=tl.float32)
        for tt in range(0, tl.cdiv(L, BT)):
            t0 = tt * BT
            zt = ld_raw(z_s, t0, d0, L, D, D, BT, BD)
            wgb += mm(tl.trans(ld_raw(s4, t0, f0, L, Fh, Fh, BT, BF)), zt, PREC, LOWP)
            wub += mm(tl.trans(ld_raw(s5, t0, f0, L, Fh, Fh, BT, BF)), zt, PREC, LOWP)
        ng = ld(thb_b, f0, d0, Fh, D, D, BF, BD)
        nu = ld(thb_b + FD, f0, d0, Fh, D, D, BF, BD)
        if HAS_GIN:
            if n == 0:  # the state's running sums enter G with weight 1: their cotangent is Ḡ
                if closes:
                    st(ginb_b, f0, d0, Fh, D, D, gs * ng, BF, BD)
                    st(ginb_b + FD, f0, d0, Fh, D, D, gs * nu, BF, BD)
                else:
                    st(ginb_b, f0, d0, Fh, D, D, ld(gsb_b, f0, d0, Fh, D, D, BF, BD), BF, BD)
                    st(ginb_b + FD, f0, d0, Fh, D, D, ld(gsb_b + FD, f0, d0, Fh, D, D, BF, BD), BF, BD)
        st(thb_b, f0, d0, Fh, D, D, dirs * ng + wgb, BF, BD)
        st(thb_b + FD, f0, d0, Fh, D, D, dirs * nu + wub, BF, BD)
        if closes:
            st(th0b_b, f0, d0, Fh, D, D, ld(th0b_b, f0, d0, Fh, D, D, BF, BD) + lam * ng, BF, BD)
            st(th0b_b + FD, f0, d0, Fh, D, D, ld(th0b_b + FD, f0, d0, Fh, D, D, BF, BD) + lam * nu, BF, BD)
        wdb = tl.zeros((BD, BF), dtype=tl.float32)
        for tt in range(0, tl.cdiv(L, BT)):
            t0 = tt * BT
            yb = _ybar_tile(gy_s, eb_s, eta_s, t0, d0, L, D, OBJ_L2, BT, BD)
            wdb += mm(tl.trans(yb), ld_raw(s3, t0, f0, L, Fh, Fh, BT, BF), PREC, LOWP)
            e = _e_tile(y_s, tg_s, eta_s, t0, d0, L, D, OBJ_L2, BT, BD)
            wdb += mm(tl.trans(e), ld_raw(s6, t0, f0, L, Fh, Fh, BT, BF), PREC, LOWP)
        wdb += 2.0 * ld(th_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF) * cbar[None, :]  # through c_f = ‖W_down[:, f]‖²
        nd = ld(thb_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF)
        if HAS_GIN:
            if n == 0:
                if closes:
                    st(ginb_b + 2 * FD, d0, f0, D, Fh, Fh, gs * nd, BD, BF)
                else:
                    st(ginb_b + 2 * FD, d0, f0, D, Fh, Fh, ld(gsb_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF), BD, BF)
        st(thb_b + 2 * FD, d0, f0, D, Fh, Fh, dirs * nd + wdb, BD, BF)
        if closes:
            st(th0b_b + 2 * FD, d0, f0, D, Fh, Fh, ld(th0b_b + 2 * FD, d0, f0, D, Fh, Fh, BD, BF) + lam * nd, BD, BF)


@triton.jit(do_not_specialize=["n", "shift", "closes_last"])
def _cms_bwd_kernel(
    z_ptr, tg_ptr, eta_ptr, zz_ptr, mk_ptr, lam_ptr, th0_ptr, ts_ptr, ts_bstride, ck_ptr, gin_ptr,
    y_ptr, fa_ptr, fb_ptr, fdh_ptr, nb_ptr, gy_ptr, gsb_ptr, dcv_ptr,
    th_ptr, thb_ptr, th0b_ptr, cb_ptr, eb_ptr, zb_ptr, gdot_ptr, nbar_ptr, ginb_ptr,
    x1_ptr, x2_ptr, x3_ptr, s1_ptr, s2_ptr, s3_ptr, s4_ptr, s5_ptr, s6_ptr,
    n, T, D, Fh, C, shift, NSEG, CP, NCK, KCK, closes_last,
    OBJ_L2: tl.constexpr, HAS_GIN: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
):
    """Backward launch n: B2 of segment n + 1 (if it exists), then B1 of segment n (if n >= 0)."""
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    f0 = j * BF
    FD = Fh * D
    th_b = th_ptr + b * 3 * FD
    thb_b = thb_ptr + b * 3 * FD
    gsb_b = gsb_ptr + b * 3 * FD
    cb_b = cb_ptr + b * Fh
    sc = b * CP * Fh
    if n + 1 < NSEG:
        m = n + 1
        s0 = tl.maximum(m * C - shift, 0)
        L = tl.minimum((m + 1) * C - shift, T) - s0
        tok = b * T + s0
        closes = (m < NSEG - 1) | (closes_last != 0)
        _bwd_finish(z_ptr + tok * D, tg_ptr + tok * D, y_ptr + tok * D, eta_ptr + tok, zz_ptr + tok, mk_ptr + tok,
                    gy_ptr + tok * D, fa_ptr + tok * Fh, fb_ptr + tok * Fh, fdh_ptr + tok * Fh, eb_ptr + tok * D,
                    zb_ptr + tok * D, s1_ptr + sc, s2_ptr + sc, s3_ptr + sc, s4_ptr + sc, s5_ptr + sc, s6_ptr + sc,
                    x1_ptr + sc, x2_ptr + sc, x3_ptr + sc, th_b, thb_b, gsb_b, th0b_ptr + b * 3 * FD,
                    ginb_ptr + b * 3 * FD, cb_b, gdot_ptr + b * NSEG, nb_ptr + b * NSEG, nbar_ptr + b * NSEG,
                    lam_ptr + b * NSEG, dcv_ptr + b, m, j, L, D, Fh, f0, closes,
                    OBJ_L2, HAS_GIN, LOWP, PREC, BT, BD, BF)
        tl.debug_barrier()
    if n >= 0:
        s0 = tl.maximum(n * C - shift, 0)
        L = tl.minimum((n + 1) * C - shift, T) - s0
        tok = b * T + s0
        closes = (n < NSEG - 1) | (closes_last != 0)
        _bwd_prepare(z_ptr + tok * D, tg_ptr + tok * D, y_ptr + tok * D, eta_ptr + tok, fa_ptr + tok * Fh,
                     fb_ptr + tok * Fh, fdh_ptr + tok * Fh, eb_ptr + tok * D, s1_ptr + sc, s2_ptr + sc, s3_ptr + sc,
                     x1_ptr + sc, x2_ptr + sc, x3_ptr + sc, th_b, thb_b, gsb_b, th0_ptr, ts_ptr + b * ts_bstride,
                     ck_ptr + b * NCK * 3 * FD, gin_ptr + b * 3 * FD, cb_b, gdot_ptr + b * NSEG, nb_ptr + b * NSEG,
                     lam_ptr + b * NSEG, n, L, D, Fh, f0, KCK, closes,
                     OBJ_L2, HAS_GIN, LOWP, PREC, BT, BD, BF)


# ---------------------------------------------------------------------------------------------- python


def _plan(B: int, T: int, D: int, Fh: int, cfg: dict, save: bool) -> dict:
    """Everything the launches need that depends only on shapes and options (Python ints)."""
    C, pos = cfg["chunk_size"], cfg["position"]
    shift = pos % C
    nseg = num_segments(T, C, shift)
    BT, BD, BF = block_sizes(C, D, Fh)
    BTB, BDB, BFB = block_sizes(C, D, Fh, backward=True)
    kck = checkpoint_every(cfg["decay"], nseg) if save else nseg + 1  # nseg + 1: never store a checkpoint
    nck = (nseg - 1) // kck if save else 0
    # the last segment's update is applied only when someone reads it (the final state), as in the reference
    closes_last = (pos + T) % C == 0 and cfg["learn_last"]
    return dict(C=C, shift=shift, nseg=nseg, BT=BT, BD=BD, BF=BF, nF=triton.cdiv(Fh, BF), BTB=BTB, BDB=BDB, BFB=BFB,
                nFB=triton.cdiv(Fh, BFB), kck=kck, nck=nck,
                CP=triton.cdiv(min(C, T), BT) * BT, CPB=triton.cdiv(min(C, T), BTB) * BTB, closes_last=closes_last)


def _segment_tokens(n: int, plan: dict, T: int) -> tuple[int, int]:
    s0 = max(n * plan["C"] - plan["shift"], 0)
    return s0, min((n + 1) * plan["C"] - plan["shift"], T)


def _forward(z, tg, eta, zz, mk, lam, th0, th_start, gin, nin, cfg: dict, save: bool):
    """All forward launches. z (B, T, D); tg (B, T, D) fp32; eta, zz, mk (B, T) fp32; lam (B, NSEG) fp32;
    th0 (3FD,) fp32; th_start (B, 3FD) fp32 (the workspace's first θ, overwritten); gin (B, 3FD) and nin (B,) the
    state's running sums, or None. Returns a dict of buffers (y32, th, gout, nb, and the saved factors)."""
    B, T, D = z.shape
    Fh = cfg["F"]
    plan = _plan(B, T, D, Fh, cfg, save)
    dev, f32 = z.device, torch.float32
    lowp = low_precision_dots(z.dtype)
    fdt = torch.bfloat16 if lowp else f32  # the saved factors' and dot operands' dtype
    nseg, CP = plan["nseg"], plan["CP"]
    th = th_start
    cb = th[:, 2 * D * Fh:].reshape(B, D, Fh).pow(2).sum(1).contiguous()  # c_f of θ_start
    y32 = torch.zeros(B, T, D, device=dev, dtype=f32)
    q = torch.zeros(B, T, device=dev, dtype=f32)
    p = torch.zeros(B, T, device=dev, dtype=f32)
    fa = torch.empty(B, T, Fh, device=dev, dtype=fdt)
    fb = torch.empty_like(fa)
    fdh = torch.empty_like(fa)
    if not cfg["learn_last"]:
        # the last segment's inner step is skipped (nobody reads it): its factors are zero, its eta too, so the
        # backward sees a segment that only reads
        s0, _ = _segment_tokens(nseg - 1, plan, T)
        fdh[:, s0:].zero_()
        eta = eta.clone()
        eta[:, s0:] = 0.0
    s1, s2, s3 = (torch.empty(B, CP, Fh, device=dev, dtype=fdt) for _ in range(3))
    nb = torch.zeros(B, nseg, device=dev, dtype=f32)
    ck = torch.empty(B, plan["nck"], 3 * D * Fh, device=dev, dtype=f32) if plan["nck"] else th  # th: a dummy
    last_open = not plan["closes_last"] and cfg["learn_last"]
    gout = torch.empty(B, 3 * D * Fh, device=dev, dtype=f32) if last_open else th  # th: never written as gout
    has_gin = gin is not None
    args = (z, tg, eta, zz, mk, lam, th0, gin if has_gin else th, nin if has_gin else nb,
            th, ck, gout, cb, y32, q, p, fa, fb, fdh, s1, s2, s3, nb)
    consts = dict(OBJ_L2=cfg["objective"] == "l2", HAS_GIN=has_gin, LOWP=lowp, PREC=dot_precision(),
                  BT=plan["BT"], BD=plan["BD"], BF=plan["BF"], **launch_options())
    grid = (plan["nF"], B)
    for k in range(nseg + 1):
        n_prev = k - 1 if k >= 1 and (k - 1 < nseg - 1 or cfg["learn_last"]) else -1
        if n_prev < 0 and k >= nseg:
            continue
        launch(_cms_fwd_kernel, grid, *args, n_prev, k, T, D, Fh, plan["C"], plan["shift"], nseg, CP, plan["nck"],
               plan["kck"], int(plan["closes_last"]), **consts)
    return dict(y32=y32, th=th, gout=gout if last_open else None, nb=nb, q=q, fa=fa, fb=fb, fdh=fdh, ck=ck, cb=cb,
                eta=eta, plan=plan)


def _backward(z, tg, eta, zz, mk, lam, th0, ts, ts_bstride, gin, fwd: dict, gy, thb, gsb, dcv, cfg: dict):
    """All backward launches; fwd: what _forward returned (saved). thb (B, 3FD): dL/dθ_final (overwritten: it
    ends as dL/dθ_start); gsb (B, 3FD): dL/d(final running sums); dcv (B,): dL/d(final curvature_sum).
    Returns (zbar (B, T, D), ebar (B, T, D), nbar (B, NSEG), th0b (B, 3FD), ginb (B, 3FD) or None)."""
    B, T, D = z.shape
    Fh = cfg["F"]
    plan = fwd["plan"]
    dev, f32 = z.device, torch.float32
    lowp = low_precision_dots(z.dtype)
    fdt = torch.bfloat16 if lowp else f32
    nseg, CP = plan["nseg"], plan["CPB"]
    th = fwd["th"].clone()  # rebuilt in place from θ_final down to θ_start
    cb = fwd["cb"].clone()
    th0b = torch.zeros(B, 3 * D * Fh, device=dev, dtype=f32)
    eb = torch.zeros(B, T, D, device=dev, dtype=f32)
    zb = torch.zeros(B, T, D, device=dev, dtype=f32)
    gdot = torch.zeros(B, nseg, device=dev, dtype=f32)
    nbar = torch.zeros(B, nseg, device=dev, dtype=f32)
    has_gin = gin is not None
    ginb = torch.empty(B, 3 * D * Fh, device=dev, dtype=f32) if has_gin else th0b
    x1, x2, x3 = (torch.empty(B, CP, Fh, device=dev, dtype=f32) for _ in range(3))
    s1, s2, s3, s4, s5, s6 = (torch.empty(B, CP, Fh, device=dev, dtype=fdt) for _ in range(6))
    args = (z, tg, fwd["eta"], zz, mk, lam, th0, ts, ts_bstride, fwd["ck"], gin if has_gin else th0b,
            fwd["y32"], fwd["fa"], fwd["fb"], fwd["fdh"], fwd["nb"], gy, gsb, dcv,
            th, thb, th0b, cb, eb, zb, gdot, nbar, ginb, x1, x2, x3, s1, s2, s3, s4, s5, s6)
    consts = dict(OBJ_L2=cfg["objective"] == "l2", HAS_GIN=has_gin, LOWP=lowp, PREC=dot_precision(),
                  BT=plan["BTB"], BD=plan["BDB"], BF=plan["BFB"], **launch_options())
    grid = (plan["nFB"], B)
    for n in range(nseg - 1, -2, -1):
        launch(_cms_bwd_kernel, grid, *args, n, T, D, Fh, plan["C"], plan["shift"], nseg, CP, plan["nck"],
               plan["kck"], int(plan["closes_last"]), **consts)
    return zb, eb, nbar, th0b, ginb if has_gin else None


def _flat(tensors, B: int) -> Tensor:
    return torch.cat([t.detach().to(torch.float32).reshape(B, -1) for t in tensors], 1).contiguous()


def _split(x: Tensor, D: int, Fh: int) -> tuple[Tensor, Tensor, Tensor]:
    FD = D * Fh
    return x[:, :FD].reshape(-1, Fh, D), x[:, FD:2 * FD].reshape(-1, Fh, D), x[:, 2 * FD:].reshape(-1, D, Fh)


class _CMSChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, tg, eta, zz, mk, lam, w_gate, w_up, w_down, s_wg, s_wu, s_wd, s_gg, s_gu, s_gd, s_cv, cfg):
        B, T, D = z.shape
        Fh = cfg["F"]
        has_state = s_wg is not None
        th0 = _flat([w_gate, w_up, w_down], 1).reshape(-1)
        # th_start is the workspace the launches overwrite with θ_c: a copy (at B = 1, expand().contiguous()
        # would return θ_0's own storage, and the updates would overwrite the decay anchor)
        th_start = _flat([s_wg, s_wu, s_wd], B) if has_state else th0.repeat(B, 1)
        gin = _flat([s_gg, s_gu, s_gd], B) if has_state else None
        nin = s_cv.detach().to(torch.float32).contiguous() if has_state else None
        save = any(ctx.needs_input_grad)
        z_c = z.detach().contiguous()
        fwd = _forward(z_c, tg.detach(), eta.detach(), zz.detach(), mk, lam, th0, th_start, gin, nin, cfg, save)
        th = fwd["th"]
        plan = fwd["plan"]
        thf = [t.clone() for t in _split(th, D, Fh)]
        if fwd["gout"] is not None:
            gf = [t.clone() for t in _split(fwd["gout"], D, Fh)]
            cvf = fwd["nb"][:, -1].clone()
        else:
            gf = [torch.zeros_like(t) for t in thf]
            cvf = torch.zeros(B, device=z.device, dtype=torch.float32)
        y = fwd["y32"] if z.dtype == torch.float32 else fwd["y32"].to(z.dtype)
        if save:
            ts = _flat([s_wg, s_wu, s_wd], B) if has_state else th0
            ctx.save_for_backward(z_c, tg, fwd["eta"], zz, mk, lam, th0, ts, gin, th, fwd["ck"], fwd["cb"],
                                  fwd["y32"], fwd["q"], fwd["fa"], fwd["fb"], fwd["fdh"], fwd["nb"])
            ctx.plan = plan
        ctx.cfg = cfg
        ctx.has_state = has_state
        ctx.dtypes = [t.dtype for t in (z, w_gate, w_up, w_down)] + (
            [t.dtype for t in (s_wg, s_wu, s_wd, s_gg, s_gu, s_gd, s_cv)] if has_state else [])
        return (y, *thf, *gf, cvf)

    @staticmethod
    def backward(ctx, gy, d_wg, d_wu, d_wd, d_gg, d_gu, d_gd, d_cv):
        (z, tg, eta, zz, mk, lam, th0, ts, gin, th, ck, cb, y32, q, fa, fb, fdh, nb) = ctx.saved_tensors
        cfg, plan = ctx.cfg, ctx.plan
        B, T, D = z.shape
        Fh = cfg["F"]
        fwd = dict(th=th, ck=ck, cb=cb, y32=y32, fa=fa, fb=fb, fdh=fdh, nb=nb, eta=eta, plan=plan)
        thb = _flat([d_wg, d_wu, d_wd], B)
        gsb = _flat([d_gg, d_gu, d_gd], B)
        dcv = d_cv.detach().to(torch.float32).contiguous()
        ts_bstride = 3 * D * Fh if ctx.has_state else 0
        zb, eb, nbar, th0b, ginb = _backward(z, tg, eta, zz, mk, lam, th0, ts, ts_bstride, gin, fwd,
                                             gy.contiguous(), thb, gsb, dcv, cfg)
        # the paths PyTorch closes: ‖z_t‖² (κ_t = ‖z_t‖² (1 + q_t) + p_t), eta and target
        seg = (torch.arange(T, device=z.device) + plan["shift"]) // plan["C"]
        zzb = mk * nbar[:, seg] * (1.0 + q)
        r = (y32 - tg) if cfg["objective"] == "l2" else -tg
        etab = (eb * r).sum(-1)
        tgb = -eta[..., None] * eb
        dt = ctx.dtypes
        p_grads = [g.sum(0) for g in _split(th0b, D, Fh)]
        if ctx.has_state:
            s_grads = [g.to(d) for g, d in zip(_split(thb, D, Fh) + _split(ginb, D, Fh), dt[4:10])]
            s_grads.append(nbar[:, 0].to(dt[10]))
        else:
            s_grads = [None] * 7
            p_grads = [g + s.sum(0) for g, s in zip(p_grads, _split(thb, D, Fh))]
        return (zb.to(dt[0]), tgb, etab, zzb, None, None, p_grads[0].to(dt[1]), p_grads[1].to(dt[2]),
                p_grads[2].to(dt[3]), *s_grads, None)


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
    step: str = "gauss_newton",
    mask: Optional[Tensor] = None,
    state: Optional[CMSState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[CMSState]]:
    """One CMS level on Triton; arguments, shapes and semantics as `cms_level_reference`.

    Differentiable (exactly, second-order terms and the step normaliser N_c included) in z, w_gate, w_up, w_down,
    p_v, w_eta, b_eta and the seven tensors of `state`.
    """
    B, T, D, Fh = _validate(
        z, w_gate, w_up, w_down, p_v, w_eta, b_eta, chunk_size, eta_max, objective, decay, mask, state, step
    )
    named = {"z": z, "w_gate": w_gate, "w_up": w_up, "w_down": w_down, "p_v": p_v, "w_eta": w_eta, "b_eta": b_eta}
    if state is not None:
        named.update({f"state.{k}": getattr(state, k) for k in CMSState._fields[:7]})
    check_kernel_inputs(named, z.device, op="cms_level")
    check_index_range(min(chunk_size, T), D, Fh, op="cms_level")
    f32 = torch.float32
    position = 0 if state is None else int(state.position)
    with _no_autocast(z.device):
        zf = z.to(f32)
        if T == 0:
            if not output_final_state:
                return z.new_zeros(B, 0, D), None
            if state is not None:
                return z.new_zeros(B, 0, D), state._replace(**{k: getattr(state, k).to(f32)
                                                               for k in CMSState._fields[:7]})
            theta = [w.to(f32).expand(B, -1, -1).contiguous() for w in (w_gate, w_up, w_down)]
            return z.new_zeros(B, 0, D), CMSState(*theta, *(torch.zeros_like(w) for w in theta), zf.new_zeros(B),
                                                  position=0,
                                                  chunk_has_valid=torch.zeros(B, dtype=torch.bool, device=z.device))
        if state is None and not output_final_state and T <= chunk_size:
            # No update is ever read: an ordinary SwiGLU FFN with θ_0, at the cost of one.
            wg, wu, wd = (w.to(f32) for w in (w_gate, w_up, w_down))
            y = (Fn.silu(zf @ wg.mT) * (zf @ wu.mT)) @ wd.mT
            return y.to(z.dtype), None
        mk = torch.ones(B, T, device=z.device, dtype=f32) if mask is None else mask.to(device=z.device, dtype=f32)
        tg = (zf @ p_v.to(f32)).contiguous()
        eta = (eta_max * torch.sigmoid(zf @ w_eta.to(f32) + b_eta.to(f32).reshape(())) * mk).contiguous()
        zz = zf.pow(2).sum(-1).contiguous()
        seen = torch.zeros(B, dtype=torch.bool, device=z.device) if state is None else state.chunk_has_valid
        seg_valid = segment_has_valid(mask, seen, T, chunk_size, position % chunk_size)  # (B, NSEG)
        # λ_n of Eq. 31 per (sequence, segment): decay, or 0 for a chunk with no valid token (SPEC §5).
        lam = (float(decay) * seg_valid.to(f32)).contiguous()
        cfg = dict(chunk_size=chunk_size, position=position, objective=objective, decay=float(decay), F=Fh,
                   learn_last=bool(output_final_state))
        s = (None,) * 7 if state is None else tuple(state[:7])
        y, *fin = _CMSChunkFn.apply(z, tg, eta, zz, mk.contiguous(), lam, w_gate, w_up, w_down, *s, cfg)
    final = None
    if output_final_state:
        # the chunk in progress after the last token: none if it closed, else the last segment's
        seen = seg_valid[:, -1] & ((position + T) % chunk_size != 0)
        final = CMSState(*fin, position=position + T, chunk_has_valid=seen)
    return y, final
