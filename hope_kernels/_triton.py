"""Triton helpers that every op's kernels share (titans, deep_titans, cms): dtypes, the fp32 dot precision, the
segment count of a chunked call, and the small device functions (`mm`, `sigmoid`, `log_sigmoid`).

Each op's `_common.py` adds what is its own (launch options, tile sizes, input checks) and names its precision
override variable (`HOPE_TITANS_DOT_PRECISION`, `HOPE_CMS_DOT_PRECISION`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hope_kernels._dispatch import triton_interpreting

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
try:  # what a launch raises when a kernel needs more shared memory / registers than the GPU has
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover
    OutOfResources = RuntimeError


def dot_precision_from(env_var: str) -> str:
    """`input_precision` of the fp32 tl.dot calls: the variable `env_var` if set, "ieee" in the interpreter, else
    "tf32"."""
    env = os.environ.get(env_var)
    if env:
        if env not in DOT_PRECISIONS:
            raise ValueError(f"{env_var}={env!r}; allowed: {list(DOT_PRECISIONS)}")
        return env
    return "ieee" if triton_interpreting() else "tf32"


def low_precision_dots(dtype: torch.dtype) -> bool:
    """True when the big products take 16-bit operands: 16-bit inputs, compiled (the interpreter stays in fp32,
    its bf16 arithmetic being wrong)."""
    return dtype in (torch.float16, torch.bfloat16) and not triton_interpreting()


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def num_segments(T: int, C: int, shift: int) -> int:
    """Segments of a call: the chunk phase counts from position 0, so a call that starts `shift` tokens into a
    chunk first finishes it (SPEC §5). Segment n holds tokens [max(nC - shift, 0), min((n+1)C - shift, T))."""
    return (T + shift + C - 1) // C if T > 0 else 0


def device_fn(fn):
    """`triton.jit` for a device function called from the kernels. Under the interpreter every call of a nested
    jit function re-patches triton.language (~3 ms, thousands of calls per launch); the kernel's own launch has
    patched it already, so there the helper runs as the interpreter's rewritten Python function directly."""
    jitted = triton.jit(fn)
    if not triton_interpreting() or not hasattr(jitted, "rewrite"):  # an interpreter without the AST rewrite
        return jitted
    rewritten = []

    def call(*args, **kwargs):
        if not rewritten:
            rewritten.append(jitted.rewrite())
        return rewritten[0](*args, **kwargs)

    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


@device_fn
def mm(x, y, PREC: tl.constexpr, LOWP: tl.constexpr):
    """x @ y with fp32 accumulation: bf16 operands when LOWP (16-bit inputs, compiled), else fp32 at PREC."""
    if LOWP:
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    else:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision=PREC)


@device_fn
def log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@device_fn
def sigmoid(x):
    e = tl.exp(-tl.abs(x))  # exp of non-positive numbers only
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
