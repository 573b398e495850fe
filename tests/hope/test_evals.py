"""The evaluations of `hope-eval`: the MQAR and forgetting generators say what they promise, the scorers are
exact on oracle models, and the CLI (checkpoint mode and --compare at smoke size) writes consistent results."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from hope.eval import run_command as eval_main
from hope.evals.common import IGNORE_INDEX, comparison_configs, ModelShape
from hope.evals.forgetting import ForgettingTask, generate_stream, recall_by_age
from hope.evals.mqar import MQARTask, generate_mixture, generate_mqar, mqar_accuracy
from hope.presets import count_parameters


class PeekingModel(torch.nn.Module):
    """An oracle that reads the future: at position t it predicts input_ids[t + 1], except where `blind(t_next)`
    says to predict token 0 instead. Scores computed on it are exact, so they test the scorers."""

    def __init__(self, vocab_size: int, blind=None):
        super().__init__()
        self.vocab_size = vocab_size
        self.blind = blind
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        target = torch.zeros_like(input_ids)
        target[:, :-1] = input_ids[:, 1:]
        if self.blind is not None:
            target[:, :-1][self.blind(input_ids)[:, 1:]] = 0
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab_size).float())


def test_mqar_rows_ask_for_values_of_context_keys():
    task = MQARTask(num_pairs=6, num_queries=4, num_keys=20, num_values=10, seq_len=24)
    rows = generate_mqar(task, 50, seed=3)
    assert rows["input_ids"] == generate_mqar(task, 50, seed=3)["input_ids"]
    assert rows["input_ids"] != generate_mqar(task, 50, seed=4)["input_ids"]
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        keys, values = ids[0:12:2], ids[1:12:2]
        assert len(set(keys)) == 6 and all(1 <= k <= 20 for k in keys) and all(21 <= v <= 30 for v in values)
        memory = dict(zip(keys, values))
        queries = ids[12:20:2]
        assert len(set(queries)) == 4 and set(queries) <= set(keys)
        assert [labels[t] for t in range(13, 20, 2)] == [memory[q] for q in queries] == ids[13:20:2]
        assert sum(label != IGNORE_INDEX for label in labels) == 4 and ids[20:] == [0] * 4
    with pytest.raises(ValueError, match="seq_len"):
        MQARTask(num_pairs=8, seq_len=20)
    with pytest.raises(ValueError, match="num_pairs"):
        MQARTask(num_pairs=9, num_keys=8)
    mixture = generate_mixture([MQARTask(num_pairs=2), MQARTask(num_pairs=4)], 10, seed=0)
    assert sorted(mixture["num_pairs"]) == [2] * 10 + [4] * 10


def test_mqar_accuracy_is_exact_on_oracles():
    task = MQARTask(num_pairs=4, seq_len=16)
    rows = generate_mqar(task, 8, seed=0)
    assert mqar_accuracy(PeekingModel(task.vocab_size), rows) == 1.0
    assert mqar_accuracy(PeekingModel(task.vocab_size, blind=lambda ids: torch.ones_like(ids, dtype=torch.bool)),
                         rows) == 0.0
    # Blind to the answers of rows 0-1 only: 2 of 8 rows wrong.
    half = PeekingModel(task.vocab_size, blind=lambda ids: torch.zeros_like(ids, dtype=torch.bool).index_fill(
        0, torch.tensor([0, 1]), True))
    assert mqar_accuracy(half, rows, batch_size=8) == pytest.approx(6 / 8)


def test_forgetting_streams_interfere_and_ask_every_fact_once():
    task = ForgettingTask(num_segments=5, pairs_per_segment=3, num_keys=4, num_values=9, repeats=2)
    rows = generate_stream(task, 20, seed=1)
    reused_with_new_value = 0
    for ids, labels, ages in zip(rows["input_ids"], rows["labels"], rows["age"]):
        assert len(ids) == task.seq_len
        teach = 3 * task.facts * task.repeats
        taught = {}
        for t in range(0, teach, 3):
            marker, key, value = ids[t : t + 3]
            assert taught.setdefault((marker, key), value) == value  # a fact is the same in every repeat
            assert labels[t : t + 3] == [IGNORE_INDEX] * 3
        assert len(taught) == task.facts
        asked = [(ids[t], ids[t + 1], ids[t + 2], labels[t + 2], ages[t + 2]) for t in range(teach, len(ids), 3)]
        assert sorted((m, k) for m, k, *_ in asked) == sorted(taught)
        for marker, key, value, label, age in asked:
            assert value == label == taught[(marker, key)] and age == task.num_segments - marker
        by_key = {}
        for (marker, key), value in taught.items():
            by_key.setdefault(key, set()).add(value)
        reused_with_new_value += sum(len(values) > 1 for values in by_key.values())
    assert reused_with_new_value > 0  # keys recur across segments with other values: the facts interfere


def test_recall_by_age_is_exact_on_oracles():
    task = ForgettingTask(num_segments=4, pairs_per_segment=2, num_keys=3)
    rows = generate_stream(task, 6, seed=0)
    assert recall_by_age(PeekingModel(task.vocab_size), rows, 4) == [1.0] * 4
    # Forgets segment 1 (marker id 1 = age 3): blind where the query's marker, two tokens back, is 1.
    def blind(ids):
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 2:] = ids[:, :-2] == 1
        return mask
    assert recall_by_age(PeekingModel(task.vocab_size, blind), rows, 4) == [1.0, 1.0, 1.0, 0.0]


def test_the_three_models_share_one_budget():
    configs = comparison_configs(100, ModelShape(hidden_size=64, num_hidden_layers=2, num_heads=2), 512)
    counts = {name: count_parameters(config) for name, config in configs.items()}
    assert configs["hope-no-cms"].cms_chunk_sizes == [None, None, None]
    assert configs["hope"].cms_chunk_sizes == [16, 128, None] and configs["transformer"].mixer == "attention"
    for name in ("hope", "hope-no-cms"):
        assert abs(counts[name] / counts["transformer"] - 1) < 0.06, counts


@pytest.mark.parametrize("task", ["mqar", "forgetting"])
def test_compare_smoke_and_checkpoint_mode_agree(tmp_path, task):
    size = ["--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--chunk_size", "4", "--steps", "2",
            "--train_batch_size", "4", "--num_examples", "8", "--num_pairs", "2,4", "--mqar_seq_len", "16",
            "--num_segments", "2", "--pairs_per_segment", "2", "--batch_size", "4"]
    results = eval_main(["--task", task, "--compare", "--output_dir", str(tmp_path), *size])
    assert set(results["models"]) == {"hope", "hope-no-cms", "transformer"}
    assert json.loads((tmp_path / "results.json").read_text())["models"].keys() == results["models"].keys()
    table = (tmp_path / "results.md").read_text()
    assert "| Hope w/o CMS |" in table and "| Transformer++ |" in table
    assert (tmp_path / f"{task}.png").stat().st_size > 1000
    key = "accuracy_by_pairs" if task == "mqar" else "recall_by_age"
    for name, metrics in results["models"].items():
        scores = list(metrics[key].values()) if task == "mqar" else metrics[key]
        assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
        # The saved checkpoint, evaluated alone, scores exactly what --compare reported.
        again = eval_main(["--task", task, "--model", str(tmp_path / name), *size[10:]])
        assert again[key] == metrics[key]


def test_lm_mode_reports_the_models_own_loss(tmp_path, capsys):
    from transformers import ByT5Tokenizer

    from hope import HopeConfig, HopeForCausalLM

    torch.manual_seed(0)
    model = HopeForCausalLM(HopeConfig(vocab_size=384, hidden_size=16, num_hidden_layers=1, num_heads=2, chunk_size=4,
                                       cms_chunk_sizes=[4, None], eos_token_id=1, pad_token_id=0))
    model.save_pretrained(tmp_path / "ckpt")
    text = "The quick brown fox jumps over the lazy dog. " * 3
    Dataset.from_dict({"text": [text]}).to_json(str(tmp_path / "held.jsonl"))
    metrics = eval_main(["--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "held.jsonl"), "--seq_len", "32",
                         "--num_threads", "1"])
    err = capsys.readouterr().err
    assert "evaluate: 100%|██████████| 4/4" in err  # the progress bar, left at its end
    assert "4 blocks of 32 tokens; 1 CPU thread (from --num_threads)" in err  # hope.runtime's policy, as in hope-train
    ids = ByT5Tokenizer()(text, add_special_tokens=False).input_ids + [1]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    with torch.no_grad():
        expected = model(input_ids=blocks, labels=blocks).loss.item()
    assert metrics["blocks"] == blocks.shape[0] and metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(expected / 0.6931471805599453, rel=1e-5)  # ByT5: a token a byte


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "blank", "no_blocks", "zero_length", "threads"])
def test_bad_input_is_one_line_with_exit_status_2(tmp_path, capsys, case):
    from hope import HopeConfig, HopeForCausalLM

    HopeForCausalLM(HopeConfig(vocab_size=384, hidden_size=16, num_hidden_layers=1, num_heads=2, chunk_size=4,
                               cms_chunk_sizes=[None])).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "blank.txt").write_text(" \n\n \n")
    (tmp_path / "plain").mkdir()
    Dataset.from_dict({"text": ["some held-out text " * 8]}).to_json(str(tmp_path / "held.jsonl"))
    model, data, extra, message = {
        "missing": (tmp_path / "nope", tmp_path / "held.jsonl", [], "no such checkpoint directory"),
        "not_a_checkpoint": (tmp_path / "plain", tmp_path / "held.jsonl", [], "not a checkpoint directory"),
        "blank": (tmp_path / "ckpt", tmp_path / "blank.txt", [], "holds no text"),
        "no_blocks": (tmp_path / "ckpt", tmp_path / "held.jsonl", ["--max_eval_samples", "0"],
                      "--max_eval_samples must be a positive integer"),
        "zero_length": (tmp_path / "ckpt", tmp_path / "held.jsonl", ["--seq_len", "1"], "--seq_len must be at least 2"),
        "threads": (tmp_path / "ckpt", tmp_path / "held.jsonl", ["--num_threads", "0"],
                    "--num_threads must be a positive integer"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model", str(model), "--data", str(data), "--seq_len", "16", *extra])  # the last --seq_len wins
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err, err
