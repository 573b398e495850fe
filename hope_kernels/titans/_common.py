"""Launch, precision and tile helpers shared by the Titans Triton kernels (linear and deep memory, chunk and step).

Precision of `tl.dot` (SPEC §5: states and sums fp32 whatever the activations):
- fp32 inputs: fp32 operands at `input_precision="tf32"` (tensor cores) on a GPU, fp32 accumulation;
- fp16 / bf16 inputs: the large C x d and d x d products take bf16 / fp16 operands (tensor cores), fp32 accumulation;
  the chunk's triangular inverse and the products that form it stay fp32 (tf32);
- HOPE_TITANS_DOT_PRECISION=ieee|tf32x3|tf32 overrides the fp32 precision (the tests set "ieee" on a GPU);
- Triton's CPU interpreter computes every dot in fp32 ("ieee") and upcasts 16-bit operands (its bf16 arithmetic
  is wrong), so the interpreter checks the algebra, never the tensor-core rounding.
"""
from __future__ import annotations

import torch
import triton.language as tl

from hope_kernels._dispatch import triton_interpreting
from hope_kernels._triton import (  # noqa: F401  (the helpers every op shares, re-exported for the kernels)
    SUPPORTED_DTYPES,
    OutOfResources,
    device_fn,
    dot_precision_from,
    log_sigmoid,
    low_precision_dots,
    mm,
    next_pow2,
    num_segments,
    sigmoid,
)

MAX_HEAD_DIM = 128
MAX_CHUNK_SIZE = 128
TRI_BLOCK = 16  # the triangular inverse solves 16 x 16 diagonal blocks by substitution, then merges them


def dot_precision() -> str:
    """`input_precision` of the fp32 tl.dot calls: HOPE_TITANS_DOT_PRECISION if set, "ieee" in the interpreter,
    else "tf32"."""
    return dot_precision_from("HOPE_TITANS_DOT_PRECISION")


def launch_options(kind: str, D: int) -> dict:
    """num_warps and num_stages of a kernel kind at head-dim block D, chosen with the offline sm_90a compile table
    (`make sm90-check`, benchmarks/results/sm90_check.md): the d x d-state and chunk tiles are fp32, so 4 warps
    spill at d = 64. num_stages=1 everywhere: prefetching the next segment's tiles (the pipeliner's default 3
    stages) doubled the shared memory and caused most spills, and in the serial scans (K1, B4) segment n+1 reads
    what segment n stored, which a prefetch would read stale. The interpreter takes one config (it cannot
    autotune). kinds: "tile" (parallel and BV-tiled kernels), "serial" (the scans, one program per (batch, head):
    K1, B4 and the deep memory's forward and backward; 8 warps at every D, 255 registers: at d = 128, 16 warps
    spilled more: K1 1.2-1.3 KB, where 8 with its column-tiled reads spill none (4 B in bf16), B4 4.7-6.5 KB
    for 3.6-3.7, the deep forward 6.8-9.1 KB for 4.5-4.7), "step" (the linear decode step), "deep_step" (the
    deep decode step: two d x h states per program, so twice the warps at d > 32)."""
    if triton_interpreting():
        return dict(num_warps=4, num_stages=1)
    warps = {"tile": 8, "serial": 8, "step": 4 if D <= 32 else 8,
             "deep_step": 4 if D <= 32 else 16}[kind]
    return dict(num_warps=warps, num_stages=1)


def block_v(D: int, lowp: bool) -> int:
    """BV, the width of W's row tiles in the state-passing kernels: 32, or 16 at d = 128 in fp32 (a 32 x 128 fp32
    state tile plus the chunk's fp32 operands spill at 8 warps; with 16-bit operands 32 fits, `make sm90-check`)."""
    return min(D, 16 if D > 64 and not lowp else 32)


def cotangent(g: "torch.Tensor | None", shape: tuple, device: torch.device) -> torch.Tensor:
    """An output's cotangent from autograd as a fresh fp32 contiguous tensor of `shape` (zeros for None): the
    backward kernels accumulate into these buffers in place, and the tensors autograd passes in must not change."""
    if g is None:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    return g.reshape(shape).to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def block_sizes(d: int, chunk_size: int) -> tuple[int, int]:
    """(D, BC): the head dim and the chunk padded to powers of two >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, next_pow2(d)), max(TRI_BLOCK, next_pow2(chunk_size))


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch; a kernel that does not fit the GPU raises a RuntimeError that says what to change (no fallback)."""
    try:
        kernel[grid](*args, **kwargs)
    except OutOfResources as e:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        raise RuntimeError(
            f"titans Triton {name} (D={kwargs.get('D')}, BC={kwargs.get('BC')}) does not fit this GPU ({e}). "
            "A smaller chunk_size or head dim fits; kernel_backend='torch' runs the PyTorch reference."
        ) from e


def check_kernel_inputs(q: torch.Tensor, a: torch.Tensor, chunk_size: int, *, op: str) -> None:
    """The kernels' constraints on top of the reference's own checks (ValueError)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op} Triton kernel: q has dtype {q.dtype}; supported: float32, float16, bfloat16 "
                         "(float64 runs on the PyTorch reference)")
    if a.dtype != q.dtype:
        raise ValueError(f"{op} Triton kernel: a has dtype {a.dtype} but q has {q.dtype}; they must match")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op} Triton kernel: head dim d={d} is not supported; need 1 <= d <= {MAX_HEAD_DIM}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"{op} Triton kernel: chunk_size={chunk_size} is not supported; "
                         f"need 1 <= chunk_size <= {MAX_CHUNK_SIZE}")
    if q.device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"{op} Triton kernel: tensors are on {q.device.type}; the kernel needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run on CPU tensors in Triton's interpreter)")


def check_no_momentum(momentum: bool, *, op: str) -> None:
    """Momentum is not in the kernels (SPEC §2 v2: off by default); kernel_backend="auto" picks the reference."""
    if momentum:
        raise ValueError(f"{op} Triton kernel: momentum=True is not supported by the Triton kernels; use "
                         "kernel_backend='torch' (or 'auto', which picks the PyTorch reference for momentum=True)")


# --------------------------------------------------------------------------------------------- jit helpers


@device_fn
def unit_lower_inverse(A, scratch, offs_c, BC: tl.constexpr, PREC: tl.constexpr):
    """T = (I + A)^-1 for A (BC, BC) strictly lower triangular, in fp32.

    The 16 x 16 diagonal blocks are inverted by forward substitution (all blocks at once, one row per step), then
    merged: with D = (I + A_diag)^-1 and M = D A_off (strictly block-lower, M^(BC/16) = 0), I + A = (I + A_diag)(I + M)
    and (I + A)^-1 = (I + M)^-1 D = D - M (D - M (D - ...)): every step multiplies by the same M (one shared-memory
    operand for the compiler to address, not one per step) and adds D in the product's accumulator. M is stored over
    A_off in scratch and read back as the left operand, and the steps are a runtime loop: the compiler gives a dot
    whose result feeds another dot of the same region (unrolled steps, or M straight from its product) the wide
    [num_warps, 1] tensor-core layout, twice the registers of D and T at BC = 64 and 8 warps (offline sm_90a compile
    of K1, benchmarks/sm90_check.py, d = 64, with K1's k read back: spill stores 120 -> 0 B fp32, 148 -> 0 B bf16).
    `scratch` is a (BC, BC) fp32 buffer of this program; it holds T on return. Every step is exact algebra (no
    Neumann series of A itself, whose terms grow binomially).
    """
    NB: tl.constexpr = BC // 16
    full = offs_c[:, None] * BC + offs_c[None, :]
    tl.store(scratch + full, A)
    tl.debug_barrier()
    ib = tl.arange(0, NB)[:, None, None]
    ii = tl.arange(0, 16)[None, :, None]
    jj = tl.arange(0, 16)[None, None, :]
    blocks = (ib * 16 + ii) * BC + ib * 16 + jj
    Ab = tl.load(scratch + blocks)  # (NB, 16, 16): the diagonal blocks of A
    Tb = tl.where(ii == jj, 1.0, 0.0) + Ab * 0.0
    j2 = tl.arange(0, 16)[None, :]
    for i in tl.static_range(1, 16):
        arow = tl.sum(tl.where(ii == i, Ab, 0.0), axis=1)  # (NB, 16): row i of every block
        new = tl.where(j2 == i, 1.0, 0.0) - tl.sum(arow[:, :, None] * Tb, axis=1)
        Tb = tl.where(ii == i, new[:, None, :], Tb)
    tl.debug_barrier()
    tl.store(scratch + blocks, Tb)
    tl.debug_barrier()
    if NB == 1:
        Tm = tl.load(scratch + full)
    else:
        same = (offs_c[:, None] // 16) == (offs_c[None, :] // 16)
        Dm = tl.load(scratch + full, mask=same, other=0.0)
        Mm = tl.dot(Dm, tl.load(scratch + full, mask=~same, other=0.0), input_precision=PREC)  # M = D A_off
        tl.debug_barrier()  # every thread has read A_off
        tl.store(scratch + full, Mm, mask=~same)  # M over A_off; D stays in the diagonal blocks
        tl.debug_barrier()
        Tm = Dm
        for _ in range(NB - 1):  # a runtime loop, M read back: see above
            Tm = tl.dot(tl.load(scratch + full, mask=~same, other=0.0), -Tm, acc=Dm, input_precision=PREC)
        tl.debug_barrier()
        tl.store(scratch + full, Tm)
    return Tm
