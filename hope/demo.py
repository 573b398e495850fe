"""`python -m hope.train --demo`: train a small Hope and a Transformer++ of one budget side by side, offline.

    python -m hope.train --demo                       # ~10 minutes on 2 CPU cores; a GPU is used when present
    python -m hope.train --demo --output-dir runs/x   # where the checkpoints and the loss-curve PNG go

Both models are `HopeForCausalLM`s of the same width and depth, trained with the Hugging Face `Trainer` for the
same steps, batch, learning rate and sequence length on CPython's help topics (`hope.data`), byte-level
(`ByT5Tokenizer`, no files needed):

    Hope           mixer="titans",    CMS levels [16, 128, None]; cms_hidden_size solved to match the budget
    Transformer++  mixer="attention", one plain SwiGLU FFN (cms_chunk_sizes=[None], default width)

It prints validation loss, bits per byte and training tokens/s of both, a sample from each, and saves each
checkpoint (model + tokenizer; `import hope; AutoModelForCausalLM.from_pretrained(path)` loads it), a
`loss_curves.png` and a `summary.json` under the output directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from hope.configuration_hope import HopeConfig

DEFAULT_OUTPUT_DIR = "runs/demo"
DEFAULT_PROMPT = "The for statement is used to"
MODEL_NAMES = ("hope", "transformer")
LABELS = {"hope": "Hope", "transformer": "Transformer++"}

# Sizes of the --demo preset, measured so both runs fit ~10 minutes on 2 shared CPU cores: a step of 8 x 256
# bytes takes ~0.65 s for Hope (PyTorch reference path) and ~0.17 s for Transformer++ on one thread.
# --tiny is the smoke-test preset of the test suite.
PRESETS = {
    "demo": dict(hidden_size=128, num_layers=2, num_heads=2, seq_len=256, batch_size=8, max_steps=600,
                 max_eval_blocks=None, max_new_tokens=200),
    "tiny": dict(hidden_size=32, num_layers=1, num_heads=2, seq_len=64, batch_size=2, max_steps=3,
                 max_eval_blocks=8, max_new_tokens=16),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hope.train --demo",
        description="Train a small Hope and a Transformer++ of the same parameter budget on an embedded corpus "
                    "(Python's help topics, byte-level) and compare them.",
    )
    parser.add_argument("--demo", action="store_true", help="run the demo (without it, hope-train trains on your data)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"where checkpoints, loss_curves.png and summary.json go (default {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per model (demo: 600)")
    parser.add_argument("--seq-len", type=int, help="tokens (bytes) per training block (demo: 256)")
    parser.add_argument("--batch-size", type=int, help="blocks per step (demo: 8)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak AdamW learning rate, cosine decay (default: the tiny preset's recipe, "
                             "hope.presets.training_defaults: 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda (bf16 when supported) if available, else cpu")
    parser.add_argument("--hidden-size", type=int, help="width of both models (demo: 128)")
    parser.add_argument("--num-layers", type=int, help="depth of both models (demo: 2)")
    parser.add_argument("--num-heads", type=int, help="heads of both models (demo: 2)")
    parser.add_argument("--num-threads", "--num_threads", dest="num_threads", type=int, default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores other "
                             "processes leave idle; hope.runtime.configure_threads)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt of the samples (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, help="bytes to sample from each model (demo: 200)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test sizes (tests)
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error("pass --demo (the demo); `hope-train --help` trains on your own data")
    preset = PRESETS["tiny" if args.tiny else "demo"]
    for key in ("hidden_size", "num_layers", "num_heads", "seq_len", "batch_size", "max_steps", "max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.max_eval_blocks = preset["max_eval_blocks"]
    for key in ("max_steps", "seq_len", "batch_size", "hidden_size", "num_layers", "num_heads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    if args.seq_len < 2:
        parser.error(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.hidden_size % args.num_heads:
        parser.error(f"--hidden-size {args.hidden_size} must be divisible by --num-heads {args.num_heads}")
    if args.lr is None:
        from hope.presets import training_defaults

        args.lr = training_defaults("tiny")["learning_rate"]
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num-threads must be at least 1, got {args.num_threads}")
    return args


# ----------------------------------------------------------------------------------------------- models


def count_parameters(model) -> int:
    """Trainable parameters, tied embeddings counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_configs(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, seq_len: int,
                  pad_token_id: int, eos_token_id: int) -> Dict[str, "HopeConfig"]:
    """The two configs at one parameter budget: Transformer++ with its default SwiGLU width (8/3 D rounded up
    to 64), and Hope (Titans mixer, CMS levels [16, 128, None]) whose per-level `cms_hidden_size` is solved
    (a multiple of 16) so that its parameter count is the closest to the Transformer++'s."""
    from hope.presets import matched_hope_config, transformer_config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_heads=num_heads,
                  max_position_embeddings=max(seq_len, 512), pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                  bos_token_id=None, tie_word_embeddings=True)
    return {
        "hope": matched_hope_config(multiple=16, chunk_size=min(64, seq_len), **common),
        "transformer": transformer_config(**common),
    }


# ------------------------------------------------------------------------------------------- training


@dataclass
class RunResult:
    name: str
    parameters: int
    train_loss: List[tuple] = field(default_factory=list)  # (step, loss)
    val_loss: List[tuple] = field(default_factory=list)  # (step, loss in nats per byte)
    train_seconds: float = 0.0
    train_tokens: int = 0
    final_val_loss: float = float("nan")
    sample: str = ""
    checkpoint: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else float("nan")


def make_callbacks(result: RunResult, validation, eval_steps: List[int], batch_size: int, autocast_dtype):
    """Two Trainer callbacks: a progress bar that shows the loss instead of printing every log line, and the
    exact validation loss (`evaluate_loss`) at `eval_steps`, recorded in `result` (eval time excluded from the
    training time)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    from hope.evals.common import evaluate_loss

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    class Record(TrainerCallback):
        def __init__(self):
            self.eval_seconds = 0.0
            self.started = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                result.train_loss.append((state.global_step, float(logs["loss"])))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in eval_steps:
                started = time.perf_counter()
                loss = evaluate_loss(model, validation, batch_size, autocast_dtype)
                result.val_loss.append((state.global_step, loss))
                self.eval_seconds += time.perf_counter() - started

        def on_train_end(self, args, state, control, **kwargs):
            result.train_seconds = time.perf_counter() - self.started - self.eval_seconds

    return [QuietProgress(), Record()]


def train_one(name: str, config, datasets, tokenizer, args, device, output_dir: Path) -> RunResult:
    """Train one model with the Trainer, evaluate it, sample from it and save it (model + tokenizer)."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed
    from transformers.trainer_callback import ProgressCallback

    from hope import HopeForCausalLM
    from hope.presets import training_defaults

    set_seed(args.seed)
    model = HopeForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    result = RunResult(name=name, parameters=count_parameters(model))
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    validation = datasets["validation"]
    if args.max_eval_blocks is not None:
        validation = validation.select(range(min(args.max_eval_blocks, len(validation))))
    # ~5 validation points on the curve, the last one at the final step (the reported number).
    eval_steps = sorted({max(1, round(args.max_steps * k / 5)) for k in range(1, 6)})
    checkpoint = output_dir / name
    recipe = {**training_defaults("tiny"), "learning_rate": args.lr}  # the demo's size (hope.presets)
    training_args = TrainingArguments(
        output_dir=str(checkpoint),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        **recipe,
        logging_steps=max(1, args.max_steps // 50),  # ~50 points on the loss curve
        eval_strategy="no",  # the Record callback evaluates, token-weighted, at eval_steps
        save_strategy="no",  # saved once at the end, below
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=device.type == "cpu",
        bf16=use_bf16,
        dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=datasets["train"],
                      data_collator=default_data_collator)
    trainer.remove_callback(ProgressCallback)
    for callback in make_callbacks(result, validation, eval_steps, args.batch_size, autocast_dtype):
        trainer.add_callback(callback)
    print(f"\n== {LABELS[name]}: {result.parameters:,} parameters, {args.max_steps} steps of "
          f"{args.batch_size} x {args.seq_len} bytes on {device.type}{' (bf16)' if use_bf16 else ''}", flush=True)
    trainer.train()
    result.train_tokens = trainer.state.global_step * args.batch_size * args.seq_len
    result.final_val_loss = result.val_loss[-1][1]
    model = trainer.model
    result.sample = generate_sample(model, tokenizer, args.prompt, args.max_new_tokens, args.seed, device)
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    result.checkpoint = str(checkpoint)
    return result


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, device) -> str:
    """Low-temperature sampling (T = 0.5, top-k 20, seeded) from `prompt`; returns prompt + continuation."""
    import torch

    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=0.5, top_k=20)
    torch.random.set_rng_state(generator_state)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- report


def plot_curves(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Train loss (lines) and validation loss (markers) of every run vs step, in nats per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for result, color in zip(results, ("tab:blue", "tab:orange", "tab:green")):
        label = LABELS.get(result.name, result.name)
        if result.train_loss:
            steps, losses = zip(*result.train_loss)
            axis.plot(steps, losses, color=color, alpha=0.8, label=f"{label} train")
        if result.val_loss:
            steps, losses = zip(*result.val_loss)
            axis.plot(steps, losses, "o--", color=color, label=f"{label} validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per byte)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    secondary = axis.secondary_yaxis("right", functions=(lambda x: x / math.log(2), lambda x: x * math.log(2)))
    secondary.set_ylabel("bits per byte")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_summary(results: Sequence[RunResult]) -> str:
    """The side-by-side table printed at the end."""
    from hope.data import bits_per_byte

    rows = [
        ("parameters", [f"{r.parameters:,}" for r in results]),
        ("validation loss (nats/byte)", [f"{r.final_val_loss:.4f}" for r in results]),
        ("validation bits per byte", [f"{bits_per_byte(r.final_val_loss):.4f}" for r in results]),
        ("final train loss (nats/byte)", [f"{r.train_loss[-1][1]:.4f}" if r.train_loss else "-" for r in results]),
        ("training tokens/s", [f"{r.tokens_per_second:,.0f}" for r in results]),
        ("training time (s)", [f"{r.train_seconds:.1f}" for r in results]),
    ]
    names = [LABELS.get(r.name, r.name) for r in results]
    width = max(len(row[0]) for row in rows)
    column = max(14, *(len(n) for n in names), *(len(v) for _, values in rows for v in values))
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>{column}}" for n in names)]
    lines += [f"{key:<{width}}  " + "  ".join(f"{v:>{column}}" for v in values) for key, values in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, RunResult]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)

    import datasets as hf_datasets
    import torch
    from transformers import ByT5Tokenizer

    import hope  # noqa: F401  (registers "hope" with the Auto classes)
    from hope.data import build_datasets, load_topics, split_topics
    from hope.runtime import configure_threads, describe_threads
    from hope.train import pick_device

    started = time.perf_counter()
    device = pick_device(args.device)
    threads_before = torch.get_num_threads()
    threads = configure_threads(args.num_threads)
    bars_were_enabled = hf_datasets.is_progress_bar_enabled()
    hf_datasets.disable_progress_bars()
    try:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = ByT5Tokenizer()
        data = build_datasets(tokenizer, seq_len=args.seq_len)
        train_names, validation_names = split_topics(load_topics())
        print(f"corpus: Python's help topics (pydoc_data.topics), byte-level ByT5 tokens, blocks of {args.seq_len}\n"
              f"  train: {len(train_names)} topics, {len(data['train'])} blocks; "
              f"validation: {len(validation_names)} other topics, {len(data['validation'])} blocks "
              f"({', '.join(validation_names)})\n"
              f"device: {device}, {describe_threads(threads, args.num_threads)}", flush=True)
        configs = build_configs(len(tokenizer), args.hidden_size, args.num_layers, args.num_heads, args.seq_len,
                                tokenizer.pad_token_id, tokenizer.eos_token_id)
        results = {name: train_one(name, configs[name], data, tokenizer, args, device, output_dir)
                   for name in MODEL_NAMES}
    finally:
        torch.set_num_threads(threads_before)
        if bars_were_enabled:
            hf_datasets.enable_progress_bars()

    ordered = [results[name] for name in MODEL_NAMES]
    hope_config = configs["hope"]
    plot_path = output_dir / "loss_curves.png"
    plot_curves(ordered, plot_path, f"Hope vs Transformer++ (D={args.hidden_size}, L={args.num_layers}, "
                                    f"{args.max_steps} steps, pydoc topics, bytes)")
    summary = {
        "args": {k: v for k, v in vars(args).items()},
        "device": str(device),
        "hope_cms_hidden_size": hope_config.cms_hidden_size,
        "models": {r.name: {"parameters": r.parameters, "val_loss": r.final_val_loss,
                            "val_bits_per_byte": r.final_val_loss / math.log(2), "tokens_per_second": r.tokens_per_second,
                            "train_seconds": r.train_seconds, "train_loss": r.train_loss, "val_loss_curve": r.val_loss,
                            "sample": r.sample, "checkpoint": r.checkpoint} for r in ordered},
        "wall_seconds": time.perf_counter() - started,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\n" + "=" * 78)
    print(f"Hope (Titans mixer + CMS {hope_config.cms_chunk_sizes} x {hope_config.cms_hidden_size[0]} wide) vs "
          f"Transformer++ (attention + FFN {configs['transformer'].cms_hidden_size[0]} wide), "
          f"D={args.hidden_size}, L={args.num_layers}, same steps / batch / lr\n"
          "(validation: held-out topics; loss per UTF-8 byte, </s> separators not counted; bpb = loss / ln 2)\n")
    print(format_summary(ordered))
    for r in ordered:
        print(f"\n--- sample from {LABELS[r.name]} (T=0.5, top-k 20) ---\n{r.sample}")
    print("\ncheckpoints (model + tokenizer; `import hope; AutoModelForCausalLM.from_pretrained(path)`):")
    for r in ordered:
        print(f"  {LABELS[r.name]:<14} {r.checkpoint}")
    print(f"loss curves: {plot_path}\nsummary:     {output_dir / 'summary.json'}")
    print(f"total wall time: {summary['wall_seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
