"""Every op through every available backend at a small grid of shapes (pytest-benchmark; `make bench`).

Ops: `titans_memory`, `titans_deep_memory` (memory_depth=2, hidden width h = d), `cms_level` (forward, forward +
backward) and their decode steps `titans_memory_step`, `titans_deep_memory_step`, `cms_level_step` (one token from
a mid-chunk state). Backends (benchmarks/workloads.py): the eager PyTorch reference, the reference under
torch.compile (the smallest shape only: each shape and grad mode costs a compile of ~20 s on the 2-core CPU
box), and the Triton kernels, which are timed only on a CUDA GPU; without one those cases are skipped with the
reason. fp32 on CPU, bf16 on CUDA.

Each benchmark records the op's FLOPs and minimum bytes in extra_info (formulas in workloads.py), so the JSON
gives achieved rates.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import workloads as W

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ROUNDS = 5

SHAPES = {
    "titans_memory": [dict(B=1, T=128, H=2, d=32, C=32), dict(B=2, T=512, H=4, d=64, C=64)],
    "cms_level": [dict(B=1, T=128, D=64, F=128, C=16), dict(B=2, T=512, D=128, F=256, C=64)],
    "titans_memory_step": [dict(B=1, H=2, d=32, C=32), dict(B=8, H=4, d=64, C=64)],
    "cms_level_step": [dict(B=1, D=64, F=128, C=16), dict(B=8, D=128, F=256, C=64)],
    # The deep op at the linear op's shapes, h = d (the config's default), so the two compare case by case.
    "titans_deep_memory": [dict(B=1, T=128, H=2, d=32, h=32, C=32), dict(B=2, T=512, H=4, d=64, h=64, C=64)],
    "titans_deep_memory_step": [dict(B=1, H=2, d=32, h=32, C=32), dict(B=8, H=4, d=64, h=64, C=64)],
}


def _cases() -> list:
    cases = []
    for op, shapes in SHAPES.items():
        modes = ("step",) if op in W.STEP_OPS else ("fwd", "fwd+bwd")
        for i, shape in enumerate(shapes):
            label = ",".join(f"{k}={v}" for k, v in shape.items())
            for mode in modes:
                for backend in W.OP_BACKENDS:
                    if backend == "compile" and i > 0:
                        continue  # compile time: the smallest shape only (module docstring)
                    cases.append(pytest.param(op, backend, shape, mode, id=f"{op}-{mode}-{backend}-{label}"))
    return cases


@pytest.mark.parametrize("op, backend, shape, mode", _cases())
def test_op(benchmark, op: str, backend: str, shape: dict, mode: str) -> None:
    reason = W.backend_unavailable_reason(backend, DEVICE, op=op)
    if reason:
        pytest.skip(reason)
    run = W.op_case(op, backend, shape, mode, DTYPE, DEVICE)

    def timed() -> torch.Tensor:
        out = run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # the benchmark's host clock must see the work finish
        return out

    flops, nbytes = W.op_flops_bytes(op, shape, mode, elt=DTYPE.itemsize)
    benchmark.extra_info.update(op=op, backend=backend, mode=mode, shape=shape, dtype=str(DTYPE),
                                device=DEVICE.type, flops=flops, bytes=nbytes)
    out = benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1)  # the warm-up round compiles
    assert out.shape[0] == shape["B"]
    assert torch.isfinite(out.float()).all()
