"""The GPU benchmark suite: one command, under 10 minutes on an H200, every figure of issues #6, #7 and #11 side by side.

    python benchmarks/gpu_suite.py                               # CUDA GPU; writes benchmarks/results/
    python benchmarks/gpu_suite.py --out-dir $OUT --budget-s 400 # as benchmarks/run_h200.sh runs it
    python benchmarks/gpu_suite.py --dry-run --out-dir /tmp/x    # CPU, tiny shapes, every code path (~30 s)

Sections, in order (a case that fails records its error string and the run goes on; cases that would start
after the time budget are recorded as skipped):
1. ceilings: device-to-device copy bandwidth (bytes read + written) and an 8192^3 bf16 matmul rate, on random
   data; every later rate is also given as a fraction of these.
2. kernels (until 45% of the budget): each op (`titans_memory`, `cms_level`, the deep memory of memory_depth=2
   `titans_deep_memory` forward and forward+backward, their decode steps) through the Triton kernels and the
   eager reference, bf16, at the 340M model's shapes (the deep op at the linear op's first shape, h = d): median
   ms (CUDA events), TFLOP/s and GB/s from the counted FLOPs and minimum bytes (benchmarks/workloads.py), the
   floor max(FLOPs / matmul rate, bytes / copy rate) and the fraction of it reached. Peers on the same shapes:
   FLA's `chunk_gated_delta_rule` (package fla-core, imported lazily; "not installed" is recorded), SDPA causal
   attention on its flash backend, flash-attn when installed, and a plain SwiGLU FFN of a CMS level's size.
3. model (until 90%): Hope, Hope-Attention and Transformer++ at the 340M shape (hidden 1024, 24 layers; one
   parameter budget, hope/presets.py): training tokens/s and peak memory (AdamW; bf16 parameters by default)
   at T = 4096 and 16384; then prefill of 1k and 32k-token prompts and decode tokens/s, ms per token and memory
   at batch 1 and 64 (the batch-1 cache repeated 64 times; a cache that cannot fit is skipped with its size).
4. the torch.compile'd references (first shape of each op only: a compile per shape and grad mode), last.
5. goals: hit / miss / not measured for each goal of issue #6, issue #7's deep memory fwd+bwd <= 2.5x the
   linear memory fwd+bwd (both Triton, same shape), and issue #11's Titans fwd+bwd <= 2.5x FLA's gated delta rule,
   >= 20x the eager reference and bf16 within 1e-2 of it, from the figures above.
Outputs `<device>_<date>.json` (device, driver, versions, plan, every figure) and `<device>_<date>.md` (the
tables, for the README) in --out-dir, rewritten after every case so that a killed run keeps what it had.

Kernel backends at model level: `--train-backends` (training and prefill) and `--decode-backends` choose the
Titans and CMS backends separately (workloads.set_kernel_backends); the default keeps the CMS reference for
training because the CMS Triton kernel runs one program per sequence (benchmarks/NOTES.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SCHEMA = "hope-gpu-suite/1"
SECTIONS = ("ceilings", "kernels", "model")
STATUSES = ("hit", "miss", "not measured")


@dataclasses.dataclass
class Plan:
    """Shapes, repetitions and thresholds of one run (FULL on the GPU, DRY for --dry-run on CPU)."""

    dtype: str
    titans_shapes: list  # {B, T, H, d, C}
    cms_shapes: list  # {B, T, D, F, C}
    titans_step_shapes: list  # {B, H, d, C}
    cms_step_shapes: list  # {B, D, F, C}
    deep_titans_shapes: list  # {B, T, H, d, h, C}; each also in titans_shapes without h (the goal pairs them)
    deep_titans_step_shapes: list  # {B, H, d, h, C}
    compile_shapes: int  # the compiled reference runs on the first N shapes of each op
    compile_backend: str  # "inductor"; the dry run uses "eager" (dynamo only: no C compile in CI)
    reps: int
    max_case_s: float  # a case stops repeating after this long
    copy_bytes: int
    matmul_n: int
    model_size: str  # preset size of hope/presets.py
    train: list  # [(T, B)]; the first T is the goals' reference length, the rest the long ones
    decode_prompts: list  # [short, long]
    decode_batches: list
    decode_steps: int
    prefill_piece: int
    budget_s: float


FULL = Plan(
    dtype="bfloat16",
    titans_shapes=[dict(B=8, T=4096, H=16, d=64, C=64), dict(B=8, T=4096, H=16, d=128, C=64),
                   dict(B=2, T=16384, H=16, d=64, C=64)],
    # the presets' learning levels (16, 128) and the chunk study's slow ones (512, 2048): issue #13's goals
    # (the two goals' sizes first: a budget cut drops the last shapes; C = 128 counts for neither goal)
    cms_shapes=[dict(B=8, T=4096, D=1024, F=640, C=C) for C in (16, 512, 2048, 128)],
    titans_step_shapes=[dict(B=1, H=16, d=64, C=64), dict(B=64, H=16, d=64, C=64)],
    cms_step_shapes=[dict(B=1, D=1024, F=640, C=16), dict(B=64, D=1024, F=640, C=16)],
    # Issue #7's shape (d = h = C = 64); benchmarks/results/sm90_check.md has the kernels' offline sm_90a footprint.
    deep_titans_shapes=[dict(B=8, T=4096, H=16, d=64, h=64, C=64)],
    deep_titans_step_shapes=[dict(B=1, H=16, d=64, h=64, C=64), dict(B=64, H=16, d=64, h=64, C=64)],
    compile_shapes=1, compile_backend="inductor", reps=10, max_case_s=8.0,
    copy_bytes=4 << 30, matmul_n=8192,
    model_size="340m", train=[(4096, 4), (16384, 1)], decode_prompts=[1024, 32768], decode_batches=[1, 64],
    decode_steps=32, prefill_piece=4096, budget_s=480.0,
)

DRY = Plan(
    dtype="float32",
    titans_shapes=[dict(B=1, T=32, H=2, d=16, C=16)],
    cms_shapes=[dict(B=1, T=16, D=16, F=16, C=8)],
    titans_step_shapes=[dict(B=2, H=2, d=16, C=16)],
    cms_step_shapes=[dict(B=2, D=16, F=16, C=8)],
    deep_titans_shapes=[dict(B=1, T=32, H=2, d=16, h=16, C=16)],
    deep_titans_step_shapes=[dict(B=2, H=2, d=16, h=16, C=16)],
    compile_shapes=1, compile_backend="eager", reps=1, max_case_s=2.0,
    copy_bytes=8 << 20, matmul_n=128,
    model_size="tiny", train=[(64, 2), (128, 1)], decode_prompts=[16, 48], decode_batches=[1, 2],
    decode_steps=3, prefill_piece=32, budget_s=240.0,
)


# ------------------------------------------------------------------------------------------- run bookkeeping


class Run:
    """The results dict, the log, the time budget and the output files of one suite run."""

    def __init__(self, plan: Plan, device, out_dir: str, dry_run: bool, argv: list):
        self.plan, self.device, self.out_dir, self.dry_run = plan, device, out_dir, dry_run
        self.t0 = time.monotonic()
        self.deadline = self.t0 + plan.budget_s
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "dry_run": dry_run,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": argv,
            "device": device_info(device),
            "versions": versions(),
            "plan": dataclasses.asdict(plan),
            "ceilings": {},
            "kernels": [],
            "model": {"train": [], "prefill": [], "decode": []},
            "goals": [],
            "log": [],
        }
        slug = "dryrun" if dry_run else device_slug(self.results["device"]["name"])
        stem = f"{slug}_{self.results['date'][:10]}"
        self.json_path = os.path.join(out_dir, stem + ".json")
        self.md_path = os.path.join(out_dir, stem + ".md")

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.results["log"].append(msg)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def until(self, fraction: float) -> Iterator[None]:
        """Within the block, cases start only before `fraction` of the budget has elapsed."""
        deadline = self.deadline
        self.deadline = min(deadline, self.t0 + fraction * self.plan.budget_s)
        try:
            yield
        finally:
            self.deadline = deadline

    def write(self) -> None:
        """Goals from what is measured so far, then the JSON and markdown files."""
        self.results["goals"] = evaluate_goals(self.results)
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        os.makedirs(self.out_dir, exist_ok=True)
        with open(self.json_path, "w") as f:
            json.dump(self.results, f, indent=1)
        with open(self.md_path, "w") as f:
            f.write(render_markdown(self.results))

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def cleanup(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> Optional[int]:
        """Peak bytes allocated on the GPU since reset_peak; None on CPU (not tracked there)."""
        import torch

        return int(torch.cuda.max_memory_allocated()) if self.device.type == "cuda" else None


class Skip(Exception):
    """A case that cannot run here, with the reason (recorded as "skipped", not as an error)."""


def error_string(e: BaseException) -> str:
    """'<Type>: <first line of the message>', at most 500 characters: what a failed case records."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:500]


def run_case(run: Run, entry: dict, setup: Callable[[], Callable[[], Any]], reps: Optional[int] = None,
             warmup: int = 0, stat: str = "median") -> Any:
    """Time one case: `setup()` builds the inputs and returns the callable; its first call (compile, autotune)
    is timed separately as first_call_s, then the median of up to `reps` calls (max_case_s in all); reps=0
    keeps the first call as the measurement; stat="mean" averages the calls instead (decode: a chunk-closing
    token costs more than the others, and throughput must count it).

    Adds ms, runs, first_call_s, peak_mem_bytes (CUDA) and warnings to `entry`, or "skipped" / "error"; never
    raises. Returns the first call's result (None on failure)."""
    from benchmarks.gpu_common import time_ms

    out = None
    if run.time_left() <= 0:
        entry["skipped"] = "time budget exhausted (--budget-s)"
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run.reset_peak()
            fn = setup()
            t0 = time.perf_counter()
            out = fn()
            run.sync()
            first = time.perf_counter() - t0
            entry["first_call_s"] = round(first, 3)
            if reps == 0:  # the first call is the measurement (a prefill: nothing to compile, too long to repeat)
                ms, n = 1e3 * first, 1
            else:
                ms, n = time_ms(fn, reps or run.plan.reps, run.device, warmup=warmup, max_seconds=run.plan.max_case_s,
                                stat=stat)
            entry.update(ms=round(ms, 4), stat=stat, runs=n, peak_mem_bytes=run.peak_bytes())
        except Skip as e:
            entry["skipped"] = str(e)
        except Exception as e:  # noqa: BLE001 - a failing case (e.g. out of shared memory) must not stop the run
            entry["error"] = error_string(e)
            out = None
    notes = sorted({str(w.message).strip().splitlines()[0][:200] for w in caught
                    if issubclass(w.category, UserWarning)})
    if notes:  # e.g. a kernel that fell back to the reference
        entry["warnings"] = notes[:5]
    return out


def add_rates(entry: dict, flops: float, nbytes: float, ceilings: dict) -> None:
    """TFLOP/s, GB/s, the roofline floor and the fractions of the ceilings reached, for a timed entry."""
    entry.update(flops=flops, bytes=nbytes)
    if "ms" not in entry or entry["ms"] <= 0:
        return
    ms = entry["ms"]
    tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
    entry["tflops"], entry["gbps"] = sig(tflops), sig(gbps)
    peak_tf, peak_bw = ceilings.get("matmul_tflops"), ceilings.get("copy_gbps")
    if peak_tf and peak_bw:
        t_flops, t_bytes = flops / peak_tf / 1e9, nbytes / peak_bw / 1e6  # ms at each ceiling
        entry["floor_ms"] = sig(max(t_flops, t_bytes))
        entry["bound"] = "compute" if t_flops >= t_bytes else "memory"
        entry["frac_of_floor"] = sig(max(t_flops, t_bytes) / ms)
        entry["frac_of_matmul"] = sig(tflops / peak_tf)
        entry["frac_of_copy"] = sig(gbps / peak_bw)


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (decimal places would zero the dry run's tiny CPU rates)."""
    return float(f"{x:.{digits}g}")


# ------------------------------------------------------------------------------------------- environment


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200'; other names lower-cased with non-alphanumerics as '-'."""
    if "H200" in name.upper():
        return "h200"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_info(device) -> dict:
    """Name, capability, multiprocessors, memory, driver and CUDA version of a CUDA device; name and cores on CPU."""
    import torch

    if device.type != "cuda":
        return {"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        driver = f"unknown ({error_string(e)})"
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
            "driver": driver, "cuda": torch.version.cuda}


def package_version(dist: str) -> str:
    """The installed version of distribution `dist`, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    """Versions of python, torch, triton, transformers and the optional peers (fla-core, flash-attn)."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": package_version("triton"), "transformers": package_version("transformers"),
            "fla-core": package_version("fla-core"), "flash-attn": package_version("flash-attn")}


# ------------------------------------------------------------------------------------------- 1. ceilings


def section_ceilings(run: Run) -> None:
    from benchmarks.gpu_common import copy_rate_gbps, matmul_rate_tflops

    plan, c = run.plan, run.results["ceilings"]
    try:
        gbps, ms = copy_rate_gbps(plan.copy_bytes, run.device)
        c.update(copy_gbps=sig(gbps), copy={"bytes": plan.copy_bytes, "ms": round(ms, 4)})
        tf, ms = matmul_rate_tflops(plan.matmul_n, run.device)
        dtype = "bfloat16" if run.device.type == "cuda" else "float32"
        c.update(matmul_tflops=sig(tf), matmul={"n": plan.matmul_n, "dtype": dtype, "ms": round(ms, 4)})
    except Exception as e:  # noqa: BLE001
        c["error"] = error_string(e)
    run.log(f"ceilings: copy {c.get('copy_gbps')} GB/s, matmul {c.get('matmul_tflops')} TFLOP/s"
            + (f" ({c['error']})" if "error" in c else ""))
    run.cleanup()


# ------------------------------------------------------------------------------------------- 2. kernels


def shape_label(shape: dict) -> str:
    """{'B': 8, 'T': 4096} -> 'B=8 T=4096'."""
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _import_or_skip(module: str, attr: str, dist: str):
    """`module.attr`, or Skip("not installed") when the package is missing (the peers are optional)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise Skip(f"not installed ({dist}: pip install {dist})")
    mod = __import__(module, fromlist=[attr])
    return getattr(mod, attr)


def peer_setup(method: str, shape: dict, mode: str, dtype, device) -> Callable[[], Any]:
    """Inputs and the callable of one peer on a Titans shape (B, T, H, d) or a CMS shape (B, T, D, F)."""
    import torch
    import torch.nn.functional as F

    from benchmarks import workloads as W

    backward = mode == "fwd+bwd"
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, dt=dtype):
        return torch.randn(*size, generator=g).to(device, dt).requires_grad_(backward)

    def finish(out):
        if backward:
            out.backward(torch.ones_like(out))
        return out.detach()

    if method == "ffn_swiglu":
        z, wg, wu, wd = W.cms_inputs(shape["B"], shape["T"], shape["D"], shape["F"], dtype, device, backward)[:4]
        return lambda: finish((F.silu(z @ wg.mT) * (z @ wu.mT)) @ wd.mT)
    B, T, H, d = shape["B"], shape["T"], shape["H"], shape["d"]
    if method == "fla_chunk_gated_delta_rule":
        fla = _import_or_skip("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "fla-core")
        q, k, v = (rand(B, T, H, d) for _ in range(3))
        gate = F.logsigmoid(4.0 + torch.randn(B, T, H, generator=g)).to(device).requires_grad_(backward)
        beta = torch.sigmoid(torch.randn(B, T, H, generator=g)).to(device, dtype).requires_grad_(backward)
        return lambda: finish(fla(q=q, k=k, v=v, g=gate, beta=beta, use_qk_l2norm_in_kernel=True)[0])
    if method == "flash_attn":
        flash = _import_or_skip("flash_attn", "flash_attn_func", "flash-attn")
        q, k, v = (rand(B, T, H, d) for _ in range(3))
        return lambda: finish(flash(q, k, v, causal=True))
    if method == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (rand(B, H, T, d) for _ in range(3))

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises when flash cannot run: no silent fallback
                return finish(F.scaled_dot_product_attention(q, k, v, is_causal=True))

        return sdpa
    raise ValueError(f"unknown peer {method!r}")


PEERS = {"titans_memory": ("fla_chunk_gated_delta_rule", "sdpa_flash", "flash_attn"), "cms_level": ("ffn_swiglu",)}


def peer_flops_bytes(method: str, shape: dict, mode: str, elt: int) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one peer case (formulas in workloads.py)."""
    from benchmarks import workloads as W

    backward = mode == "fwd+bwd"
    if method == "ffn_swiglu":
        args = (shape["B"], shape["T"], shape["D"], shape["F"])
        return W.ffn_flops(*args, backward=backward), W.ffn_bytes(*args, elt=elt, backward=backward)
    args = (shape["B"], shape["T"], shape["H"], shape["d"])
    if method == "fla_chunk_gated_delta_rule":
        return W.fla_flops(*args, backward=backward), W.fla_bytes(*args, elt=elt, backward=backward)
    return W.sdpa_flops(*args, backward=backward), W.sdpa_bytes(*args, elt=elt, backward=backward)


def section_kernels(run: Run, ops: list, methods: set, backends: tuple, with_peers: bool) -> None:
    """Every op x shape x mode through `backends` (and the peers); rates against the ceilings.

    The eager reference always runs first on each (shape, mode) when it is among `backends`, and the other
    backends' outputs are compared with it (rel_err_vs_eager: a sanity check, not the kernel tests). The
    compiled reference runs on the first `plan.compile_shapes` shapes only.
    """
    import torch

    from benchmarks import workloads as W

    plan = run.plan
    dtype = getattr(torch, plan.dtype)
    shapes = {"titans_memory": plan.titans_shapes, "cms_level": plan.cms_shapes,
              "titans_memory_step": plan.titans_step_shapes, "cms_level_step": plan.cms_step_shapes,
              "titans_deep_memory": plan.deep_titans_shapes, "titans_deep_memory_step": plan.deep_titans_step_shapes}
    compile_pass = "compile" in backends
    # Shape index outermost: every op's first (main) shape runs before any op's second, so a budget cut (FLA's
    # autotuning alone can take a minute) costs the extra shapes, not a whole op.
    depth = max((len(shapes[op]) for op in ops), default=0)
    cases = [(i, op, shapes[op][i]) for i in range(depth) for op in ops if i < len(shapes[op])]
    for i, op, shape in cases:
        modes = ("step",) if op in W.STEP_OPS else ("fwd", "fwd+bwd")
        if compile_pass and (i >= plan.compile_shapes or (methods and "compile" not in methods)):
            continue
        for mode in modes:
            reference = None  # the eager output
            for backend in backends:
                if methods and backend not in methods and not (compile_pass and backend == "eager"):
                    continue
                if compile_pass and backend == "eager":  # timed in the first pass: only the output here
                    reference = untimed_output(run, op, shape, mode, dtype)
                    continue
                reference = kernel_case(run, op, backend, shape, mode, dtype, reference)
            reference = None
            for peer in PEERS.get(op, ()) if with_peers else ():
                if methods and peer not in methods:
                    continue
                entry = {"op": op, "method": peer, "peer": True, "mode": mode, "shape": shape,
                         "dtype": plan.dtype}
                run_case(run, entry, lambda peer=peer, shape=shape, mode=mode:
                         peer_setup(peer, shape, mode, dtype, run.device))
                add_rates(entry, *peer_flops_bytes(peer, shape, mode, dtype.itemsize), run.results["ceilings"])
                record_kernel(run, entry)


def untimed_output(run: Run, op: str, shape: dict, mode: str, dtype):
    """The eager reference's output of one case, or None when it fails or the budget is spent."""
    from benchmarks import workloads as W

    if run.time_left() <= 0:
        return None
    try:
        return W.op_case(op, "eager", shape, mode, dtype, run.device)()
    except Exception:  # noqa: BLE001 - only a comparison is lost; the first pass recorded the error
        return None


def kernel_case(run: Run, op: str, backend: str, shape: dict, mode: str, dtype, reference):
    """Time one op through one backend and record it; returns the eager output (the reference) when
    `backend` is eager, else `reference` unchanged."""
    from benchmarks import workloads as W
    from benchmarks.gpu_common import rel_err

    entry = {"op": op, "method": backend, "peer": False, "mode": mode, "shape": shape, "dtype": run.plan.dtype}
    if backend == "compile":
        entry["compile_backend"] = run.plan.compile_backend

    def setup():
        reason = W.backend_unavailable_reason(backend, run.device, allow_interpreter=run.dry_run, op=op)
        if reason:
            raise Skip(reason)
        return W.op_case(op, backend, shape, mode, dtype, run.device, run.plan.compile_backend)

    out = run_case(run, entry, setup)
    if out is not None and backend == "eager":
        reference = out
    elif out is not None and reference is not None:
        entry["rel_err_vs_eager"] = float(f"{rel_err(out, reference):.3e}")
    add_rates(entry, *W.op_flops_bytes(op, shape, mode, dtype.itemsize), run.results["ceilings"])
    record_kernel(run, entry)
    return reference


def record_kernel(run: Run, entry: dict) -> None:
    """Log, keep and write out one kernel entry (the files stay current if the run is killed)."""
    log_kernel(run, entry)
    run.results["kernels"].append(entry)
    run.cleanup()
    run.write()


def case_note(entry: dict) -> str:
    """'ERROR <error>' or 'skipped: <reason>' for an entry without a timing, else ''."""
    if "error" in entry:
        return f"ERROR {entry['error']}"
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    return ""


def log_kernel(run: Run, e: dict) -> None:
    """One log line per kernel entry: time and rates, or why there are none."""
    head = f"  {e['op']:23s} {e['method']:27s} {e['mode']:7s} {shape_label(e['shape']):28s}"
    if "ms" in e:
        run.log(f"{head} {e['ms']:10.3f} ms {e.get('tflops', 0):8.2f} TFLOP/s {e.get('gbps', 0):9.1f} GB/s"
                f" {100 * e.get('frac_of_floor', 0):5.1f}% of floor")
    else:
        run.log(f"{head} {case_note(e)}")


# ------------------------------------------------------------------------------------------- 3. model


def parse_backends(spec: str) -> dict:
    """'titans=triton,cms=torch' -> {'titans': 'triton', 'cms': 'torch'} (both keys required)."""
    from hope_kernels import BACKENDS

    out = dict(item.split("=", 1) for item in spec.split(",") if item)
    if set(out) != {"titans", "cms"} or not set(out.values()) <= set(BACKENDS):
        raise argparse.ArgumentTypeError(f"want titans=<b>,cms=<b> with <b> in {BACKENDS}, got {spec!r}")
    return out


PRECISIONS = {
    "bf16": "bf16 parameters and AdamW states, no autocast (training and decode)",
    "autocast-bf16": "fp32 parameters, bf16 autocast (training); bf16 parameters (decode)",
}


def section_model(run: Run, models: list, train_backends: dict, decode_backends: dict, precision: str) -> None:
    """Training steps, then prefill and decode, for the models at the plan's preset size.

    Loops run length-outermost (every model at T=4096 before any at 16384; every model's 1k prompt before any
    32k one), so that a budget cut loses the longest cases of all models rather than a whole model.
    precision (CUDA only; the CPU dry run is fp32): "bf16" (default) or "autocast-bf16". Under CUDA autocast
    F.normalize returns fp32, so the Titans mixer hands the kernel an fp32 q with a bf16 a, which the Triton
    kernel refuses (benchmarks/NOTES.md); pure bf16 keeps both in bf16.
    """
    import torch

    from benchmarks import workloads as W

    plan, res = run.plan, run.results["model"]
    cuda = run.device.type == "cuda"
    autocast = torch.bfloat16 if cuda and precision == "autocast-bf16" else None
    param_dtype = torch.bfloat16 if cuda and precision == "bf16" else torch.float32
    res.update(size=plan.model_size, train_backends=train_backends, decode_backends=decode_backends,
               precision=PRECISIONS[precision] if cuda else "fp32", parameters={})
    built = {}
    for name in models:
        try:
            built[name] = W.build_model(name, plan.model_size, run.device, dtype=param_dtype)
            res["parameters"][name] = sum(p.numel() for p in built[name].parameters())
        except Exception as e:  # noqa: BLE001
            res["parameters"][name] = None
            run.log(f"  {name}: build failed: {error_string(e)}")
    for T, B in plan.train:
        for name in models:
            entry = {"model": name, "T": T, "B": B}
            model = built.get(name)
            if model is None:
                entry["error"] = "model build failed"
            else:
                W.set_kernel_backends(model, **train_backends)
                run_case(run, entry, lambda: W.train_step(model, B, T, autocast), reps=max(2, plan.reps // 3))
                model.zero_grad(set_to_none=True)  # the optimizer states went with the step closure
                if "ms" in entry:
                    entry["tokens_per_s"] = round(B * T / entry["ms"] * 1e3, 1)
            record_model(run, "train", entry)
    for name, model in built.items():
        built[name] = model.to(torch.bfloat16 if cuda else torch.float32).eval()
    for prompt in plan.decode_prompts:
        for name in models:
            if name in built:
                section_decode(run, built[name], name, prompt, train_backends, decode_backends)
    built.clear()
    run.cleanup()


def section_decode(run: Run, model, name: str, prompt: int, prefill_backends: dict, decode_backends: dict) -> None:
    """Prefill one prompt at batch 1 (timed), then decode at each batch (the cache repeated to that batch)."""
    import torch

    from benchmarks import workloads as W

    plan = run.plan
    W.set_kernel_backends(model, **prefill_backends)
    prefill_entry = {"model": name, "prompt": prompt}
    holder = {}

    def do_prefill():
        holder["cache"] = W.prefill(model, prompt, plan.prefill_piece)
        return holder["cache"]

    run_case(run, prefill_entry, lambda: do_prefill, reps=0)
    if "ms" in prefill_entry:
        prefill_entry["tokens_per_s"] = round(prompt / prefill_entry["ms"] * 1e3, 1)
    record_model(run, "prefill", prefill_entry)
    cache = holder.pop("cache", None)
    W.set_kernel_backends(model, **decode_backends)
    rows = 1
    for batch in plan.decode_batches:
        entry = {"model": name, "prompt": prompt, "batch": batch}
        if cache is None:  # the prefill's own entry says why
            entry["skipped" if "skipped" in prefill_entry else "error"] = "no prefilled cache"
        else:
            def setup(batch=batch):
                nonlocal rows
                if batch % rows:
                    raise Skip(f"batch {batch} is not a multiple of the cached batch {rows}")
                need = W.cache_bytes(cache) * (batch // rows)
                if run.device.type == "cuda":
                    free = torch.cuda.mem_get_info()[0] + W.cache_bytes(cache)
                    if need > 0.8 * free:
                        raise Skip(f"the cache would take {need / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free")
                if batch != rows:
                    cache.batch_repeat_interleave(batch // rows)
                    rows = batch
                entry["cache_bytes"] = W.cache_bytes(cache)
                return W.decode_step(model, cache, batch)

            run_case(run, entry, setup, reps=plan.decode_steps, warmup=2, stat="mean")
            if "ms" in entry:
                entry["tokens_per_s"] = round(batch / entry["ms"] * 1e3, 1)
        record_model(run, "decode", entry)
    cache = None
    run.cleanup()


def record_model(run: Run, kind: str, entry: dict) -> None:
    """Log, keep and write out one model-level entry of `kind` (train, prefill, decode)."""
    log_model(run, kind, entry)
    run.results["model"][kind].append(entry)
    run.cleanup()
    run.write()


def log_model(run: Run, kind: str, e: dict) -> None:
    """One log line per model-level entry: tokens/s, ms and peak memory, or why there are none."""
    what = " ".join(f"{k}={e[k]}" for k in ("T", "B", "prompt", "batch") if k in e)
    head = f"  {kind:7s} {e['model']:15s} {what:22s}"
    if "tokens_per_s" in e:
        mem = e.get("peak_mem_bytes")
        mem_s = f"  peak {mem / 2**30:6.2f} GiB" if mem else ""
        run.log(f"{head} {e['tokens_per_s']:12.1f} tokens/s {e['ms']:10.2f} ms{mem_s}")
    else:
        run.log(f"{head} {case_note(e)}")


# ------------------------------------------------------------------------------------------- 4. goals


def _goal(gid: str, goal: str, target: str, values: dict, ok: Optional[bool], measured: str) -> dict:
    status = "not measured" if ok is None else ("hit" if ok else "miss")
    return {"id": gid, "goal": goal, "target": target, "status": status, "measured": measured, "values": values}


def evaluate_goals(results: dict) -> list:
    """The goals of issues #6, #7 and #11 as hit / miss / not measured, computed from the figures in `results` only.

    The training lengths and decode prompts come from the plan (4096 / 16384 and 1k / 32k in the full run), so
    the dry run evaluates the same rules on its tiny shapes.
    """
    plan = results["plan"]
    model = results["model"]
    goals = []

    # 1. Training throughput: Hope >= 0.7x Transformer++ at the first T, ahead (> 1x) at every longer T.
    tps = {(e["model"], e["T"]): e["tokens_per_s"] for e in model.get("train", []) if "tokens_per_s" in e}
    t_ref, longs = plan["train"][0][0], [t for t, _ in plan["train"][1:]]

    def ratio_at(T):
        if ("hope", T) in tps and ("transformer++", T) in tps:
            return tps[("hope", T)] / tps[("transformer++", T)]
        return None

    r = ratio_at(t_ref)
    goals.append(_goal("train_ref", f"Hope training throughput >= 0.7x Transformer++ at T={t_ref}",
                       ">= 0.7", {"ratio": r}, None if r is None else r >= 0.7,
                       "not measured" if r is None else f"{r:.2f}x"))
    rs = {T: ratio_at(T) for T in longs}
    got = {T: v for T, v in rs.items() if v is not None}
    goals.append(_goal("train_long", f"Hope training throughput ahead of Transformer++ at T >= {min(longs) if longs else '-'}",
                       "> 1.0 at every long T", {"ratios": {str(T): v for T, v in rs.items()}},
                       None if not got else all(v > 1.0 for v in got.values()),
                       ", ".join(f"T={T}: {v:.2f}x" for T, v in got.items()) or "not measured"))

    # 2. Issue #11: Titans forward+backward within 2.5x FLA's gated delta rule on the same shapes (Hope's state has
    # 3d+2 value rows, not d) and 20x faster than the eager reference; bf16 outputs within 1e-2 of the reference.
    k = results.get("kernels", [])

    def ms_of(op, method, mode, shape):
        for e in k:
            if (e["op"], e["method"], e["mode"], e["shape"]) == (op, method, mode, shape) and "ms" in e:
                return e["ms"]
        return None

    pairs = []
    for e in k:
        if e["op"] == "titans_memory" and e["method"] == "triton" and e["mode"] == "fwd+bwd" and "ms" in e:
            fla = ms_of("titans_memory", "fla_chunk_gated_delta_rule", "fwd+bwd", e["shape"])
            if fla:
                pairs.append((shape_label(e["shape"]), e["ms"] / fla))
    fla_note = next((e.get("skipped") or e.get("error") for e in k
                     if e["method"] == "fla_chunk_gated_delta_rule" and "ms" not in e), None)
    goals.append(_goal("titans_vs_fla", "Titans kernel fwd+bwd within 2.5x FLA chunk_gated_delta_rule", "<= 2.5x",
                       {"ratios": dict(pairs)}, None if not pairs else all(v <= 2.5 for _, v in pairs),
                       ", ".join(f"{s}: {v:.2f}x" for s, v in pairs)
                       or f"not measured: {'FLA ' + fla_note if fla_note else 'no Titans Triton fwd+bwd timing'}"))
    speedups = []
    for e in k:
        if e["op"] == "titans_memory" and e["method"] == "triton" and e["mode"] == "fwd+bwd" and "ms" in e:
            eager = ms_of("titans_memory", "eager", "fwd+bwd", e["shape"])
            if eager:
                speedups.append((shape_label(e["shape"]), eager / e["ms"]))
    goals.append(_goal("titans_vs_eager", "Titans kernel fwd+bwd >= 20x faster than the eager reference", ">= 20x",
                       {"speedups": dict(speedups)}, None if not speedups else all(v >= 20 for _, v in speedups),
                       ", ".join(f"{s}: {v:.1f}x" for s, v in speedups) or "not measured"))
    errs = [(f"{e['mode']} {shape_label(e['shape'])}", e["rel_err_vs_eager"]) for e in k
            if e["op"] == "titans_memory" and e["method"] == "triton" and "rel_err_vs_eager" in e
            and e["dtype"] == "bfloat16"]
    goals.append(_goal("titans_bf16", "Titans kernel bf16 output within 1e-2 relative of the reference", "<= 1e-2",
                       {"rel_errs": dict(errs)}, None if not errs else all(v <= 1e-2 for _, v in errs),
                       ", ".join(f"{s}: {v:.1e}" for s, v in errs) or "not measured (bf16 runs on the GPU only)"))

    # 3. Issue #13: the CMS kernel at >= 50% of the measured matmul rate where a level is compute-bound
    # (C >= 512), and at its memory floor where it is memory-bound (C < 128: >= 70% of the copy rate on the
    # floor's bytes, `workloads.cms_bytes`, the share FLA's memory-bound kernels reach); every timed chunked case,
    # forward and fwd+bwd.
    cms = [e for e in k if e["op"] == "cms_level" and e["method"] == "triton"]
    fr = [(f"{e['mode']} {shape_label(e['shape'])}", e["frac_of_matmul"]) for e in cms
          if e["shape"]["C"] >= 512 and "frac_of_matmul" in e]
    goals.append(_goal("cms_matmul", "CMS kernel >= 50% of the measured matmul rate at C >= 512", ">= 0.50",
                       {"fractions": dict(fr)}, None if not fr else min(v for _, v in fr) >= 0.5,
                       ", ".join(f"{s}: {100 * v:.1f}%" for s, v in fr) or "not measured"))
    fl = [(f"{e['mode']} {shape_label(e['shape'])}", e["frac_of_copy"]) for e in cms
          if e["shape"]["C"] < 128 and "frac_of_copy" in e]
    goals.append(_goal("cms_bandwidth", "CMS kernel at its memory floor below C = 128", ">= 0.70 of the floor",
                       {"fractions": dict(fl)}, None if not fl else min(v for _, v in fl) >= 0.7,
                       ", ".join(f"{s}: {100 * v:.1f}%" for s, v in fl) or "not measured"))

    # 4. Decode: Hope's ms per token flat (within 10%) from the short to the long prompt; >= 2x Transformer++
    # tokens/s at the long prompt. Each batch measured for both sides counts.
    dec = {(e["model"], e["prompt"], e["batch"]): e for e in model.get("decode", []) if "ms" in e}
    short, long_ = plan["decode_prompts"][0], plan["decode_prompts"][-1]
    flat = {b: dec[("hope", long_, b)]["ms"] / dec[("hope", short, b)]["ms"] for b in plan["decode_batches"]
            if ("hope", long_, b) in dec and ("hope", short, b) in dec}
    goals.append(_goal("decode_flat", f"Hope decode latency per token flat from {short} to {long_} tokens of context",
                       "<= 1.10x", {"ratios": {str(b): v for b, v in flat.items()}},
                       None if not flat else all(v <= 1.10 for v in flat.values()),
                       ", ".join(f"batch {b}: {v:.2f}x" for b, v in flat.items()) or "not measured"))
    speed = {b: dec[("hope", long_, b)]["tokens_per_s"] / dec[("transformer++", long_, b)]["tokens_per_s"]
             for b in plan["decode_batches"] if ("hope", long_, b) in dec and ("transformer++", long_, b) in dec}
    tpp_note = [f"batch {e['batch']}: Transformer++ {case_note(e)}" for e in model.get("decode", [])
                if e["model"] == "transformer++" and e["prompt"] == long_ and "ms" not in e]
    goals.append(_goal("decode_speed", f"Hope decode >= 2x Transformer++ tokens/s at {long_} tokens of context",
                       ">= 2.0x", {"ratios": {str(b): v for b, v in speed.items()}},
                       None if not speed else all(v >= 2.0 for v in speed.values()),
                       "; ".join([", ".join(f"batch {b}: {v:.2f}x" for b, v in speed.items())] + tpp_note).strip("; ")
                       or "not measured"))

    # 5. Issue #7: the deep memory's Triton fwd+bwd within 2.5x the linear memory's at the same (B, T, H, d, C).
    deep_pairs, deep_notes = [], []
    for e in k:
        if (e["op"], e["method"], e["mode"]) != ("titans_deep_memory", "triton", "fwd+bwd"):
            continue
        label = shape_label(e["shape"])
        linear_shape = {key: v for key, v in e["shape"].items() if key != "h"}
        linear = next((x for x in k if (x["op"], x["method"], x["mode"], x["shape"])
                       == ("titans_memory", "triton", "fwd+bwd", linear_shape)), None)
        if "ms" in e and linear is not None and linear.get("ms"):
            deep_pairs.append((label, e["ms"] / linear["ms"]))
        elif "ms" not in e:
            deep_notes.append(f"{label}: deep {case_note(e) or 'no timing'}")
        else:
            deep_notes.append(f"{label}: linear {case_note(linear) if linear else 'not run'}")
    goals.append(_goal("deep_vs_linear", "Deep memory (memory_depth=2) fwd+bwd within 2.5x the linear memory fwd+bwd",
                       "<= 2.5x", {"ratios": dict(deep_pairs)},
                       None if not deep_pairs else all(v <= 2.5 for _, v in deep_pairs),
                       "; ".join([", ".join(f"{s}: {v:.2f}x" for s, v in deep_pairs)] + deep_notes).strip("; ")
                       or "not measured: no deep Triton fwd+bwd timing"))
    return goals


# ------------------------------------------------------------------------------------------- markdown


def _f(x, fmt: str = "{:.3g}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def _gib(x) -> str:
    return _f(None if x is None else x / 2**30, "{:.3g}")


def render_markdown(results: dict) -> str:
    """The suite's tables as markdown (goals first), for benchmarks/results/ and the README."""
    dev, ver, c = results["device"], results["versions"], results["ceilings"]
    lines = [f"# Hope benchmark suite: {dev['name']} ({results['date']})", ""]
    if results["dry_run"]:
        lines += ["**Dry run on CPU with tiny shapes: it exercises the code paths; its numbers mean nothing.**", ""]
    lines += [", ".join(f"{k} {v}" for k, v in ver.items())
              + (f"; driver {dev.get('driver')}, CUDA {dev.get('cuda')}" if dev["type"] == "cuda" else ""), ""]
    lines += ["## Ceilings (measured in this run)", "", "| ceiling | value |", "|---|---|",
              f"| device-to-device copy (read + write) | {_f(c.get('copy_gbps'), '{:.4g}')} GB/s |",
              f"| matmul {c.get('matmul', {}).get('n', '')}^3 {c.get('matmul', {}).get('dtype', '')} "
              f"| {_f(c.get('matmul_tflops'), '{:.4g}')} TFLOP/s |"]
    if "error" in c:
        lines.append(f"| error | {c['error']} |")
    lines += ["", "## Goals", "", "| goal | target | measured | status |", "|---|---|---|---|"]
    for g in results["goals"]:
        lines.append(f"| {g['goal']} | {g['target']} | {g['measured']} | **{g['status']}** |")
    lines += ["", "## Kernels and peers", "",
              "Median ms; rates from counted FLOPs and minimum bytes (benchmarks/workloads.py); floor = the larger of "
              "FLOPs / matmul rate and bytes / copy rate; % of floor = floor / time.", "",
              "| op | method | mode | shape | ms | TFLOP/s | GB/s | floor ms (bound) | % of floor | % of matmul | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in results["kernels"]:
        note = case_note(e) or (f"rel err vs eager {e['rel_err_vs_eager']:.1e}" if "rel_err_vs_eager" in e else "")
        lines.append(
            f"| {e['op']} | {e['method']}{' (peer)' if e['peer'] else ''} | {e['mode']} | {shape_label(e['shape'])} "
            f"| {_f(e.get('ms'), '{:.4g}')} | {_f(e.get('tflops'))} | {_f(e.get('gbps'))} "
            f"| {_f(e.get('floor_ms'), '{:.4g}')} ({e.get('bound', '-')}) | {_f(e.get('frac_of_floor'), '{:.1%}')} "
            f"| {_f(e.get('frac_of_matmul'), '{:.1%}')} | {note.replace('|', '/')} |")
    m = results["model"]
    params = m.get("parameters", {})
    lines += ["", f"## Model level: preset {m.get('size')}, backends train {m.get('train_backends')}, "
              f"decode {m.get('decode_backends')}; {m.get('precision')}", "",
              "| model | parameters | T | B | tokens/s | vs Transformer++ | step ms | peak memory GiB | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    tpp = {e["T"]: e["tokens_per_s"] for e in m.get("train", []) if e["model"] == "transformer++" and "tokens_per_s" in e}
    for e in m.get("train", []):
        rel = e["tokens_per_s"] / tpp[e["T"]] if "tokens_per_s" in e and tpp.get(e["T"]) else None
        lines.append(f"| {e['model']} | {_f(params.get(e['model']), '{:,}')} | {e['T']} | {e['B']} "
                     f"| {_f(e.get('tokens_per_s'), '{:,.0f}')} | {_f(rel, '{:.2f}x')} | {_f(e.get('ms'), '{:.1f}')} "
                     f"| {_gib(e.get('peak_mem_bytes'))} | {case_note(e).replace('|', '/')} |")
    lines += ["", "| model | prompt | batch | decode tokens/s | ms / token | cache GiB | peak memory GiB | note |",
              "|---|---|---|---|---|---|---|---|"]
    for e in m.get("decode", []):
        lines.append(f"| {e['model']} | {e['prompt']} | {e['batch']} | {_f(e.get('tokens_per_s'), '{:,.1f}')} "
                     f"| {_f(e.get('ms'), '{:.2f}')} | {_gib(e.get('cache_bytes'))} | {_gib(e.get('peak_mem_bytes'))} "
                     f"| {case_note(e).replace('|', '/')} |")
    lines += ["", "| model | prompt | prefill tokens/s (batch 1) | note |", "|---|---|---|---|"]
    for e in m.get("prefill", []):
        lines.append(f"| {e['model']} | {e['prompt']} | {_f(e.get('tokens_per_s'), '{:,.0f}')} "
                     f"| {case_note(e).replace('|', '/')} |")
    lines += ["", f"Run time {results.get('elapsed_s')} s. Raw figures: the JSON file of the same name.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    from benchmarks.workloads import MODEL_NAMES, OPS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, every code path (CI)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"), help="where the JSON and markdown go")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget: later cases are recorded as skipped (default: 480 on GPU, 240 dry run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops of the kernels section")
    p.add_argument("--methods", default="", help="comma-separated methods (backends and peers) to keep; "
                   "default all")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated models of the model section")
    p.add_argument("--train-backends", type=parse_backends, default=None,
                   help="kernel backends for training and prefill (default titans=triton,cms=torch on GPU)")
    p.add_argument("--decode-backends", type=parse_backends, default=None,
                   help="kernel backends for decode (default titans=triton,cms=torch on GPU)")
    p.add_argument("--train-precision", choices=sorted(PRECISIONS), default="bf16",
                   help="model-level precision on CUDA (default %(default)s; the dry run is fp32)")
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    """Run the suite; returns 0 (also when cases failed: they are recorded), 0 with a message without a GPU."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from benchmarks.gpu_common import gpu_unavailable_reason

    if args.dry_run:
        import torch

        if "triton" not in sys.modules and not torch.cuda.is_available():
            # The dry run exercises the Triton path too, in the interpreter; it must be set before triton loads.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        device, plan = torch.device("cpu"), DRY
        # One intra-op thread, as the CPU benchmarks (benchmarks/conftest.py): on the shared 2-core box a second
        # thread spins against other processes and tiny ops take 100x longer.
        torch.set_num_threads(1)
    else:
        reason = gpu_unavailable_reason("gpu_suite")
        if reason:
            print(reason)
            return 0
        import torch

        device, plan = torch.device("cuda"), FULL
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    on_gpu = device.type == "cuda"
    train_b = args.train_backends or ({"titans": "triton", "cms": "torch"} if on_gpu else {"titans": "torch", "cms": "torch"})
    # The CMS kernel has not run on a GPU yet (hope_kernels.cms.GPU_VERIFIED): the model section keeps its reference
    # (--train-backends cms=triton to try it); the kernels section times the kernel itself.
    decode_b = args.decode_backends or ({"titans": "triton", "cms": "torch"} if on_gpu else {"titans": "torch", "cms": "torch"})
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    run = Run(plan, device, args.out_dir, args.dry_run, argv)
    run.log(f"gpu_suite: {run.results['device']['name']} | "
            + " | ".join(f"{k} {v}" for k, v in run.results["versions"].items())
            + (" | DRY RUN (CPU, tiny shapes)" if args.dry_run else ""))
    if "ceilings" in sections:
        section_ceilings(run)
        run.write()
    ops, methods = [o for o in args.ops.split(",") if o], {m for m in args.methods.split(",") if m}
    # Goal figures first: kernels and peers until 45% of the budget, the model level until 90%, and the
    # compiled references (a compile per shape and grad mode, the slowest and least needed) last.
    if "kernels" in sections:
        run.log("kernels (median ms, TFLOP/s, GB/s, fraction of the roofline floor)")
        with run.until(0.45):
            section_kernels(run, ops, methods, ("eager", "triton"), with_peers=True)
    if "model" in sections:
        run.log(f"model level, preset {plan.model_size}: train {train_b}, decode {decode_b}")
        with run.until(0.9):
            section_model(run, [m for m in args.models.split(",") if m], train_b, decode_b, args.train_precision)
    if "kernels" in sections:
        run.log(f"compiled references ({plan.compile_backend}), compared with the eager output")
        section_kernels(run, ops, methods, ("eager", "compile"), with_peers=False)
    run.write()
    run.log("goals: " + "; ".join(f"{g['id']}: {g['status']} [{g['measured']}]" for g in run.results["goals"]))
    n_err = sum("error" in e for e in run.results["kernels"]) + sum(
        "error" in e for part in ("train", "prefill", "decode") for e in run.results["model"][part])
    run.results["errors"] = n_err
    run.write()
    run.log(f"wrote {run.json_path} and {run.md_path} ({n_err} failed cases, {run.results['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
