"""`hope-train` end to end at smoke-test size: the data forms it reads, TrainingArguments passthrough, fine-tuning
a checkpoint, exact resumption after an interruption, the errors it promises, and DDP (2 gloo processes) equal
to one process with the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hope  # noqa: F401  (registers the Auto classes)
from hope.data import load_text_dataset
from hope.train import main, parse_overrides

REPO = Path(__file__).resolve().parents[2]
TINY = "hidden_size=32,num_heads=2,num_hidden_layers=1,chunk_size=8,cms_chunk_sizes=[4,None]"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 help topics as jsonl ("text" column): ~190k bytes, thousands of 32-byte blocks."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    with path.open("w") as handle:
        for text in list(topics.values())[:40]:
            handle.write(json.dumps({"text": text, "id": len(text)}) + "\n")
    return path


def train(output: Path, data, *extra: str, steps: int = 3, batch: int = 2):
    return main(["--model", "tiny", "--data", str(data), "--config_overrides", TINY, "--seq_len", "32",
                 "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--use_cpu",
                 "--output_dir", str(output), "--learning_rate", "1e-2", "--logging_steps", "1",
                 "--disable_tqdm", "true", "--seed", "0", *extra])


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def test_parse_overrides():
    assert parse_overrides("hidden_size=32,cms_chunk_sizes=[4,None],kernel_backend=torch,dgd=False") == {
        "hidden_size": 32, "cms_chunk_sizes": [4, None], "kernel_backend": "torch", "dgd": False}
    assert parse_overrides('{"eta_max": 0.5}') == {"eta_max": 0.5}
    assert parse_overrides(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("hidden_size")


def test_trains_evaluates_saves_and_passes_training_arguments_through(tmp_path, corpus):
    metrics = train(tmp_path / "run", corpus, "--gradient_accumulation_steps", "2", "--save_steps", "1",
                    "--save_total_limit", "1", "--lr_scheduler_type", "constant", "--max_eval_samples", "4",
                    "--validation_split_percentage", "10", steps=3)
    run = tmp_path / "run"
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-3"]  # save_total_limit=1 kept the last
    args = torch.load(run / "training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 2 and args.lr_scheduler_type == "constant"
    assert {e["learning_rate"] for e in state["log_history"] if "learning_rate" in e} == {1e-2}
    assert 0 < metrics["eval_loss"] < 10 and metrics["eval_perplexity"] == pytest.approx(
        torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)
    assert 0 < metrics["eval_bits_per_byte"] < 15
    model = AutoModelForCausalLM.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert model.config.hidden_size == 32 and model.config.cms_chunk_sizes == [4, None]
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_data_forms_all_train(tmp_path, corpus):
    """txt, parquet, a directory of jsonl files, a glob, a save_to_disk directory, and streaming."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    (tmp_path / "a.txt").write_text("\n".join(texts[:3]))
    Dataset.from_dict({"body": texts[:5]}).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "dir").mkdir()
    shutil.copy(corpus, tmp_path / "dir" / "part0.jsonl")
    Dataset.from_dict({"text": texts[:5]}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_text_dataset(str(tmp_path / "a.txt"))) == len("\n".join(texts[:3]).splitlines())  # a row a line
    for data, extra in ((tmp_path / "a.txt", ()), (tmp_path / "b.parquet", ("--text_column", "body")),
                        (tmp_path / "dir", ()), (tmp_path / "d*/*.jsonl", ()), (tmp_path / "saved", ()),
                        (corpus, ("--streaming", "--max_eval_samples", "2"))):
        out = tmp_path / ("out_" + Path(str(data)).stem.replace("*", "x"))
        train(out, data, "--save_strategy", "no", "--validation_split_percentage", "0", *extra, steps=2)
        assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2, data


def test_fine_tunes_a_checkpoint(tmp_path, corpus):
    train(tmp_path / "base", corpus, "--save_strategy", "no", "--validation_split_percentage", "0")
    base = weights(tmp_path / "base")
    # learning rate 0: the fine-tune starts from the checkpoint (not a fresh init) and keeps it
    main(["--model", str(tmp_path / "base"), "--data", str(corpus), "--seq_len", "32", "--max_steps", "1",
          "--use_cpu", "--output_dir", str(tmp_path / "zero"), "--learning_rate", "0", "--save_strategy", "no",
          "--validation_split_percentage", "0", "--disable_tqdm", "true"])
    assert_same_weights(weights(tmp_path / "zero"), base)
    main(["--model", str(tmp_path / "base"), "--data", str(corpus), "--seq_len", "32", "--max_steps", "2",
          "--use_cpu", "--output_dir", str(tmp_path / "ft"), "--learning_rate", "1e-2", "--save_strategy", "no",
          "--validation_split_percentage", "0", "--disable_tqdm", "true"])
    tuned = weights(tmp_path / "ft")
    assert max((tuned[k] - base[k]).abs().max().item() for k in base) > 1e-4
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ft").config.hidden_size == 32


def test_interrupted_run_resumes_without_losing_steps(tmp_path, corpus):
    common = ("--save_steps", "2", "--validation_split_percentage", "0")
    train(tmp_path / "whole", corpus, *common, steps=4)
    train(tmp_path / "cut", corpus, *common, steps=4)
    # The run died after its step-2 checkpoint: steps 3-4 and the final save never happened.
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    (tmp_path / "cut" / "model.safetensors").unlink()
    train(tmp_path / "cut", corpus, *common, "--resume_from_checkpoint", "last", steps=4)
    assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "whole"))
    history = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]


@pytest.mark.parametrize("case", ["missing", "empty", "column", "vocab", "seq_len", "preset", "streaming", "resume"])
def test_clear_errors(tmp_path, corpus, capsys, case):
    (tmp_path / "empty.jsonl").write_text("")
    data, extra, message = {
        "missing": (tmp_path / "nope.jsonl", (), "no such file"),
        "empty": (tmp_path / "empty.jsonl", (), "empty"),
        "column": (corpus, ("--text_column", "body"), "no column 'body'"),
        "vocab": (corpus, ("--config_overrides", TINY + ",vocab_size=100"), "tokenizer has 384 tokens"),
        "seq_len": (corpus, ("--config_overrides", TINY + ",max_position_embeddings=16"), "max_position_embeddings 16"),
        "preset": (corpus, ("--model", "hope-9b"), "unknown preset"),
        "streaming": (corpus, ("--streaming", "--max_steps", "-1"), "--streaming needs --max_steps"),
        "resume": (corpus, ("--resume_from_checkpoint", "last"), "no checkpoint-N folder"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "out", data, *extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_ddp_two_gloo_processes_equal_one_process(tmp_path, corpus):
    """torchrun, 2 CPU processes x 2 rows = 1 process x 4 rows: the same steps, losses and final weights.
    (FSDP cannot be checked here: accelerate enables it only on accelerators, and on CPU runs plain DDP.)"""
    common = ["--model", "tiny", "--data", str(corpus), "--config_overrides", TINY, "--seq_len", "32",
              "--max_steps", "3", "--use_cpu", "--save_strategy", "no", "--validation_split_percentage", "0",
              "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "hope.train", *common, "--per_device_train_batch_size", "2", "--ddp_backend",
                               "gloo", "--output_dir", str(tmp_path / "ddp")],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 process(es), DDP" in launched.stdout, launched.stdout[-2000:]
    train(tmp_path / "one", corpus, "--save_strategy", "no", "--validation_split_percentage", "0", steps=3, batch=4)
    logs = [[(e["loss"], e["grad_norm"]) for e in json.loads((tmp_path / run / "trainer_state.json").read_text())
             ["log_history"] if "loss" in e] for run in ("ddp", "one")]
    assert len(logs[0]) == len(logs[1]) == 3
    for (loss_ddp, norm_ddp), (loss_one, norm_one) in zip(*logs):
        assert loss_ddp == pytest.approx(loss_one, rel=1e-5) and norm_ddp == pytest.approx(norm_one, rel=1e-4)
    assert_same_weights(weights(tmp_path / "ddp"), weights(tmp_path / "one"), atol=1e-5)


def test_console_scripts_are_declared_and_answer_help(monkeypatch, capsys):
    """setup.py declares hope-train, hope-eval and hope-learn, and each resolves to a main that prints its usage."""
    import importlib
    import runpy

    import setuptools

    declared = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: declared.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    scripts = dict(line.replace(" ", "").split("=") for line in declared["entry_points"]["console_scripts"])
    assert set(scripts) == {"hope-train", "hope-eval", "hope-learn"}
    for name, target in scripts.items():
        module, function = target.split(":")
        with pytest.raises(SystemExit) as exit_info:
            getattr(importlib.import_module(module), function)(["--help"])
        assert exit_info.value.code == 0
        assert f"usage: {name}" in capsys.readouterr().out
