"""Offline sm_90a compile check of the CMS Triton kernels (no GPU needed; issue #13 part 3).

The kernels' own launch code (`hope_kernels/cms/chunk.py` `_forward` / `_backward`, `step.py`
`cms_level_step_triton`) runs on meta tensors at the presets' shapes with `launch` replaced by a recorder, so
every kernel is compiled with the arguments, constexprs, warps and grid the runtime would use, for
`GPUTarget("cuda", 90, 32)` (H100 / H200) with this machine's triton; the wheel's ptxas (`-arch=sm_90a -v`) gives
registers and spills. Nothing runs on a GPU: these are the compiler's resource figures, not timings.

    python -m benchmarks.cms_sm90_check                  # 340M and 1.3B, C = 16, 128, 512, 2048, fp32 and bf16
    python -m benchmarks.cms_sm90_check --presets hope-340m --chunks 16 --dtypes bf16 --kernels _cms_bwd_kernel

Writes benchmarks/results/cms_sm90_check.json and prints a Markdown table (docs/cms/README.md §5 quotes it).
Goal (issue #13): no spills, shared memory <= 227 KB, wgmma present. `make sm90-check` runs it after the Titans
kernels' check (`benchmarks/sm90_check.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
os.environ.pop("HOPE_CMS_DOT_PRECISION", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.sm90_check import DTYPES, RESULTS, SMEM_LIMIT, _ptxas_report, _signature  # noqa: E402


def record(D: int, Fh: int, C: int, dtype: torch.dtype, B: int = 8, T: int = 4096) -> list:
    """Every launch of one level's forward (with the saved tensors of a backward), backward and decode step."""
    from hope_kernels.cms import _common, chunk, step
    from hope_kernels.cms.reference import CMSState

    launches = []
    saved = [(m, "launch", m.launch) for m in (chunk, step)] + [(step, "check_kernel_inputs", step.check_kernel_inputs)]
    chunk.launch = step.launch = lambda kernel, grid, *a, **kw: launches.append((kernel, grid, a, kw))
    step.check_kernel_inputs = lambda *a, **k: None
    try:  # the interpreter is off here, so 16-bit inputs take bf16 dots and the GPU's tiles, as on the GPU
        meta = dict(device="meta", dtype=torch.float32)
        z = torch.empty(B, T, D, device="meta", dtype=dtype)
        tg = torch.empty(B, T, D, **meta)
        eta, zz, mk = (torch.empty(B, T, **meta) for _ in range(3))
        nseg = _common.num_segments(T, C, 0)
        lam = torch.empty(B, nseg, **meta)
        th0 = torch.empty(3 * D * Fh, **meta)
        cfg = dict(chunk_size=C, position=0, objective="l2", decay=0.05, F=Fh, learn_last=True)
        fwd = chunk._forward(z, tg, eta, zz, mk, lam, th0, torch.empty(B, 3 * D * Fh, **meta), None, None, cfg, True)
        n_fwd = len(launches)
        chunk._backward(z, tg, eta, zz, mk, lam, th0, th0, 0, None, fwd, torch.empty(B, T, D, **meta),
                        torch.empty(B, 3 * D * Fh, **meta), torch.empty(B, 3 * D * Fh, **meta),
                        torch.empty(B, **meta), cfg)
        # one launch of each kind is enough: every launch of a call shares one binary (do_not_specialize)
        launches[:] = [launches[0], launches[n_fwd]]
        w = [torch.empty(Fh, D, device="meta", dtype=dtype), torch.empty(Fh, D, device="meta", dtype=dtype),
             torch.empty(D, Fh, device="meta", dtype=dtype)]
        state = CMSState(torch.empty(B, Fh, D, **meta), torch.empty(B, Fh, D, **meta), torch.empty(B, D, Fh, **meta),
                         torch.empty(B, Fh, D, **meta), torch.empty(B, Fh, D, **meta), torch.empty(B, D, Fh, **meta),
                         torch.empty(B, **meta), position=1, chunk_has_valid=torch.ones(B, dtype=torch.bool,
                                                                                         device="meta"))
        with torch.no_grad():
            step.cms_level_step_triton(z[:, 0], *w, torch.empty(D, D, device="meta", dtype=dtype),
                                       torch.empty(D, device="meta", dtype=dtype), torch.empty((), **meta),
                                       chunk_size=C, eta_max=1.0, decay=0.05, state=state)
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
    return launches


def compile_launch(kernel, grid, args, kwargs) -> dict:
    sig, constexprs, attrs = _signature(kernel, args, kwargs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    regs, spill_st, spill_ld = _ptxas_report(ptx)
    blocks = {k: v for k, v in constexprs.items() if k.startswith("B")}
    return dict(kernel=kernel.__name__, registers=regs, spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
                shared_bytes=int(compiled.metadata.shared), wgmma="wgmma.mma_async" in ptx,
                grid=[int(g) for g in grid], num_warps=compiled.metadata.num_warps, num_stages=options.get("num_stages"),
                blocks=blocks)


def main(argv=None) -> int:
    from hope.presets import HOPE_CMS_CHUNK_SIZES, get_preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["hope-340m", "hope-1.3b"])
    parser.add_argument("--chunks", type=int, nargs="+", default=sorted({C for levels in HOPE_CMS_CHUNK_SIZES.values()
                                                                         for C in levels if C}),
                        help="chunk sizes (default: every learning level of the presets, CPU and GPU sizes: "
                             "hope.presets.HOPE_CMS_CHUNK_SIZES, today 16, 128, 512, 2048)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--kernels", nargs="*", help="only these kernel names (default: every kernel)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cms_sm90_check.json")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    jobs = []
    for preset in args.presets:
        config = get_preset(preset)
        D = config.hidden_size
        Fh = next(F for C, F in zip(config.cms_chunk_sizes, config.cms_hidden_size) if C)  # one width per preset
        for C in args.chunks:
            for dt in args.dtypes:
                for kernel, grid, a, kw in record(D, Fh, C, DTYPES[dt]):
                    if kernel.__name__.startswith("_step") and C != args.chunks[0]:
                        continue  # the step kernels do not depend on the chunk size
                    if args.kernels and kernel.__name__ not in args.kernels:
                        continue
                    jobs.append((preset, D, Fh, C, dt, kernel, grid, a, kw))
    rows, cache = [], {}
    for preset, D, Fh, C, dt, kernel, grid, a, kw in tqdm(jobs, desc="sm_90a compile", unit="kernel"):
        sig = _signature(kernel, a, kw)
        key = (kernel.__name__, repr(sig), repr(sorted(kw.items())))
        if key not in cache:  # D, F: runtime ints specialized on divisibility by 16 only, so presets share binaries
            cache[key] = compile_launch(kernel, grid, a, kw)
        rows.append(dict(preset=preset, D=D, F=Fh, C=C, dtype=dt, **dict(cache[key], grid=[int(g) for g in grid])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        target="cuda sm_90a (GPUTarget('cuda', 90, 32)), offline: nothing here ran on a GPU",
        triton=triton.__version__, smem_limit_bytes=SMEM_LIMIT, shape="B=8, T=4096", rows=rows), indent=1))
    print("| kernel | preset (D, F) | C | dtype | blocks (BT, BD, BF) | warps / stages | registers | spills (st / ld B) "
          "| shared KB | wgmma | grid |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["blocks"]
        blocks = "-" if r["kernel"].startswith("_step") else f"{b.get('BT')}, {b.get('BD')}, {b.get('BF')}"
        print(f"| `{r['kernel']}` | {r['preset']} ({r['D']}, {r['F']}) | {r['C']} | {r['dtype']} | {blocks} | "
              f"{r['num_warps']} / {r['num_stages']} | {r['registers']} | {r['spill_store_bytes']} / "
              f"{r['spill_load_bytes']} | {r['shared_bytes'] / 1024:.1f} | {'yes' if r['wgmma'] else 'no'} | "
              f"{'x'.join(map(str, r['grid']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
