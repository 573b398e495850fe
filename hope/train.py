"""`hope-train` (also `python -m hope.train`): train or fine-tune a Hope causal LM with the Hugging Face Trainer.

    hope-train --model small --data corpus.txt --output_dir runs/small --max_steps 2000
    hope-train --model hope-340m --data data/*.jsonl --tokenizer ./my-tokenizer --seq_len 4096 --bf16 \\
               --gradient_accumulation_steps 8 --gradient_checkpointing --save_total_limit 3
    hope-train --model runs/small --data more.parquet --output_dir runs/ft --learning_rate 1e-4   # fine-tune
    hope-train ... --resume_from_checkpoint last                                  # after an interruption
    torchrun --nproc_per_node 8 -m hope.train ...        accelerate launch -m hope.train ...   (DDP / FSDP)
    python -m hope.train --demo                                                   # the offline demo (hope.demo)
    hope-train ... --optim m3 --optim_args "lr=3e-4,slow_chunk_size=100"           # the M3 optimizer (hope.optim)

`--model` is a preset name (`hope.get_preset`: tiny, small, hope-340m/760m/1.3b, transformer-340m/...) or a
checkpoint directory. `--data` is a local txt/json/jsonl/parquet/csv file, glob or directory of such files
(read by `datasets.load_dataset`), a directory written by `Dataset.save_to_disk`, or a hub dataset name when
the machine is online. Every `TrainingArguments` option passes through unchanged (`--help` lists them). Texts
are tokenized, each followed by EOS, and packed into blocks of `--seq_len` tokens (`hope.data`).
"""
from __future__ import annotations

import ast
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

DEFAULT_TOKENIZER = "byt5 (ByT5Tokenizer(): byte-level, needs no files)"


@dataclass
class HopeTrainArguments:
    """The arguments of `hope-train` beside `TrainingArguments`."""

    model: str = field(metadata={"help": "a preset name (tiny, small, hope-340m, hope-760m, hope-1.3b, "
                                         "transformer-340m, ...) or a checkpoint directory to fine-tune"})
    data: str = field(metadata={"help": "training data: a txt/json/jsonl/parquet/csv file, a glob or directory of "
                                        "them, a directory saved with Dataset.save_to_disk, or a hub dataset name"})
    validation_data: Optional[str] = field(default=None, metadata={"help": "held-out data, same forms as --data"})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "without --validation_data: this percentage of the training texts is held "
                                       "out (0 = no validation; not with --streaming)"})
    data_config: Optional[str] = field(default=None, metadata={"help": "configuration name of a hub dataset"})
    text_column: str = field(default="text", metadata={"help": "column holding the raw text"})
    tokenizer: Optional[str] = field(
        default=None, metadata={"help": "tokenizer path or hub name; default: the checkpoint's own tokenizer, "
                                        f"else {DEFAULT_TOKENIZER}"})
    seq_len: int = field(default=1024, metadata={"help": "tokens per packed training block"})
    streaming: bool = field(default=False, metadata={"help": "stream the data (corpora larger than memory; needs "
                                                             "--max_steps; packing is per 1000 texts)"})
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "HopeConfig fields to override, 'hidden_size=256,cms_chunk_sizes=[16,None]' "
                                        "or a JSON object; for a checkpoint only execution fields make sense"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "keep the first N packed blocks"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "evaluate on the first N blocks"})


class UsageError(ValueError):
    """A bad command line or bad data: reported as `error: ...` with exit status 2, no traceback."""


# ------------------------------------------------------------------------------------------ utilities


def pick_device(requested: str):
    """torch.device for "auto" (cuda when available, else cpu), "cpu" or "cuda" (an error when absent)."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but torch sees no CUDA device")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def idle_cores() -> int:
    """CPU cores this process may use minus the load of other processes (1-minute load average), at least 1.
    On a shared box, more threads than idle cores make torch's OpenMP threads spin and slow down many-fold."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def parse_overrides(text: Optional[str]) -> Dict[str, Any]:
    """'a=1,b=[16,None],c=torch' or '{"a": 1}' -> dict; values are Python literals, else strings."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            return dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise UsageError(f"--config_overrides is not valid JSON: {error}") from None
    pieces, depth, current = [], 0, ""
    for char in text:  # split on the commas outside brackets
        depth += char in "[({"
        depth -= char in "])}"
        if char == "," and depth == 0:
            pieces.append(current)
            current = ""
        else:
            current += char
    pieces.append(current)
    overrides = {}
    for piece in filter(str.strip, pieces):
        key, sep, value = piece.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--config_overrides: {piece!r} is not of the form key=value")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return overrides


def is_checkpoint(path: str) -> bool:
    return Path(path, "config.json").is_file()


def load_tokenizer(name: Optional[str], model: str):
    """The tokenizer named by --tokenizer, else the checkpoint's own, else the file-free ByT5 byte tokenizer."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if name in (None, "byt5"):
        if name is None and is_checkpoint(model) and any(Path(model).glob("tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(model)
        return ByT5Tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load tokenizer {name!r}: {error}") from None


def load_model(args: HopeTrainArguments, tokenizer):
    """A fresh HopeForCausalLM from a preset, or a checkpoint to fine-tune; checks it against the tokenizer and
    the sequence length."""
    import hope  # noqa: F401  (Auto classes)
    from hope import HopeConfig, HopeForCausalLM

    overrides = parse_overrides(args.config_overrides)
    if is_checkpoint(args.model):
        config = HopeConfig.from_pretrained(args.model, **overrides)
        source = f"checkpoint {args.model}"
    elif Path(args.model).exists():
        raise UsageError(f"--model {args.model!r} is a path without a config.json: not a checkpoint")
    else:
        try:
            config = hope.get_preset(args.model, **{"pad_token_id": tokenizer.pad_token_id,
                                                    "eos_token_id": tokenizer.eos_token_id, **overrides})
        except ValueError as error:
            raise UsageError(f"--model {args.model!r}: {error} (or give a checkpoint directory)") from None
        source = f"preset {args.model}"
    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
                         f" ({source}); use a smaller tokenizer, or (training from a preset) --config_overrides "
                         f"vocab_size={len(tokenizer)}")
    if args.seq_len > config.max_position_embeddings:
        raise UsageError(f"--seq_len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings} ({source}); lower --seq_len or override "
                         "max_position_embeddings")
    if is_checkpoint(args.model):
        return HopeForCausalLM.from_pretrained(args.model, config=config), source
    return HopeForCausalLM(config), source


def resolve_resume(value: Optional[str], output_dir: str) -> Optional[str]:
    """--resume_from_checkpoint: a checkpoint path, or "last"/"true" for the newest checkpoint-N in output_dir."""
    from transformers.trainer_utils import get_last_checkpoint

    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("last", "latest", "true", "auto"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise UsageError(f"--resume_from_checkpoint {value}: no checkpoint-N folder in {output_dir}")
        return last
    if not Path(value).is_dir():
        raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    return value


def bits_per_byte_factor(dataset, tokenizer, text_column: str, sample: int = 200) -> Optional[float]:
    """Tokens per UTF-8 byte over the first `sample` texts (EOS excluded): bits per byte = nats per token / ln 2
    x this factor. None for streaming data."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset) or len(dataset) == 0:
        return None
    texts = [text for text in dataset.select(range(min(sample, len(dataset))))[text_column] if text]
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    nbytes = sum(len(text.encode("utf-8")) for text in texts)
    return tokens / nbytes if nbytes else None


# ----------------------------------------------------------------------------------------- --optim m3


def take_optim_m3(argv: Sequence[str]) -> tuple[list, bool]:
    """(argv without `--optim m3`, whether it was there): "m3" is no TrainingArguments optimizer name, so it is
    taken out before parsing; every other --optim value passes through to TrainingArguments."""
    argv, kept, found = list(argv), [], False
    i = 0
    while i < len(argv):
        if argv[i] == "--optim" and i + 1 < len(argv) and argv[i + 1] == "m3":
            found, i = True, i + 2
        elif argv[i] == "--optim=m3":
            found, i = True, i + 1
        else:
            kept.append(argv[i])
            i += 1
    return kept, found


def m3_optimizer(model, training_args):
    """`--optim m3`: hope.optim.M3 (Algorithm 1) on the hidden matrices, its AdamW fallback (embeddings, head,
    norms, biases, convolution taps) at --learning_rate with --adam_beta1/2 and --adam_epsilon, --weight_decay
    on both. --optim_args sets M3's own arguments (their defaults otherwise), e.g.
    "lr=3e-4,slow_chunk_size=100,alpha=1.0,betas=(0.9,0.999,0.9),eps=1e-4,ns_steps=5"."""
    import inspect

    from hope.optim import M3, m3_param_groups

    options = parse_overrides(training_args.optim_args)
    allowed = sorted(set(inspect.signature(M3).parameters) - {"params", "weight_decay", "adamw_betas", "adamw_eps"})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UsageError(f"--optim_args {unknown} are not M3 options; allowed: {allowed}")
    groups = m3_param_groups(model, adamw_lr=training_args.learning_rate, weight_decay=training_args.weight_decay)
    try:
        return M3(groups, adamw_betas=(training_args.adam_beta1, training_args.adam_beta2),
                  adamw_eps=training_args.adam_epsilon, **options)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--optim m3: {error}") from None


# ----------------------------------------------------------------------------------------------- main


def run(args: HopeTrainArguments, training_args, optim_m3: bool = False) -> Dict[str, Any]:
    """Load data and model, train, evaluate, save; returns the metrics (also written to all_results.json)."""
    from transformers import Trainer, default_data_collator, set_seed

    from hope.data import load_text_dataset, pack_for_training

    if args.seq_len < 2:
        raise UsageError(f"--seq_len must be at least 2, got {args.seq_len}")
    if args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps (a streamed dataset has no length to count epochs by)")
    if not 0 <= args.validation_split_percentage < 100:
        raise UsageError(f"--validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}")
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model, source = load_model(args, tokenizer)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    with training_args.main_process_first(desc="load and pack the data"):
        raw = load_text_dataset(args.data, config=args.data_config, text_column=args.text_column,
                                streaming=args.streaming)
        if args.validation_data is not None:
            raw_validation = load_text_dataset(args.validation_data, config=args.data_config,
                                               text_column=args.text_column, streaming=args.streaming)
        elif args.validation_split_percentage > 0 and not args.streaming:
            if len(raw) < 2:
                raise UsageError(f"{args.data} has {len(raw)} text(s): too few to hold out a validation split; "
                                 "pass --validation_data or --validation_split_percentage 0")
            split = raw.train_test_split(test_size=args.validation_split_percentage / 100, seed=training_args.seed)
            raw, raw_validation = split["train"], split["test"]
        else:
            raw_validation = None
        factor = bits_per_byte_factor(raw_validation if raw_validation is not None else raw, tokenizer,
                                      args.text_column)
        train = pack_for_training(raw, tokenizer, args.seq_len, args.text_column, args.max_train_samples,
                                  name=args.data)
        validation = (pack_for_training(raw_validation, tokenizer, args.seq_len, args.text_column,
                                        args.max_eval_samples, name=args.validation_data or "validation split")
                      if raw_validation is not None else None)

    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=validation,
                      data_collator=default_data_collator, processing_class=tokenizer,
                      optimizers=(m3_optimizer(model, training_args) if optim_m3 else None, None))
    if training_args.process_index == 0:
        parameters = sum(p.numel() for p in model.parameters())
        blocks = "streamed" if args.streaming else f"{len(train):,} blocks"
        engine = "FSDP" if trainer.is_fsdp_enabled else "DDP" if training_args.world_size > 1 else "single process"
        print(f"hope-train: {source}, {parameters:,} parameters, mixer={model.config.mixer}, "
              f"cms_chunk_sizes={model.config.cms_chunk_sizes}; data {args.data}: {blocks} of {args.seq_len} tokens; "
              f"tokenizer {type(tokenizer).__name__} ({len(tokenizer)} tokens); {training_args.world_size} "
              f"process(es), {engine}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if validation is not None:
        metrics.update(trainer.evaluate())
        loss = metrics.get("eval_loss", float("nan"))
        metrics["eval_perplexity"] = math.exp(loss) if loss < 50 else float("inf")
        if factor is not None:
            metrics["eval_bits_per_byte"] = loss / math.log(2) * factor
    trainer.save_model()  # model + tokenizer (processing_class), main process only
    trainer.save_state()
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    if training_args.process_index == 0:
        print(f"saved to {training_args.output_dir} (import hope; AutoModelForCausalLM.from_pretrained(path))",
              flush=True)
    return metrics


def parse_args(argv: Sequence[str]):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((HopeTrainArguments, TrainingArguments), prog="hope-train",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    argv = list(argv)
    if not any(a == "--output_dir" or a.startswith(("--output_dir=", "--output-dir")) for a in argv):
        model = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model"), "model")
        argv += ["--output_dir", str(Path("runs") / Path(model).name)]
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Optional[Sequence[str]] = None):
    """Console entry point of `hope-train`; `--demo` runs `hope.demo` instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in argv:
        from hope.demo import main as demo_main

        return demo_main(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hope.data import DataError

    try:
        argv, optim_m3 = take_optim_m3(argv)
        args, training_args = parse_args(argv)
        return run(args, training_args, optim_m3=optim_m3)
    except (UsageError, DataError, FileNotFoundError) as error:
        print(f"hope-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
