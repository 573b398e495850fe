"""Launch, precision, tile and segment helpers shared by the CMS Triton kernels (chunk.py, step.py).

Precision of `tl.dot` (SPEC §5: states, fast weights and inner-gradient sums fp32 whatever the activations):
- fp32 inputs: fp32 operands at `input_precision="tf32"` (tensor cores) on a GPU, fp32 accumulation;
- fp16 / bf16 inputs: bf16 operands (tensor cores), fp32 accumulation; the fast weights stay fp32 masters and are
  rounded to bf16 only as dot operands;
- HOPE_CMS_DOT_PRECISION=ieee|tf32x3|tf32 overrides the fp32 precision (the tests set "ieee" on a GPU);
- Triton's CPU interpreter computes every dot in fp32 ("ieee") and keeps 16-bit inputs in fp32 (its bf16
  arithmetic is wrong), so the interpreter checks the algebra, never the tensor-core rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as Fn
import triton.language as tl
from torch import Tensor

from hope_kernels._dispatch import triton_interpreting
from hope_kernels._triton import (  # noqa: F401  (the helpers every op shares, re-exported for the kernels)
    SUPPORTED_DTYPES,
    OutOfResources,
    device_fn,
    dot_precision_from,
    low_precision_dots,
    mm,
    next_pow2,
    num_segments,
    sigmoid,
)


def dot_precision() -> str:
    """`input_precision` of the fp32 tl.dot calls: HOPE_CMS_DOT_PRECISION if set, "ieee" in the interpreter, else
    "tf32"."""
    return dot_precision_from("HOPE_CMS_DOT_PRECISION")


def segment_has_valid(mask: Optional[Tensor], chunk_has_valid: Tensor, T: int, C: int, shift: int) -> Tensor:
    """(B, NSEG) bool: whether the chunk that segment n belongs to has held a valid (mask = 1) token by the
    segment's end: one in the segment, or, for n = 0, one consumed before it (`chunk_has_valid`, (B,) bool).
    This decides Eq. 31's retention pull λ_n (SPEC §5: a chunk of padding changes no state)."""
    B = chunk_has_valid.shape[0]
    nseg = num_segments(T, C, shift)
    valid = torch.ones(B, T, dtype=torch.bool, device=chunk_has_valid.device) if mask is None else mask != 0
    # Segment n covers the tokens [nC - shift, (n+1)C - shift): pad to whole chunks and reduce per chunk.
    valid = Fn.pad(valid, (shift, nseg * C - shift - T), value=False).reshape(B, nseg, C).any(-1)
    valid[:, 0] |= chunk_has_valid
    return valid


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch; a kernel that does not fit the GPU raises a RuntimeError that says what to change (no fallback).
    `benchmarks/cms_sm90_check.py` replaces this function with a recorder to compile every launch offline."""
    try:
        kernel[grid](*args, **kwargs)
    except OutOfResources as e:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        raise RuntimeError(
            f"cms Triton {name} (blocks BT={kwargs.get('BT')}, BD={kwargs.get('BD')}, BF={kwargs.get('BF')}) does "
            f"not fit this GPU ({e}); kernel_backend='torch' runs the PyTorch reference."
        ) from e


def check_kernel_inputs(tensors: dict, device: torch.device, *, op: str) -> None:
    """The constraints of the Triton kernels on top of the reference's own checks (ValueError)."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{op} Triton kernel: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16 "
                "(float64 runs on the PyTorch reference, kernel_backend='torch')"
            )
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{op} Triton kernel: tensors are on {device.type}; the kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run on CPU tensors in Triton's interpreter)"
        )


def check_index_range(rows: int, D: int, Fh: int, *, op: str) -> None:
    """The kernels' in-tile offsets are int32 (their base pointers are offset in int64): a chunk's rows x max(D, F)
    and the 3 F D fast weights of one sequence must stay below 2^31 elements."""
    if rows * max(D, Fh) >= 2**31 or 3 * D * Fh >= 2**31:
        raise ValueError(f"{op} Triton kernel: chunk rows {rows} x max(D={D}, F={Fh}) or 3 D F pass 2^31 elements; "
                         "use a smaller chunk_size, or kernel_backend='torch'")


# --------------------------------------------------------------------------------------------- jit helpers


@device_fn
def offsets(r0, c0, nr, nc, stride, BR: tl.constexpr, BC: tl.constexpr):
    """(offsets, mask) of the (BR, BC) tile at (r0, c0) of a row-major (nr, nc) matrix with `stride` per row.
    int32: the kernels offset their base pointers in int64 (sequence x T x D and sequence x 3FD pass 2^31 at
    the 1.3B shape: D = 2048), so a tile's offsets stay below chunk x max(D, F) < 2^31 (checked by the callers);
    int64 tile offsets would double the registers of every address tensor."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    return rows[:, None] * stride + cols[None, :], (rows[:, None] < nr) & (cols[None, :] < nc)


@device_fn
def ld(ptr, r0, c0, nr, nc, stride, BR: tl.constexpr, BC: tl.constexpr):
    """(BR, BC) fp32 tile; zeros outside (nr, nc)."""
    off, m = offsets(r0, c0, nr, nc, stride, BR, BC)
    return tl.load(ptr + off, mask=m, other=0.0).to(tl.float32)


@device_fn
def ld_raw(ptr, r0, c0, nr, nc, stride, BR: tl.constexpr, BC: tl.constexpr):
    """(BR, BC) tile in the buffer's own dtype (a dot operand); zeros outside (nr, nc)."""
    off, m = offsets(r0, c0, nr, nc, stride, BR, BC)
    return tl.load(ptr + off, mask=m, other=0.0)


@device_fn
def st(ptr, r0, c0, nr, nc, stride, x, BR: tl.constexpr, BC: tl.constexpr):
    off, m = offsets(r0, c0, nr, nc, stride, BR, BC)
    tl.store(ptr + off, x.to(ptr.dtype.element_ty), mask=m)


@device_fn
def atomic_acc(ptr, r0, c0, nr, nc, stride, x, BR: tl.constexpr, BC: tl.constexpr):
    """ptr tile += x with fp32 atomics: the cross-tile reduction over F (the launch boundary orders it)."""
    off, m = offsets(r0, c0, nr, nc, stride, BR, BC)
    tl.atomic_add(ptr + off, x, mask=m, sem="relaxed")


@device_fn
def ldv(ptr, r0, n, BR: tl.constexpr):
    rows = r0 + tl.arange(0, BR)
    return tl.load(ptr + rows, mask=rows < n, other=0.0).to(tl.float32)


def checkpoint_every(decay: float, nseg: int) -> int:
    """K: the backward keeps θ_n for n = K, 2K, ... and rebuilds the θ_n between them by inverting Eq. 31's update,
    θ_n = (θ_{n+1} - λ θ_0 + Δ_n) / (1 - λ), with Δ_n recomputed from the saved rank-C factors. Each inverted step
    multiplies the rounding error already in θ by 1 / (1 - λ) (the forward's pull toward θ_0 contracts, so its
    inverse expands) and adds one rounding of its own, so K steps from a checkpoint carry at most about
    K (1 - λ)^-K roundings: K is the largest value with K (1 - λ)^-K <= 256, i.e. a relative error of at most
    about 256 · 6e-8 = 1.5e-5 in fp32 (the forward's own rounding per step is 6e-8). λ = 0: every 256 chunks;
    λ = 0.05: every 37; λ >= 0.9: every chunk (then the backward keeps θ per chunk)."""
    if nseg <= 1:
        return max(nseg, 1)
    if decay <= 0:
        return min(nseg, 256)
    if decay >= 1:
        return 1
    k = 1
    while k + 1 <= nseg and (k + 1) * (1.0 - decay) ** (-(k + 1)) <= 256:
        k += 1
    return k

