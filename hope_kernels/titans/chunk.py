"""Triton kernels of the chunked self-modifying Titans memory (SPEC §2), forward and backward.

Same signature and semantics as `titans_memory_reference` (hope_kernels/titans/reference.py):
`titans_memory_triton` returns the reads o_t = M_t q_t and, on request, the final `TitansState`.

Design (one program per (batch, head); the chunk recurrence runs inside the kernel):

* A sequence is cut into segments exactly as the reference does: chunk phase counts from position 0,
  so with a cached state at position p the first segment holds the C - p % C tokens that finish the
  current chunk, then full chunks, then a partial last one. One launch covers all segments: segment n
  holds tokens [max(nC - p%C, 0), min((n+1)C - p%C, T)).
* Each segment is padded to BC = max(16, next_pow2(C)) token rows (tl.dot needs every dim >= 16).
  Padded tokens have valid = 0, i.e. alpha = 1, eta = 0 and no momentum step, so they change nothing.
  The head dim is padded to D = max(16, next_pow2(d)) columns/rows with zeros.
* Per segment the kernel evaluates the closed form of SPEC §2 (the `_segment` extension to a start
  state Z_s that differs from the chunk-start Z_c): k, v, eta, alpha from Z_c; decay matrices in log
  space (only exp of non-positive numbers); the reads; then the state after the segment. Every row of
  Z moves by one right-multiplication: Z_end = gamma_L Z_s - Z_c A + sigma_L S_s, S_end = beta^L S_s - Z_c A_s
  (plus the value-target terms for M). The state lives in a global fp32 workspace, one slot per
  segment when a backward will follow (that is the saved state: O(T/C * (3d+2) * d) per (b, h)), two
  ping-pong slots otherwise. A `tl.debug_barrier()` (= __syncthreads) orders one segment's stores
  before the next segment's loads inside the program.
* The backward recomputes each segment's coefficients from the saved segment-start states and walks
  the segments in reverse, carrying dL/dZ and dL/dS (two ping-pong slots). The gradient of the closed
  form is derived by hand (masked C x C and C x d matmuls, no per-token state); it was checked
  against float64 autograd of the reference.

Constraints (checked, ValueError otherwise): 1 <= d <= 128; 1 <= chunk_size <= 128; q and a of one
dtype among float32, float16, bfloat16; CUDA tensors (or CPU tensors under TRITON_INTERPRET=1). Sums,
states and elementwise math are fp32 (inputs are upcast on load); o and the input gradients come back in
the input dtype, the state and its gradients in fp32.

tl.dot precision (`dot_precision`): "tf32x3" for fp32 inputs (tensor cores, ~fp32 accuracy), "tf32" for
fp16/bf16 inputs, HOPE_TITANS_DOT_PRECISION=ieee|tf32x3|tf32 overrides. The interpreter computes every
dot in fp32. A launch that does not fit the GPU (OutOfResources: shared memory) is retried at the other of
"tf32" / "tf32x3"; if neither fits, the call raises a RuntimeError (kernel_backend="triton" never falls back:
use a smaller chunk_size or head dim, or kernel_backend="torch").

GPU resources (checked offline by compiling for sm_90a with triton 3.7 and its ptxas; no GPU was at hand,
so nothing here has been run or timed on a GPU): at d = 64, C = 64 (the model default) both kernels fit
in shared memory (fwd 80-115 KB, bwd 180-230 KB of the 227 KB; the value-target backward only at tf32x3)
but spill registers (255 registers plus ~10 KB of local memory per thread in the backward); at d = 128,
C = 64 the forward fits at tf32 (~225 KB)
while the backward does not (~700 KB; ~450 KB at C = 32), so at d = 128 the backward falls back to the
reference. The shared-memory copies of tl.dot operands are what limits the size, hence the transposed
reads (o^T = M q^T), the reassociated state update ((Z_c W^T) k instead of Z_c (W^T k)) and the re-loads
and re-computations in the backward's second pass. A kernel that tiles the (d, d) blocks of the state by
rows (and keeps per-token partials in a scratch buffer) would lift the d = 128 limit and the spills.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from hope_kernels._dispatch import triton_interpreting
from hope_kernels.titans.reference import (
    ADAPTIVE_NAMES,
    TitansState,
    _check_inputs,
    adaptive_row_mask,
    memory_rows,
)

__all__ = ["titans_memory_triton", "MAX_HEAD_DIM", "MAX_CHUNK_SIZE", "SUPPORTED_DTYPES"]

MAX_HEAD_DIM = 128
MAX_CHUNK_SIZE = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
try:  # what a launch raises when a kernel needs more shared memory / registers than the GPU has
    from triton.runtime.errors import OutOfResources as _OutOfResources
except ImportError:  # pragma: no cover
    _OutOfResources = RuntimeError


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision (all operands are fp32): HOPE_TITANS_DOT_PRECISION if set, else
    "tf32x3" for fp32 inputs (tensor cores at ~fp32 accuracy) and "tf32" for fp16/bf16 inputs (whose
    own rounding is coarser than tf32's). The interpreter computes every dot in fp32 anyway."""
    env = os.environ.get("HOPE_TITANS_DOT_PRECISION")
    if env:
        if env not in DOT_PRECISIONS:
            raise ValueError(f"HOPE_TITANS_DOT_PRECISION={env!r}; allowed: {list(DOT_PRECISIONS)}")
        return env
    if triton_interpreting():
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _launch(kernel, grid, args, kwargs, prec: str) -> str:
    """Launch at `prec`; when the kernel does not fit the GPU (OutOfResources: shared memory), retry at the
    other tensor-core precision (their shared-memory footprints differ). Returns the precision used; raises
    RuntimeError when nothing fits."""
    errors = []
    for p in [prec] + [x for x in ("tf32", "tf32x3") if x != prec]:
        try:
            kernel[grid](*args, PREC=p, **kwargs)
            return p
        except _OutOfResources as e:
            errors.append(f"{p}: {e}")
    name = getattr(getattr(kernel, "fn", None), "__name__", "kernel")
    raise RuntimeError(
        f"titans Triton {name} (head dim block D={kwargs.get('D')}, chunk block BC={kwargs.get('BC')}) does not "
        f"fit this GPU ({'; '.join(errors)}). A smaller chunk_size or head dim fits; kernel_backend='torch' "
        "runs the PyTorch reference."
    )


# tl.sum / tl.cumsum are jit wrappers around these builtins; calling the builtins directly is the same
# code when compiled and skips a nested-function call (slow) in the interpreter.
_sum_combine = tl.standard._sum_combine


def _configs() -> list:
    """Autotune configs: one under the interpreter (it cannot benchmark), else 4 / 8 / 16 warps."""
    if triton_interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8, 16)]


def _prune_configs(configs, named_args, **kwargs):
    """Each config of these big kernels compiles for a minute or two at d = 64: try only the plausible ones
    (4 or 8 warps for small tiles, 8 or 16 for large ones)."""
    D, BC = kwargs.get("D", 64), kwargs.get("BC", 64)
    want = (4, 8) if D * BC <= 32 * 32 else (8, 16)
    return [c for c in configs if c.num_warps in want] or configs


# --------------------------------------------------------------------------------------------- helpers


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # exp of non-positive numbers only
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _coeffs(a, valid, zc, d, b_eta, b_alpha, log_beta, eta_max, eps, offs_c, offs_d,
            D: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr):
    """Everything of one segment that depends on the chunk-start memories and the inputs a, valid."""
    md = offs_d < d
    boff = offs_d[:, None] * d + offs_d[None, :]
    bm = md[:, None] & md[None, :]
    Mk = tl.load(zc + (d) * d + boff, mask=bm, other=0.0)
    Mv = tl.load(zc + (2 * d) * d + boff, mask=bm, other=0.0)
    me = tl.load(zc + (3 * d) * d + offs_d, mask=md, other=0.0)
    ma = tl.load(zc + (3 * d + 1) * d + offs_d, mask=md, other=0.0)
    kr = tl.dot(a, tl.trans(Mk), input_precision=PREC)
    nrm = tl.sqrt(tl.reduce(kr * kr, 1, _sum_combine))
    nn = tl.maximum(nrm, 1e-12)
    k = kr / nn[:, None]
    v = tl.dot(a, tl.trans(Mv), input_precision=PREC)
    e_pre = tl.reduce(a * me[None, :], 1, _sum_combine) + b_eta
    sig_e = _sigmoid(e_pre)
    eta = eta_max * sig_e * valid
    al_pre = tl.reduce(a * ma[None, :], 1, _sum_combine) + b_alpha
    la = (tl.minimum(al_pre, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(al_pre)))) * valid
    lg = tl.associative_scan(la, 0, _sum_combine)
    lg_tot = tl.reduce(la, 0, _sum_combine)
    causal = offs_c[:, None] <= offs_c[None, :]  # [j, t]: j <= t
    dec = tl.exp(tl.where(causal, lg[None, :] - lg[:, None], float("-inf")))  # gamma_t / gamma_j
    gamma = tl.exp(lg)
    dlast = tl.exp(lg_tot - lg)  # gamma_L / gamma_j
    gL = tl.exp(lg_tot)
    if MOM:
        lb = tl.associative_scan(log_beta * valid, 0, _sum_combine)
        lb_tot = tl.reduce(log_beta * valid, 0, _sum_combine)
        mo = tl.exp(tl.where(causal, lb[None, :] - lb[:, None], float("-inf")))  # B_j / B_i
        c = tl.dot(mo, valid[:, None] * dec, input_precision=PREC)
        wexp = valid * tl.exp(lb)
        sigma = tl.reduce(wexp[:, None] * dec, 0, _sum_combine)
        clast = tl.reduce(mo * (valid * dlast)[None, :], 1, _sum_combine)
        molast = tl.exp(lb_tot - lb)
        sL = tl.reduce(wexp * dlast, 0, _sum_combine)
        bL = tl.exp(lb_tot)
    else:
        mo = dec
        c = dec
        wexp = gamma * 0.0
        sigma = gamma * 0.0
        clast = dlast
        molast = gamma * 0.0
        sL = gL * 0.0
        bL = gL * 0.0
    return (me, ma, kr, nrm, nn, k, v, sig_e, eta, al_pre, dec, gamma, dlast, gL,
            mo, c, wexp, sigma, clast, molast, sL, bL)


@triton.jit
def _targets(k, v, OBJ_L2: tl.constexpr, VALUE: tl.constexpr):
    if OBJ_L2:
        u = k - v
    else:
        u = -v
    if VALUE:
        if OBJ_L2:
            u_m = k
        else:
            u_m = k * 0.0
    else:
        u_m = u
    return u, u_m


@triton.jit
def _advance_adaptive(zs, zc, ss, ze, se, me, ma, W, Ws, k, gL, sL, bL, d, boff, bm, offs_d, md,
                      AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
                      MOM: tl.constexpr, PREC: tl.constexpr):
    """The adaptive rows [M_k ; M_v ; m_eta ; m_alpha] after a segment (self targets, SPEC §2 closed form):
    X_end = gL X_s - (X_c W^T) k + sL S_s, S_end = bL S_s - (X_c Ws^T) k; rows outside `adaptive` are copied.
    zs, zc, ss, ze, se point at the M_k row of (2d+2, d) row-major blocks (start, chunk start, start momentum,
    end, end momentum); me, ma: the chunk-start m_eta, m_alpha rows; W, Ws: (BC, D) right factors."""
    for blk in tl.static_range(0, 2):
        if (blk == 0 and AD_K) or (blk == 1 and AD_V):
            Xe = gL * tl.load(zs + blk * d * d + boff, mask=bm, other=0.0) - tl.dot(
                tl.dot(tl.load(zc + blk * d * d + boff, mask=bm, other=0.0), tl.trans(W), input_precision=PREC),
                k, input_precision=PREC)
            if MOM:
                SXs = tl.load(ss + blk * d * d + boff, mask=bm, other=0.0)
                Xe += sL * SXs
                tl.store(se + blk * d * d + boff, bL * SXs - tl.dot(
                    tl.dot(tl.load(zc + blk * d * d + boff, mask=bm, other=0.0), tl.trans(Ws), input_precision=PREC),
                    k, input_precision=PREC), mask=bm)
            tl.store(ze + blk * d * d + boff, Xe, mask=bm)
        else:
            tl.store(ze + blk * d * d + boff, tl.load(zs + blk * d * d + boff, mask=bm, other=0.0), mask=bm)
            if MOM:
                tl.store(se + blk * d * d + boff, tl.load(ss + blk * d * d + boff, mask=bm, other=0.0), mask=bm)
    # m_eta and m_alpha rows: (x_c W^T) k with vector ops
    for rr in tl.static_range(0, 2):
        row = 2 * d + rr
        xs = tl.load(zs + row * d + offs_d, mask=md, other=0.0)
        if (rr == 0 and AD_E) or (rr == 1 and AD_A):
            if rr == 0:
                xc = me
            else:
                xc = ma
            xe = gL * xs - tl.reduce(tl.reduce(W * xc[None, :], 1, _sum_combine)[:, None] * k, 0, _sum_combine)
            if MOM:
                sxs = tl.load(ss + row * d + offs_d, mask=md, other=0.0)
                xe += sL * sxs
                tl.store(se + row * d + offs_d, bL * sxs - tl.reduce(
                    tl.reduce(Ws * xc[None, :], 1, _sum_combine)[:, None] * k, 0, _sum_combine), mask=md)
            tl.store(ze + row * d + offs_d, xe, mask=md)
        else:
            tl.store(ze + row * d + offs_d, xs, mask=md)
            if MOM:
                tl.store(se + row * d + offs_d, tl.load(ss + row * d + offs_d, mask=md, other=0.0), mask=md)


# --------------------------------------------------------------------------------------------- forward


@triton.autotune(configs=_configs(), key=["D", "BC", "MOM", "VALUE", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _titans_fwd_kernel(
    q_ptr, a_ptr, valid_ptr, zc_ptr, z_ptr, s_ptr, wz_ptr, ws_ptr, o_ptr, b_eta_ptr, b_alpha_ptr, log_beta_ptr,
    T, H, d, C, shift, NSEG, NSLOT, eta_max, eps,
    BC: tl.constexpr, D: tl.constexpr, MOM: tl.constexpr, OBJ_L2: tl.constexpr, VALUE: tl.constexpr,
    AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    R = 3 * d + 2
    RD = R * d
    pid64 = pid.to(tl.int64)
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    boff = offs_d[:, None] * d + offs_d[None, :]  # (D, D) block of a row-major (R, d) state
    bm = md[:, None] & md[None, :]
    b_eta = tl.load(b_eta_ptr + h)
    b_alpha = tl.load(b_alpha_ptr + h)
    log_beta = tl.load(log_beta_ptr + h)
    zc_in = zc_ptr + pid64 * RD
    z_in = z_ptr + pid64 * RD
    s_in = s_ptr + pid64 * RD
    wz = wz_ptr + pid64 * NSLOT * RD
    ws = ws_ptr + pid64 * NSLOT * RD
    tok_stride = H * d
    row0 = b.to(tl.int64) * T

    for n in range(0, NSEG):
        seg_start = tl.maximum(n * C - shift, 0)
        seg_len = tl.minimum((n + 1) * C - shift, T) - seg_start
        if n == 0:
            zc = zc_in
            zs = z_in
            ss = s_in
        else:
            zs = wz + ((n - 1) % NSLOT) * RD
            ss = ws + ((n - 1) % NSLOT) * RD
            zc = zs
        ze = wz + (n % NSLOT) * RD
        se = ws + (n % NSLOT) * RD

        mt = offs_c < seg_len
        tok = row0 + seg_start + offs_c
        offs_x = tok[:, None] * tok_stride + h * d + offs_d[None, :]
        m2 = mt[:, None] & md[None, :]
        offs_xT = tok[None, :] * tok_stride + h * d + offs_d[:, None]  # (D, BC): the transposed tile
        m2T = md[:, None] & mt[None, :]
        q = tl.load(q_ptr + offs_x, mask=m2, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_x, mask=m2, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = tl.load(valid_ptr + tok, mask=mt, other=0.0).to(tl.float32)
        else:
            valid = tl.where(mt, 1.0, 0.0)

        (me, ma, kr, nrm, nn, k, v, sig_e, eta, al_pre, dec, gamma, dlast, gL,
         mo, c, wexp, sigma, clast, molast, sL, bL) = _coeffs(
            a, valid, zc, d, b_eta, b_alpha, log_beta, eta_max, eps, offs_c, offs_d, D, MOM, PREC)
        u, u_m = _targets(k, v, OBJ_L2, VALUE)

        # ---- reads o_t = M_t q_t, computed transposed (o^T = M q^T ...) so that every D x D matrix is the
        # left operand of its tl.dot and only thin (D x BC) operands are staged in shared memory.
        kq = tl.dot(k, tl.trans(q), input_precision=PREC)  # [i, t] = k_i . q_t
        wd = eps * eta[:, None] * kq * dec
        wg = eta[:, None] * kq * c
        r = tl.dot(tl.trans(wd), k, input_precision=PREC) + tl.dot(tl.trans(wg), u_m, input_precision=PREC)
        Ms = tl.load(zs + boff, mask=bm, other=0.0)
        oT = tl.dot(Ms, tl.trans(gamma[:, None] * q), input_precision=PREC)
        Mc = tl.load(zc + boff, mask=bm, other=0.0)
        oT -= tl.dot(Mc, tl.trans(r), input_precision=PREC)
        if MOM:
            SMs = tl.load(ss + boff, mask=bm, other=0.0)
            oT += tl.dot(SMs, tl.trans(sigma[:, None] * q), input_precision=PREC)
        if VALUE:
            oT += tl.dot(tl.trans(v), wg, input_precision=PREC)
        tl.store(o_ptr + offs_xT, oT.to(o_ptr.dtype.element_ty), mask=m2T)

        # ---- state after the segment: Z_end = gL Z_s - (Z_c W^T) k + sL S_s;  S_end = bL S_s - (Z_c Ws^T) k
        e_d = eps * eta * dlast
        e_g = eta * clast
        e_m = eta * molast
        W = e_d[:, None] * k + e_g[:, None] * u
        Ws = e_m[:, None] * u
        # M rows (value target: own u_m, plus the value terms)
        WM = e_d[:, None] * k + e_g[:, None] * u_m
        zeM = gL * tl.load(zs + boff, mask=bm, other=0.0) - tl.dot(
            tl.dot(tl.load(zc + boff, mask=bm, other=0.0), tl.trans(WM), input_precision=PREC), k, input_precision=PREC)
        if VALUE:
            zeM += tl.dot(tl.trans(e_g[:, None] * v), k, input_precision=PREC)
        if MOM:
            SMs = tl.load(ss + boff, mask=bm, other=0.0)
            zeM += sL * SMs
            seM = bL * SMs - tl.dot(tl.dot(tl.load(zc + boff, mask=bm, other=0.0), tl.trans(e_m[:, None] * u_m),
                                           input_precision=PREC), k, input_precision=PREC)
            if VALUE:
                seM += tl.dot(tl.trans(e_m[:, None] * v), k, input_precision=PREC)
            tl.store(se + boff, seM, mask=bm)
        tl.store(ze + boff, zeM, mask=bm)

        # M_k, M_v, m_eta, m_alpha: the adaptive rows, which start d rows into Z
        _advance_adaptive(zs + d * d, zc + d * d, ss + d * d, ze + d * d, se + d * d, me, ma, W, Ws, k, gL, sL, bL,
                          d, boff, bm, offs_d, md, AD_K, AD_V, AD_E, AD_A, MOM, PREC)
        # the next segment reads what this one stored
        tl.debug_barrier()


# -------------------------------------------------------------------------------------------- backward


@triton.jit
def _blk_state_grads(zcb, zsb, ssb, dze, dse, k, W, Ws, MOM: tl.constexpr, PREC: tl.constexpr):
    """Pass-A gradient of one adaptive (D, D) block: dW, dWs, the dk terms and the scalar sums."""
    t1 = tl.dot(k, tl.trans(dze), input_precision=PREC)  # [i, p] = k_i . dZe_p
    dW = -tl.dot(t1, zcb, input_precision=PREC)
    dk = -tl.dot(tl.dot(W, tl.trans(zcb), input_precision=PREC), dze, input_precision=PREC)
    dgL = tl.reduce(tl.reduce(dze * zsb, 1, _sum_combine), 0, _sum_combine)
    if MOM:
        t2 = tl.dot(k, tl.trans(dse), input_precision=PREC)
        dWs = -tl.dot(t2, zcb, input_precision=PREC)
        dk -= tl.dot(tl.dot(Ws, tl.trans(zcb), input_precision=PREC), dse, input_precision=PREC)
        dsL = tl.reduce(tl.reduce(dze * ssb, 1, _sum_combine), 0, _sum_combine)
        dbL = tl.reduce(tl.reduce(dse * ssb, 1, _sum_combine), 0, _sum_combine)
    else:
        t2 = t1 * 0.0
        dWs = dW * 0.0
        dsL = dgL * 0.0
        dbL = dgL * 0.0
    return t1, t2, dW, dWs, dk, dgL, dsL, dbL


@triton.jit
def _row_state_grads(zcr, zsr, ssr, dzer, dser, k, W, Ws, MOM: tl.constexpr):
    """Pass-A gradient of one adaptive row (m_eta or m_alpha)."""
    t1 = tl.reduce(k * dzer[None, :], 1, _sum_combine)
    dW = -t1[:, None] * zcr[None, :]
    dk = -tl.reduce(W * zcr[None, :], 1, _sum_combine)[:, None] * dzer[None, :]
    dgL = tl.reduce(dzer * zsr, 0, _sum_combine)
    if MOM:
        t2 = tl.reduce(k * dser[None, :], 1, _sum_combine)
        dWs = -t2[:, None] * zcr[None, :]
        dk -= tl.reduce(Ws * zcr[None, :], 1, _sum_combine)[:, None] * dser[None, :]
        dsL = tl.reduce(dzer * ssr, 0, _sum_combine)
        dbL = tl.reduce(dser * ssr, 0, _sum_combine)
    else:
        dWs = dW * 0.0
        dsL = dgL * 0.0
        dbL = dgL * 0.0
    return dW, dWs, dk, dgL, dsL, dbL


@triton.jit
def _blk_out_grads(dze, dse, k, ub, e_d, e_g, e_m, gL, sL, bL, ADAPT: tl.constexpr, MOM: tl.constexpr,
                   PREC: tl.constexpr):
    """Pass-B state part of dZ_c, dZ_s, dS_s for one (D, D) block whose gradients use ub (u, or u_m for M):
    dZ_c = -(dZe k^T) W - (dSe k^T) Ws with W = e_d k + e_g ub, Ws = e_m ub, regrouped so that the only
    thin tl.dot operands are k and ub (shared by the blocks, so a single shared-memory copy each)."""
    if ADAPT:
        t1 = tl.dot(dze, tl.trans(k), input_precision=PREC)  # (D, BC)
        if MOM:
            t2 = tl.dot(dse, tl.trans(k), input_precision=PREC)
            tu = t1 * e_g[None, :] + t2 * e_m[None, :]
            dss = sL * dze + bL * dse
        else:
            tu = t1 * e_g[None, :]
            dss = dse
        dzc = -tl.dot(t1 * e_d[None, :], k, input_precision=PREC) - tl.dot(tu, ub, input_precision=PREC)
        dzs = gL * dze
    else:
        dzc = dze * 0.0
        dzs = dze
        dss = dse
    return dzc, dzs, dss


@triton.jit
def _row_out_grads(dzer, dser, k, W, Ws, gL, sL, bL, ADAPT: tl.constexpr, MOM: tl.constexpr):
    if ADAPT:
        dzc = -tl.reduce(tl.reduce(k * dzer[None, :], 1, _sum_combine)[:, None] * W, 0, _sum_combine)
        dzs = gL * dzer
        if MOM:
            dzc -= tl.reduce(tl.reduce(k * dser[None, :], 1, _sum_combine)[:, None] * Ws, 0, _sum_combine)
            dss = sL * dzer + bL * dser
        else:
            dss = dser
    else:
        dzc = dzer * 0.0
        dzs = dzer
        dss = dser
    return dzc, dzs, dss


@triton.jit
def _store_blk_grads(n, nxt_z, nxt_s, dzc_out, dz_out, ds_out, r0, d, offs_d, dzc, dzs, dss,
                     D: tl.constexpr, MOM: tl.constexpr):
    md = offs_d < d
    boff = offs_d[:, None] * d + offs_d[None, :]
    bm = md[:, None] & md[None, :]
    if n > 0:
        tl.store(nxt_z + (r0) * d + boff, dzc + dzs, mask=bm)
        if MOM:
            tl.store(nxt_s + (r0) * d + boff, dss, mask=bm)
    else:
        tl.store(dzc_out + (r0) * d + boff, dzc, mask=bm)
        tl.store(dz_out + (r0) * d + boff, dzs, mask=bm)
        if MOM:
            tl.store(ds_out + (r0) * d + boff, dss, mask=bm)


@triton.jit
def _store_row_grads(n, nxt_z, nxt_s, dzc_out, dz_out, ds_out, r, d, offs_d, dzc, dzs, dss, MOM: tl.constexpr):
    md = offs_d < d
    if n > 0:
        tl.store(nxt_z + (r) * d + offs_d, dzc + dzs, mask=md)
        if MOM:
            tl.store(nxt_s + (r) * d + offs_d, dss, mask=md)
    else:
        tl.store(dzc_out + (r) * d + offs_d, dzc, mask=md)
        tl.store(dz_out + (r) * d + offs_d, dzs, mask=md)
        if MOM:
            tl.store(ds_out + (r) * d + offs_d, dss, mask=md)


@triton.jit
def _adaptive_state_grads(zs, zc, ss, dzcur, dscur, me, ma, k, W, Ws, dk, dgL, dsL, dbL, d, boff, bm, offs_d, md,
                          AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
                          MOM: tl.constexpr, PREC: tl.constexpr):
    """Pass-A gradients of the adaptive rows [M_k ; M_v ; m_eta ; m_alpha] (pointers at the M_k row of (2d+2, d)
    blocks: start, chunk start, start momentum, and the carried dZ_end, dS_end): returns dW, dWs (summed over the
    rows) and dk, dgL, dsL, dbL with these rows' terms added."""
    dW_R = W * 0.0
    dWs_R = W * 0.0
    if AD_K:
        Xs = tl.load(zs + (0) * d + boff, mask=bm, other=0.0)
        dze = tl.load(dzcur + (0) * d + boff, mask=bm, other=0.0)
        if MOM:
            SXs = tl.load(ss + (0) * d + boff, mask=bm, other=0.0)
            dse = tl.load(dscur + (0) * d + boff, mask=bm, other=0.0)
        else:
            SXs = Xs * 0.0
            dse = dze * 0.0
        t1, t2, dW_b, dWs_b, dk_add, g1, g2, g3 = _blk_state_grads(tl.load(zc + boff, mask=bm, other=0.0), Xs, SXs, dze, dse, k, W, Ws, MOM, PREC)
        dW_R += dW_b
        dWs_R += dWs_b
        dk += dk_add
        dgL += g1
        dsL += g2
        dbL += g3
    if AD_V:
        Xs = tl.load(zs + (d) * d + boff, mask=bm, other=0.0)
        dze = tl.load(dzcur + (d) * d + boff, mask=bm, other=0.0)
        if MOM:
            SXs = tl.load(ss + (d) * d + boff, mask=bm, other=0.0)
            dse = tl.load(dscur + (d) * d + boff, mask=bm, other=0.0)
        else:
            SXs = Xs * 0.0
            dse = dze * 0.0
        t1, t2, dW_b, dWs_b, dk_add, g1, g2, g3 = _blk_state_grads(tl.load(zc + d * d + boff, mask=bm, other=0.0), Xs, SXs, dze, dse, k, W, Ws, MOM, PREC)
        dW_R += dW_b
        dWs_R += dWs_b
        dk += dk_add
        dgL += g1
        dsL += g2
        dbL += g3
    if AD_E:
        xs = tl.load(zs + (2 * d) * d + offs_d, mask=md, other=0.0)
        dzer = tl.load(dzcur + (2 * d) * d + offs_d, mask=md, other=0.0)
        if MOM:
            sxs = tl.load(ss + (2 * d) * d + offs_d, mask=md, other=0.0)
            dser = tl.load(dscur + (2 * d) * d + offs_d, mask=md, other=0.0)
        else:
            sxs = xs * 0.0
            dser = dzer * 0.0
        dW_b, dWs_b, dk_add, g1, g2, g3 = _row_state_grads(me, xs, sxs, dzer, dser, k, W, Ws, MOM)
        dW_R += dW_b
        dWs_R += dWs_b
        dk += dk_add
        dgL += g1
        dsL += g2
        dbL += g3
    if AD_A:
        xs = tl.load(zs + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
        dzer = tl.load(dzcur + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
        if MOM:
            sxs = tl.load(ss + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
            dser = tl.load(dscur + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
        else:
            sxs = xs * 0.0
            dser = dzer * 0.0
        dW_b, dWs_b, dk_add, g1, g2, g3 = _row_state_grads(ma, xs, sxs, dzer, dser, k, W, Ws, MOM)
        dW_R += dW_b
        dWs_R += dWs_b
        dk += dk_add
        dgL += g1
        dsL += g2
        dbL += g3
    return dW_R, dWs_R, dk, dgL, dsL, dbL


@triton.jit
def _scalar_chain(deta, de_d, de_g, de_m, dgL, dsL, dbL, dgamma, dsigma, ddec, dc, eta, eps, eta_max, valid, sig_e,
                  al_pre, dec, gamma, dlast, gL, mo, wexp, clast, molast, bL, rev, MOM: tl.constexpr,
                  PREC: tl.constexpr):
    """The scalar chain of a segment's backward: the gradients of e_d, e_g, e_m, gL, sL, bL, gamma, sigma, the decay
    matrix and c, through log(alpha), log(beta) and eta, down to the pre-activations. Returns
    de_pre (d/d(m_eta.a + b_eta)), dal_pre (d/d(m_alpha.a + b_alpha)), both (BC,), and d/d(log beta)."""
    deta += eps * dlast * de_d + clast * de_g
    ddlast = eps * eta * de_d
    dclast = eta * de_g
    if MOM:
        deta += molast * de_m
        dmolast = eta * de_m
        dmo = dclast[:, None] * (valid * dlast)[None, :]
        ddlast += valid * tl.reduce(mo * dclast[:, None], 0, _sum_combine)
        ddlast += dsL * wexp
        dlb = dsL * wexp * dlast - dmolast * molast
        dlb_tot = tl.reduce(dmolast * molast, 0, _sum_combine) + dbL * bL
        dmo += tl.dot(dc, tl.trans(valid[:, None] * dec), input_precision=PREC)
        ddec += valid[:, None] * tl.dot(tl.trans(mo), dc, input_precision=PREC)
        ddec += wexp[:, None] * dsigma[None, :]
        dlb += wexp * tl.reduce(dec * dsigma[None, :], 1, _sum_combine)
        pm = dmo * mo
        dlb += tl.reduce(pm, 0, _sum_combine) - tl.reduce(pm, 1, _sum_combine)
        drev = tl.reduce(tl.where(rev, dlb[None, :], 0.0), 1, _sum_combine) + dlb_tot
        dlbeta = tl.reduce(valid * drev, 0, _sum_combine)
    else:
        ddlast += dclast
        ddec += dc
        dlbeta = gL * 0.0
    dlg_tot = tl.reduce(ddlast * dlast, 0, _sum_combine) + dgL * gL
    dlg = dgamma * gamma - ddlast * dlast
    pdm = ddec * dec
    dlg += tl.reduce(pdm, 0, _sum_combine) - tl.reduce(pdm, 1, _sum_combine)
    dla = tl.reduce(tl.where(rev, dlg[None, :], 0.0), 1, _sum_combine) + dlg_tot
    dal_pre = dla * valid * _sigmoid(-al_pre)
    de_pre = deta * valid * eta_max * sig_e * (1.0 - sig_e)
    return de_pre, dal_pre, dlbeta


@triton.jit
def _input_grads(dk, dv, k, nn, nrm, adapt, de_pre, dal_pre, me, ma, d, boff, bm, PREC: tl.constexpr):
    """Back through k = normalize(a M_kᵀ), v = a M_vᵀ, eta and alpha (Eq. 90): returns dkr (the gradient of the
    unnormalised k) and da. adapt: the chunk-start M_k row of the (2d+2, d) adaptive rows."""
    kdk = tl.reduce(k * dk, 1, _sum_combine)
    dkr = dk / nn[:, None] - tl.where(nrm > 1e-12, kdk / nn, 0.0)[:, None] * k
    da = tl.dot(dkr, tl.load(adapt + boff, mask=bm, other=0.0), input_precision=PREC)
    da += tl.dot(dv, tl.load(adapt + d * d + boff, mask=bm, other=0.0), input_precision=PREC)
    da += de_pre[:, None] * me[None, :] + dal_pre[:, None] * ma[None, :]
    return dkr, da


@triton.jit
def _adaptive_out_grads(n, dzcur, dscur, dzc_last, nxt_z, nxt_s, dzc_out, dz_out, ds_out, k, u, a, W, Ws, dkr, dv,
                        de_pre, dal_pre, e_d, e_g, e_m, gL, sL, bL, xl, d, offs_d, md, boff, bm,
                        AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
                        D: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr):
    """Pass-B gradients of the adaptive rows [M_k ; M_v ; m_eta ; m_alpha] w.r.t. the chunk-start, start and start
    momentum state, stored to the carry (n > 0) or the outputs (n = 0). Every pointer is at the M_k row."""
    # M_k rows
    dze = tl.load(dzcur + (0) * d + boff, mask=bm, other=0.0)
    if MOM:
        dse = tl.load(dscur + (0) * d + boff, mask=bm, other=0.0)
    else:
        dse = dze * 0.0
    g_zc, g_zs, g_ss = _blk_out_grads(dze, dse, k, u, e_d, e_g, e_m, gL, sL, bL, AD_K, MOM, PREC)
    g_zc += tl.dot(tl.trans(dkr), a, input_precision=PREC)
    g_zc += xl * tl.load(dzc_last + (0) * d + boff, mask=bm, other=0.0)
    _store_blk_grads(n, nxt_z, nxt_s, dzc_out, dz_out, ds_out, 0, d, offs_d, g_zc, g_zs, g_ss, D, MOM)
    # M_v rows
    dze = tl.load(dzcur + (d) * d + boff, mask=bm, other=0.0)
    if MOM:
        dse = tl.load(dscur + (d) * d + boff, mask=bm, other=0.0)
    else:
        dse = dze * 0.0
    g_zc, g_zs, g_ss = _blk_out_grads(dze, dse, k, u, e_d, e_g, e_m, gL, sL, bL, AD_V, MOM, PREC)
    g_zc += tl.dot(tl.trans(dv), a, input_precision=PREC)
    g_zc += xl * tl.load(dzc_last + (d) * d + boff, mask=bm, other=0.0)
    _store_blk_grads(n, nxt_z, nxt_s, dzc_out, dz_out, ds_out, d, d, offs_d, g_zc, g_zs, g_ss, D, MOM)
    # m_eta row
    dzer = tl.load(dzcur + (2 * d) * d + offs_d, mask=md, other=0.0)
    if MOM:
        dser = tl.load(dscur + (2 * d) * d + offs_d, mask=md, other=0.0)
    else:
        dser = dzer * 0.0
    g_zc, g_zs, g_ss = _row_out_grads(dzer, dser, k, W, Ws, gL, sL, bL, AD_E, MOM)
    g_zc += tl.reduce(de_pre[:, None] * a, 0, _sum_combine)
    g_zc += xl * tl.load(dzc_last + (2 * d) * d + offs_d, mask=md, other=0.0)
    _store_row_grads(n, nxt_z, nxt_s, dzc_out, dz_out, ds_out, 2 * d, d, offs_d, g_zc, g_zs, g_ss, MOM)
    # m_alpha row
    dzer = tl.load(dzcur + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
    if MOM:
        dser = tl.load(dscur + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
    else:
        dser = dzer * 0.0
    g_zc, g_zs, g_ss = _row_out_grads(dzer, dser, k, W, Ws, gL, sL, bL, AD_A, MOM)
    g_zc += tl.reduce(dal_pre[:, None] * a, 0, _sum_combine)
    g_zc += xl * tl.load(dzc_last + (2 * d + 1) * d + offs_d, mask=md, other=0.0)
    _store_row_grads(n, nxt_z, nxt_s, dzc_out, dz_out, ds_out, 2 * d + 1, d, offs_d, g_zc, g_zs, g_ss, MOM)


@triton.autotune(configs=_configs(), key=["D", "BC", "MOM", "VALUE", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _titans_bwd_kernel(
    q_ptr, a_ptr, valid_ptr, zc_ptr, z_ptr, s_ptr, wz_ptr, ws_ptr, do_ptr,
    dz_init_ptr, ds_init_ptr, dzc_last_ptr, gz_ptr, gs_ptr,
    dq_ptr, da_ptr, dzc_out_ptr, dz_out_ptr, ds_out_ptr, dpar_ptr,
    b_eta_ptr, b_alpha_ptr, log_beta_ptr,
    T, H, d, C, shift, NSEG, eta_max, eps, extra_last,
    BC: tl.constexpr, D: tl.constexpr, MOM: tl.constexpr, OBJ_L2: tl.constexpr, VALUE: tl.constexpr,
    AD_K: tl.constexpr, AD_V: tl.constexpr, AD_E: tl.constexpr, AD_A: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    R = 3 * d + 2
    RD = R * d
    pid64 = pid.to(tl.int64)
    offs_c = tl.arange(0, BC)
    offs_d = tl.arange(0, D)
    md = offs_d < d
    boff = offs_d[:, None] * d + offs_d[None, :]  # (D, D) block of a row-major (R, d) state
    bm = md[:, None] & md[None, :]
    b_eta = tl.load(b_eta_ptr + h)
    b_alpha = tl.load(b_alpha_ptr + h)
    log_beta = tl.load(log_beta_ptr + h)
    zc_in = zc_ptr + pid64 * RD
    z_in = z_ptr + pid64 * RD
    s_in = s_ptr + pid64 * RD
    wz = wz_ptr + pid64 * NSEG * RD
    ws = ws_ptr + pid64 * NSEG * RD
    dz_init = dz_init_ptr + pid64 * RD
    ds_init = ds_init_ptr + pid64 * RD
    dzc_last = dzc_last_ptr + pid64 * RD
    gz = gz_ptr + pid64 * 2 * RD
    gs = gs_ptr + pid64 * 2 * RD
    dzc_out = dzc_out_ptr + pid64 * RD
    dz_out = dz_out_ptr + pid64 * RD
    ds_out = ds_out_ptr + pid64 * RD
    tok_stride = H * d
    row0 = b.to(tl.int64) * T
    rev = offs_c[None, :] >= offs_c[:, None]  # [s, t]: t >= s
    acc_beta = b_eta * 0.0
    acc_balpha = b_eta * 0.0
    acc_lbeta = b_eta * 0.0

    for i in range(0, NSEG):
        n = NSEG - 1 - i
        seg_start = tl.maximum(n * C - shift, 0)
        seg_len = tl.minimum((n + 1) * C - shift, T) - seg_start
        if n == 0:
            zc = zc_in
            zs = z_in
            ss = s_in
        else:
            zs = wz + (n - 1) * RD
            ss = ws + (n - 1) * RD
            zc = zs
        if i == 0:
            dzcur = dz_init
            dscur = ds_init
        else:
            dzcur = gz + ((i - 1) % 2) * RD
            dscur = gs + ((i - 1) % 2) * RD
        nxt_z = gz + (i % 2) * RD
        nxt_s = gs + (i % 2) * RD

        mt = offs_c < seg_len
        tok = row0 + seg_start + offs_c
        offs_x = tok[:, None] * tok_stride + h * d + offs_d[None, :]
        m2 = mt[:, None] & md[None, :]
        q = tl.load(q_ptr + offs_x, mask=m2, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_x, mask=m2, other=0.0).to(tl.float32)
        dO = tl.load(do_ptr + offs_x, mask=m2, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = tl.load(valid_ptr + tok, mask=mt, other=0.0).to(tl.float32)
        else:
            valid = tl.where(mt, 1.0, 0.0)

        (me, ma, kr, nrm, nn, k, v, sig_e, eta, al_pre, dec, gamma, dlast, gL,
         mo, c, wexp, sigma, clast, molast, sL, bL) = _coeffs(
            a, valid, zc, d, b_eta, b_alpha, log_beta, eta_max, eps, offs_c, offs_d, D, MOM, PREC)
        u, u_m = _targets(k, v, OBJ_L2, VALUE)
        kq = tl.dot(k, tl.trans(q), input_precision=PREC)
        wd = eps * eta[:, None] * kq * dec
        wg = eta[:, None] * kq * c
        r = tl.dot(tl.trans(wd), k, input_precision=PREC) + tl.dot(tl.trans(wg), u_m, input_precision=PREC)
        e_d = eps * eta * dlast
        e_g = eta * clast
        e_m = eta * molast
        W = e_d[:, None] * k + e_g[:, None] * u
        WM = e_d[:, None] * k + e_g[:, None] * u_m
        Ws = e_m[:, None] * u
        WsM = e_m[:, None] * u_m

        # ================= pass A: every gradient that needs a sum over the rows of Z
        Ms = tl.load(zs + (0) * d + boff, mask=bm, other=0.0)
        Mc = tl.load(zc + (0) * d + boff, mask=bm, other=0.0)
        dgamma = tl.reduce(dO * tl.dot(q, tl.trans(Ms), input_precision=PREC), 1, _sum_combine)
        dq = gamma[:, None] * tl.dot(dO, Ms, input_precision=PREC)
        dr = -tl.dot(dO, Mc, input_precision=PREC)
        if MOM:
            SMs = tl.load(ss + (0) * d + boff, mask=bm, other=0.0)
            dsigma = tl.reduce(dO * tl.dot(q, tl.trans(SMs), input_precision=PREC), 1, _sum_combine)
            dq += sigma[:, None] * tl.dot(dO, SMs, input_precision=PREC)
        else:
            SMs = Ms * 0.0
            dsigma = dgamma * 0.0
        dwg = tl.dot(u_m, tl.trans(dr), input_precision=PREC)
        dwd = tl.dot(k, tl.trans(dr), input_precision=PREC)
        du_m = tl.dot(wg, dr, input_precision=PREC)
        dk = tl.dot(wd, dr, input_precision=PREC)
        if VALUE:
            dwg += tl.dot(v, tl.trans(dO), input_precision=PREC)
            dv = tl.dot(wg, dO, input_precision=PREC)
        else:
            dv = k * 0.0
        dkq = eps * eta[:, None] * dec * dwd + eta[:, None] * c * dwg
        ddec = eps * eta[:, None] * kq * dwd
        dc = eta[:, None] * kq * dwg
        deta = tl.reduce(eps * kq * dec * dwd + kq * c * dwg, 1, _sum_combine)
        dk += tl.dot(dkq, q, input_precision=PREC)
        dq += tl.dot(tl.trans(dkq), k, input_precision=PREC)

        # state path, M block (always adaptive)
        dze = tl.load(dzcur + (0) * d + boff, mask=bm, other=0.0)
        if MOM:
            dse = tl.load(dscur + (0) * d + boff, mask=bm, other=0.0)
        else:
            dse = dze * 0.0
        t1, t2, dW_M, dWs_M, dk_add, dgL, dsL, dbL = _blk_state_grads(Mc, Ms, SMs, dze, dse, k, WM, WsM, MOM, PREC)
        dk += dk_add
        de_g = eta * 0.0
        de_m = eta * 0.0
        if VALUE:
            dk += tl.dot(e_g[:, None] * v, dze, input_precision=PREC)
            de_g += tl.reduce(t1 * v, 1, _sum_combine)
            dv += e_g[:, None] * t1
            if MOM:
                dk += tl.dot(e_m[:, None] * v, dse, input_precision=PREC)
                de_m += tl.reduce(t2 * v, 1, _sum_combine)
                dv += e_m[:, None] * t2
        dW_R, dWs_R, dk, dgL, dsL, dbL = _adaptive_state_grads(
            zs + d * d, zc + d * d, ss + d * d, dzcur + d * d, dscur + d * d, me, ma, k, W, Ws, dk, dgL, dsL, dbL,
            d, boff, bm, offs_d, md, AD_K, AD_V, AD_E, AD_A, MOM, PREC)
        dW_all = dW_M + dW_R
        de_d = tl.reduce(dW_all * k, 1, _sum_combine)
        de_g += tl.reduce(dW_M * u_m + dW_R * u, 1, _sum_combine)
        dk += e_d[:, None] * dW_all
        du_m += e_g[:, None] * dW_M
        du = e_g[:, None] * dW_R
        if MOM:
            de_m += tl.reduce(dWs_M * u_m + dWs_R * u, 1, _sum_combine)
            du_m += e_m[:, None] * dWs_M
            du += e_m[:, None] * dWs_R

        # ---- scalar chain: e_d, e_g, e_m, gL, sL, bL, gamma, sigma, decay, c -> log alpha, log beta, eta
        de_pre, dal_pre, dlbeta = _scalar_chain(
            deta, de_d, de_g, de_m, dgL, dsL, dbL, dgamma, dsigma, ddec, dc, eta, eps, eta_max, valid, sig_e, al_pre,
            dec, gamma, dlast, gL, mo, wexp, clast, molast, bL, rev, MOM, PREC)
        acc_beta += tl.reduce(de_pre, 0, _sum_combine)
        acc_balpha += tl.reduce(dal_pre, 0, _sum_combine)
        acc_lbeta += dlbeta

        # ---- k, v chain: u = k - v or -v; k = normalize(a M_k^T); v = a M_v^T
        if OBJ_L2:
            dk += du
        dv -= du
        if VALUE:
            if OBJ_L2:
                dk += du_m
        else:
            if OBJ_L2:
                dk += du_m
            dv -= du_m
        dkr, da = _input_grads(dk, dv, k, nn, nrm, zc + d * d, de_pre, dal_pre, me, ma, d, boff, bm, PREC)
        tl.store(dq_ptr + offs_x, dq, mask=m2)
        tl.store(da_ptr + offs_x, da, mask=m2)

        # ================= pass B: dZ_c, dZ_s, dS_s row block by row block
        # Fresh loads and a recomputation of k, v, u, r, W: pass B then shares no tl.dot operand (and so no
        # shared-memory copy) with pass A, which keeps the kernel's shared-memory footprint small.
        q = tl.load(q_ptr + offs_x, mask=m2, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_x, mask=m2, other=0.0).to(tl.float32)
        dO = tl.load(do_ptr + offs_x, mask=m2, other=0.0).to(tl.float32)
        k = tl.dot(a, tl.trans(tl.load(zc + d * d + boff, mask=bm, other=0.0)), input_precision=PREC) / nn[:, None]
        v = tl.dot(a, tl.trans(tl.load(zc + 2 * d * d + boff, mask=bm, other=0.0)), input_precision=PREC)
        u, u_m = _targets(k, v, OBJ_L2, VALUE)
        W = e_d[:, None] * k + e_g[:, None] * u  # for the m_eta / m_alpha rows (vector ops, no tl.dot)
        Ws = e_m[:, None] * u
        r = tl.dot(tl.trans(wd), k, input_precision=PREC) + tl.dot(tl.trans(wg), u_m, input_precision=PREC)
        xl = tl.where(n == NSEG - 1, extra_last, 0.0)
        # M rows
        dze = tl.load(dzcur + (0) * d + boff, mask=bm, other=0.0)
        if MOM:
            dse = tl.load(dscur + (0) * d + boff, mask=bm, other=0.0)
        else:
            dse = dze * 0.0
        g_zc, g_zs, g_ss = _blk_out_grads(dze, dse, k, u_m, e_d, e_g, e_m, gL, sL, bL, True, MOM, PREC)
        g_zc -= tl.dot(tl.trans(dO), r, input_precision=PREC)
        g_zs += tl.dot(tl.trans(gamma[:, None] * dO), q, input_precision=PREC)
        if MOM:
            g_ss += tl.dot(tl.trans(sigma[:, None] * dO), q, input_precision=PREC)
        g_zc += xl * tl.load(dzc_last + (0) * d + boff, mask=bm, other=0.0)
        _store_blk_grads(n, nxt_z, nxt_s, dzc_out, dz_out, ds_out, 0, d, offs_d, g_zc, g_zs, g_ss, D, MOM)
        _adaptive_out_grads(n, dzcur + d * d, dscur + d * d, dzc_last + d * d, nxt_z + d * d, nxt_s + d * d,
                            dzc_out + d * d, dz_out + d * d, ds_out + d * d, k, u, a, W, Ws, dkr, dv, de_pre, dal_pre,
                            e_d, e_g, e_m, gL, sL, bL, xl, d, offs_d, md, boff, bm, AD_K, AD_V, AD_E, AD_A, D, MOM,
                            PREC)
        # the next (earlier) segment reads the carry this one stored
        tl.debug_barrier()

    tl.store(dpar_ptr + pid64 * 3 + 0, acc_beta)
    tl.store(dpar_ptr + pid64 * 3 + 1, acc_balpha)
    tl.store(dpar_ptr + pid64 * 3 + 2, acc_lbeta)


# ---------------------------------------------------------------------------------------------- python


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _block_sizes(d: int, chunk_size: int) -> tuple[int, int]:
    return max(16, _next_pow2(d)), max(16, _next_pow2(chunk_size))


def _num_segments(T: int, C: int, shift: int) -> int:
    return (T + shift + C - 1) // C if T > 0 else 0


def check_kernel_inputs(q: Tensor, a: Tensor, chunk_size: int, *, token_dim: bool = True) -> None:
    """The constraints of the Triton kernels on top of the reference's own checks (ValueError)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"titans Triton kernel: q has dtype {q.dtype}; supported: float32, float16, bfloat16 "
            "(use titans_memory_reference for float64)"
        )
    if a.dtype != q.dtype:
        raise ValueError(f"titans Triton kernel: a has dtype {a.dtype} but q has {q.dtype}; they must match")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"titans Triton kernel: head dim d={d} is not supported; need 1 <= d <= {MAX_HEAD_DIM}")
    if token_dim and not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"titans Triton kernel: chunk_size={chunk_size} is not supported; need 1 <= chunk_size <= {MAX_CHUNK_SIZE}"
        )
    if q.device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"titans Triton kernel: tensors are on {q.device.type}; the kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run on CPU tensors in Triton's interpreter)"
        )


class _TitansChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, a, zc, z, s, b_eta, b_alpha, momentum_logit, valid, cfg):
        B, T, H, d = q.shape
        R = memory_rows(d)
        C, pos = cfg["chunk_size"], cfg["position"]
        shift = pos % C
        nseg = _num_segments(T, C, shift)
        D, BC = _block_sizes(d, C)
        mom = cfg["momentum"]
        dev = q.device
        q_c, a_c = q.contiguous(), a.contiguous()
        zc_c = zc.detach().to(torch.float32).contiguous()
        z_c = z.detach().to(torch.float32).contiguous()
        s_c = s.detach().to(torch.float32).contiguous()
        params = torch.stack([
            b_eta.detach().to(torch.float32),
            b_alpha.detach().to(torch.float32),
            F.logsigmoid(momentum_logit.detach().to(torch.float32)),
        ]).contiguous()
        save = any(ctx.needs_input_grad)
        nslot = nseg if save else min(nseg, 2)
        o = torch.empty_like(q_c)
        wz = torch.empty(B * H, max(nslot, 1), R, d, device=dev, dtype=torch.float32)
        ws = torch.empty(B * H, max(nslot, 1), R, d, device=dev, dtype=torch.float32) if mom else wz
        if nseg > 0:
            _launch(_titans_fwd_kernel, (B * H,), (
                q_c, a_c, valid if valid is not None else q_c, zc_c, z_c, s_c, wz, ws, o,
                params[0], params[1], params[2],
                T, H, d, C, shift, nseg, nslot, float(cfg["eta_max"]), cfg["eps"],
            ), dict(
                BC=BC, D=D, MOM=mom, OBJ_L2=cfg["objective"] == "l2", VALUE=cfg["memory_target"] == "value",
                AD_K=cfg["ad"][0], AD_V=cfg["ad"][1], AD_E=cfg["ad"][2], AD_A=cfg["ad"][3],
                HAS_MASK=valid is not None,
            ), dot_precision(q.dtype))
        if nseg > 0:
            z_f = wz.view(B, H, -1, R, d)[:, :, (nseg - 1) % nslot].clone()
            s_f = ws.view(B, H, -1, R, d)[:, :, (nseg - 1) % nslot].clone() if mom else s_c.clone()
            if (pos + T) % C == 0:
                zc_f = z_f.clone()
            elif nseg >= 2:
                zc_f = wz.view(B, H, -1, R, d)[:, :, (nseg - 2) % nslot].clone()
            else:
                zc_f = zc_c.clone()
        else:
            zc_f, z_f, s_f = zc_c.clone(), z_c.clone(), s_c.clone()
        if save:
            ctx.save_for_backward(q_c, a_c, valid, zc_c, z_c, s_c, wz, ws if mom else None, params, b_eta, b_alpha,
                                  momentum_logit)
        ctx.cfg = cfg
        ctx.dims = (B, T, H, d, nseg, shift)
        ctx.dtypes = (q.dtype, a.dtype, zc.dtype, z.dtype, s.dtype, b_eta.dtype, b_alpha.dtype, momentum_logit.dtype)
        return o, zc_f, z_f, s_f

    @staticmethod
    def backward(ctx, do, dzc_f, dz_f, ds_f):
        q, a, valid, zc, z, s, wz, ws, params, b_eta, b_alpha, momentum_logit = ctx.saved_tensors
        cfg = ctx.cfg
        B, T, H, d, nseg, shift = ctx.dims
        R = memory_rows(d)
        C, pos = cfg["chunk_size"], cfg["position"]
        mom = cfg["momentum"]
        D, BC = _block_sizes(d, C)
        dev = q.device
        f32 = torch.float32
        dzc_f = dzc_f.to(f32).contiguous()
        dz_f = dz_f.to(f32).contiguous()
        ds_f = ds_f.to(f32).contiguous()
        boundary = (pos + T) % C == 0
        if nseg == 0:
            dq, da = torch.zeros_like(q, dtype=f32), torch.zeros_like(a, dtype=f32)
            dzc_in, dz_in, ds_in = dzc_f, dz_f, ds_f
            dpar = torch.zeros(B, H, 3, device=dev, dtype=f32)
        else:
            dz_init = dz_f + dzc_f if boundary else dz_f
            dq = torch.empty(q.shape, device=dev, dtype=f32)
            da = torch.empty(a.shape, device=dev, dtype=f32)
            dzc_in = torch.empty(B, H, R, d, device=dev, dtype=f32)
            dz_in = torch.empty_like(dzc_in)
            ds_in = torch.empty_like(dzc_in) if mom else ds_f
            gz = torch.empty(B * H, 2, R, d, device=dev, dtype=f32)
            gs = torch.empty_like(gz) if mom else gz
            dpar = torch.zeros(B, H, 3, device=dev, dtype=f32)
            _launch(_titans_bwd_kernel, (B * H,), (
                q, a, valid if valid is not None else q, zc, z, s, wz, ws if mom else wz, do.contiguous(),
                dz_init, ds_f, dzc_f, gz, gs,
                dq, da, dzc_in, dz_in, ds_in, dpar,
                params[0], params[1], params[2],
                T, H, d, C, shift, nseg, float(cfg["eta_max"]), cfg["eps"], 0.0 if boundary else 1.0,
            ), dict(
                BC=BC, D=D, MOM=mom, OBJ_L2=cfg["objective"] == "l2", VALUE=cfg["memory_target"] == "value",
                AD_K=cfg["ad"][0], AD_V=cfg["ad"][1], AD_E=cfg["ad"][2], AD_A=cfg["ad"][3],
                HAS_MASK=valid is not None,
            ), dot_precision(q.dtype))
        dpar = dpar.sum(0)
        dml = dpar[:, 2] * torch.sigmoid(-momentum_logit.detach().to(f32)) if mom else torch.zeros_like(dpar[:, 2])
        dt = ctx.dtypes
        return (dq.to(dt[0]), da.to(dt[1]), dzc_in.to(dt[2]), dz_in.to(dt[3]), ds_in.to(dt[4]),
                dpar[:, 0].to(dt[5]), dpar[:, 1].to(dt[6]), dml.to(dt[7]), None, None)


def titans_memory_triton(
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
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[TitansState]]:
    """Chunked self-modifying Titans memory on Triton; shapes and semantics as `titans_memory_reference`.

    Differentiable in q, a, z0, b_eta, b_alpha, momentum_logit and the tensors of `state`.
    """
    _check_inputs(q, a, z0, b_eta, b_alpha, momentum_logit, chunk_size, eta_max, objective, memory_target,
                  adaptive, mask, state)
    check_kernel_inputs(q, a, chunk_size)
    B, T, H, d = q.shape
    R = memory_rows(d)
    rows = adaptive_row_mask(adaptive, d)
    ad = (bool(rows[d]), bool(rows[2 * d]), bool(rows[3 * d]), bool(rows[3 * d + 1]))
    if state is None:
        zc = z0.to(torch.float32).unsqueeze(0).expand(B, H, R, d)
        z = zc
        s = torch.zeros(B, H, R, d, device=q.device, dtype=torch.float32)
        position = 0
    else:
        zc, z, s, position = state.z_chunk, state.z, state.s, int(state.position)
        for name, t in (("z_chunk", zc), ("z", z), ("s", s)):
            if not t.is_floating_point() or t.device != q.device:
                raise ValueError(f"state.{name} must be a floating tensor on {q.device}, got {t.dtype} on {t.device}")
    valid = None if mask is None else mask.detach().to(device=q.device, dtype=torch.float32).contiguous()
    cfg = dict(chunk_size=chunk_size, position=position, eta_max=float(eta_max), eps=1.0 if dgd else 0.0,
               momentum=bool(momentum), objective=objective, memory_target=memory_target, ad=ad)
    o, zc_f, z_f, s_f = _TitansChunkFn.apply(q, a, zc, z, s, b_eta, b_alpha, momentum_logit, valid, cfg)
    final = TitansState(zc_f, z_f, s_f, position + T) if output_final_state else None
    return o, final
