"""`hope-eval --task continual`: the synthetic languages say what they promise, the transfer metrics follow GEM's
definitions, and a smoke run of the whole benchmark writes consistent results in seconds."""
from __future__ import annotations

import json

import pytest

from hope.eval import main as eval_main
from hope.evals.continual import (BASE_MARKERS, IGNORE_INDEX, OUTPUTS, SYMBOLS, build_benchmark, encode,
                                  language_rows, make_languages, transfer_metrics)


def decode(ids):
    return bytes(i - 3 for i in ids).decode("ascii")


def test_languages_conflict_and_rows_label_only_outputs():
    languages = make_languages("0123", seed=0, num_symbols=16)
    assert [language.marker for language in languages] == list("0123")
    for language in languages:
        assert sorted(language.mapping) == list(SYMBOLS) and sorted(language.mapping.values()) == list(OUTPUTS)
    # The same symbols get different outputs in different languages (the knowledge conflicts).
    assert all(sum(a.mapping[s] != b.mapping[s] for s in SYMBOLS) >= 8 for a in languages for b in languages
               if a is not b)
    assert make_languages("0123", seed=0, num_symbols=16) == languages
    assert make_languages("0123", seed=1, num_symbols=16) != languages
    rows = language_rows(languages[2], 20, pairs_per_row=5, seed=3)
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        text = decode(ids)
        assert len(ids) == 11 and text[0] == "2"
        symbols, outputs = text[1::2], text[2::2]
        assert len(set(symbols)) == 5  # distinct: an output cannot be copied from the row
        assert [languages[2].mapping[s] for s in symbols] == list(outputs)
        assert [label for label in labels if label != IGNORE_INDEX] == encode(outputs)
        assert all(labels[t] == IGNORE_INDEX for t in [0, 1, 3, 5, 7, 9])  # the marker and the symbols


def test_benchmark_splits_and_base_data():
    from types import SimpleNamespace

    args = SimpleNamespace(pairs_per_row=4, base_languages=3, num_symbols=8, base_steps=5, train_batch_size=8,
                           base_corpus_fraction=0.25, num_tasks=4, rows_per_task=6, eval_rows=5)
    bench = build_benchmark(args, seed=0)
    assert len(bench.train) == len(bench.evaluation) == 4
    assert [len(rows) for rows in bench.train] == [6] * 4 and [len(rows) for rows in bench.evaluation] == [5] * 4
    assert bench.train[0]["input_ids"] != bench.evaluation[0]["input_ids"]  # held-out rows
    markers = {decode(ids)[0] for ids in bench.base["input_ids"]}
    assert set(BASE_MARKERS[:3]) <= markers and not markers & set("0123")  # new markers in the continual phase
    assert len(bench.base) >= 40 and all(len(ids) == 9 for ids in bench.base["input_ids"])


def test_transfer_metrics_follow_gem():
    matrix = [[0.9, 0.1, 0.2], [0.5, 0.8, 0.3], [0.4, 0.6, 0.7]]
    base = [0.1, 0.2, 0.1]
    metrics = transfer_metrics(matrix, base)
    assert metrics["acc"] == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    assert metrics["bwt"] == pytest.approx(((0.4 - 0.9) + (0.6 - 0.8)) / 2)
    assert metrics["fwt"] == pytest.approx(((0.1 - 0.2) + (0.3 - 0.1)) / 2)


def test_continual_smoke_run(tmp_path):
    methods = "hope-online,hope-attention-stacked,transformer-finetune,transformer-replay"
    eval_main(["--task", "continual", "--output_dir", str(tmp_path), "--hidden_size", "16", "--num_layers", "1",
               "--num_heads", "2", "--chunk_size", "4", "--num_tasks", "4", "--num_symbols", "4",
               "--pairs_per_row", "2", "--rows_per_task", "6", "--eval_rows", "3", "--epochs", "1",
               "--base_steps", "2", "--train_batch_size", "4", "--finetune_batch_size", "4", "--base_languages", "2",
               "--seeds", "0", "--methods", methods, "--replay_fraction", "0.5", "--no_progress"])
    results = json.loads((tmp_path / "results.json").read_text())
    ran = set(results["methods"])
    assert ran | set(results["skipped"]) == set(methods.split(","))
    assert {"hope-online", "transformer-finetune", "transformer-replay"} <= ran
    for entry in results["methods"].values():
        run = entry["seeds"]["0"]
        assert len(run["matrix"]) == 4 and all(len(row) == 4 for row in run["matrix"]) and len(run["base"]) == 4
        assert all(0 <= a <= 1 for row in run["matrix"] for a in row)
        metrics = transfer_metrics(run["matrix"], run["base"])
        assert all(run[key] == pytest.approx(value) for key, value in metrics.items())
        assert entry["summary"]["acc"]["mean"] == pytest.approx(run["acc"])
    assert results["methods"]["hope-online"]["seeds"]["0"]["learner_steps"]["0"] > 0
    for name in ("results.md", "continual_heatmap.png", "continual_lines.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| method | parameters | ACC | BWT | FWT |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        eval_main(["--task", "continual", "--methods", "nope"])
