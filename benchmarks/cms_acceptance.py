"""The CMS v2 acceptance runs (issue #13): `hope-eval --task <task> --compare --steps 4000` at the README's CPU
settings, for several seeds, with no per-run tuning; then one table, JSON and plot of them all.

    PYTHONPATH=. python benchmarks/cms_acceptance.py --tasks forgetting,mqar --seeds 0,1,2 \\
        --runs_dir runs/acceptance --output docs/cms/acceptance

Each run is exactly `hope-eval --task T --compare --steps 4000 --seed S --output_dir RUNS/T_seedS` (runs whose
results.json exists are skipped). "Trained to the end" is checked on the saved checkpoint: a step with a
non-finite gradient leaves NaN weights behind (AdamW turns a NaN gradient into NaN parameters), so a model
trained to the end has finite weights and a finite loss on its training rows.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tasks", default="forgetting,mqar")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--runs_dir", default="runs/acceptance")
    parser.add_argument("--output", default="docs/cms/acceptance", help="prefix of the .json, .md and .png")
    parser.add_argument("--collect_only", action="store_true", help="only gather the runs that exist")
    return parser.parse_args(argv)


def health(checkpoint: Path, task: str, seed: int) -> Dict[str, Any]:
    """Whether the saved model's weights are all finite, and its mean loss on 64 fresh training-like rows."""
    from transformers import AutoModelForCausalLM

    import hope  # noqa: F401  (Auto classes)
    from hope.eval import parse_args as eval_args
    from hope.eval import train_rows
    from hope.evals.common import evaluate_loss

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    args = eval_args(["--task", task, "--compare", "--steps", "2", "--train_batch_size", "32", "--seed", str(seed)])
    rows, _, _ = train_rows(args)
    loss = evaluate_loss(model, rows.select(range(64)), batch_size=32)
    return {"finite_weights": finite, "train_rows_loss": loss,
            "trained_to_end": finite and math.isfinite(loss)}


def collect(args) -> List[Dict[str, Any]]:
    runs = []
    for task in args.tasks.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            directory = Path(args.runs_dir) / f"{task}_seed{seed}"
            path = directory / "results.json"
            if not path.exists():
                continue
            results = json.loads(path.read_text())
            for name, metrics in results["models"].items():
                metrics.update(health(directory / name, task, seed))
            runs.append({"task": task, "seed": seed, "results": results})
    return runs


def table(runs: List[Dict[str, Any]]) -> str:
    from hope.evals.common import MODEL_LABELS

    lines = []
    for task in sorted({r["task"] for r in runs}):
        these = [r for r in runs if r["task"] == task]
        first = these[0]["results"]["models"]["hope"]
        keys = list(first["accuracy_by_pairs"]) if task == "mqar" else list(range(len(first["recall_by_age"])))
        columns = [f"{k} pairs" for k in keys] if task == "mqar" else [f"age {k}" for k in keys] + ["mean"]
        lines += [f"**{task}**, `hope-eval --task {task} --compare --steps {these[0]['results']['args']['steps']}`",
                  "", "| model | seed | trained to end | " + " | ".join(columns) + " |",
                  "|---|---|---|" + "---|" * len(columns)]
        for name in ("hope", "hope-no-cms", "transformer"):
            for r in these:
                m = r["results"]["models"].get(name)
                if m is None:
                    continue
                values = ([m["accuracy_by_pairs"][k] for k in keys] if task == "mqar"
                          else m["recall_by_age"] + [m["mean_recall"]])
                lines.append(f"| {MODEL_LABELS[name]} | {r['seed']} | {'yes' if m['trained_to_end'] else 'NO'} | "
                             + " | ".join(f"{v:.3f}" for v in values) + " |")
            ok = [r["results"]["models"][name] for r in these if name in r["results"]["models"]]
            if len(ok) > 1:
                values = [[m["accuracy_by_pairs"][k] for k in keys] if task == "mqar"
                          else m["recall_by_age"] + [m["mean_recall"]] for m in ok]
                means = [sum(v[i] for v in values) / len(values) for i in range(len(columns))]
                lines.append(f"| {MODEL_LABELS[name]} | mean of {len(ok)} | | "
                             + " | ".join(f"**{v:.3f}**" for v in means) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hope.evals.common import MODEL_LABELS

    tasks = sorted({r["task"] for r in runs})
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    colours = {"hope": "C0", "hope-no-cms": "C1", "transformer": "C2"}
    for axis, task in zip(axes[0], tasks):
        for r in (r for r in runs if r["task"] == task):
            for name, m in r["results"]["models"].items():
                if task == "mqar":
                    xs, ys = zip(*sorted((int(k), v) for k, v in m["accuracy_by_pairs"].items()))
                else:
                    xs, ys = range(len(m["recall_by_age"])), m["recall_by_age"]
                axis.plot(list(xs), list(ys), "o-", color=colours[name], alpha=0.7,
                          label=MODEL_LABELS[name] if r["seed"] == runs[0]["seed"] else None)
        axis.set_xlabel("key-value pairs in context" if task == "mqar" else "age of the fact (segments since)")
        axis.set_ylabel("recall accuracy")
        axis.set_title(f"{task}, {len([r for r in runs if r['task'] == task])} seeds")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    if not args.collect_only:
        from hope.eval import main as hope_eval

        for task in args.tasks.split(","):
            for seed in args.seeds.split(","):
                directory = Path(args.runs_dir) / f"{task}_seed{seed}"
                if (directory / "results.json").exists():
                    continue
                print(f"== hope-eval --task {task} --compare --steps {args.steps} --seed {seed}", flush=True)
                hope_eval(["--task", task, "--compare", "--steps", str(args.steps), "--seed", seed,
                           "--output_dir", str(directory)])
    runs = collect(args)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    output.with_suffix(".md").write_text(table(runs) + "\n")
    plot(runs, output.with_suffix(".png"))
    print(table(runs))
    return runs


if __name__ == "__main__":
    main()
