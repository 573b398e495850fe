"""transformers.Trainer on a tiny Hope: the loss goes down, and gradient accumulation with
`num_items_in_batch` gives the same step as one big batch (tokens with label -100 counted right)."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hope import HopeForCausalLM
from tests.hope.utils_hope import VOCAB, tiny_config

SEQ_LEN = 16


def _pattern_dataset(rows: int = 64, seed: int = 0) -> Dataset:
    """Sequences that repeat a random pattern of 2-4 tokens: learnable in context and across steps. A random
    number of leading labels is -100, so micro-batches hold different numbers of target tokens."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(rows):
        period = int(torch.randint(2, 5, (1,), generator=generator))
        pattern = torch.randint(0, VOCAB, (period,), generator=generator)
        ids = pattern.repeat(SEQ_LEN // period + 1)[:SEQ_LEN]
        labels = ids.clone()
        labels[: int(torch.randint(0, SEQ_LEN // 2, (1,), generator=generator))] = -100
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return Dataset.from_list(examples)


def _train(tmp_path, dataset: Dataset, *, batch_size: int, accumulation: int, steps: int, num_items: list | None = None):
    torch.manual_seed(0)
    model = HopeForCausalLM(tiny_config(mixer="titans", cms_chunk_sizes=[4, None]))
    if num_items is not None:
        model.register_forward_pre_hook(lambda m, args, kwargs: num_items.append(kwargs.get("num_items_in_batch")),
                                        with_kwargs=True)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, max_steps=steps,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, learning_rate=3e-3,
        lr_scheduler_type="constant", warmup_steps=0, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == steps
    return model, logs


def _eval_loss(model: HopeForCausalLM, dataset: Dataset) -> float:
    batch = dataset[:32]
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["labels"])).loss.item()


def test_trainer_lowers_the_loss(tmp_path):
    dataset = _pattern_dataset()
    torch.manual_seed(0)
    before = _eval_loss(HopeForCausalLM(tiny_config(mixer="titans", cms_chunk_sizes=[4, None])), dataset)
    model, logs = _train(tmp_path, dataset, batch_size=8, accumulation=1, steps=12)
    after = _eval_loss(model, dataset)
    losses = [float(entry["loss"]) for entry in logs]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < before - 0.3, f"eval loss {before:.3f} -> {after:.3f}"
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"logged losses did not go down: {losses}"


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """bs 4 x 2 accumulation steps sees the same 8 rows per step as bs 8: with the loss normalised by
    num_items_in_batch (the target tokens of both micro-batches), the logged loss and grad norm agree."""
    dataset = _pattern_dataset()
    num_items = []
    _, accumulated = _train(tmp_path / "acc", dataset, batch_size=4, accumulation=2, steps=3, num_items=num_items)
    _, single = _train(tmp_path / "one", dataset, batch_size=8, accumulation=1, steps=3)
    assert len(num_items) == 6 and all(n is not None for n in num_items), f"num_items_in_batch not passed: {num_items}"
    assert num_items[0] == num_items[1] and num_items[0] < 8 * (SEQ_LEN - 1)  # counted over both, -100 excluded
    for step, (a, b) in enumerate(zip(accumulated, single)):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4), f"step {step}"
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4), f"step {step}"
