"""CUDA benchmark of the Continuum Memory System level kernels (hope_kernels/cms/chunk.py).

    python benchmarks/bench_cms_gpu.py            # full run, writes benchmarks/results/cms_h200.json
    python benchmarks/bench_cms_gpu.py --quick    # small shapes, a minute or two
    python benchmarks/bench_cms_gpu.py --out results.json --dot-precision tf32

1. Correctness in bf16: the Triton op on bf16 inputs vs the PyTorch reference on fp32 copies of the same
   inputs (B=8, T=4096, D=1024, hidden F=2048, C in {64, 512, 4096}; --quick: smaller), y, the final state and
   every gradient (z, the six parameters): relative error ||x - ref|| / ||ref|| <= 1e-2.
2. Timing (CUDA events, median of a few runs) of forward and forward+backward, bf16 activations and
   parameters, output_final_state=False (as in training):
   - cms_triton        the Triton op (this project)
   - cms_ref_eager     the PyTorch reference (a Python loop over chunks, batched over B)
   - cms_ref_compile   the reference with its per-chunk step `_chunk_piece` under torch.compile (compiling the
                       whole function would unroll the chunk loop)
   - ffn_swiglu        a plain bf16 SwiGLU FFN of the same size (what a level with C = None costs)
3. FLOPs are matmul FLOPs (formulas below), TFLOP/s from the median time, and the fraction of a measured
   bf16 matmul rate (an 8192^3 torch.matmul) on the same GPU.

Exits 0 with a message on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.gpu_common import cuda_time_ms, gpu_unavailable_reason, matmul_rate_tflops, rel_err  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "cms_h200.json")
ETA_MAX = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results file (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repetitions")
    p.add_argument("--dot-precision", choices=["ieee", "tf32", "tf32x3"], default=None,
                   help="tl.dot precision of the CMS kernels (default: the module's own default, ieee)")
    p.add_argument("--skip", default="", help="comma-separated method names to skip")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    p.add_argument("--no-correctness", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- FLOPs


def cms_flops(B, T, D, Fh, C, backward=False):
    """Matmul FLOPs of one CMS level that learns on every token (per token: read 6DF, inner gradients 8DF,
    target 2D^2); the backward of the kernel recomputes the forward and adds 32DF + 4D^2."""
    per_tok = 14 * D * Fh + 2 * D * D
    if backward:
        per_tok += 38 * D * Fh + 4 * D * D
    return B * T * per_tok


def ffn_flops(B, T, D, Fh, C=None, backward=False):
    return B * T * 6 * D * Fh * (3 if backward else 1)


# ----------------------------------------------------------------------------------------------- inputs


def cms_inputs(B, T, D, Fh, dtype, device, requires_grad=False, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(B, T, D, generator=g)
    z = 0.4 * z / z.pow(2).mean(-1, keepdim=True).sqrt()
    xs = [
        z,
        torch.randn(Fh, D, generator=g) / D**0.5,
        torch.randn(Fh, D, generator=g) / D**0.5,
        torch.randn(D, Fh, generator=g) / Fh**0.5,
        torch.randn(D, D, generator=g) / D**0.5,
        torch.randn(D, generator=g) / D**0.5,
        torch.tensor(-2.0),
    ]
    return [x.to(device=device, dtype=dtype).requires_grad_(requires_grad) for x in xs]


def correctness(B, T, D, Fh, C, log):
    import torch

    from hope_kernels.cms.chunk import cms_level_triton
    from hope_kernels.cms.reference import cms_level_reference

    xb = cms_inputs(B, T, D, Fh, torch.bfloat16, "cuda", requires_grad=True)
    xf = [x.detach().float().requires_grad_() for x in xb]
    kw = dict(chunk_size=C, eta_max=ETA_MAX, objective="l2", decay=0.0, output_final_state=True)
    entry = {"shape": dict(B=B, T=T, D=D, F=Fh, C=C)}
    errs = {}
    outs = {}
    for name, fn, xs in (("triton", cms_level_triton, xb), ("ref", cms_level_reference, xf)):
        y, st = fn(*xs, **kw)
        g = torch.Generator(device="cpu").manual_seed(1)
        w = torch.randn(y.shape, generator=g).to("cuda")
        ws = [torch.randn(t.shape, generator=g).to("cuda") * 1e-3 for t in st[:3]]
        loss = (y.float() * w).sum() + sum((t * v).sum() for t, v in zip(st[:3], ws))
        grads = torch.autograd.grad(loss, xs)
        outs[name] = [y, *st[:6], *grads]
        del y, st, grads, loss
        torch.cuda.empty_cache()
    names = ["y", "w_gate_final", "w_up_final", "w_down_final", "grad_gate", "grad_up", "grad_down",
             "dz", "dw_gate", "dw_up", "dw_down", "dp_v", "dw_eta", "db_eta"]
    for n, a, b in zip(names, outs["triton"], outs["ref"]):
        errs[n] = rel_err(a, b)
    worst = max(errs.values())
    entry.update(rel_err=errs, max_rel_err=worst, ok=bool(worst <= 1e-2))
    log(f"  B={B} T={T} D={D} F={Fh} C={C}: max rel err {worst:.2e} ({'ok' if worst <= 1e-2 else 'FAIL'})")
    return entry


# ----------------------------------------------------------------------------------------------- methods


@contextlib.contextmanager
def compiled_chunk_piece():
    import torch

    import hope_kernels.cms.reference as ref

    orig = ref._chunk_piece
    ref._chunk_piece = torch.compile(orig, dynamic=False)
    try:
        yield
    finally:
        ref._chunk_piece = orig


def make_methods(skip):
    import torch
    import torch.nn.functional as F

    from hope_kernels.cms.chunk import cms_level_triton
    from hope_kernels.cms.reference import cms_level_reference

    def runner(fn, ctx=contextlib.nullcontext):
        def setup(B, T, D, Fh, C, backward):
            xs = cms_inputs(B, T, D, Fh, torch.bfloat16, "cuda", requires_grad=backward)

            def run():
                with ctx():
                    y, _ = fn(*xs, chunk_size=C, eta_max=ETA_MAX, objective="l2")
                    if backward:
                        y.backward(torch.ones_like(y))

            return run

        return setup

    def ffn_setup(B, T, D, Fh, C, backward):
        z, wg, wu, wd = cms_inputs(B, T, D, Fh, torch.bfloat16, "cuda", requires_grad=backward)[:4]

        def run():
            y = (F.silu(z @ wg.mT) * (z @ wu.mT)) @ wd.mT
            if backward:
                y.backward(torch.ones_like(y))

        return run

    methods = {
        "cms_triton": (runner(cms_level_triton), cms_flops),
        "cms_ref_eager": (runner(cms_level_reference), cms_flops),
        "cms_ref_compile": (runner(cms_level_reference, compiled_chunk_piece), cms_flops),
        "ffn_swiglu": (ffn_setup, ffn_flops),
    }
    return {k: v for k, v in methods.items() if k not in skip}


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = gpu_unavailable_reason("bench_cms_gpu")
    if reason:
        print(reason)
        return 0
    import torch
    import triton

    if args.dot_precision:
        os.environ["HOPE_CMS_DOT_PRECISION"] = args.dot_precision
    import hope_kernels.cms.chunk as chunk_mod

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    dev_name = torch.cuda.get_device_name()
    log(f"device {dev_name} | torch {torch.__version__} | triton {triton.__version__} | "
        f"dot precision {chunk_mod.DOT_PRECISION}")
    peak = matmul_rate_tflops(4096 if args.quick else 8192)
    log(f"measured bf16 matmul rate: {peak:.1f} TFLOP/s")
    result = {
        "device": dev_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dot_precision": chunk_mod.DOT_PRECISION,
        "dtype": "bfloat16",
        "quick": bool(args.quick),
        "bf16_matmul_tflops": round(peak, 2),
        "correctness": [],
        "timings": [],
    }
    if args.quick:
        B, T, D, Fh, chunks = 2, 512, 256, 512, (64, 512)
    else:
        B, T, D, Fh, chunks = 8, 4096, 1024, 2048, (64, 512, 4096)

    # ---- 1. correctness
    if not args.no_correctness:
        log("correctness (bf16 Triton vs fp32 reference, tolerance 1e-2)")
        for C in chunks:
            try:
                result["correctness"].append(correctness(B, T, D, Fh, C, log))
            except Exception as e:  # noqa: BLE001
                log(f"  correctness C={C}: ERROR {type(e).__name__}: {e}")
                traceback.print_exc()
                result["correctness"].append({"shape": dict(B=B, T=T, D=D, F=Fh, C=C),
                                              "error": f"{type(e).__name__}: {e}"})
            torch.cuda.empty_cache()

    # ---- 2. timings
    skip = {s for s in args.skip.split(",") if s}
    methods = make_methods(skip)
    reps = args.reps or (3 if args.quick else 5)
    log(f"timings (median of up to {reps} runs; ms, TFLOP/s, fraction of the bf16 matmul rate)")
    for C in chunks:
        for name, (setup, flops_fn) in methods.items():
            if name == "ffn_swiglu" and C != chunks[0]:
                continue  # independent of C
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                entry = {"method": name, "mode": mode, "shape": dict(B=B, T=T, D=D, F=Fh, C=C)}
                run = None
                try:
                    run = setup(B, T, D, Fh, C, backward)
                    t0 = time.time()
                    run()  # compile / autotune outside the timing
                    torch.cuda.synchronize()
                    entry["first_call_s"] = round(time.time() - t0, 2)
                    ms, n = cuda_time_ms(run, reps, warmup=0)
                    flops = flops_fn(B, T, D, Fh, C, backward=backward)
                    tf = flops / ms / 1e9
                    entry.update(ms=round(ms, 4), runs=n, flops=flops, tflops=round(tf, 3),
                                 frac_of_matmul=round(tf / peak, 4))
                    log(f"  {name:16s} {mode:8s} B={B} T={T} D={D} F={Fh} C={C:5d}: {ms:10.3f} ms "
                        f"{tf:8.2f} TFLOP/s ({100 * tf / peak:5.1f}% of matmul)")
                except torch.cuda.OutOfMemoryError as e:
                    entry["error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
                    log(f"  {name:16s} {mode:8s} C={C}: out of memory")
                except Exception as e:  # noqa: BLE001
                    entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    log(f"  {name:16s} {mode:8s} C={C}: ERROR {entry['error']}")
                result["timings"].append(entry)
                run = None
                torch.cuda.empty_cache()
    result["log"] = lines
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
