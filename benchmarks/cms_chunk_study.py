"""Which CMS chunk sizes (SPEC §3 cost model, issue #13 part 2): MQAR, forgetting and bits per byte at CPU scale
for several level sets, on streams long enough for the slowest level to update (T >= 4x its chunk).

The README's CPU comparisons use rows of 32 (MQAR) and 72 (forgetting) tokens, in which a level of chunk 128 or
more never updates. Here every row is a stream of `--seq_len` tokens (default 8192 = 4 x 2048):

* MQAR: independent MQAR instances (2, 4 and 8 pairs of 16 keys and 16 values, `hope.evals.mqar`, pads
  stripped), one separator token (0) between them, packed until the row is full (about 400 instances);
* forgetting: independent forgetting streams (4 segments x 2 facts, taught twice, `hope.evals.forgetting`),
  packed the same way (about 110 per row);
* language: Python's help topics as bytes (topics split 80/20), blocks of `--seq_len`.

Nothing in an instance needs an earlier one, so what a slow level learns across instances can only be the task's
format and statistics; what each level costs in recall of the instance at hand is what the task scores show.
Every level set trains the same model (the README's CPU shape: hidden 64, 2 layers, 2 heads, Titans chunk 16)
with its CMS width solved for the Transformer++ budget, with AdamW (lr 3e-3, cosine, 5% warm-up, clip 1) for
`--steps` steps of `--batch_size` rows, and is scored on rows of another seed: MQAR accuracy by pairs, forgetting
recall by age, validation bits per byte, each also by position in the row (does a late instance, read after the
slow levels have updated many times, fare better or worse than an early one?).

One JSON per (level set, task, seed) under --output_dir (reruns skip what exists), then summary.md and
chunk_study.png. Example (the figures in docs/cms/):

    PYTHONPATH=. python benchmarks/cms_chunk_study.py --output_dir docs/cms/chunk_study
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

TASKS = ("mqar", "forgetting", "lm")
DEFAULT_LEVEL_SETS = "16,128,None;128,512,None;512,2048,None;None,None,None"
POSITION_BUCKETS = (0, 512, 2048, 8192, 1 << 30)


def parse_level_sets(text: str) -> List[List[Optional[int]]]:
    sets = []
    for part in text.split(";"):
        sets.append([None if v.strip() == "None" else int(v) for v in part.split(",")])
    return sets


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--level_sets", default=DEFAULT_LEVEL_SETS, help="';'-separated cms_chunk_sizes lists")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--eval_rows", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--chunk_size", type=int, default=16, help="Titans chunk")
    parser.add_argument("--config_overrides", default="", help="JSON object of further HopeConfig fields")
    parser.add_argument("--output_dir", default="runs/cms_chunk_study")
    args = parser.parse_args(argv)
    args.level_sets = parse_level_sets(args.level_sets)
    args.tasks = args.tasks.split(",")
    if args.seq_len < 32:  # task_rows' MQAR draw (~20 tokens an instance, 12 counted) needs rows this long
        parser.error(f"--seq_len {args.seq_len} is below 32")
    for levels in args.level_sets:
        largest = max((c for c in levels if c), default=0)
        if args.seq_len < 4 * largest:
            parser.error(f"--seq_len {args.seq_len} is shorter than 4x the largest chunk {largest} of {levels}")
    return args


# --------------------------------------------------------------------------------------------- data


def pack(instances: List[Dict[str, list]], seq_len: int, rows: int) -> Dict[str, torch.Tensor]:
    """Concatenate instances ("input_ids", "labels", "tag": a per-position int, -1 unlabelled) with one separator 0
    between them into `rows` rows of seq_len tokens (the last instance of a row is cut; its cut labels dropped)."""
    ids = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.full((rows, seq_len), -100, dtype=torch.long)
    tags = torch.full((rows, seq_len), -1, dtype=torch.long)
    source = iter(instances)  # task_rows draws enough (each row takes its whole instances and one cut one)
    for row in range(rows):
        position = 0
        while position < seq_len:
            instance = next(source)
            n = min(len(instance["input_ids"]), seq_len - position)
            ids[row, position : position + n] = torch.tensor(instance["input_ids"][:n])
            labels[row, position : position + n] = torch.tensor(instance["labels"][:n])
            tags[row, position : position + n] = torch.tensor(instance["tag"][:n])
            position += n + 1  # the separator stays 0 with no label
    return {"input_ids": ids, "labels": labels, "tag": tags}


def task_rows(task: str, rows: int, seq_len: int, seed: int) -> tuple[Dict[str, torch.Tensor], int]:
    """(packed rows, vocab size) of MQAR or forgetting instances drawn with `seed`."""
    if task == "mqar":
        from hope.evals.mqar import MQARTask, generate_mqar

        settings = [MQARTask(num_pairs=p, num_keys=16, num_values=16, seq_len=32) for p in (2, 4, 8)]
        per_setting = rows * seq_len // (3 * 12) + 8  # the shortest instance (2 pairs) has 8 tokens + separator
        parts = [generate_mqar(t, per_setting, seed + 1000 * i) for i, t in enumerate(settings)]
        order = torch.randperm(3 * per_setting, generator=torch.Generator().manual_seed(seed))
        instances = []
        for index in order.tolist():
            part, k = parts[index % 3], index // 3
            length = 4 * settings[index % 3].num_pairs  # pairs, then as many queries: no pads
            labels = part[k]["labels"][:length]
            instances.append({"input_ids": part[k]["input_ids"][:length], "labels": labels,
                              "tag": [settings[index % 3].num_pairs if v != -100 else -1 for v in labels]})
        return pack(instances, seq_len, rows), settings[0].vocab_size
    from hope.evals.forgetting import ForgettingTask, generate_stream

    setting = ForgettingTask(num_segments=4, pairs_per_segment=2, num_keys=16, num_values=16, repeats=2)
    # a row holds seq_len // (length + 1) whole streams and the cut start of one more
    streams = generate_stream(setting, rows * (seq_len // (setting.seq_len + 1) + 1), seed)
    instances = [{"input_ids": s["input_ids"], "labels": s["labels"], "tag": s["age"]} for s in streams]
    return pack(instances, seq_len, rows), setting.vocab_size


def lm_rows(seq_len: int) -> tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], int]:
    """(train blocks, validation blocks, vocab size) of Python's help topics as ByT5 bytes, topics split 80/20;
    EOS separates topics and is not a target."""
    from transformers import ByT5Tokenizer

    from hope.data import load_topics, split_topics

    tokenizer = ByT5Tokenizer()
    topics = load_topics()
    splits = []
    for names in split_topics(topics, validation_fraction=0.2):
        stream: List[int] = []
        for name in names:
            stream += tokenizer(topics[name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
        labels = ids.masked_fill(ids == tokenizer.eos_token_id, -100)
        splits.append({"input_ids": ids, "labels": labels, "tag": (labels != -100).long() - 1})
    return splits[0], splits[1], len(tokenizer)


# --------------------------------------------------------------------------------------------- model


def make_config(levels: List[Optional[int]], vocab_size: int, args):
    from hope.presets import matched_hope_config

    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    return matched_hope_config(multiple=8, vocab_size=vocab_size, hidden_size=args.hidden_size,
                               num_hidden_layers=args.num_layers, num_heads=args.num_heads,
                               chunk_size=args.chunk_size, cms_chunk_sizes=list(levels),
                               max_position_embeddings=args.seq_len, pad_token_id=0, bos_token_id=None,
                               eos_token_id=None, tie_word_embeddings=True, **overrides)


def train(model, data: Dict[str, torch.Tensor], args) -> Dict[str, Any]:
    """AdamW (betas 0.9/0.95, wd 0.01), cosine with 5% warm-up, clipping at 1, rows drawn with the seed; stops at
    the first non-finite loss or gradient norm."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (
        1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup))))
    losses, grad_norms, nan_step = [], [], None
    model.train()
    for step in tqdm(range(args.steps), desc="train", mininterval=60):
        index = torch.randint(len(data["input_ids"]), (args.batch_size,), generator=generator)
        loss = model(input_ids=data["input_ids"][index], labels=data["labels"][index]).loss
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
    return {"loss": losses, "grad_norm": grad_norms, "nan_step": nan_step, "trained_to_end": nan_step is None}


@torch.no_grad()
def score(model, data: Dict[str, torch.Tensor], batch_size: int = 2) -> Dict[str, Any]:
    """Per labelled position: correct (greedy) and the loss; grouped by tag and by position bucket."""
    model.eval()
    correct, nll, tags, positions = [], [], [], []
    for start in range(0, len(data["input_ids"]), batch_size):
        ids = data["input_ids"][start : start + batch_size]
        labels, tag = data["labels"][start : start + batch_size], data["tag"][start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target, keep = labels[:, 1:], labels[:, 1:] != -100
        loss = F.cross_entropy(logits.flatten(0, 1), target.clamp_min(0).flatten(), reduction="none")
        where = keep.nonzero()
        correct.append((logits.argmax(-1) == target)[keep])
        nll.append(loss.view_as(target)[keep])
        tags.append(tag[:, 1:][keep])
        positions.append(where[:, 1] + 1)
    correct, nll, tags, positions = (torch.cat(x) for x in (correct, nll, tags, positions))
    by_tag = {int(t): float(correct[tags == t].float().mean()) for t in tags.unique().tolist()}
    by_position = {}
    for lo, hi in zip(POSITION_BUCKETS, POSITION_BUCKETS[1:]):
        inside = (positions >= lo) & (positions < hi)
        if inside.any():
            by_position[f"{lo}-{min(hi, int(positions.max()) + 1)}"] = {
                "accuracy": float(correct[inside].float().mean()),
                "bits_per_token": float(nll[inside].mean()) / math.log(2)}
    return {"accuracy": float(correct.float().mean()), "bits_per_token": float(nll.mean()) / math.log(2),
            "by_tag": by_tag, "by_position": by_position, "labelled": int(len(correct))}


def run_one(levels: List[Optional[int]], task: str, args) -> Dict[str, Any]:
    from hope import HopeForCausalLM

    if task == "lm":
        train_data, eval_data, vocab = lm_rows(args.seq_len)
    else:
        rows = args.steps * args.batch_size
        train_data, vocab = task_rows(task, min(rows, 512), args.seq_len, args.seed)
        eval_data, _ = task_rows(task, args.eval_rows, args.seq_len, args.seed + 1)
    config = make_config(levels, vocab, args)
    torch.manual_seed(args.seed)
    model = HopeForCausalLM(config)
    started = time.perf_counter()
    result: Dict[str, Any] = {"cms_chunk_sizes": levels, "task": task, "seed": args.seed, "steps": args.steps,
                              "batch_size": args.batch_size, "seq_len": args.seq_len,
                              "cms_hidden_size": config.cms_hidden_size, "cms_step": config.cms_step,
                              "parameters": sum(p.numel() for p in model.parameters())}
    result["train"] = train(model, train_data, args)
    result["eval"] = score(model, eval_data)
    result["seconds"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------- report


def label(levels) -> str:
    return "[" + ", ".join(str(c) for c in levels) + "]"


def summarise(results: List[Dict[str, Any]]) -> str:
    lines = ["| cms_chunk_sizes | task | seed | parameters | trained to end | final train loss | score | "
             "by setting | by position in the row |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["task"], str(r["cms_chunk_sizes"]), r["seed"])):
        e, tr = r["eval"], r["train"]
        final = [v for v in tr["loss"][-20:] if math.isfinite(v)]
        if r["task"] == "lm":
            main = f"{e['bits_per_token']:.3f} bits/byte"
            by_tag = "-"
            by_pos = ", ".join(f"{k}: {v['bits_per_token']:.3f}" for k, v in e["by_position"].items())
        else:
            main = f"{e['accuracy']:.3f} accuracy"
            name = "pairs" if r["task"] == "mqar" else "age"
            tags = sorted(e["by_tag"].items(), key=lambda kv: int(kv[0]))
            by_tag = ", ".join(f"{name} {k}: {v:.3f}" for k, v in tags)
            by_pos = ", ".join(f"{k}: {v['accuracy']:.3f}" for k, v in e["by_position"].items())
        lines.append(f"| {label(r['cms_chunk_sizes'])} | {r['task']} | {r['seed']} | {r['parameters']:,} | "
                     f"{'yes' if tr['trained_to_end'] else 'NO (step %s)' % tr['nan_step']} | "
                     f"{sum(final) / len(final) if final else float('nan'):.3f} | {main} | {by_tag} | {by_pos} |")
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    sets = sorted({label(r["cms_chunk_sizes"]) for r in results})
    colour = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(sets)}  # one colour a level set, a style a seed
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for r in sorted((r for r in results if r["task"] == task), key=lambda r: (label(r["cms_chunk_sizes"]),
                                                                                  r["seed"])):
            buckets = r["eval"]["by_position"]
            key = "bits_per_token" if task == "lm" else "accuracy"
            axis.plot(range(len(buckets)), [v[key] for v in buckets.values()], "o" + "-:--"[r["seed"] % 3],
                      color=colour[label(r["cms_chunk_sizes"])],
                      label=f"{label(r['cms_chunk_sizes'])} seed {r['seed']}")
            axis.set_xticks(range(len(buckets)), list(buckets), rotation=20, fontsize=8)
        axis.set_xlabel("position in the row (tokens)")
        axis.set_ylabel("validation bits per byte" if task == "lm" else "accuracy")
        axis.set_title({"mqar": "packed MQAR", "forgetting": "packed forgetting", "lm": "pydoc bytes"}[task])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        for levels in args.level_sets:
            name = "-".join(str(c) for c in levels)
            path = out / f"{task}_{name}_seed{args.seed}.json"
            if path.exists():
                continue
            print(f"== {task}, cms_chunk_sizes={label(levels)}, seed {args.seed}", flush=True)
            result = run_one(levels, task, args)
            path.write_text(json.dumps(result))
            print(summarise([result]).splitlines()[-1], flush=True)
    every = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*.json"))]
    (out / "summary.md").write_text(summarise(every) + "\n")
    plot(every, out / "chunk_study.png")
    print(summarise(every))
    return every


if __name__ == "__main__":
    main()
