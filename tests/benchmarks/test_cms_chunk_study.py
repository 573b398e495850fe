"""benchmarks/cms_chunk_study.py: the packed task rows and one tiny end-to-end run (the study itself is not a test)."""
from __future__ import annotations

import json

import pytest

from benchmarks import cms_chunk_study as study


@pytest.mark.parametrize("task", ["mqar", "forgetting"])
@pytest.mark.parametrize("rows,seq_len", [(1, 8192), (7, 300), (200, 512)])
def test_rows_are_full_and_labelled(task, rows, seq_len):
    """Enough instances are drawn for every row (each row cuts one), and every row has labelled tokens."""
    data, vocab = study.task_rows(task, rows, seq_len, seed=3)
    assert data["input_ids"].shape == data["labels"].shape == data["tag"].shape == (rows, seq_len)
    labelled = data["labels"] != -100
    assert labelled.any(1).all()
    assert ((data["tag"] >= 0) == labelled).all()  # a tag exactly where a label is
    assert int(data["input_ids"].max()) < vocab


def test_tiny_run_writes_results(tmp_path):
    """Two level sets, two steps each, on 64-token rows: one JSON per run, the summary and the plot."""
    out = tmp_path / "study"
    results = study.main(["--level_sets", "4,16,None;None,None,None", "--tasks", "mqar", "--seq_len", "64",
                          "--steps", "2", "--batch_size", "1", "--eval_rows", "2", "--hidden_size", "32",
                          "--num_layers", "1", "--num_heads", "2", "--chunk_size", "4", "--output_dir", str(out)])
    assert len(results) == 2
    for r in results:
        assert r["train"]["trained_to_end"] and len(r["train"]["loss"]) == 2
        assert 0.0 <= r["eval"]["accuracy"] <= 1.0
    assert len(list(out.glob("mqar_*_seed0.json"))) == 2
    assert "| [4, 16, None] | mqar |" in (out / "summary.md").read_text()
    assert (out / "chunk_study.png").stat().st_size > 0
    again = study.main(["--level_sets", "4,16,None", "--tasks", "mqar", "--seq_len", "64", "--output_dir", str(out)])
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)  # reruns skip what exists


def test_rejects_rows_too_short_for_the_slowest_level():
    with pytest.raises(SystemExit):
        study.parse_args(["--level_sets", "16,128,None", "--seq_len", "256"])
