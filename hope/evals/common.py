"""What every evaluation shares: token-weighted loss, accuracy at the labelled positions, training a model on a
synthetic task with the HF Trainer, and the three models every comparison runs (Hope, Hope without CMS,
Transformer++ at one parameter budget)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hope.configuration_hope import HopeConfig

IGNORE_INDEX = -100
MODEL_LABELS = {"hope": "Hope", "hope-no-cms": "Hope w/o CMS", "transformer": "Transformer++"}


def _batches(dataset, batch_size: int, device: torch.device, progress: bool = False):
    """(input_ids, labels) tensors of `batch_size` rows; with `progress`, a tqdm bar counts the rows."""
    from tqdm.auto import tqdm

    with tqdm(total=len(dataset), desc="evaluate", unit="row", disable=not progress) as bar:
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            yield (torch.tensor(batch["input_ids"], device=device), torch.tensor(batch["labels"], device=device))
            bar.update(len(batch["input_ids"]))


def evaluate_loss(model, dataset, batch_size: int, autocast_dtype: Optional[torch.dtype] = None,
                  progress: bool = False) -> float:
    """Mean next-token loss in nats over every labelled token of `dataset` (rows of "input_ids" and "labels",
    -100 skipped), weighted by tokens, not by batches. `progress` shows a tqdm bar."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in _batches(dataset, batch_size, device, progress):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=ids, use_cache=False).logits
            targets = labels[:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def labelled_correct(model, dataset, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Greedy correctness at every labelled position: a bool tensor (rows, T) that is True where the argmax of
    the prediction for token t (made at t - 1) equals labels[t]; False at unlabelled positions. `progress` shows a
    tqdm bar."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for ids, labels in _batches(dataset, batch_size, device, progress):
            predicted = model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)
            correct = torch.zeros_like(labels, dtype=torch.bool)
            correct[:, 1:] = (predicted == labels[:, 1:]) & (labels[:, 1:] != IGNORE_INDEX)
            rows.append(correct.cpu())
    model.train(was_training)
    return torch.cat(rows)


@dataclass
class ModelShape:
    """Width, depth and heads of the compared models; `chunk_size` is the Titans chunk of the Hope models."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_heads: int = 2
    chunk_size: int = 16


def comparison_configs(vocab_size: int, shape: ModelShape, max_position_embeddings: int) -> Dict[str, "HopeConfig"]:
    """Hope (CMS [16, 128, None]), Hope without CMS (the same levels, all `None`: no in-context learning in the
    MLPs) and Transformer++; the CMS widths of both Hope models are solved so that all three share one budget."""
    from hope.presets import matched_hope_config, transformer_config

    common = dict(vocab_size=vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                  num_heads=shape.num_heads, max_position_embeddings=max_position_embeddings, pad_token_id=0,
                  bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    hope = matched_hope_config(multiple=8, chunk_size=shape.chunk_size, **common)
    # Without in-context learning a level has no target projection or step-size gate: its width is solved anew.
    no_cms = matched_hope_config(multiple=8, chunk_size=shape.chunk_size, cms_chunk_sizes=[None] * 3, **common)
    return {"hope": hope, "hope-no-cms": no_cms, "transformer": transformer_config(**common)}


def train_on_task(config, train_dataset, *, steps: int, batch_size: int, learning_rate: float, seed: int,
                  output_dir: Path, progress: bool = True):
    """A fresh HopeForCausalLM(config) trained on `train_dataset` ("input_ids"/"labels" rows) with the HF
    Trainer (`fine_tune`). Returns the trained model in eval mode."""
    from transformers import set_seed

    from hope import HopeForCausalLM

    set_seed(seed)
    return fine_tune(HopeForCausalLM(config), train_dataset, steps=steps, batch_size=batch_size,
                     learning_rate=learning_rate, seed=seed, output_dir=output_dir, progress=progress)


def fine_tune(model, train_dataset, *, batch_size: int, learning_rate: float, seed: int, output_dir: Path,
              steps: Optional[int] = None, epochs: Optional[float] = None, progress: bool = True):
    """Train `model` (any HF causal LM) in place on `train_dataset` with the HF Trainer, for `steps` optimizer
    steps or `epochs` passes: AdamW, cosine schedule with 5% warmup, gradient clipping at 1; the CPU unless CUDA
    is present (bf16 there). Returns the model in eval mode."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    cuda = torch.cuda.is_available()
    total = steps if steps is not None else math.ceil(len(train_dataset) / batch_size * epochs)
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps if steps is not None else -1,
        num_train_epochs=epochs if epochs is not None else 1, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, total // 20),
        weight_decay=0.01, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=max(1, total // 10),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(), dataloader_num_workers=0, disable_tqdm=not progress,
    )
    model.train()
    Trainer(model=model, args=arguments, train_dataset=train_dataset, data_collator=default_data_collator).train()
    return model.eval()
