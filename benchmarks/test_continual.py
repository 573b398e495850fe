"""Online learning (pytest-benchmark; `make bench`): `hope.OnlineLearner` reading one 512-token sequence against
the same model's plain training throughput at the same shape.

* learn: `OnlineLearner(model)` with its defaults (every CMS level with a chunk size learns, AdamW), one sequence
  of T = 512 random tokens per call, batch 1: a forward and backward per piece (pieces end at each step of the
  fastest level, C = 16), an optimizer step per level period;
* train: one AdamW step on the next-token loss at B = 1, T = 512 (`workloads.train_step`), the same model.

Both at preset `small` (hidden 256, 4 layers, 4 heads), fp32, the PyTorch reference kernels. The ratio of the two
throughputs is recorded in the learn row's `extra_info` (`ratio_to_training`; the goal is >= 0.3), reported and
not asserted.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from benchmarks import workloads as W

SIZE = "small"
SEQ_LEN = 512
NAMES = ("hope", "hope-attention")


def _train_tokens_per_second(name: str) -> float:
    """Plain training at B = 1, T = SEQ_LEN: median of 3 timed steps after a warm-up step."""
    model = W.build_model(name, SIZE, kernel_backend="torch")
    step = W.train_step(model, 1, SEQ_LEN)
    step()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return SEQ_LEN / statistics.median(times)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_batch1(benchmark, name: str) -> None:
    model = W.build_model(name, SIZE, kernel_backend="torch")
    step = W.train_step(model, 1, SEQ_LEN)
    benchmark.extra_info.update(parameters=sum(p.numel() for p in model.parameters()), tokens_per_step=SEQ_LEN)
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_online_learn(benchmark, name: str) -> None:
    from hope.continual import OnlineLearner

    model = W.build_model(name, SIZE, kernel_backend="torch")
    learner = OnlineLearner(model, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(0))
    summary = benchmark.pedantic(lambda: learner.learn([ids]), rounds=3, warmup_rounds=1)
    learn = SEQ_LEN / benchmark.stats.stats.median
    train = _train_tokens_per_second(name)
    benchmark.extra_info.update(parameters=sum(p.numel() for p in model.parameters()), tokens_per_call=SEQ_LEN,
                                periods=learner.periods, learn_tokens_per_s=learn, train_tokens_per_s=train,
                                ratio_to_training=learn / train)
    print(f"\n{name}: OnlineLearner {learn:,.0f} tokens/s, plain training at B=1 T={SEQ_LEN} {train:,.0f} tokens/s: "
          f"ratio {learn / train:.2f} (goal >= 0.30)")
    assert summary["tokens"] == SEQ_LEN and summary["mean_loss"] is not None
