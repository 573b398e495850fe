"""Triton forward kernel of the chunked deep Titans memory (SPEC §2 "Deep memory", Eq. 91, memory_depth=2).

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
  start; the reads H = silu(γ Q W2_sᵀ + σ Q S2_sᵀ - Wdᵀ P - Wgᵀ G), O = Q + γ H W1_sᵀ + σ H S1_sᵀ - W1gᵀ E;
  then the state after the segment. All masked BC x BC and BC x D (BC x HD) tl.dots.
* The state lives in fp32 ping-pong workspaces (two slots per (b, h)); `tl.debug_barrier()` orders a
  segment's stores before the next segment's loads.

Backward: there is no Triton backward yet (issue #7, stage 4). The autograd op recomputes the forward with the
PyTorch reference (`titans_deep_memory_reference`, from the same inputs and start state) and differentiates
that, so gradients are exact but cost a reference forward + backward. This is documented, not silent:
`TRITON_BACKWARD = False` says so.

Constraints (ValueError otherwise): 1 <= d, h <= 128; 1 <= chunk_size <= 128; q and a of one dtype among
float32, float16, bfloat16; CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, where half inputs are upcast
to fp32 first). States and sums are fp32; o comes back in the input dtype. Not run or timed on a GPU.
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
    adaptive_rows,
    titans_deep_memory_reference,
)
from hope_kernels.titans.chunk import (
    MAX_HEAD_DIM,
    _advance_adaptive,
    _block_sizes,
    _coeffs,
    _configs,
    _launch,
    _next_pow2,
    _num_segments,
    _prune_configs,
    _sigmoid,
    _targets,
    check_kernel_inputs,
    dot_precision,
)
from hope_kernels.titans.reference import ADAPTIVE_NAMES, adaptive_row_mask

__all__ = ["titans_deep_memory_triton", "TRITON_BACKWARD"]

TRITON_BACKWARD = False


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
    T, H, d, hd, C, shift, NSEG, eta_max, eps,
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
            slot = (n - 1) % 2
            zs = wz_ptr + (pid64 * 2 + slot) * AD
            ss = ws_ptr + (pid64 * 2 + slot) * AD
            w1s = ww1_ptr + (pid64 * 2 + slot) * WD
            s1s = ws1_ptr + (pid64 * 2 + slot) * WD
            w2s = ww2_ptr + (pid64 * 2 + slot) * WD
            s2s = ws2_ptr + (pid64 * 2 + slot) * WD
            zc = zs
            w1c = w1s
            w2c = w2s
        slot_e = n % 2
        ze = wz_ptr + (pid64 * 2 + slot_e) * AD
        se = ws_ptr + (pid64 * 2 + slot_e) * AD
        w1e_p = ww1_ptr + (pid64 * 2 + slot_e) * WD
        s1e_p = ws1_ptr + (pid64 * 2 + slot_e) * WD
        w2e_p = ww2_ptr + (pid64 * 2 + slot_e) * WD
        s2e_p = ws2_ptr + (pid64 * 2 + slot_e) * WD

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


def _deep_forward(q: Tensor, a: Tensor, valid: Optional[Tensor], states: Sequence[Tensor], b_eta: Tensor,
                  b_alpha: Tensor, momentum_logit: Tensor, cfg: dict) -> tuple[Tensor, list[Tensor]]:
    """Launch the forward kernel; returns o (q's dtype) and the nine final state tensors (fp32)."""
    B, T, H, d = q.shape
    hid = states[3].shape[-1]
    C, pos = cfg["chunk_size"], cfg["position"]
    shift = pos % C
    nseg = _num_segments(T, C, shift)
    D, BC = _block_sizes(d, C)
    HD = max(16, _next_pow2(hid))
    f32 = torch.float32
    dev = q.device
    out_dtype = q.dtype
    q_c, a_c = _kernel_inputs(q.detach(), a.detach())
    st = [x.detach().to(f32).contiguous() for x in states]
    params = torch.stack([b_eta.detach().to(f32), b_alpha.detach().to(f32),
                          F.logsigmoid(momentum_logit.detach().to(f32))]).contiguous()
    o = torch.empty_like(q_c)
    work = [torch.empty(B * H, 2, *st[i].shape[2:], device=dev, dtype=f32) for i in (1, 2, 4, 5, 7, 8)]
    if nseg == 0:
        return o.to(out_dtype), [x.clone() for x in st]
    _launch(_deep_fwd_kernel, (B * H,), (
        q_c, a_c, valid if valid is not None else q_c, *st, *work, o, params[0], params[1], params[2],
        T, H, d, hid, C, shift, nseg, float(cfg["eta_max"]), cfg["eps"],
    ), dict(
        BC=BC, D=D, HD=HD, MOM=cfg["momentum"], OBJ_L2=cfg["objective"] == "l2",
        VALUE=cfg["memory_target"] == "value",
        AD_K=cfg["ad"][0], AD_V=cfg["ad"][1], AD_E=cfg["ad"][2], AD_A=cfg["ad"][3], HAS_MASK=valid is not None,
    ), dot_precision(q_c.dtype))
    last, before = (nseg - 1) % 2, (nseg - 2) % 2
    final = []
    for i, (cur, mom) in enumerate(((work[0], work[1]), (work[2], work[3]), (work[4], work[5]))):
        shape = st[3 * i].shape
        x_f = cur.view(shape[0], shape[1], 2, *shape[2:])[:, :, last].clone()
        s_f = mom.view(shape[0], shape[1], 2, *shape[2:])[:, :, last].clone() if cfg["momentum"] else st[3 * i + 2].clone()
        if (pos + T) % C == 0:
            xc_f = x_f.clone()
        elif nseg >= 2:  # the last segment started at a chunk boundary: its start is in the other slot
            xc_f = cur.view(shape[0], shape[1], 2, *shape[2:])[:, :, before].clone()
        else:
            xc_f = st[3 * i].clone()
        final += [xc_f, x_f, s_f]
    return o.to(out_dtype), final


class _DeepChunkFn(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: autograd through the PyTorch reference, recomputed from the same
    inputs and start state (no Triton backward yet, see the module docstring)."""

    @staticmethod
    def forward(ctx, q, a, b_eta, b_alpha, momentum_logit, valid, cfg, *states):
        o, final = _deep_forward(q, a, valid, states, b_eta, b_alpha, momentum_logit, cfg)
        ctx.save_for_backward(q, a, b_eta, b_alpha, momentum_logit, valid, *states)
        ctx.cfg = cfg
        return (o, *final)

    @staticmethod
    def backward(ctx, do, *dfinal):
        q, a, b_eta, b_alpha, momentum_logit, valid, *states = ctx.saved_tensors
        cfg = ctx.cfg
        inputs = [x.detach().requires_grad_() for x in (q, a, b_eta, b_alpha, momentum_logit, *states)]
        qq, aa, be, ba, ml, *st = inputs
        with torch.enable_grad():
            o, final = titans_deep_memory_reference(
                # With a state the initial parameters are only shape-checked: any batch row of the state will do.
                qq, aa, st[4][0], st[7][0], st[1][0], be, ba, ml,
                chunk_size=cfg["chunk_size"], eta_max=cfg["eta_max"], momentum=cfg["momentum"],
                dgd=cfg["eps"] > 0, objective=cfg["objective"], memory_target=cfg["memory_target"],
                adaptive=cfg["adaptive"], mask=valid, state=DeepTitansState(*st, cfg["position"]),
                output_final_state=True)
            outputs = [o] + list(final[:9])
            grads_out = [do] + list(dfinal)
            pairs = [(x, g) for x, g in zip(outputs, grads_out) if g is not None]
            grads = torch.autograd.grad([x for x, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
        grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, (q, a, b_eta, b_alpha, momentum_logit,
                                                                                 *states))]
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
    """Chunked deep Titans memory with the Triton forward kernel; shapes and semantics as
    `titans_deep_memory_reference`. Differentiable in every tensor input (backward through the reference)."""
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
