"""`hope-train` (also `python -m hope.train`): train or fine-tune a Hope causal LM with the Hugging Face Trainer.

    hope-train --model small --data corpus.txt --output_dir runs/small --max_steps 2000
    hope-train --model hope-340m --data data/*.jsonl --tokenizer ./my-tokenizer --seq_len 4096 --bf16 \\
               --gradient_accumulation_steps 8 --activation_checkpointing --save_total_limit 3
    hope-train --model runs/small --data more.parquet --output_dir runs/ft --learning_rate 1e-4   # fine-tune
    hope-train ... --resume_from_checkpoint last                                  # after an interruption
    torchrun --nproc_per_node 8 -m hope.train ...        accelerate launch -m hope.train ...   (DDP / FSDP)
    python -m hope.train --demo                                                   # the offline demo (hope.demo)
    hope-train ... --optim m3 --optim_args "lr=3e-4,slow_chunk_size=100"           # the M3 optimizer (hope.optim)

`--model` is a preset name (`hope.get_preset`: tiny, small, hope-340m/760m/1.3b, transformer-340m/...) or a
checkpoint directory. A preset trains from scratch with its recipe (`hope.presets.training_defaults`: learning
rate, schedule, warm-up, weight decay), each overridable by its flag; a checkpoint is fine-tuned with the
Trainer's defaults or your flags. `--data` is a local txt/json/jsonl/parquet/csv file, glob or directory of
such files (read by `datasets.load_dataset`), a directory written by `Dataset.save_to_disk`, or a hub dataset
name when the machine is online. A row is a document; a .txt file is cut at blank lines (`--text_split`). Every
`TrainingArguments` option passes through unchanged (`--help` lists them). Documents are tokenized, each
followed by EOS, and packed into blocks of `--seq_len` tokens (`hope.data`). Ctrl-C saves a checkpoint at the
end of the current step and prints the command that resumes from it.
"""
from __future__ import annotations

import ast
import json
import math
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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
    text_split: str = field(default="paragraph", metadata={
        "help": "how .txt files are cut into documents (EOS after each): paragraph (at blank lines), document (a "
                "file each) or line; newlines inside a document are kept", "choices": ["paragraph", "document", "line"]})
    num_threads: Optional[int] = field(default=None, metadata={
        "help": "CPU threads for torch; default OMP_NUM_THREADS if set, else the cores other processes leave idle"})


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
    # PretrainedConfig keeps an unknown keyword as an attribute: a misspelt field would change nothing, silently.
    unknown = sorted(set(overrides) - set(HopeConfig().to_dict()))
    if unknown:
        raise UsageError(f"--config_overrides: {', '.join(unknown)} is not a HopeConfig field (README, Configuration)")
    if is_checkpoint(args.model):
        try:
            config = HopeConfig.from_pretrained(args.model, **overrides)
        except ValueError as error:
            raise UsageError(f"--config_overrides for checkpoint {args.model}: {error}") from None
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


# ------------------------------------------------------------------ command line, training recipe, Ctrl-C

# transformers 5.24 renamed TrainingArguments.gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs)
# and warns (FutureWarning) on the old names; 5.17 knows only the old ones. hope-train accepts both spellings
# and passes the installed version its own, so neither warns.
CHECKPOINTING_FLAGS = (("gradient_checkpointing", "activation_checkpointing"),
                       ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))
# The fields of a training recipe that hope-train prints, whether from a preset or the Trainer's defaults.
RECIPE_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta2", "max_grad_norm")


def checkpointing_flags_for(argv: Sequence[str], fields) -> List[str]:
    """`argv` with every --gradient_checkpointing / --activation_checkpointing flag (and its _kwargs; with "_"
    or "-", bare or "=value") spelled as the installed TrainingArguments, whose field names are `fields`, does."""
    spelled = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        for old, new in CHECKPOINTING_FLAGS:
            if name in {f"--{flag}" for flag in (old, new, old.replace("_", "-"), new.replace("_", "-"))}:
                name = f"--{new if new in fields else old}"
                break
        spelled.append(name + sep + value)
    return spelled


def build_parser():
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser((HopeTrainArguments, TrainingArguments), prog="hope-train",
                            description=__doc__.split("\n\n")[0].split(": ", 1)[1])


def parse_args(argv: Sequence[str]):
    """(HopeTrainArguments, TrainingArguments, recipe, argv) for a command line. `recipe` is the preset's
    from-scratch recipe (`hope.presets.training_defaults`), already the default of those TrainingArguments
    fields the command line leaves unset; empty when --model is a checkpoint. The returned argv is the command
    line as parsed (the checkpointing flags respelled, --output_dir made explicit)."""
    import dataclasses

    from transformers import TrainingArguments

    from hope.presets import training_defaults

    argv = checkpointing_flags_for(argv, {f.name for f in dataclasses.fields(TrainingArguments)})
    if not any(a == "--output_dir" or a.startswith(("--output_dir=", "--output-dir")) for a in argv):
        model = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model"), "model")
        argv += ["--output_dir", str(Path("runs") / Path(model).name)]
    args, training_args = build_parser().parse_args_into_dataclasses(args=argv)
    try:  # a preset trains from scratch with its recipe; a path is a checkpoint to fine-tune
        recipe = {} if Path(args.model).exists() else training_defaults(args.model)
    except ValueError:  # an unknown preset name, which load_model reports
        recipe = {}
    if recipe:  # parse again with the recipe as the defaults: a flag on the command line still wins
        parser = build_parser()
        parser.set_defaults(**recipe)
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return args, training_args, recipe, argv


def describe_recipe(training_args, recipe: Dict[str, Any], model: str) -> str:
    """One line: the learning rate, schedule, warm-up, ... this run uses, and where they come from."""
    from hope.presets import TRAINING_RECIPE_SOURCE, parse_preset_name

    def shown(key: str) -> str:
        value = getattr(training_args, key)
        value = getattr(value, "value", value)  # SchedulerType -> "cosine"
        given = recipe and key in recipe and value != recipe[key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f"{key}={text}" + (" (yours)" if given else "")

    values = ", ".join(shown(key) for key in RECIPE_FIELDS)
    if recipe:
        source = TRAINING_RECIPE_SOURCE[parse_preset_name(model)[1]]
        return f"from scratch with preset {model}'s recipe ({source}; a flag overrides any of it): {values}"
    return f"fine-tuning with the Trainer's defaults and your flags: {values}"


def resume_command(argv: Sequence[str], world_size: int = 1) -> str:
    """The command that resumes this run from its newest checkpoint: the same arguments, with
    `--resume_from_checkpoint last` in place of any given."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in ("--resume_from_checkpoint", "--resume-from-checkpoint"):
            skip_value = True
        elif not arg.startswith(("--resume_from_checkpoint=", "--resume-from-checkpoint=")):
            kept.append(arg)
    program = "hope-train" if Path(sys.argv[0]).name.startswith("hope-train") else "python -m hope.train"
    command = f"{program} {shlex.join(kept + ['--resume_from_checkpoint', 'last'])}"
    if world_size > 1:
        command += f"    (with the launcher of this run: torchrun / accelerate launch ... -m hope.train, {world_size} processes)"
    return command


def stop_on_interrupt_callback():
    """A TrainerCallback whose `request` (the SIGINT handler during training) asks the Trainer to save a
    checkpoint at the end of the current optimizer step and stop. The checkpoint holds what
    --resume_from_checkpoint needs (weights, optimizer, scheduler, RNG and data position). A second Ctrl-C
    aborts at once. With several processes the request is shared (all-reduce) so that all stop at one step."""
    from transformers import TrainerCallback

    class StopOnInterrupt(TrainerCallback):
        def __init__(self):
            self.requested = False
            self.stopped_at: Optional[int] = None

        def request(self, signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nhope-train: Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again aborts without "
                  "saving)", file=sys.stderr, flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            requested = self.requested
            if args.world_size > 1:
                import torch
                import torch.distributed as dist

                flag = torch.tensor([float(requested)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                requested = bool(flag.item())
            if requested and state.global_step < state.max_steps:
                control.should_save = control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    return StopOnInterrupt()


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


def prepare_data(args: HopeTrainArguments, tokenizer, seed: int):
    """(train blocks, validation blocks or None, tokens per byte of the validation texts or None). Without
    --validation_data, --validation_split_percentage of the documents (the rows; `hope.data.load_text_dataset`)
    is held out whole, so no text of a validation document is trained on."""
    from hope.data import load_text_dataset, pack_for_training

    raw = load_text_dataset(args.data, config=args.data_config, text_column=args.text_column,
                            streaming=args.streaming, text_split=args.text_split)
    if args.validation_data is not None:
        raw_validation = load_text_dataset(args.validation_data, config=args.data_config,
                                           text_column=args.text_column, streaming=args.streaming,
                                           text_split=args.text_split)
    elif args.validation_split_percentage > 0 and not args.streaming:
        if len(raw) < 2:
            raise UsageError(f"{args.data} has {len(raw)} document(s): too few to hold out a validation split; "
                             "pass --validation_data, --validation_split_percentage 0, or (a .txt file) "
                             "--text_split paragraph")
        split = raw.train_test_split(test_size=args.validation_split_percentage / 100, seed=seed)
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
    return train, validation, factor


def run(args: HopeTrainArguments, training_args, recipe: Optional[Dict[str, Any]] = None,
        argv: Sequence[str] = (), optim_m3: bool = False) -> Dict[str, Any]:
    """Load data and model, train, evaluate, save; returns the metrics (also written to all_results.json).
    `recipe` and `argv` come from `parse_args`: what to report, and the command a Ctrl-C prints to resume;
    `optim_m3`: train with hope.optim.M3 (`--optim m3`, see `m3_optimizer`)."""
    import threading

    from transformers import Trainer, default_data_collator, set_seed

    from hope.runtime import configure_threads, describe_threads

    if args.seq_len < 2:
        raise UsageError(f"--seq_len must be at least 2, got {args.seq_len}")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1 (a block), got {getattr(args, name)}")
    if args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps (a streamed dataset has no length to count epochs by)")
    if not 0 <= args.validation_split_percentage < 100:
        raise UsageError(f"--validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}")
    if training_args.fsdp_plugin_args is not None and (training_args.world_size < 2 or
                                                       training_args.device.type == "cpu"):
        # Trainer shards (FSDP2 by default, each HopeBlock: _no_split_modules) only across several processes, and
        # accelerate only on accelerators: on CPU it would quietly run DDP.
        raise UsageError(f"--fsdp needs several processes on accelerators (CUDA, XPU, NPU, ...); this run has "
                         f"{training_args.world_size} process(es) on {training_args.device.type}. Launch with "
                         "torchrun or accelerate launch on GPUs, or drop --fsdp (DDP on CPU)")
    try:
        threads = configure_threads(args.num_threads)
    except ValueError as error:
        raise UsageError(str(error)) from None
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model, source = load_model(args, tokenizer)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    with training_args.main_process_first(desc="load and pack the data"):
        train, validation, factor = prepare_data(args, tokenizer, training_args.seed)

    stop = stop_on_interrupt_callback()
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=validation,
                      data_collator=default_data_collator, processing_class=tokenizer, callbacks=[stop],
                      optimizers=(m3_optimizer(model, training_args) if optim_m3 else None, None))
    if training_args.process_index == 0:
        parameters = sum(p.numel() for p in model.parameters())
        blocks = "streamed" if args.streaming else f"{len(train):,} blocks"
        engine = "FSDP" if trainer.is_fsdp_enabled else "DDP" if training_args.world_size > 1 else "single process"
        print(f"hope-train: {source}, {parameters:,} parameters, mixer={model.config.mixer}, "
              f"cms_chunk_sizes={model.config.cms_chunk_sizes}; data {args.data}: {blocks} of {args.seq_len} tokens; "
              f"tokenizer {type(tokenizer).__name__} ({len(tokenizer)} tokens); {training_args.world_size} "
              f"process(es), {engine}; {describe_threads(threads, args.num_threads)}\n"
              f"hope-train: {describe_recipe(training_args, recipe or {}, args.model)}", flush=True)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous_handler = signal.signal(signal.SIGINT, stop.request) if in_main_thread else None
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
    if stop.stopped_at is not None:
        if training_args.process_index == 0:
            checkpoint = Path(training_args.output_dir, f"checkpoint-{stop.stopped_at}")
            print(f"hope-train: interrupted: step {stop.stopped_at} of {trainer.state.max_steps} saved to "
                  f"{checkpoint}; resume with:\n  {resume_command(argv, training_args.world_size)}",
                  file=sys.stderr, flush=True)
        raise SystemExit(130)
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


def run_command(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """What `hope-train ARGS` does, returning its result rather than an exit status: the demo's results with
    --demo, else the metrics of `run`. Bad input prints one line (`hope-train: error: ...`) and raises
    SystemExit(2); a run stopped by Ctrl-C saves a checkpoint, prints how to resume and raises SystemExit(130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in argv:
        from hope.demo import main as demo_main

        return demo_main(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from hope.data import DataError

    threads_before = torch.get_num_threads()
    try:
        argv, optim_m3 = take_optim_m3(argv)
        args, training_args, recipe, argv = parse_args(argv)
        if optim_m3:  # the resume command a Ctrl-C prints keeps the optimizer
            argv = [*argv, "--optim", "m3"]
        return run(args, training_args, recipe, argv, optim_m3=optim_m3)
    except (UsageError, DataError, FileNotFoundError) as error:
        print(f"hope-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        torch.set_num_threads(threads_before)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point of `hope-train` (`--demo` runs `hope.demo`): exit status 0 after a successful run,
    2 for bad input, 130 after Ctrl-C."""
    try:
        run_command(argv)
    except KeyboardInterrupt:
        print("\nhope-train: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
