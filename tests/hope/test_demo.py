"""`python -m hope.train --demo` end to end at smoke-test size, and the corpus split it relies on."""
from __future__ import annotations

import math
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

import hope  # noqa: F401  (registers the Auto classes)
from hope.data import IGNORE_INDEX, build_datasets, load_topics, pack_dataset, split_topics, topics_dataset, tokenize_dataset
from hope.train import run_command


def test_topic_split_is_disjoint_deterministic_and_non_empty():
    topics = load_topics()
    train, validation = split_topics(topics)
    assert validation and train
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(topics)
    assert split_topics(reversed(list(topics))) == (train, validation)  # order-independent
    validation_chars = sum(len(topics[name]) for name in validation)
    assert 0.02 < validation_chars / sum(len(text) for text in topics.values()) < 0.3


def test_packed_blocks_are_full_and_skip_the_separators():
    tokenizer = ByT5Tokenizer()
    data = build_datasets(tokenizer, seq_len=64)
    assert len(data["train"]) > 10 * len(data["validation"]) > 0
    block = data["validation"][0]
    assert len(block["input_ids"]) == len(block["labels"]) == 64
    # ByT5 ids are bytes + 3, so the first block is the first validation topic's opening bytes.
    first = split_topics(load_topics())[1][0]
    text = load_topics()[first].encode("utf-8")
    assert len(text) >= 64 and bytes(i - 3 for i in block["input_ids"]) == text[:64]
    # Every </s> separator is in the inputs but never a target.
    packed = pack_dataset(tokenize_dataset(topics_dataset({"a": "xy", "b": "zw"}, ["a", "b"]), tokenizer), 3,
                          tokenizer.eos_token_id)
    eos = tokenizer.eos_token_id
    assert packed["input_ids"] == [[ord("x") + 3, ord("y") + 3, eos], [ord("z") + 3, ord("w") + 3, eos]]
    assert packed["labels"] == [[ord("x") + 3, ord("y") + 3, IGNORE_INDEX], [ord("z") + 3, ord("w") + 3, IGNORE_INDEX]]


def test_demo_trains_saves_and_reports_both_models(tmp_path, capsys):
    results = run_command(["--demo", "--tiny", "--max-steps", "3", "--device", "cpu", "--num-threads", "1",
                           "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "1 CPU thread (from --num_threads)" in out  # hope.runtime.configure_threads, as in hope-train

    assert set(results) == {"hope", "transformer"}
    row = re.search(r"^validation bits per byte\s+(\S+)\s+(\S+)\s*$", out, re.MULTILINE)
    assert row, out
    bpb = [float(value) for value in row.groups()]
    assert all(math.isfinite(value) and 0 < value < 10 for value in bpb)
    for value, name in zip(bpb, ("hope", "transformer")):
        assert value == round(results[name].final_val_loss / math.log(2), 4)
    assert re.search(r"^\s+Hope\s+Transformer\+\+\s*$", out, re.MULTILINE), out
    assert "training tokens/s" in out and "sample from Hope" in out and "sample from Transformer++" in out

    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert (tmp_path / "summary.json").exists()
    mixers = {}
    for name in ("hope", "transformer"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / name)
        ids = tokenizer("def f(x):", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tokenizer))
        assert torch.isfinite(logits).all()
        assert results[name].parameters == sum(p.numel() for p in model.parameters())
        assert results[name].train_loss and results[name].val_loss[-1][0] == 3
        mixers[name] = (model.config.mixer, model.config.cms_chunk_sizes)
    assert mixers == {"hope": ("titans", [16, 128, None]), "transformer": ("attention", [None])}
