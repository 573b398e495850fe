"""`hope-eval` (also `python -m hope.eval`): evaluate a checkpoint, or run the synthetic comparisons.

    hope-eval --model runs/small --data held_out.jsonl             # loss, perplexity, bits per byte
    hope-eval --model runs/mqar/hope --task mqar                    # a checkpoint's MQAR accuracy
    hope-eval --model runs/forgetting/hope --task forgetting        # a checkpoint's recall by age
    hope-eval --task mqar --compare --output_dir runs/mqar          # train Hope, Hope w/o CMS, Transformer++ at one
    hope-eval --task forgetting --compare --output_dir runs/forget  #   budget on the task; table, JSON and PNG
    hope-eval --task continual --output_dir runs/continual          # tasks learned in turn: forgetting matrix

`--compare` trains the three models from scratch with the HF Trainer on freshly generated rows, evaluates them
on rows from another seed, and writes `results.json`, `results.md` and `<task>.png` plus each checkpoint under
--output_dir. Defaults are the CPU scale (minutes); `--hidden_size 512 --num_layers 8 --steps 5000 ...` is
the GPU scale. A progress bar counts the evaluated rows. Exit status: 0, 2 for bad input (one line), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

TASKS = ("lm", "mqar", "forgetting", "continual")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hope-eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--task", choices=TASKS, default="lm", help="lm (needs --data), mqar or forgetting")
    parser.add_argument("--model", help="checkpoint directory (not with --compare)")
    parser.add_argument("--compare", action="store_true", help="train and compare the three models on the task")
    parser.add_argument("--output_dir", "--output-dir", default=None, help="where --compare writes (runs/<task>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=16)
    parser.add_argument("--num_threads", "--num-threads", type=int, default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores other processes "
                             "leave idle)")
    lm = parser.add_argument_group("lm: loss on a dataset")
    lm.add_argument("--data", help="a txt/json/jsonl/parquet/csv file, glob, directory, saved dataset or hub name")
    lm.add_argument("--data_config", default=None)
    lm.add_argument("--text_column", default="text")
    lm.add_argument("--tokenizer", default=None, help="default: the checkpoint's own, else ByT5")
    lm.add_argument("--seq_len", type=int, default=1024)
    lm.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N blocks")
    lm.add_argument("--text_split", choices=["paragraph", "document", "line"], default="paragraph",
                    help="how .txt files are cut into documents (EOS after each), as in hope-train")
    synthetic = parser.add_argument_group("mqar / forgetting")
    synthetic.add_argument("--num_examples", type=int, default=256, help="evaluation rows per setting")
    synthetic.add_argument("--num_pairs", default="2,4,8", help="MQAR: comma-separated pairs per setting")
    synthetic.add_argument("--num_keys", type=int, default=16, help="MQAR and forgetting: key vocabulary")
    synthetic.add_argument("--num_values", type=int, default=16, help="MQAR and forgetting: value vocabulary")
    synthetic.add_argument("--mqar_seq_len", type=int, default=32, help="MQAR: row length")
    synthetic.add_argument("--num_segments", type=int, default=4, help="forgetting: segments per stream")
    synthetic.add_argument("--pairs_per_segment", type=int, default=2, help="forgetting: facts per segment")
    synthetic.add_argument("--repeats", type=int, default=2, help="forgetting: times each fact is taught")
    compare = parser.add_argument_group("--compare: the models and their training")
    compare.add_argument("--hidden_size", type=int, default=64)
    compare.add_argument("--num_layers", type=int, default=2)
    compare.add_argument("--num_heads", type=int, default=2)
    compare.add_argument("--chunk_size", type=int, default=16, help="Titans chunk of the Hope models")
    compare.add_argument("--steps", type=int, default=1000, help="optimizer steps per model")
    compare.add_argument("--train_batch_size", type=int, default=32)
    compare.add_argument("--learning_rate", type=float, default=3e-3)
    from hope.evals.continual import add_arguments as add_continual_arguments, check_arguments

    add_continual_arguments(parser)
    args = parser.parse_args(argv)
    if args.task == "continual":
        if args.model is not None:
            parser.error("--task continual trains its own models (no --model)")
        args.compare = True
        check_arguments(args, parser.error)
    if args.compare == (args.model is not None):
        parser.error("give either --model CHECKPOINT or --compare")
    if args.task == "lm" and (args.compare or not args.data):
        parser.error("--task lm evaluates a checkpoint on --data (and has no --compare)")
    for key in ("batch_size", "num_examples", "steps", "train_batch_size", "seq_len", "hidden_size", "num_layers",
                "num_heads", "chunk_size", "num_segments", "pairs_per_segment", "mqar_seq_len", "num_keys", "num_values",
                "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be a positive integer, got {getattr(args, key)}")
    if args.seq_len < 2:
        parser.error(f"--seq_len must be at least 2 (a block predicts its tokens 1..T-1), got {args.seq_len}")
    for key in ("max_eval_samples", "num_threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key} must be a positive integer, got {getattr(args, key)}")
    try:
        args.num_pairs = [int(value) for value in args.num_pairs.split(",") if value.strip()]
    except ValueError:
        parser.error(f"--num_pairs must be comma-separated integers, got {args.num_pairs!r}")
    args.output_dir = Path(args.output_dir or Path("runs") / args.task)
    return args


# --------------------------------------------------------------------------------------------- tasks


def mqar_tasks(args: argparse.Namespace):
    from hope.evals.mqar import MQARTask

    return [MQARTask(num_pairs=pairs, num_keys=args.num_keys, num_values=args.num_values, seq_len=args.mqar_seq_len)
            for pairs in args.num_pairs]


def forgetting_task(args: argparse.Namespace):
    from hope.evals.forgetting import ForgettingTask

    return ForgettingTask(num_segments=args.num_segments, pairs_per_segment=args.pairs_per_segment,
                          num_keys=args.num_keys, num_values=args.num_values, repeats=args.repeats)


def evaluate_task(model, args: argparse.Namespace) -> Dict[str, Any]:
    """MQAR accuracy per number of pairs, or forgetting recall per age, of one model on rows of seed + 1."""
    from hope.evals.forgetting import generate_stream, recall_by_age
    from hope.evals.mqar import generate_mqar, mqar_accuracy

    if args.task == "mqar":
        tasks = mqar_tasks(args)
        needed = tasks[0].vocab_size
        check_vocab(model, needed)
        return {"accuracy_by_pairs": {task.num_pairs: mqar_accuracy(model, generate_mqar(task, args.num_examples,
                                                                                         args.seed + 1),
                                                                    args.batch_size, progress=True)
                                      for task in tasks}}
    task = forgetting_task(args)
    check_vocab(model, task.vocab_size)
    recall = recall_by_age(model, generate_stream(task, args.num_examples, args.seed + 1), task.num_segments,
                           args.batch_size, progress=True)
    return {"recall_by_age": recall, "mean_recall": sum(recall) / len(recall)}


def check_vocab(model, needed: int) -> None:
    from hope.train import UsageError

    if model.config.vocab_size < needed:
        raise UsageError(f"the task uses {needed} token ids but the model's vocab_size is {model.config.vocab_size}")


def train_rows(args: argparse.Namespace):
    """Training rows for --compare: enough fresh rows (seed) for every step to see new ones."""
    from hope.evals.forgetting import generate_stream
    from hope.evals.mqar import generate_mixture

    rows = args.steps * args.train_batch_size
    if args.task == "mqar":
        tasks = mqar_tasks(args)
        return generate_mixture(tasks, math.ceil(rows / len(tasks)), args.seed), tasks[0].vocab_size, args.mqar_seq_len
    task = forgetting_task(args)
    return (generate_stream(task, rows, args.seed).select_columns(["input_ids", "labels"]), task.vocab_size,
            task.seq_len)


def compare(args: argparse.Namespace) -> Dict[str, Any]:
    """Train the three models on the task and evaluate each; write results.json, results.md and the PNG."""
    if args.task == "continual":  # its own methods and outputs (hope/evals/continual.py)
        from hope.evals.continual import run as run_continual

        return run_continual(args)
    from hope.evals.common import MODEL_LABELS, ModelShape, comparison_configs, train_on_task

    args.output_dir.mkdir(parents=True, exist_ok=True)
    train, vocab_size, seq_len = train_rows(args)
    shape = ModelShape(args.hidden_size, args.num_layers, args.num_heads, args.chunk_size)
    configs = comparison_configs(vocab_size, shape, max_position_embeddings=max(seq_len, 512))
    results: Dict[str, Any] = {"task": args.task, "args": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()}, "models": {}}
    for name, config in configs.items():
        started = time.perf_counter()
        print(f"\n== {MODEL_LABELS[name]} on {args.task}: {args.steps} steps of {args.train_batch_size} rows",
              flush=True)
        model = train_on_task(config, train, steps=args.steps, batch_size=args.train_batch_size,
                              learning_rate=args.learning_rate, seed=args.seed,
                              output_dir=args.output_dir / name / "trainer")
        metrics = evaluate_task(model, args)
        metrics["parameters"] = sum(p.numel() for p in model.parameters())
        metrics["train_seconds"] = time.perf_counter() - started
        model.save_pretrained(args.output_dir / name)
        results["models"][name] = metrics
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (args.output_dir / "results.md").write_text(table + "\n")
    plot(results, args.output_dir / f"{args.task}.png")
    print("\n" + table)
    print(f"\nresults: {args.output_dir / 'results.json'}, {args.output_dir / 'results.md'}, "
          f"{args.output_dir / (args.task + '.png')}; checkpoints: {args.output_dir}/<model>")
    return results


def format_table(results: Dict[str, Any]) -> str:
    """A markdown table: one row per model; MQAR accuracy per number of pairs, or recall per age."""
    from hope.evals.common import MODEL_LABELS

    models = results["models"]
    if results["task"] == "mqar":
        keys = list(next(iter(models.values()))["accuracy_by_pairs"])
        header = ["model", "parameters"] + [f"{key} pairs" for key in keys]
        rows = [[MODEL_LABELS[n], f"{m['parameters']:,}"] + [f"{m['accuracy_by_pairs'][k]:.3f}" for k in keys]
                for n, m in models.items()]
    else:
        ages = len(next(iter(models.values()))["recall_by_age"])
        header = ["model", "parameters"] + [f"age {age}" for age in range(ages)] + ["mean"]
        rows = [[MODEL_LABELS[n], f"{m['parameters']:,}"] + [f"{r:.3f}" for r in m["recall_by_age"]] +
                [f"{m['mean_recall']:.3f}"] for n, m in models.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(results: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from hope.evals.common import MODEL_LABELS

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, metrics in results["models"].items():
        if results["task"] == "mqar":
            xs, ys = zip(*sorted((int(k), v) for k, v in metrics["accuracy_by_pairs"].items()))
        else:
            xs, ys = range(len(metrics["recall_by_age"])), metrics["recall_by_age"]
        axis.plot(list(xs), list(ys), "o-", label=f"{MODEL_LABELS[name]} ({metrics['parameters']:,} params)")
    if results["task"] == "mqar":
        axis.set_xlabel("key-value pairs in context")
        axis.set_ylabel("recall accuracy")
        axis.set_title("MQAR")
    else:
        axis.set_xlabel("age of the fact (segments taught since)")
        axis.set_ylabel("recall accuracy")
        axis.set_title("Forgetting within a stream")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def evaluate_lm(args: argparse.Namespace) -> Dict[str, Any]:
    """Loss, perplexity and bits per byte of a checkpoint on --data (blocks of --seq_len, EOS a target)."""
    from hope.data import load_text_dataset, pack_for_training
    from hope.evals.common import evaluate_loss
    from hope.train import bits_per_byte_factor, load_tokenizer

    model = load_checkpoint(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    check_vocab(model, len(tokenizer))
    raw = load_text_dataset(args.data, config=args.data_config, text_column=args.text_column,
                            text_split=args.text_split)
    blocks = pack_for_training(raw, tokenizer, args.seq_len, args.text_column, args.max_eval_samples, name=args.data)
    print(f"hope-eval: {args.model} on {args.data}: {len(blocks):,} blocks of {args.seq_len} tokens; {args.threads}",
          file=sys.stderr, flush=True)
    loss = evaluate_loss(model, blocks, args.batch_size, progress=True)
    factor = bits_per_byte_factor(raw, tokenizer, args.text_column)
    metrics = {"loss": loss, "perplexity": math.exp(loss) if loss < 50 else float("inf"), "blocks": len(blocks),
               "bits_per_byte": loss / math.log(2) * factor if factor else None}
    print(json.dumps(metrics, indent=2))
    return metrics


def load_checkpoint(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    import hope  # noqa: F401  (Auto classes)
    from hope.train import UsageError

    if not Path(path).exists():
        raise UsageError(f"--model {path!r}: no such checkpoint directory")
    if not Path(path, "config.json").is_file():
        raise UsageError(f"--model {path!r} is not a checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def run_command(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """What `hope-eval ARGS` does, returning the metrics (or the --compare results) rather than an exit status.
    Bad input prints one line (`hope-eval: error: ...`) and raises SystemExit(2)."""
    import torch

    from hope.data import DataError
    from hope.runtime import configure_threads, describe_threads
    from hope.train import UsageError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads_before = torch.get_num_threads()
    try:
        try:
            threads = configure_threads(args.num_threads)
        except ValueError as error:  # a bad OMP_NUM_THREADS
            raise UsageError(str(error)) from None
        args.threads = describe_threads(threads, args.num_threads)
        if args.compare:
            print(f"hope-eval: {args.threads}", file=sys.stderr, flush=True)
            return compare(args)
        if args.task == "lm":
            return evaluate_lm(args)
        model = load_checkpoint(args.model)
        print(f"hope-eval: {args.model} on {args.task}; {args.threads}", file=sys.stderr, flush=True)
        metrics = evaluate_task(model, args)
        print(json.dumps(metrics, indent=2))
        return metrics
    except (UsageError, DataError, FileNotFoundError) as error:
        print(f"hope-eval: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        torch.set_num_threads(threads_before)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of `hope-eval`: exit status 0 on success, 2 for bad input, 130 after Ctrl-C."""
    try:
        run_command(argv)
    except KeyboardInterrupt:
        print("\nhope-eval: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
