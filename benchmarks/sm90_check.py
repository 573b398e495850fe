"""Offline sm_90a compile check of every Titans Triton kernel (`make sm90-check`; no GPU needed).

The real Python wrappers (chunk forward / backward and decode step, linear and deep memory) run on meta tensors at
the presets' shapes with `launch` replaced by a recorder, so every kernel is compiled with exactly the arguments,
constexprs, warps and grid the runtime would use. Each recorded launch is compiled with this machine's triton for
`GPUTarget("cuda", 90, 32)` (the H100 / H200); the triton wheel ships ptxas, whose `-v` report gives registers and
spills. The table (kernel, shape, dtype, registers, spill bytes, shared memory, wgmma, grid at B=8, T=4096, H=16)
goes to benchmarks/results/sm90_check.md and .json.

    python -m benchmarks.sm90_check                       # every kernel, d = 64 and 128, fp32 and bf16
    python -m benchmarks.sm90_check --d 16 --dtype fp32 --kernels _main_state_fwd_kernel --out /tmp/x   # one
    python -m benchmarks.sm90_check --kernels _gen_fwd_kernel --update   # recompile these rows of the committed table

Goal (issue #11): no spills and shared memory <= 227 KB (the H200's per-block limit) at d = 64 and 128.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
os.environ.pop("HOPE_TITANS_DOT_PRECISION", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOATS = {"eta_max", "eps", "resid"}  # the kernels' fp32 scalar arguments; every other scalar is an integer


class _Recorder:
    """Stands in for `hope_kernels.titans._common.launch`: keeps (kernel, grid, args, kwargs)."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel, grid, *args, **kwargs):
        self.launches.append((kernel, grid, args, kwargs))


def _patched(modules, recorder):
    saved = []
    for m in modules:
        for name, value in (("launch", recorder), ("check_kernel_inputs", lambda *a, **k: None)):
            if hasattr(m, name):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, value)
    return saved


def record(d: int, dtype: torch.dtype, B: int = 8, T: int = 4096, H: int = 16, C: int = 64) -> list:
    """Every launch of the linear and deep ops' forward, backward and step at (B, T, H, d), chunk_size C, with the
    model's rule flags (unit values, retention toward the initial memories, the deep memory's curvature guard)."""
    from hope_kernels.deep_titans import chunk as deep_chunk, step as deep_step
    from hope_kernels.titans import chunk, step
    from hope_kernels.titans.reference import TitansState, memory_rows

    rec = _Recorder()
    saved = _patched([chunk, step, deep_chunk, deep_step], rec)
    meta = dict(device="meta")
    try:
        R, G, h = memory_rows(d), 2 * d + 2, d
        q = torch.empty(B, T, H, d, dtype=dtype, **meta)
        be, ba = torch.empty(H, **meta), torch.empty(H, **meta)
        valid = torch.empty(B, T, **meta)
        kw = dict(chunk_size=C, eta_max=1.0)
        # linear op: forward with the tensors a backward needs, then the backward
        cfg = chunk._config(d, C, None, 0, 1.0, True, "l2", "self", True, True, "init", ("k", "v", "eta", "alpha"),
                            True)
        z = torch.empty(B, H, R, d, **meta)
        anchor = torch.empty(H, R, d, **meta)
        o, zc_end, z_end, saved_t, nseg = chunk._forward(q, q, z, z, anchor, be, ba, valid, cfg, save=True)
        chunk._backward(q, q, valid, anchor, be, ba, *saved_t, q, zc_end, z_end, cfg, nseg)
        st = TitansState(z, z, None, 5)
        step.titans_memory_step_triton(q[:, 0], q[:, 0], torch.empty(H, R, d, **meta), be, ba, state=st, **kw)
        # deep op (h = d, the default memory_hidden)
        cfg = dict(cfg, HD=max(16, triton.next_power_of_2(h)))
        zg, w1, w2 = torch.empty(B, H, G, d, **meta), torch.empty(B, H, d, h, **meta), torch.empty(B, H, h, d, **meta)
        anchors = (zg[0], w1[0], w2[0])
        o, finals, saved_t, nseg = deep_chunk._forward(q, q, w1, w1, w2, w2, zg, zg, anchors, be, ba, valid, cfg,
                                                       save=True)
        deep_chunk._backward(q, q, valid, anchors, be, ba, *saved_t, q, finals, cfg, nseg)
        from hope_kernels.deep_titans.reference import DeepTitansState

        dst = DeepTitansState(zg, zg, None, w1, w1, None, w2, w2, None, 5)
        deep_step.titans_deep_memory_step_triton(q[:, 0], q[:, 0], w1[0], w2[0], zg[0], be, ba, state=dst, **kw)
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
    return rec.launches


def _signature(kernel, args, kwargs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as a launch would specialize them: triton's own specializer on each argument
    (an int equal to 1 becomes a constexpr, ints and pointers divisible by 16 get `tt.divisibility`; meta tensors
    count as aligned, as real allocations are), so the compile is the one the GPU would run."""
    fn = kernel
    names = [p.name for p in fn.params if not p.is_constexpr]
    if len(names) != len(args):
        raise RuntimeError(f"{fn.__name__}: {len(args)} positional arguments for {len(names)} parameters")
    values = dict(zip(names, args))
    sig, attrs = {}, {}
    constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    for index, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        value = values[p.name]
        if p.name in FLOATS:
            value = float(value)
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            sig[p.name] = "constexpr"
            constexprs[p.name] = key
        else:
            sig[p.name] = kind
            if key:
                attrs[(index,)] = BaseBackend.parse_attr(key)
    return sig, constexprs, attrs


def _ptxas_report(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX for sm_90a."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return regs, int(spill.group(1)), int(spill.group(2))


def compile_launch(kernel, grid, args, kwargs) -> dict:
    sig, constexprs, attrs = _signature(kernel, args, kwargs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    t0 = time.time()
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    regs, spill_st, spill_ld = _ptxas_report(ptx)
    n_grid = 1
    for g in grid:
        n_grid *= int(g)
    return dict(kernel=kernel.__name__, registers=regs, spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
                shared_bytes=int(compiled.metadata.shared), wgmma="wgmma.mma_async" in ptx,
                grid=[int(g) for g in grid], programs=n_grid, num_warps=compiled.metadata.num_warps,
                compile_s=round(time.time() - t0, 1),
                constexprs={k: v for k, v in constexprs.items() if not isinstance(v, bool) or v})


def _op_of(name: str) -> str:
    return "deep" if name.startswith("_deep") else "both" if name.startswith("_gen") else "linear"


def write_table(rows: list, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sm90_check.json").write_text(json.dumps(dict(
        target="cuda sm_90a (GPUTarget('cuda', 90, 32)), offline: nothing here ran on a GPU",
        triton=triton.__version__, smem_limit_bytes=SMEM_LIMIT, grid_at="B=8, T=4096, H=16, C=64",
        rows=rows), indent=1))
    ok = [r for r in rows if r["spill_store_bytes"] == 0 and r["shared_bytes"] <= SMEM_LIMIT]
    lines = [
        "# Offline sm_90a compile of the Titans Triton kernels (`make sm90-check`)",
        "",
        f"triton {triton.__version__}, `GPUTarget('cuda', 90, 32)`, ptxas `-arch=sm_90a -v` from the triton wheel. "
        "**Nothing here ran on a GPU**: these are the compiler's resource figures, not timings. Grid: programs "
        "launched at B=8, T=4096, H=16, C=64 (d and dtype as in the row; the deep memory at h = d).",
        "",
        f"Goal: no spills and shared memory <= 227 KB. Met by {len(ok)} of {len(rows)} rows.",
        "",
        "| kernel | op | d | dtype | warps | registers | spills (store / load B) | shared KB | wgmma | grid | programs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        smem = r["shared_bytes"] / 1024
        flag = "" if r["shared_bytes"] <= SMEM_LIMIT else " **over**"
        spill = f"{r['spill_store_bytes']} / {r['spill_load_bytes']}"
        if r["spill_store_bytes"]:
            spill = f"**{spill}**"
        lines.append(f"| `{r['kernel']}` | {_op_of(r['kernel'])} | {r['d']} | {r['dtype']} | {r['num_warps']} | "
                     f"{r['registers']} | {spill} | {smem:.1f}{flag} | {'yes' if r['wgmma'] else 'no'} | "
                     f"{'x'.join(map(str, r['grid']))} | {r['programs']} |")
    (out / "sm90_check.md").write_text("\n".join(lines) + "\n")


def _merged(previous: list, rows: list) -> list:
    """The rows of `previous` with those of `rows` in their place (same kernel, d, dtype), new ones at the end."""
    def key(row: dict) -> tuple:
        return row["kernel"], row["d"], row["dtype"]

    fresh = {key(row): row for row in rows}
    if len(fresh) != len(rows):
        raise RuntimeError("two compiled rows share a kernel, d and dtype: --update cannot tell them apart")
    kept = [fresh.pop(key(row), row) for row in previous]
    return kept + list(fresh.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims (default: 64 128)")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--kernels", nargs="*", help="only these kernel names (default: every kernel)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of sm90_check.md / .json")
    parser.add_argument("--update", action="store_true",
                        help="recompile only the selected rows of the table already in --out and keep the others "
                             "(rows are matched by kernel, d and dtype)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    jobs = []
    for d in args.d:
        for dtype in args.dtype:
            seen = set()
            for kernel, grid, a, kw in record(d, DTYPES[dtype]):
                if args.kernels and kernel.__name__ not in args.kernels:
                    continue
                key = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in kw.items())))
                if key not in seen:  # the deep op launches the generating scan again with the same constexprs
                    seen.add(key)
                    jobs.append((d, dtype, kernel, grid, a, kw))
    previous = json.loads((args.out / "sm90_check.json").read_text())["rows"] if args.update else []
    rows = []
    for d, dtype, kernel, grid, a, kw in tqdm(jobs, desc="sm_90a compile", unit="kernel"):
        rows.append(dict(d=d, dtype=dtype, **compile_launch(kernel, grid, a, kw)))
        write_table(_merged(previous, rows), args.out)  # after every kernel: an interrupted run keeps what it compiled
    print((args.out / "sm90_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
