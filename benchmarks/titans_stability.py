"""Stability figures of the Titans memory (SPEC §2 v2, "Stability figures", a release criterion).

From a fresh `small` model and from the same model after `--train-steps` steps on the pydoc corpus, read a stream
of real text (Python's help topics, repeated) out to `--max-tokens` tokens through the recurrent cache and record,
per layer, the read norm ||o_t - q_t|| (what the memory adds to the residual read, averaged over the heads and
the tokens of each 512-token segment) and the state norm ||Z_t|| (Frobenius, over every fast weight of the layer:
Z for the linear memory; the generating memories, W1 and W2 for the deep one), at T = 512, 1K, 2K, ... The
criterion: every value finite and within a factor 100 of its value at T = 512, in fp32 and under bf16 autocast,
for the default config and for memory_depth=2.

    python benchmarks/titans_stability.py --out-dir docs/stability            # the figures in the README
    python benchmarks/titans_stability.py --eta-max 0.5 --max-tokens 8192     # a quick probe of another eta_max

Writes titans_stability.json, titans_stability.md and titans_stability.png to --out-dir. Deterministic under
--seed. Not a test: about 10-20 minutes on 2 CPU cores at the defaults.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import hope
import hope.layers.titans_mixer as titans_mixer
from hope.data import load_topics, split_topics
from hope_kernels.deep_titans import DeepTitansState

CHECKPOINTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
SEGMENT = 512
FACTOR = 100.0


def corpus_ids(tokenizer, names: Sequence[str], topics: dict, length: Optional[int] = None) -> torch.Tensor:
    """The topics' text as byte tokens, (N,) int64; repeated (or cut) to `length` tokens when given."""
    text = "\n\n".join(topics[name] for name in names)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return ids if length is None else ids.repeat(math.ceil(length / len(ids)))[:length]


class ReadProbe:
    """Records ||o_t - q_t|| of every Titans op call (the model calls the ops by their module-level names)."""

    def __init__(self):
        self.sums: list[float] = []
        self._originals = {}

    def __enter__(self):
        for name in ("titans_memory", "titans_deep_memory"):
            original = getattr(titans_mixer, name)
            self._originals[name] = original

            def wrapped(q, a, *args, _original=original, **kwargs):
                o, state = _original(q, a, *args, **kwargs)
                self.sums.append((o.float() - q.float()).norm(dim=-1).mean().item())  # mean over (B, T, H)
                return o, state

            setattr(titans_mixer, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(titans_mixer, name, original)


def state_norm(memory) -> float:
    """Frobenius norm of every current fast weight of one layer's Titans state."""
    parts = (memory.z, memory.w1, memory.w2) if isinstance(memory, DeepTitansState) else (memory.z,)
    return math.sqrt(sum(float(p.float().square().sum()) for p in parts))


@torch.no_grad()
def probe_stream(model, ids: torch.Tensor, autocast: Optional[torch.dtype], desc: str) -> dict:
    """Read `ids` in segments of 512 tokens with the cache; per checkpoint and layer, the read and state norms."""
    model.eval()
    layers = model.config.num_hidden_layers
    cache = None
    rows = {"tokens": [], "read": [], "state": []}
    with ReadProbe() as probe:
        for start in tqdm(range(0, len(ids), SEGMENT), desc=desc, leave=False):
            probe.sums.clear()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                out = model(ids[None, start : start + SEGMENT], cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
            end = start + SEGMENT
            if end in CHECKPOINTS or end == len(ids):
                rows["tokens"].append(end)
                rows["read"].append(list(probe.sums[:layers]))
                rows["state"].append([state_norm(layer.memory) for layer in cache.layers])
    return rows


def train(model, ids: torch.Tensor, steps: int, seq_len: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """A plain AdamW loop with warmup and cosine decay on random windows of `ids`; returns the losses."""
    if steps == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="train", leave=False):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {len(losses)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def verdict(rows: dict) -> dict:
    """Finite everywhere, and every layer's values within FACTOR of their value at the first checkpoint."""
    out = {}
    for key in ("read", "state"):
        values = torch.tensor(rows[key], dtype=torch.float64)  # (checkpoints, layers)
        finite = bool(torch.isfinite(values).all())
        ratio = (values / values[:1]).clamp_min(1e-300)
        worst = float(torch.maximum(ratio.max(), 1 / ratio.min())) if finite else math.inf
        out[key] = dict(finite=finite, worst_factor=worst, ok=finite and worst <= FACTOR)
    return out


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in results:
        rows = run["rows"]
        label = f"{run['model']}, {run['stage']}, {run['dtype']}"
        for ax, key in zip(axes, ("read", "state")):
            values = torch.tensor(rows[key], dtype=torch.float64).mean(1)  # mean over layers
            ax.plot(rows["tokens"], values.tolist(), marker="o", label=label)
    for ax, title in zip(axes, ("read norm ||o_t - q_t|| (mean over layers)", "state norm ||Z_t|| (mean over layers)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens read")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: list, args) -> str:
    lines = [f"# Titans memory stability (SPEC §2 v2), `small` preset, eta_max = {args.eta_max}",
             "",
             f"Seed {args.seed}; stream: pydoc topics repeated, read in {SEGMENT}-token segments through the cache; "
             f"trained = {args.train_steps} AdamW steps (lr {args.lr}, T = {args.seq_len}, B = {args.batch_size}). "
             f"Values: mean over layers; worst = the largest factor (up or down) of any layer against T = 512.",
             "",
             "| model | stage | dtype | " + " | ".join(f"read@{t}" for t in results[0]["rows"]["tokens"])
             + " | " + " | ".join(f"state@{t}" for t in results[0]["rows"]["tokens"]) + " | worst read | worst state | ok |",
             "|" + "---|" * (4 + 2 * len(results[0]["rows"]["tokens"]) + 2)]
    for run in results:
        rows = run["rows"]
        read = torch.tensor(rows["read"], dtype=torch.float64).mean(1).tolist()
        state = torch.tensor(rows["state"], dtype=torch.float64).mean(1).tolist()
        v = run["verdict"]
        lines.append(f"| {run['model']} | {run['stage']} | {run['dtype']} | "
                     + " | ".join(f"{x:.3g}" for x in read) + " | " + " | ".join(f"{x:.3g}" for x in state)
                     + f" | {v['read']['worst_factor']:.3g} | {v['state']['worst_factor']:.3g} | "
                     + ("yes" if v["read"]["ok"] and v["state"]["ok"] else "**no**") + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/stability"))
    parser.add_argument("--max-tokens", type=int, default=CHECKPOINTS[-1])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eta-max", type=float, default=hope.HopeConfig().eta_max)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.max_tokens % SEGMENT:
        parser.error(f"--max-tokens must be a multiple of {SEGMENT}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    topics = load_topics()
    train_names, held_out = split_topics(topics)
    stream = corpus_ids(tokenizer, held_out, topics, args.max_tokens)
    train_ids = corpus_ids(tokenizer, train_names, topics)
    results = []
    started = time.time()
    for depth in args.depths:
        torch.manual_seed(args.seed)
        config = hope.get_preset("small", memory_depth=depth, eta_max=args.eta_max, kernel_backend="torch")
        model = hope.HopeForCausalLM(config)
        name = "default" if depth == 1 else "memory_depth=2"
        for stage in ("fresh", "trained"):
            if stage == "trained":
                if args.train_steps == 0:
                    continue
                losses = train(model, train_ids, args.train_steps, args.seq_len, args.batch_size, args.lr, args.seed)
                print(f"{name}: trained {args.train_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
            for dtype in args.dtypes:
                rows = probe_stream(model, stream, torch.bfloat16 if dtype == "bf16" else None, f"{name} {stage} {dtype}")
                run = dict(model=name, stage=stage, dtype=dtype, rows=rows, verdict=verdict(rows))
                results.append(run)
                v = run["verdict"]
                print(f"{name:>15} {stage:>7} {dtype}: worst read factor {v['read']['worst_factor']:.3g}, "
                      f"worst state factor {v['state']['worst_factor']:.3g}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(eta_max=args.eta_max, seed=args.seed, train_steps=args.train_steps, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - started), factor=FACTOR)
    (args.out_dir / "titans_stability.json").write_text(json.dumps(dict(meta=meta, runs=results), indent=1))
    (args.out_dir / "titans_stability.md").write_text(markdown(results, args))
    plot(results, args.out_dir / "titans_stability.png")
    ok = all(r["verdict"]["read"]["ok"] and r["verdict"]["state"]["ok"] for r in results)
    print(f"wrote {args.out_dir}/titans_stability.{{json,md,png}}; criterion {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
