"""Stability of the CMS in-context step (SPEC §3 v2, issue #13): train, then stream, then stress.

For each `cms_step` and input scale it runs, on Python's help topics (byte tokens, topics split 80/20):

1. a fresh Hope of `--preset` (`tiny`: hidden 128, 2 layers; `small`: 256, 4) whose CMS level inputs are
   scaled by `--scales` (each CMS RMSNorm gain starts at that value, as if outer training had grown the
   features), streaming a held-out text of `--stream_tokens` tokens through the cache: the drift
   ‖θ_c − θ_0‖/‖θ_0‖ of every layer's learning levels;
2. `--steps` AdamW steps at B = `--batch_size`, T = `--seq_len` (lr 3e-3, cosine, 5% warm-up, clip 1): the loss
   and the gradient norm of every step, and the first step whose loss or gradient norm is not finite;
3. the trained model: bits per byte of 512-token validation blocks, and the held-out stream again: bits per
   byte by position window and the drift;
4. stress: the trained model with every CMS level input further multiplied by 10 and by 100: is the output
   finite over a `--stress_tokens` stream, and how far do the fast weights drift?

One JSON per run under --output_dir (rerunning skips runs whose JSON exists), then `summary.md` and `drift.png`;
the trained model of a run that reached its last step is saved under --output_dir/checkpoints. Seeded; one
intra-op thread (the CPU box is shared). `--op_stress` instead writes, in seconds, the op-level table: one level
alone on inputs x1 ... x1000, finite or not, and its drift.

The candidate study of docs/cms/step_study ran at commit 7e0f814, where the reference still had every candidate
(cms_step = gn, i.e. today's gauss_newton; gn_token, nlms, trust, lact; v1, the old step):

    git checkout 7e0f814 && PYTHONPATH=. python benchmarks/cms_stability.py --preset tiny --steps 200 \\
        --stream_tokens 16384 --stress_tokens 4096 --steps_list gn,gn_token,nlms,trust,lact,v1 --scales 10,1 \\
        --output_dir docs/cms/step_study

Today's step, for the acceptance figures (docs/cms/drift):

    PYTHONPATH=. python benchmarks/cms_stability.py --preset tiny --steps 200 --scales 1,10 --seed 0 \\
        --output_dir docs/cms/drift
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

WINDOWS = ((0, 512), (512, 4096), (4096, 8192), (8192, 32768))
PIECE = 512  # tokens per forward call when streaming (a multiple of every chunk size measured)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps_list", default="gauss_newton", help="comma-separated cms_step values to run")
    parser.add_argument("--scales", default="1,10", help="comma-separated CMS input scales at initialisation")
    parser.add_argument("--decay", type=float, default=None, help="cms_decay (default: the config default)")
    parser.add_argument("--eta_max", type=float, default=None, help="cms_eta_max (default: the config default)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--config_overrides", default="", help="JSON object of further HopeConfig fields")
    parser.add_argument("--tag", default="", help="suffix of the run names (e.g. for overrides)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream_tokens", type=int, default=32768)
    parser.add_argument("--stress_tokens", type=int, default=8192)
    parser.add_argument("--output_dir", default="runs/cms_stability")
    parser.add_argument("--op_stress", action="store_true",
                        help="only the op-level stress table (seconds): drift and finiteness at input x1..x1000")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------- data


def corpus(seq_len: int):
    """(train blocks (N, seq_len) int64, validation blocks, held-out stream (1, L) int64, ignore id)."""
    from transformers import ByT5Tokenizer

    from hope.data import load_topics, split_topics

    tokenizer = ByT5Tokenizer()
    topics = load_topics()
    train_names, held_out_names = split_topics(topics, validation_fraction=0.2)

    def ids(names: List[str]) -> torch.Tensor:
        out: List[int] = []
        for name in names:
            out += tokenizer(topics[name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return torch.tensor(out)

    train, held_out = ids(train_names), ids(held_out_names)
    blocks = train[: len(train) // seq_len * seq_len].view(-1, seq_len)
    validation = held_out[: len(held_out) // seq_len * seq_len].view(-1, seq_len)
    return blocks, validation, held_out[None], tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------- model


def cms_levels(model):
    """[(layer index, level index, CMSLevel)] of every level that learns in context."""
    return [(i, l, level) for i, layer in enumerate(model.model.layers)
            for l, level in enumerate(layer.cms.levels) if level.learns_in_context]


def scale_cms_inputs(model, factor: float) -> None:
    """Multiply the gain of every CMS RMSNorm (the level inputs z) by `factor`."""
    with torch.no_grad():
        for layer in model.model.layers:
            norms = layer.cms.norms if hasattr(layer.cms, "norms") else [layer.cms.norm]
            for norm in norms:
                norm.weight.mul_(factor)


def drift(model, cache) -> Dict[str, float]:
    """‖θ_c − θ_0‖ / ‖θ_0‖ (the three weights together) of every learning level, keyed 'layer.level'."""
    out = {}
    for i, l, level in cms_levels(model):
        state = cache.layers[i].cms[l]
        if state is None:
            continue
        num = sum((getattr(state, n).double() - getattr(level, n).double()).pow(2).sum(dim=(1, 2))
                  for n in ("w_gate", "w_up", "w_down"))
        den = sum(getattr(level, n).double().pow(2).sum() for n in ("w_gate", "w_up", "w_down"))
        out[f"{i}.{l}"] = float((num / den).sqrt().max())
    return out


@contextlib.contextmanager
def cms_frozen(model):
    """Every CMS level reads θ_0 and never learns in context (a plain SwiGLU FFN) while the mixer keeps its state:
    the reference that tells the CMS's in-context effect on a long stream from the mixer's."""
    levels = [level for _, _, level in cms_levels(model)]
    sizes = [level.chunk_size for level in levels]
    for level in levels:
        level.chunk_size = None
    try:
        yield
    finally:
        for level, size in zip(levels, sizes):
            level.chunk_size = size


@torch.no_grad()
def stream(model, ids: torch.Tensor, ignore_id: int, tokens: int) -> Dict[str, Any]:
    """Read `ids[:, :tokens]` through the cache in pieces of PIECE tokens: the drift after every piece, the
    next-token loss by position window (bits per byte) and whether every logit stayed finite."""
    from hope.cache_hope import HopeCache

    model.eval()
    ids = ids[:, :tokens]
    cache = HopeCache(model.config.num_hidden_layers)
    positions, drifts, losses, finite = [], [], [], True
    previous_logit = None
    for start in range(0, ids.shape[1], PIECE):
        piece = ids[:, start : start + PIECE]
        logits = model(input_ids=piece, cache=cache, use_cache=True).logits.float()
        finite = finite and bool(torch.isfinite(logits).all())
        # the loss of token t is predicted at t - 1, so the first token of a piece uses the last logit before it
        full = logits if previous_logit is None else torch.cat([previous_logit, logits], 1)
        targets = piece if previous_logit is None else torch.cat([ids[:, start - 1 : start], piece], 1)
        nll = F.cross_entropy(full[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), reduction="none")
        keep = targets[:, 1:].flatten() != ignore_id
        first = start + 1 if previous_logit is None else start
        losses += [(first + k, float(v)) for k, (v, m) in enumerate(zip(nll.tolist(), keep.tolist())) if m]
        previous_logit = logits[:, -1:]
        positions.append(start + piece.shape[1])
        drifts.append(drift(model, cache))
    windows = {}
    for lo, hi in WINDOWS:
        values = [v for p, v in losses if lo <= p < hi]
        if values:
            mean = sum(values) / len(values)
            windows[f"{lo}-{hi}"] = mean / math.log(2) if math.isfinite(mean) else float("nan")
    return {"positions": positions, "drift": drifts, "bits_per_byte": windows, "finite": finite,
            "max_drift": max((max(d.values()) for d in drifts if d), default=0.0)}


@torch.no_grad()
def validation_bpb(model, blocks: torch.Tensor, ignore_id: int, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size]
        logits = model(input_ids=x, use_cache=False).logits.float()
        targets = x[:, 1:].flatten()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets, reduction="none")
        keep = targets != ignore_id
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return total / count / math.log(2)


def train(model, blocks: torch.Tensor, ignore_id: int, args) -> Dict[str, Any]:
    """AdamW (betas 0.9/0.95, wd 0.01), cosine schedule with 5% warm-up, clipping at 1; stops at the first
    non-finite loss or gradient norm."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses, grad_norms, nan_step = [], [], None
    model.train()
    for step in tqdm(range(args.steps), desc="train", mininterval=30):
        x = blocks[torch.randint(len(blocks), (args.batch_size,), generator=generator)]
        labels = x.masked_fill(x == ignore_id, -100)
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        losses.append(float(loss.detach()))
        grad_norms.append(grad_norm)
        if not (math.isfinite(losses[-1]) and math.isfinite(grad_norm)):
            nan_step = step
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return {"loss": losses, "grad_norm": grad_norms, "nan_step": nan_step,
            "trained_to_end": nan_step is None,
            "max_grad_norm": max((g for g in grad_norms if math.isfinite(g)), default=float("nan"))}


def run_name(step: str, scale: float, args) -> str:
    return f"{step}{args.tag}_x{scale:g}_seed{args.seed}"


def run_one(step: str, scale: float, args, data) -> Dict[str, Any]:
    from hope import HopeForCausalLM
    from hope.presets import get_preset

    blocks, validation, held_out, ignore_id = data
    overrides = dict(json.loads(args.config_overrides) if args.config_overrides else {})
    overrides["cms_step"] = step
    if args.decay is not None:
        overrides["cms_decay"] = args.decay
    if args.eta_max is not None:
        overrides["cms_eta_max"] = args.eta_max
    config = get_preset(args.preset, max_position_embeddings=max(args.stream_tokens, 8192), **overrides)
    torch.manual_seed(args.seed)
    model = HopeForCausalLM(config)
    scale_cms_inputs(model, scale)
    result: Dict[str, Any] = {"cms_step": step, "scale": scale, "seed": args.seed, "steps": args.steps,
                              "cms_chunk_sizes": config.cms_chunk_sizes, "cms_eta_max": config.cms_eta_max,
                              "cms_decay": config.cms_decay, "parameters": sum(p.numel() for p in model.parameters())}
    started = time.perf_counter()
    result["fresh_stream"] = stream(model, held_out, ignore_id, args.stream_tokens)
    result["train"] = train(model, blocks, ignore_id, args)
    result["validation_bpb"] = validation_bpb(model, validation, ignore_id)
    result["trained_stream"] = stream(model, held_out, ignore_id, args.stream_tokens)
    with cms_frozen(model):
        result["trained_stream_cms_frozen"] = stream(model, held_out, ignore_id, args.stream_tokens)
    if result["train"]["trained_to_end"]:
        model.save_pretrained(Path(args.output_dir) / "checkpoints" / run_name(step, scale, args))
    result["stress"] = {}
    for factor in (10.0, 100.0):
        scale_cms_inputs(model, factor)
        result["stress"][f"x{factor:g}"] = stream(model, held_out, ignore_id, args.stress_tokens)
        scale_cms_inputs(model, 1.0 / factor)
    result["seconds"] = time.perf_counter() - started
    return result


def op_stress(steps: Sequence[str], seed: int, scales=(1, 10, 100, 1000), T: int = 512, C: int = 4, D: int = 16,
              Fh: int = 48) -> List[Dict[str, Any]]:
    """One CMS level op alone (fp32, B = 2) on random unit-RMS inputs times `scale`, θ_0 ~ N(0, 0.2²), eta at half
    its bound: is y finite after T / C updates, and how far did θ drift? Both objectives; each step at its
    config default eta_max (1/(C D) for the steps that do not normalise the step size, 1 for those that do)."""
    from hope.configuration_hope import HopeConfig
    from hope_kernels.cms.reference import cms_level_reference

    rows = []
    for step in steps:
        eta_max = HopeConfig(hidden_size=D, num_heads=1, cms_chunk_sizes=[C], cms_step=step).cms_eta_max[0]
        for objective in ("l2", "dot"):
            for scale in scales:
                g = torch.Generator().manual_seed(seed)
                z = torch.randn(2, T, D, generator=g)
                z = scale * z / z.pow(2).mean(-1, keepdim=True).sqrt()
                theta0 = [0.2 * torch.randn(*shape, generator=g) for shape in ((Fh, D), (Fh, D), (D, Fh))]
                p_v = 0.2 * torch.randn(D, D, generator=g)
                y, state = cms_level_reference(z, *theta0, p_v, torch.zeros(D), torch.zeros(()), chunk_size=C,
                                               eta_max=eta_max, objective=objective, step=step,
                                               output_final_state=True)
                num = sum((w - w0).pow(2).sum((1, 2)) for w, w0 in zip(state[:3], theta0))
                drift_ = float((num / sum(w0.pow(2).sum() for w0 in theta0)).sqrt().max())
                rows.append({"cms_step": step, "objective": objective, "scale": scale, "eta_max": eta_max,
                             "finite": bool(torch.isfinite(y).all()), "drift": drift_})
    return rows


def op_stress_table(rows: List[Dict[str, Any]]) -> str:
    scales = sorted({r["scale"] for r in rows})
    lines = ["| cms_step | objective | " + " | ".join(f"input x{s:g}" for s in scales) + " |",
             "|---|---|" + "---|" * len(scales)]
    for key in dict.fromkeys((r["cms_step"], r["objective"]) for r in rows):
        cells = []
        for scale in scales:
            (r,) = [r for r in rows if (r["cms_step"], r["objective"], r["scale"]) == (*key, scale)]
            cells.append(f"{r['drift']:.3g}" if r["finite"] and math.isfinite(r["drift"]) else "**NaN**")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- report


def summarise(results: List[Dict[str, Any]]) -> str:
    header = ("| cms_step | input scale | trained to end | first NaN step | final loss | max grad norm | "
              "val bits/byte | stream bits/byte 0-512 / 512-4K / 4K-8K / 8K-32K | the same with the CMS frozen | "
              "max drift fresh / trained | "
              "x10 / x100: finite, max drift |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        tr = r["train"]
        final = [v for v in tr["loss"][-10:] if math.isfinite(v)]
        windows = " / ".join(f"{v:.2f}" for v in r["trained_stream"]["bits_per_byte"].values())
        frozen = r.get("trained_stream_cms_frozen")
        frozen = " / ".join(f"{v:.2f}" for v in frozen["bits_per_byte"].values()) if frozen else "-"
        stress = ", ".join(f"{'yes' if s['finite'] else 'NO'} {s['max_drift']:.3g}" for s in r["stress"].values())
        lines.append(
            f"| {r['cms_step']}{r.get('tag', '')} | {r['scale']:g} | {'yes' if tr['trained_to_end'] else 'NO'} | "
            f"{tr['nan_step'] if tr['nan_step'] is not None else '-'} | "
            f"{sum(final) / len(final) if final else float('nan'):.3f} | {tr['max_grad_norm']:.3g} | "
            f"{r['validation_bpb']:.3f} | {windows} | {frozen} | {r['fresh_stream']['max_drift']:.3g} / "
            f"{r['trained_stream']['max_drift']:.3g} | {stress} |")
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({r["scale"] for r in results})
    figure, axes = plt.subplots(len(scales), 2, figsize=(11, 3.6 * len(scales)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted({r["cms_step"] + r.get("tag", "") for r in results})
    for row, scale in enumerate(scales):
        for col, key in enumerate(("fresh_stream", "trained_stream")):
            axis = axes[row][col]
            for r in results:
                if r["scale"] != scale:
                    continue
                name = r["cms_step"] + r.get("tag", "")
                s = r[key]
                worst = [max(d.values()) if d else float("nan") for d in s["drift"]]
                worst = [w if math.isfinite(w) else float("nan") for w in worst]
                axis.plot(s["positions"], worst, label=name, color=colours[names.index(name) % len(colours)])
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel("stream position (tokens)")
            axis.set_ylabel("max over levels of ‖θ_c − θ_0‖ / ‖θ_0‖")
            axis.set_title(f"{'fresh' if col == 0 else 'trained'} model, CMS input x{scale:g}")
            axis.grid(alpha=0.3, which="both")
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.op_stress:
        rows = op_stress(args.steps_list.split(","), args.seed)
        (out / "op_stress.json").write_text(json.dumps(rows, indent=1))
        (out / "op_stress.md").write_text(op_stress_table(rows) + "\n")
        print(op_stress_table(rows))
        return rows
    data = corpus(args.seq_len)
    results = []
    for step in args.steps_list.split(","):
        for scale in (float(s) for s in args.scales.split(",")):
            path = out / f"{run_name(step, scale, args)}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
                continue
            print(f"== cms_step={step}{args.tag} input x{scale:g} seed {args.seed}", flush=True)
            result = run_one(step, scale, args, data)
            result["tag"] = args.tag
            path.write_text(json.dumps(result))
            results.append(result)
            print(summarise([result]).splitlines()[-1], flush=True)
    every = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*.json"))]
    (out / "summary.md").write_text(summarise(every) + "\n")
    plot(every, out / "drift.png")
    print(summarise(every))
    return results


if __name__ == "__main__":
    main()
