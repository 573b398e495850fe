"""Model level (pytest-benchmark; `make bench`): one training step and one decode token of Hope, Hope-Attention
and Transformer++ at one parameter budget (`hope/presets.py`, preset "small": hidden 256, 4 layers, 4 heads).

* training step: AdamW, next-token loss, B = 4, T = 512, fp32, the PyTorch reference kernels;
* decode: one token per call at batch 1 after a prompt of 128 or 1024 tokens (Hope's cost per token should
  not depend on the prompt length; attention's grows with its KV cache).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import workloads as W

SIZE = "small"
BATCH, SEQ_LEN = 4, 512
PROMPTS = (128, 1024)


@pytest.mark.parametrize("name", W.MODEL_NAMES)
def test_train_step(benchmark, name: str) -> None:
    model = W.build_model(name, SIZE, kernel_backend="torch")
    step = W.train_step(model, BATCH, SEQ_LEN)
    benchmark.extra_info.update(parameters=sum(p.numel() for p in model.parameters()),
                                tokens_per_step=BATCH * SEQ_LEN)
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("name", W.MODEL_NAMES)
def test_decode_token(benchmark, name: str, prompt: int) -> None:
    model = W.build_model(name, SIZE, kernel_backend="torch").eval()
    cache = W.prefill(model, prompt, piece=512)
    assert cache.seen_tokens == prompt
    step = W.decode_step(model, cache, batch=1)
    benchmark.extra_info.update(parameters=sum(p.numel() for p in model.parameters()), prompt=prompt,
                                cache_bytes=W.cache_bytes(cache))
    logits = benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    assert logits.shape == (1, 1, model.config.vocab_size)
    assert cache.seen_tokens == prompt + 22  # every call consumed one token
