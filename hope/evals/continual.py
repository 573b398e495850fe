"""Continual learning across tasks whose knowledge conflicts (`hope-eval --task continual`).

**Tasks: synthetic languages.** Language k maps the same 16 source symbols (bytes 'a'..'p') to output symbols
('A'..'P') by its own random permutation f_k, drawn from the seed. A row of language k is its marker byte
('0', '1', ...) followed by `pairs_per_row` distinct symbols, each followed by its output:

    "2" "c" f_2(c) "k" f_2(k) "a" f_2(a) ...          (byte tokens, ByT5 ids = byte + 3)

Only the outputs are labelled, and the symbols of a row are distinct, so an output cannot be copied from the
row: it is knowledge, stored in weights. The languages share their symbols, so learning f_k overwrites what
f_1..f_{k-1} put in the same weights unless a method keeps them apart (by the marker). Accuracy on a task is the
fraction of its outputs predicted greedily, on held-out rows (another seed) of the same language; chance is 1/16.

**Base model.** Every method starts from a model trained with the HF Trainer on base data: rows of
`base_languages` other languages (markers 'q', 'r', ...: the format, and that the marker selects the mapping),
and, for `base_corpus_fraction` of the rows, blocks of the embedded corpus (Python's pydoc topics, bytes). The
continual phase then teaches new mappings under new markers, one task after another.

**Methods** (one parameter budget: Hope, Transformer++ and the Llama have Transformer++'s count, as in the
`--compare` evaluations; one token budget: every method reads each task's rows `epochs` times):
- `hope-online`: Hope + `hope.OnlineLearner` (each CMS level with a chunk size steps every C_l tokens on the
  LM loss, everything else frozen), reading each row as one sequence;
- `hope-attention-stacked`: a Llama trained on the base data, turned into Hope-Attention by `hope.stack_levels`
  (CMS levels from its MLPs), + `OnlineLearner`;
- `transformer-finetune`: Transformer++ fine-tuned on each task in turn with the HF Trainer (all parameters):
  the catastrophic-forgetting baseline;
- `transformer-replay`: the same with a replay buffer that keeps `replay_fraction` (5%) of every past task's
  rows and mixes them into each later task, replacing as many of its rows (same token budget);
- optional controls: `hope-finetune` (Hope fine-tuned like Transformer++: architecture without the learner) and
  `transformer-online` (OnlineLearner on Transformer++'s FFN, given period `--transformer_online_period`).

**Outputs** (per method, per seed, and mean ± std over seeds): R[i][j], the accuracy on task j after learning
task i; the base accuracies b_j; final average accuracy ACC = mean_j R[T][j]; backward transfer
BWT = mean_{j<T} (R[T][j] - R[j][j]) (negative = forgetting); forward transfer FWT = mean_{j>1} (R[j-1][j] - b_j)
(GEM, Lopez-Paz & Ranzato 2017). results.json, results.md, continual_heatmap.png, continual_lines.png.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

SYMBOLS = "abcdefghijklmnop"
OUTPUTS = "ABCDEFGHIJKLMNOP"
TASK_MARKERS = "0123456789"
BASE_MARKERS = "qrstuvwxyzQRSTUVWXYZ"
METHODS = ("hope-online", "hope-attention-stacked", "transformer-finetune", "transformer-replay", "hope-finetune",
           "transformer-online")
DEFAULT_METHODS = METHODS[:4]
METHOD_LABELS = {
    "hope-online": "Hope + OnlineLearner",
    "hope-attention-stacked": "Hope-Attention stacked on Llama + OnlineLearner",
    "transformer-finetune": "Transformer++ fine-tuned (Trainer)",
    "transformer-replay": "Transformer++ fine-tuned + 5% replay",
    "hope-finetune": "Hope fine-tuned (Trainer)",
    "transformer-online": "Transformer++ + OnlineLearner (FFN)",
}
IGNORE_INDEX = -100
BYTE_OFFSET = 3  # ByT5: ids 0-2 are pad, </s>, unk; byte b is id b + 3
VOCAB_SIZE = 384  # len(ByT5Tokenizer())


class MethodUnavailable(RuntimeError):
    """A method whose building block is not in this installation (recorded as skipped, with the reason)."""


# ------------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Language:
    """A synthetic language: its marker byte and its mapping of SYMBOLS to OUTPUTS."""

    marker: str
    mapping: Dict[str, str]


def make_languages(markers: str, seed: int, num_symbols: int) -> List[Language]:
    """One random permutation of the first `num_symbols` outputs per marker, from `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    symbols, outputs = SYMBOLS[:num_symbols], OUTPUTS[:num_symbols]
    return [Language(marker, {s: outputs[i] for s, i in zip(symbols, torch.randperm(num_symbols,
                                                                                   generator=generator).tolist())})
            for marker in markers]


def encode(text: str) -> List[int]:
    """ByT5 ids of an ASCII text (byte + 3), without the tokenizer's overhead."""
    return [byte + BYTE_OFFSET for byte in text.encode("ascii")]


def language_rows(language: Language, num_rows: int, pairs_per_row: int, seed: int):
    """`num_rows` rows of `language` as a Dataset ("input_ids", "labels": only the outputs labelled)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    symbols = sorted(language.mapping)
    rows = {"input_ids": [], "labels": []}
    for _ in range(num_rows):
        chosen = [symbols[i] for i in torch.randperm(len(symbols), generator=generator)[:pairs_per_row].tolist()]
        text = language.marker + "".join(s + language.mapping[s] for s in chosen)
        ids = encode(text)
        rows["input_ids"].append(ids)
        rows["labels"].append([IGNORE_INDEX] + [IGNORE_INDEX if i % 2 == 0 else ids[1 + i]
                                                for i in range(2 * pairs_per_row)])
    return Dataset.from_dict(rows)


def corpus_rows(num_rows: int, length: int, seed: int):
    """`num_rows` blocks of `length` bytes of the embedded corpus (pydoc topics), every byte labelled."""
    import torch
    from datasets import Dataset

    from hope.data import load_topics

    stream = encode("\n".join(load_topics().values()).encode("ascii", "ignore").decode("ascii"))
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (num_rows,), generator=generator).tolist()
    blocks = [stream[start : start + length] for start in starts]
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(block) for block in blocks]})


@dataclass
class Benchmark:
    """Everything one seed of the benchmark reads: the base data, each task's training and evaluation rows."""

    base: Any
    tasks: List[Language]
    train: List[Any]
    evaluation: List[Any]


def build_benchmark(args: argparse.Namespace, seed: int) -> Benchmark:
    from datasets import concatenate_datasets

    length = 1 + 2 * args.pairs_per_row
    base_languages = make_languages(BASE_MARKERS[: args.base_languages], seed + 1000, args.num_symbols)
    base_rows = args.base_steps * args.train_batch_size
    corpus = round(base_rows * args.base_corpus_fraction)
    per_language = math.ceil((base_rows - corpus) / max(1, len(base_languages)))
    parts = [language_rows(language, per_language, args.pairs_per_row, seed + 2000 + i)
             for i, language in enumerate(base_languages)]
    if corpus:
        parts.append(corpus_rows(corpus, length, seed + 3000))
    base = concatenate_datasets(parts).shuffle(seed=seed)
    tasks = make_languages(TASK_MARKERS[: args.num_tasks], seed, args.num_symbols)
    train = [language_rows(task, args.rows_per_task, args.pairs_per_row, seed + 4000 + i) for i, task in enumerate(tasks)]
    evaluation = [language_rows(task, args.eval_rows, args.pairs_per_row, seed + 5000 + i)
                  for i, task in enumerate(tasks)]
    return Benchmark(base, tasks, train, evaluation)


# ------------------------------------------------------------------------------------------------ metrics


def transfer_metrics(matrix: Sequence[Sequence[float]], base: Sequence[float]) -> Dict[str, float]:
    """ACC, BWT and FWT (GEM) of an accuracy matrix R[i][j] (after task i, on task j) and base accuracies b_j."""
    T = len(matrix)
    acc = sum(matrix[-1]) / T
    bwt = sum(matrix[-1][j] - matrix[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0
    fwt = sum(matrix[j - 1][j] - base[j] for j in range(1, T)) / (T - 1) if T > 1 else 0.0
    return {"acc": acc, "bwt": bwt, "fwt": fwt}


def recency_floor(bench: Benchmark) -> List[List[float]]:
    """F[i][j]: the accuracy on task j of a predictor that answers with task i's mapping whatever the marker,
    the floor a model sits on once it has learned task i and ignores which language it reads."""
    floor = []
    for latest in bench.tasks:
        row = []
        for task, rows in zip(bench.tasks, bench.evaluation):
            hits = total = 0
            for ids, labels in zip(rows["input_ids"], rows["labels"]):
                for t, label in enumerate(labels):
                    if label != IGNORE_INDEX:
                        symbol = chr(ids[t - 1] - BYTE_OFFSET)
                        hits += latest.mapping[symbol] == task.mapping[symbol]
                        total += 1
            row.append(hits / total)
        floor.append(row)
    return floor


def accuracy(model, rows, batch_size: int) -> float:
    """Fraction of the labelled outputs predicted greedily."""
    import torch

    from hope.evals.common import labelled_correct

    correct = labelled_correct(model, rows, batch_size)
    return int(correct.sum()) / max(1, int((torch.tensor(rows["labels"]) != IGNORE_INDEX).sum()))


# ------------------------------------------------------------------------------------------------ methods


def model_configs(args: argparse.Namespace) -> Dict[str, Any]:
    """Hope and Transformer++ at one budget (hope.evals.common.comparison_configs) for the ByT5 vocabulary."""
    from hope.evals.common import ModelShape, comparison_configs

    shape = ModelShape(args.hidden_size, args.num_layers, args.num_heads, args.chunk_size)
    configs = comparison_configs(VOCAB_SIZE, shape, max_position_embeddings=512)
    overrides = parse_overrides(args.hope_overrides)
    if overrides:
        configs["hope"] = type(configs["hope"])(**{**configs["hope"].to_dict(), **overrides})
    return configs


def parse_overrides(text: Optional[str]) -> Dict[str, Any]:
    from hope.train import parse_overrides as parse

    return parse(text)


def llama_config(args: argparse.Namespace):
    """A Llama of Transformer++'s shape (same width, depth, heads, FFN width, tied embeddings)."""
    from transformers import LlamaConfig

    transformer = model_configs(args)["transformer"]
    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=transformer.hidden_size,
                       intermediate_size=transformer.cms_hidden_size[0],
                       num_hidden_layers=transformer.num_hidden_layers, num_attention_heads=transformer.num_heads,
                       num_key_value_heads=transformer.num_heads, max_position_embeddings=512,
                       rms_norm_eps=transformer.rms_norm_eps, tie_word_embeddings=True, pad_token_id=0,
                       bos_token_id=None, eos_token_id=1, attention_bias=False, mlp_bias=False)


def stack_levels_function() -> Callable:
    """`hope.stack_levels` (arXiv §7.3: Hope-Attention whose CMS levels start from a Llama's MLPs), or
    MethodUnavailable."""
    try:
        from hope import stack_levels
    except ImportError:
        raise MethodUnavailable("hope.stack_levels (level stacking, issue #14) is not in this installation yet") \
            from None
    return stack_levels


class Runner:
    """Runs the methods of one seed on one Benchmark, sharing each architecture's base model."""

    def __init__(self, args: argparse.Namespace, bench: Benchmark, seed: int, output_dir: Path):
        self.args, self.bench, self.seed, self.output_dir = args, bench, seed, output_dir
        self._bases: Dict[str, Any] = {}
        self.base_seconds: Dict[str, float] = {}

    def base(self, kind: str):
        """A copy of the base model of `kind` ("hope", "transformer", "llama"): trained once per seed and saved
        under <output_dir>/base-<kind>, or loaded from --base_from (a previous run's directory for this seed)."""
        import copy

        from transformers import AutoModelForCausalLM, set_seed

        import hope  # noqa: F401  (Auto classes)
        from hope.evals.common import fine_tune
        from hope.train import UsageError

        if kind not in self._bases:
            started = time.perf_counter()
            saved = None if self.args.base_from is None else self.args.base_from / f"seed{self.seed}" / f"base-{kind}"
            if saved is not None and not saved.is_dir():
                print(f"\n== seed {self.seed}: --base_from holds no {saved}: training the base {kind} model",
                      flush=True)
                saved = None
            if saved is not None:
                recorded = json.loads((saved / "base_args.json").read_text()) if (saved / "base_args.json").is_file() \
                    else None
                if recorded != base_arguments(self.args):
                    raise UsageError(f"--base_from {self.args.base_from}: {saved} was not trained with these base "
                                     f"flags ({base_arguments(self.args)}); it holds {recorded}")
                model = AutoModelForCausalLM.from_pretrained(saved)
                print(f"\n== seed {self.seed}: base {kind} model loaded from {saved}", flush=True)
            else:
                set_seed(self.seed)
                if kind == "llama":
                    from transformers import LlamaForCausalLM

                    model = LlamaForCausalLM(llama_config(self.args))
                else:
                    from hope import HopeForCausalLM

                    model = HopeForCausalLM(model_configs(self.args)[kind])
                print(f"\n== seed {self.seed}: base {kind} model, {self.args.base_steps} steps of "
                      f"{self.args.train_batch_size} rows", flush=True)
                fine_tune(model, self.bench.base, steps=self.args.base_steps, batch_size=self.args.train_batch_size,
                          learning_rate=self.args.learning_rate, seed=self.seed,
                          output_dir=self.output_dir / f"base-{kind}", progress=self.args.progress)
                model.save_pretrained(self.output_dir / f"base-{kind}")
                (self.output_dir / f"base-{kind}" / "base_args.json").write_text(json.dumps(base_arguments(self.args)))
            self._bases[kind] = model.eval()
            self.base_seconds[kind] = time.perf_counter() - started
        return copy.deepcopy(self._bases[kind])

    def evaluate(self, model) -> List[float]:
        return [accuracy(model, rows, self.args.batch_size) for rows in self.bench.evaluation]

    def run(self, method: str) -> Dict[str, Any]:
        """One method on this seed; "seconds" is the continual phase only (base training is in base_seconds)."""
        if method in ("hope-online", "transformer-online", "hope-attention-stacked"):
            if method == "hope-attention-stacked":
                stack_levels = stack_levels_function()  # before training a base it could not use
                model = stack_levels(self.base("llama"), cms_chunk_sizes=parse_levels(self.args.stack_chunk_sizes))
                levels = None
            elif method == "hope-online":
                model, levels = self.base("hope"), None
            else:
                model, levels = self.base("transformer"), {0: self.args.transformer_online_period}
            started = time.perf_counter()
            result = self.online(model, levels)
        else:
            model = self.base("hope" if method == "hope-finetune" else "transformer")
            started = time.perf_counter()
            result = self.finetune(model, replay=method == "transformer-replay")
        result.update(transfer_metrics(result["matrix"], result["base"]))
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["seconds"] = time.perf_counter() - started
        return result

    def online(self, model, levels) -> Dict[str, Any]:
        """OnlineLearner over each task's rows (one row = one sequence), `epochs` passes in a seeded order."""
        import torch

        from hope.continual import OnlineLearner

        args = self.args
        learner = OnlineLearner(model, levels=levels, lr=args.learner_lr, optimizer=args.learner_optimizer,
                                max_grad_norm=args.learner_max_grad_norm, progress=args.progress)
        base = self.evaluate(model)
        matrix, tokens_per_second = [], []
        generator = torch.Generator().manual_seed(self.seed)
        for index, rows in enumerate(self.bench.train):
            print(f"-- task {index}: OnlineLearner, {args.epochs} x {len(rows)} rows", flush=True)
            for _ in range(args.epochs):
                order = torch.randperm(len(rows), generator=generator).tolist()
                summary = learner.learn({"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]}
                                        for i in order)
                tokens_per_second.append(summary["tokens_per_second"])
            with learner.applied():
                matrix.append(self.evaluate(model))
            print(f"   accuracy on tasks 0..{len(matrix[-1]) - 1}: " + " ".join(f"{a:.3f}" for a in matrix[-1]),
                  flush=True)
        return {"base": base, "matrix": matrix, "periods": learner.periods, "learner_steps": learner.steps,
                "tokens_per_second": statistics.fmean(tokens_per_second)}

    def finetune(self, model, replay: bool) -> Dict[str, Any]:
        """HF Trainer on each task in turn; with `replay`, a buffer of `replay_fraction` of every past task."""
        from datasets import concatenate_datasets

        from hope.evals.common import fine_tune

        args = self.args
        base = self.evaluate(model)
        matrix, buffer = [], []
        for index, rows in enumerate(self.bench.train):
            train, replayed = rows, 0
            if replay and buffer:
                memory = concatenate_datasets(buffer)
                # Same token budget as without replay: the replayed rows replace as many of the task's rows.
                train = concatenate_datasets([rows.select(range(len(rows) - len(memory))), memory]) \
                    if len(memory) < len(rows) else memory.select(range(len(rows)))
                replayed = min(len(memory), len(rows))
            print(f"-- task {index}: Trainer, {args.epochs} x {len(train)} rows ({replayed} replayed)", flush=True)
            fine_tune(model, train.shuffle(seed=self.seed + index), epochs=args.epochs,
                      batch_size=args.finetune_batch_size, learning_rate=args.finetune_lr, seed=self.seed + index,
                      output_dir=self.output_dir / "trainer", progress=args.progress)
            matrix.append(self.evaluate(model))
            print(f"   accuracy on tasks 0..{len(matrix[-1]) - 1}: " + " ".join(f"{a:.3f}" for a in matrix[-1]),
                  flush=True)
            if replay:
                keep = max(1, round(args.replay_fraction * len(rows)))
                buffer.append(rows.shuffle(seed=self.seed + 100 + index).select(range(keep)))
        return {"base": base, "matrix": matrix}


def base_arguments(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags a base model depends on (checked when --base_from reuses one)."""
    keys = ("hidden_size", "num_layers", "num_heads", "chunk_size", "hope_overrides", "num_symbols", "pairs_per_row",
            "base_steps", "base_languages", "base_corpus_fraction", "train_batch_size", "learning_rate")
    return {key: getattr(args, key) for key in keys}


def parse_levels(text: str) -> List[Optional[int]]:
    return [None if part.strip().lower() == "none" else int(part) for part in text.split(",") if part.strip()]


# ------------------------------------------------------------------------------------------------ the run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hope-eval --task continual` (the model shape, --train_batch_size, --learning_rate, --batch_size
    and --output_dir are the --compare ones)."""
    group = parser.add_argument_group("continual: tasks learned one after another (hope/evals/continual.py)")
    group.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {list(METHODS)}")
    group.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (tasks, rows, base models)")
    group.add_argument("--num_tasks", type=int, default=4)
    group.add_argument("--num_symbols", type=int, default=16, help="symbols (and outputs) per language, <= 16")
    group.add_argument("--pairs_per_row", type=int, default=8)
    group.add_argument("--rows_per_task", type=int, default=256)
    group.add_argument("--eval_rows", type=int, default=128)
    group.add_argument("--epochs", type=int, default=2, help="passes over each task's rows (every method)")
    group.add_argument("--base_steps", type=int, default=400, help="Trainer steps of each base model")
    group.add_argument("--base_languages", type=int, default=8)
    group.add_argument("--base_corpus_fraction", type=float, default=0.25,
                       help="share of the base rows that are pydoc blocks")
    group.add_argument("--learner_lr", type=float, default=1e-3)
    group.add_argument("--learner_optimizer", default="adamw", help="sgd, adamw or m3")
    group.add_argument("--learner_max_grad_norm", type=float, default=1.0)
    group.add_argument("--finetune_lr", type=float, default=1e-3)
    group.add_argument("--finetune_batch_size", type=int, default=16)
    group.add_argument("--replay_fraction", type=float, default=0.05)
    group.add_argument("--stack_chunk_sizes", default="16", help="CMS levels of the stacked Llama")
    group.add_argument("--transformer_online_period", type=int, default=16)
    group.add_argument("--hope_overrides", default=None, help="HopeConfig fields of the Hope model, e.g. "
                                                              "'cms_eta_max=[1e-4,1e-5,1e-5]'")
    group.add_argument("--base_from", type=Path, default=None,
                       help="load each seed's base models from this earlier run's --output_dir instead of training "
                            "them (the base flags must match); a base it does not hold is trained (and said so)")
    group.add_argument("--no_progress", dest="progress", action="store_false")


def check_arguments(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    """Validate and normalise the continual flags (error: argparse's parser.error)."""
    try:
        args.seeds = [int(seed) for seed in str(args.seeds).split(",") if seed.strip()]
    except ValueError:
        error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    methods = [method.strip() for method in str(args.methods).split(",") if method.strip()]
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    args.methods = methods
    for key in ("num_tasks", "num_symbols", "pairs_per_row", "rows_per_task", "eval_rows", "epochs", "base_steps",
                "base_languages", "finetune_batch_size", "transformer_online_period"):
        if getattr(args, key) < 1:
            error(f"--{key} must be a positive integer, got {getattr(args, key)}")
    if not args.seeds:
        error("--seeds is empty")
    if args.num_tasks > len(TASK_MARKERS):
        error(f"--num_tasks must be at most {len(TASK_MARKERS)}, got {args.num_tasks}")
    if args.base_languages > len(BASE_MARKERS):
        error(f"--base_languages must be at most {len(BASE_MARKERS)}, got {args.base_languages}")
    if not 2 <= args.num_symbols <= len(SYMBOLS):
        error(f"--num_symbols must be in [2, {len(SYMBOLS)}], got {args.num_symbols}")
    if args.pairs_per_row > args.num_symbols:
        error(f"--pairs_per_row {args.pairs_per_row} exceeds --num_symbols {args.num_symbols} (symbols of a row "
              "are distinct)")
    if not 0 <= args.base_corpus_fraction < 1:
        error(f"--base_corpus_fraction must be in [0, 1), got {args.base_corpus_fraction}")
    if not 0 <= args.replay_fraction <= 1:
        error(f"--replay_fraction must be in [0, 1], got {args.replay_fraction}")
    try:
        parse_levels(args.stack_chunk_sizes)
    except ValueError:
        error(f"--stack_chunk_sizes must be comma-separated ints or None, got {args.stack_chunk_sizes!r}")
    if args.learner_max_grad_norm <= 0:
        args.learner_max_grad_norm = None


def summarize(per_seed: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and standard deviation over seeds of the matrix, the base accuracies and ACC / BWT / FWT."""
    runs = list(per_seed.values())

    def stats(values: List[float]) -> Dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    T = len(runs[0]["matrix"])
    return {
        "matrix": [[statistics.fmean(run["matrix"][i][j] for run in runs) for j in range(T)] for i in range(T)],
        "base": [statistics.fmean(run["base"][j] for run in runs) for j in range(T)],
        **{key: stats([run[key] for run in runs]) for key in ("acc", "bwt", "fwt", "seconds")},
        "parameters": runs[0]["parameters"],
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Every method on every seed; writes results.json, results.md and the two PNGs under --output_dir. CPU
    threads are hope-eval's (its thread policy), not set here."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        "task": "continual", "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "methods": {}, "skipped": {},
    }
    for seed in args.seeds:
        bench = build_benchmark(args, seed)
        results.setdefault("languages", {})[seed] = [
            {"marker": task.marker, "mapping": "".join(task.mapping[s] for s in sorted(task.mapping))}
            for task in bench.tasks]
        floor = recency_floor(bench)
        results.setdefault("recency_floor", {})[seed] = {"matrix": floor, **transfer_metrics(floor, floor[0])}
        runner = Runner(args, bench, seed, args.output_dir / f"seed{seed}")
        for method in args.methods:
            if method in results["skipped"]:
                continue
            print(f"\n== seed {seed}: {METHOD_LABELS[method]}", flush=True)
            try:
                outcome = runner.run(method)
            except MethodUnavailable as reason:
                print(f"   skipped: {reason}", flush=True)
                results["skipped"][method] = str(reason)
                continue
            results["methods"].setdefault(method, {"label": METHOD_LABELS[method], "seeds": {}})["seeds"][seed] = \
                outcome
            results.setdefault("base_seconds", {})[seed] = runner.base_seconds
            (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))  # partial results too
    for method, entry in results["methods"].items():
        entry["summary"] = summarize(entry["seeds"])
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (args.output_dir / "results.md").write_text(table + "\n")
    if results["methods"]:
        plot(results, args.output_dir)
    print("\n" + table)
    print(f"\nresults: {args.output_dir / 'results.json'}, {args.output_dir / 'results.md'}, "
          f"{args.output_dir / 'continual_heatmap.png'}, {args.output_dir / 'continual_lines.png'}")
    return results


def format_table(results: Dict[str, Any]) -> str:
    """Markdown: one row per method (ACC, BWT, FWT as mean ± std over seeds), then each method's mean matrix."""
    seeds = len(next(iter(results["methods"].values()))["seeds"]) if results["methods"] else 0
    lines = [f"Mean ± std over {seeds} seed(s). ACC: final average accuracy; BWT: backward transfer (negative = "
             "forgetting); FWT: forward transfer. Chance is 1 / num_symbols.", "",
             "| method | parameters | ACC | BWT | FWT | continual phase, s / seed |", "|---|---|---|---|---|---|"]
    for entry in results["methods"].values():
        s = entry["summary"]
        lines.append(f"| {entry['label']} | {s['parameters']:,} | {s['acc']['mean']:.3f} ± {s['acc']['std']:.3f} | "
                     f"{s['bwt']['mean']:+.3f} ± {s['bwt']['std']:.3f} | {s['fwt']['mean']:+.3f} ± "
                     f"{s['fwt']['std']:.3f} | {s['seconds']['mean']:.0f} |")
    floors = list(results.get("recency_floor", {}).values())
    if floors:
        accs = [floor["acc"] for floor in floors]
        bwts = [floor["bwt"] for floor in floors]
        spread = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        lines.append(f"| recency floor: answer with the latest task's mapping, ignoring the marker | | "
                     f"{statistics.fmean(accs):.3f} ± {spread(accs):.3f} | {statistics.fmean(bwts):+.3f} ± "
                     f"{spread(bwts):.3f} | | |")
    for method, reason in results["skipped"].items():
        lines.append(f"| {METHOD_LABELS[method]} | skipped: {reason} | | | | |")
    for entry in results["methods"].values():
        matrix, base = entry["summary"]["matrix"], entry["summary"]["base"]
        T = len(matrix)
        lines += ["", f"{entry['label']}: accuracy on task j (columns) after learning task i (rows), mean over seeds",
                  "", "| after | " + " | ".join(f"task {j}" for j in range(T)) + " |", "|---" * (T + 1) + "|",
                  "| base | " + " | ".join(f"{a:.3f}" for a in base) + " |"]
        lines += [f"| task {i} | " + " | ".join(f"{a:.3f}" for a in row) + " |" for i, row in enumerate(matrix)]
    return "\n".join(lines)


def plot(results: Dict[str, Any], output_dir: Path) -> None:
    """continual_heatmap.png (each method's mean matrix) and continual_lines.png (average accuracy on the tasks
    learned so far, and accuracy on the first task, after each task; mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    entries = list(results["methods"].values())
    figure, axes = plt.subplots(1, len(entries), figsize=(3.4 * len(entries) + 1, 4.2), squeeze=False,
                                constrained_layout=True)
    for index, (axis, entry) in enumerate(zip(axes[0], entries)):
        matrix = entry["summary"]["matrix"]
        T = len(matrix)
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i in range(T):
            for j in range(T):
                axis.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center",
                          color="white" if matrix[i][j] < 0.6 else "black", fontsize=8)
        axis.set_xticks(range(T))
        axis.set_yticks(range(T))
        axis.set_xlabel("evaluated on task")
        if index == 0:
            axis.set_ylabel("after learning task")
        axis.set_title(entry["label"].replace(" + ", "\n+ ", 1), fontsize=8)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    figure.savefig(output_dir / "continual_heatmap.png", dpi=120, bbox_inches="tight", pad_inches=0.15)
    plt.close(figure)

    figure, (seen, first) = plt.subplots(1, 2, figsize=(10, 4))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("x", "--")]
    for (marker, line), entry in zip(styles, entries):
        runs = list(entry["seeds"].values())
        T = len(runs[0]["matrix"])
        xs = list(range(T + 1))
        curves = [[statistics.fmean(run["base"][:1])] + [statistics.fmean(run["matrix"][i][: i + 1]) for i in range(T)]
                  for run in runs]
        firsts = [[run["base"][0]] + [run["matrix"][i][0] for i in range(T)] for run in runs]
        for axis, values in ((seen, curves), (first, firsts)):
            mean = [statistics.fmean(v[x] for v in values) for x in xs]
            std = [statistics.stdev(v[x] for v in values) if len(values) > 1 else 0.0 for x in xs]
            axis.plot(xs, mean, marker=marker, linestyle=line, alpha=0.85, label=entry["label"])
            axis.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    floors = [floor["matrix"] for floor in results.get("recency_floor", {}).values()]
    if floors:  # defined once a task has been learned (x >= 1)
        T = len(floors[0])
        xs = list(range(1, T + 1))
        seen.plot(xs, [statistics.fmean(statistics.fmean(f[i][: i + 1]) for f in floors) for i in range(T)], "k--",
                  linewidth=1, label="recency floor (latest mapping, marker ignored)")
        first.plot(xs, [statistics.fmean(f[i][0] for f in floors) for i in range(T)], "k--", linewidth=1,
                   label="recency floor (latest mapping, marker ignored)")
    seen.set_title("average accuracy on the tasks learned so far")
    first.set_title("accuracy on task 0 (forgetting)")
    for axis in (seen, first):
        axis.set_xlabel("tasks learned (0 = base model)")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1.02)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    first.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "continual_lines.png", dpi=120)
    plt.close(figure)
