"""One training step of a small Hope against Transformer++ of the same size (pytest-benchmark).

Shape of issue #2: hidden 256, 4 layers, T = 512, B = 4. Hope keeps the CMS parameter budget of the
Transformer++ FFN (three levels of 256 vs one of 704). Run with `make bench`; the README reports the ratio.
"""
from __future__ import annotations

import pytest
import torch

from hope import HopeConfig, HopeForCausalLM

SHAPE = dict(vocab_size=384, hidden_size=256, num_hidden_layers=4, num_heads=4)
BATCH, SEQ_LEN = 4, 512

MODELS = {
    "hope": dict(mixer="titans", chunk_size=64, cms_chunk_sizes=[16, 128, None], cms_hidden_size=256),
    "hope-attention": dict(mixer="attention", cms_chunk_sizes=[16, 128, None], cms_hidden_size=256),
    "transformer++": dict(mixer="attention", cms_chunk_sizes=[None], cms_hidden_size=704),
}


def build(name: str) -> HopeForCausalLM:
    torch.manual_seed(0)
    return HopeForCausalLM(HopeConfig(**SHAPE, **MODELS[name], kernel_backend="torch"))


@pytest.mark.parametrize("name", list(MODELS))
def test_train_step(benchmark, name: str) -> None:
    model = build(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ_LEN))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    benchmark.extra_info["parameters"] = sum(p.numel() for p in model.parameters())
    benchmark.extra_info["tokens_per_step"] = BATCH * SEQ_LEN
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))
