"""CUDA benchmark of the self-modifying Titans memory kernels (hope_kernels/titans/chunk.py).

    python benchmarks/bench_titans_gpu.py            # full run, writes benchmarks/results/titans_h200.json
    python benchmarks/bench_titans_gpu.py --quick    # small shapes, a minute or two
    python benchmarks/bench_titans_gpu.py --out results.json --dot-precision tf32

1. Correctness in bf16: the Triton op on bf16 inputs vs the PyTorch reference on fp32 copies of the same
   inputs (B=8, T=4096, H=16, d=64 and d=128; --quick: smaller), forward (o, final state) and every gradient,
   relative error ||x - ref|| / ||ref|| <= 1e-2.
2. Timing (CUDA events, median of several runs) of forward and forward+backward, bf16 activations:
   - titans_triton       the Triton op (this project)
   - titans_ref_eager    the PyTorch reference (a Python loop over chunks; batched over B and H)
   - titans_ref_compile  the same with its per-chunk closed form `_segment` under torch.compile (compiling the
                         whole function would unroll the chunk loop: minutes of compile time at T = 16384)
   - fla_gated_delta     FLA's chunk_gated_delta_rule (optional import; a linear-memory baseline)
   - sdpa_causal         torch.nn.functional.scaled_dot_product_attention, causal
   at T = 4096 and 16384 (B=8, H=16, d = 64 and 128).
3. FLOPs are the matmul FLOPs of each algorithm (elementwise work not counted; formulas in the functions
   below); bytes are the minimal HBM traffic (inputs, outputs and, for Titans, the per-chunk state stream).
   TFLOP/s and GB/s follow from the median time.

Exits 0 with a message on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.gpu_common import cuda_time_ms, gpu_unavailable_reason, rel_err  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "titans_h200.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results file (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repetitions")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--dot-precision", choices=["ieee", "tf32", "tf32x3"], default=None,
                   help="tl.dot precision of the Titans kernels (default: the module's own default)")
    p.add_argument("--skip", default="", help="comma-separated method names to skip")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- FLOPs


def titans_flops(B, T, H, d, C, backward=False, momentum=True):
    """Matmul FLOPs of the chunked closed form (per segment: C tokens, D = d, state rows 3d+2)."""
    nseg = math.ceil(T / C)
    fwd = 14 * C * d * d + 6 * C * C * d + 2 * C ** 3 + 12 * d ** 3
    if not momentum:
        fwd -= 4 * C * d * d + 6 * d ** 3
    per = fwd
    if backward:
        per += 108 * C * d * d + 20 * C * C * d + 6 * C ** 3  # recompute + the manual backward
    return B * H * nseg * per


def titans_bytes(B, T, H, d, C, elt=2, backward=False):
    nseg = math.ceil(T / C)
    R = 3 * d + 2
    act = 3 * B * T * H * d * elt  # q, a in, o out
    state = B * H * nseg * 5 * R * d * 4  # per segment: read Z_c, Z_s, S_s; write Z, S (fp32)
    if backward:
        act += 4 * B * T * H * d * elt  # q, a, do in; dq, da out (counted as 4 streams)
        state += B * H * nseg * 7 * R * d * 4  # saved states in, the gradient carry in/out
    return act + state


def sdpa_flops(B, T, H, d, backward=False):
    f = 2 * 2 * B * H * T * T * d / 2  # QK^T and PV, causal half
    return f * (3.5 if backward else 1.0)  # backward ~2.5x forward (recompute included)


def sdpa_bytes(B, T, H, d, elt=2, backward=False):
    return (4 if not backward else 9) * B * T * H * d * elt


def fla_flops(B, T, H, d, C=64, backward=False):
    """Chunked gated delta rule (WY form), approximate: K K^T, the triangular solve, w/u, state, output."""
    n = math.ceil(T / C)
    per = 2 * C * C * d + C ** 3 / 3 + 4 * C * C * d + 4 * C * d * d + 2 * C * d * d + 4 * C * C * d
    return B * H * n * per * (3.0 if backward else 1.0)


def fla_bytes(B, T, H, d, C=64, elt=2, backward=False):
    n = math.ceil(T / C)
    return (4 * B * T * H * d * elt + B * H * n * d * d * 4) * (2 if backward else 1)


# ----------------------------------------------------------------------------------------------- inputs


def titans_inputs(B, T, H, d, dtype, device, requires_grad=False, seed=0):
    import torch
    import torch.nn.functional as F

    from hope_kernels.titans.reference import memory_rows

    g = torch.Generator(device="cpu").manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, d, generator=g), dim=-1)
    a = torch.randn(B, T, H, d, generator=g)
    z0 = torch.randn(H, memory_rows(d), d, generator=g) / math.sqrt(d)
    b_eta = -1.0 + 0.3 * torch.randn(H, generator=g)
    b_alpha = 4.0 + 0.3 * torch.randn(H, generator=g)
    mlog = 1.0 + 0.3 * torch.randn(H, generator=g)
    out = [q.to(dtype), a.to(dtype), z0, b_eta, b_alpha, mlog]
    return [t.to(device).requires_grad_(requires_grad) for t in out]


def titans_kwargs(C):
    return dict(chunk_size=C, eta_max=0.1, momentum=True, dgd=True, objective="l2", memory_target="self",
                adaptive=("k", "v", "eta", "alpha"))


# ----------------------------------------------------------------------------------------------- checks


def correctness(B, T, H, d, C, device, log):
    """bf16 Triton vs the fp32 reference on the same (bf16-rounded) inputs: o, state, gradients."""
    import torch

    from hope_kernels.titans.chunk import titans_memory_triton
    from hope_kernels.titans.reference import titans_memory_reference

    kw = titans_kwargs(C)
    x16 = titans_inputs(B, T, H, d, torch.bfloat16, device, requires_grad=True)
    x32 = [t.detach().float().requires_grad_(True) for t in x16]
    o, st = titans_memory_triton(*x16, output_final_state=True, **kw)
    o_ref, st_ref = titans_memory_reference(*x32, output_final_state=True, **kw)
    g = torch.Generator(device="cpu").manual_seed(1)
    do = torch.randn(o_ref.shape, generator=g).to(device)
    dz = torch.randn(st_ref.z.shape, generator=g).to(device) / math.sqrt(B * H)
    loss = (o.float() * do).sum() + (st.z * dz).sum()
    loss_ref = (o_ref * do).sum() + (st_ref.z * dz).sum()
    grads = torch.autograd.grad(loss, x16)
    grads_ref = torch.autograd.grad(loss_ref, x32)
    res = {"o": rel_err(o, o_ref), "state.z": rel_err(st.z, st_ref.z), "state.s": rel_err(st.s, st_ref.s),
           "state.z_chunk": rel_err(st.z_chunk, st_ref.z_chunk)}
    for name, gk, gr in zip(["q", "a", "z0", "b_eta", "b_alpha", "momentum_logit"], grads, grads_ref):
        res["d" + name] = rel_err(gk, gr)
    ok = all(v <= 1e-2 for v in res.values())
    log(f"  correctness bf16 B={B} T={T} H={H} d={d} C={C}: {'PASS' if ok else 'FAIL'} "
        + " ".join(f"{k}={v:.1e}" for k, v in res.items()))
    del o, st, o_ref, st_ref, grads, grads_ref
    torch.cuda.empty_cache()
    return {"shape": dict(B=B, T=T, H=H, d=d, C=C), "rel_err": res, "pass": ok, "tol": 1e-2}


# ----------------------------------------------------------------------------------------------- methods


def make_methods(C, skip, log):
    import torch
    import torch.nn.functional as F

    import hope_kernels.titans.reference as ref_mod
    from hope_kernels.titans.chunk import titans_memory_triton

    kw = titans_kwargs(C)
    methods = {}

    def titans_runner(fn):
        def setup(B, T, H, d, backward):
            x = titans_inputs(B, T, H, d, torch.bfloat16, "cuda", requires_grad=backward)

            def run():
                o, _ = fn(*x, **kw)
                if backward:
                    o.backward(torch.ones_like(o))
                return o

            return run

        return setup

    methods["titans_triton"] = (titans_runner(titans_memory_triton), titans_flops, titans_bytes)
    methods["titans_ref_eager"] = (titans_runner(ref_mod.titans_memory_reference), titans_flops, titans_bytes)

    compiled = {}

    def ref_compiled(*args, **kwargs):
        if "seg" not in compiled:
            for knob in ("cache_size_limit", "recompile_limit"):  # one compile per shape and grad mode
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
            compiled["seg"] = torch.compile(ref_mod._segment, dynamic=False)
        orig = ref_mod._segment
        ref_mod._segment = compiled["seg"]
        try:
            return ref_mod.titans_memory_reference(*args, **kwargs)
        finally:
            ref_mod._segment = orig

    methods["titans_ref_compile"] = (titans_runner(ref_compiled), titans_flops, titans_bytes)

    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # noqa: BLE001
        log(f"fla not installed ({type(e).__name__}: {e}); skipping fla_gated_delta")
        chunk_gated_delta_rule = None
    if chunk_gated_delta_rule is not None:
        def fla_setup(B, T, H, d, backward):
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (torch.randn(B, T, H, d, generator=g).to("cuda", torch.bfloat16).requires_grad_(backward)
                       for _ in range(3))
            gate = F.logsigmoid(4.0 + torch.randn(B, T, H, generator=g)).to("cuda").requires_grad_(backward)
            beta = torch.sigmoid(torch.randn(B, T, H, generator=g)).to("cuda", torch.bfloat16).requires_grad_(backward)

            def run():
                o, _ = chunk_gated_delta_rule(q=q, k=k, v=v, g=gate, beta=beta, use_qk_l2norm_in_kernel=True)
                if backward:
                    o.backward(torch.ones_like(o))
                return o

            return run

        methods["fla_gated_delta"] = (fla_setup, fla_flops, fla_bytes)

    def sdpa_setup(B, T, H, d, backward):
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, H, T, d, generator=g).to("cuda", torch.bfloat16).requires_grad_(backward)
                   for _ in range(3))

        def run():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if backward:
                o.backward(torch.ones_like(o))
            return o

        return run

    methods["sdpa_causal"] = (sdpa_setup, lambda B, T, H, d, C, backward=False: sdpa_flops(B, T, H, d, backward),
                              lambda B, T, H, d, C, elt=2, backward=False: sdpa_bytes(B, T, H, d, elt, backward))
    return {k: v for k, v in methods.items() if k not in skip}


def bench_shapes(args):
    if args.quick:
        return [dict(B=2, T=T, H=4, d=d) for T in (1024, 2048) for d in (64, 128)]
    return [dict(B=8, T=T, H=16, d=d) for T in (4096, 16384) for d in (64, 128)]


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = gpu_unavailable_reason("bench_titans_gpu")
    if reason:
        print(reason)
        return 0
    import torch
    import triton

    if args.dot_precision:
        os.environ["HOPE_TITANS_DOT_PRECISION"] = args.dot_precision
    import hope_kernels.titans.chunk as chunk_mod

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    C = args.chunk_size
    dev_name = torch.cuda.get_device_name()
    log(f"device {dev_name} | torch {torch.__version__} | triton {triton.__version__} | "
        f"dot precision (bf16 inputs) {chunk_mod.dot_precision(torch.bfloat16)} | chunk size {C}")
    result = {
        "device": dev_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dot_precision": chunk_mod.dot_precision(torch.bfloat16),
        "chunk_size": C,
        "dtype": "bfloat16",
        "quick": bool(args.quick),
        "correctness": [],
        "timings": [],
    }

    # ---- 1. correctness
    log("correctness (bf16 Triton vs fp32 reference, tolerance 1e-2)")
    corr_shapes = ([dict(B=2, T=1024, H=4, d=d) for d in (64, 128)] if args.quick
                   else [dict(B=8, T=4096, H=16, d=d) for d in (64, 128)])
    for s in corr_shapes:
        try:
            result["correctness"].append(correctness(s["B"], s["T"], s["H"], s["d"], C, "cuda", log))
        except Exception as e:  # noqa: BLE001
            log(f"  correctness {s}: ERROR {type(e).__name__}: {e}")
            traceback.print_exc()
            result["correctness"].append({"shape": s, "error": f"{type(e).__name__}: {e}"})
        torch.cuda.empty_cache()

    # ---- 2. timings
    skip = {s for s in args.skip.split(",") if s}
    methods = make_methods(C, skip, log)
    reps = args.reps or (3 if args.quick else 5)
    log(f"timings (median of up to {reps} runs; ms, TFLOP/s, GB/s)")
    for s in bench_shapes(args):
        B, T, H, d = s["B"], s["T"], s["H"], s["d"]
        for name, (setup, flops_fn, bytes_fn) in methods.items():
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                entry = {"method": name, "mode": mode, "shape": dict(B=B, T=T, H=H, d=d, C=C)}
                caught = warnings.catch_warnings(record=True)
                wlist = caught.__enter__()
                warnings.simplefilter("always")
                try:
                    run = setup(B, T, H, d, backward)
                    if name == "titans_ref_compile":
                        t0 = time.time()
                        run()  # compile outside the timing
                        torch.cuda.synchronize()
                        entry["compile_s"] = round(time.time() - t0, 1)
                    ms, n = cuda_time_ms(run, reps)
                    flops = flops_fn(B, T, H, d, C, backward=backward)
                    nbytes = bytes_fn(B, T, H, d, C, backward=backward)
                    entry.update(ms=round(ms, 4), runs=n, flops=flops, bytes=nbytes,
                                 tflops=round(flops / ms / 1e9, 3), gbps=round(nbytes / ms / 1e6, 1))
                    log(f"  {name:20s} {mode:8s} B={B} T={T:6d} H={H} d={d:4d}: {ms:10.3f} ms "
                        f"{entry['tflops']:8.2f} TFLOP/s {entry['gbps']:9.1f} GB/s")
                except torch.cuda.OutOfMemoryError as e:
                    entry["error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
                    log(f"  {name:20s} {mode:8s} B={B} T={T:6d} H={H} d={d:4d}: out of memory")
                except Exception as e:  # noqa: BLE001
                    entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    log(f"  {name:20s} {mode:8s} B={B} T={T:6d} H={H} d={d:4d}: ERROR {entry['error']}")
                finally:
                    caught.__exit__(None, None, None)
                notes = sorted({str(w.message).splitlines()[0][:300] for w in wlist if "titans" in str(w.message)})
                if notes:  # e.g. a kernel that does not fit the GPU and ran the PyTorch reference instead
                    entry["warnings"] = notes
                    for note in notes:
                        log(f"    warning: {note}")
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
