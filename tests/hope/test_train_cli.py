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
from hope.train import main, parse_overrides, run_command

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
    return run_command(["--model", "tiny", "--data", str(data), "--config_overrides", TINY, "--seq_len", "32",
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


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "blank_document", "binary", "no_blocks", "zero_length",
                                  "threads",
                                  "column", "vocab", "seq_len", "override_name", "preset", "streaming", "resume"])
def test_clear_errors(tmp_path, corpus, capsys, case):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n\t \n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    data, extra, message = {
        "missing": (tmp_path / "nope.jsonl", (), "no such file"),
        "empty": (tmp_path / "empty.jsonl", (), "empty"),
        "blank": (tmp_path / "blank.txt", (), "holds no text: it is empty or whitespace only"),
        "blank_document": (tmp_path / "blank.txt", ("--text_split", "document", "--validation_split_percentage", "0"),
                           "holds no text: every row is empty or whitespace"),
        "binary": (tmp_path / "binary.txt", (), "binary.txt' is not UTF-8 text (byte 0x80 at offset 128)"),
        "no_blocks": (corpus, ("--max_train_samples", "0"), "--max_train_samples must be at least 1"),
        "zero_length": (corpus, ("--seq_len", "0"), "--seq_len must be at least 2"),
        "threads": (corpus, ("--num_threads", "0"), "--num_threads must be at least 1"),
        "column": (corpus, ("--text_column", "body"), "no column 'body'"),
        "vocab": (corpus, ("--config_overrides", TINY + ",vocab_size=100"), "tokenizer has 384 tokens"),
        "seq_len": (corpus, ("--config_overrides", TINY + ",max_position_embeddings=16"), "max_position_embeddings 16"),
        "override_name": (corpus, ("--config_overrides", TINY + ",chunk_sz=8"), "chunk_sz is not a HopeConfig field"),
        "preset": (corpus, ("--model", "hope-9b"), "unknown preset"),
        "streaming": (corpus, ("--streaming", "--max_steps", "-1"), "--streaming needs --max_steps"),
        "resume": (corpus, ("--resume_from_checkpoint", "last"), "no checkpoint-N folder"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "out", data, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the lines before it, if any, are progress bars
    assert last.startswith("hope-train: error: ") and message in last and "Traceback" not in err, err


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


# ------------------------------------------------------------------------- the first hour of a new user (#15)


def declared_console_scripts(monkeypatch) -> dict:
    """{script name: "module:function"} as setup.py declares them."""
    import runpy

    import setuptools

    declared = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: declared.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return dict(line.replace(" ", "").split("=") for line in declared["entry_points"]["console_scripts"])


def write_console_scripts(monkeypatch, directory: Path) -> dict:
    """The console scripts pip generates from setup.py's entry points (the same three lines), under `directory`:
    {script name: path}. Each runs `sys.exit(function())`, so a returned value is the exit status."""
    scripts = {}
    for name, target in declared_console_scripts(monkeypatch).items():
        module, function = target.split(":")
        path = directory / name
        path.write_text(f"import re\nimport sys\nfrom {module} import {function}\nif __name__ == '__main__':\n"
                        f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                        f"    sys.exit({function}())\n")
        scripts[name] = path
    return scripts


def subprocess_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def console(script: Path, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], env=subprocess_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def tiny_run(data, output: Path, *extra: str) -> list:
    return ["--model", "tiny", "--data", str(data), "--config_overrides", TINY, "--seq_len", "32", "--use_cpu",
            "--output_dir", str(output), "--validation_split_percentage", "0", "--disable_tqdm", "true", *extra]


@pytest.mark.slow  # six subprocesses, ~35 s on 2 cores
def test_console_scripts_return_0_after_success_and_2_with_one_line_for_bad_input(tmp_path, corpus, monkeypatch):
    """The installed hope-train, hope-eval, hope-learn and hope-train --demo exit 0 after a successful run, without
    printing their result dict on stderr; bad input exits 2 with one line and no traceback."""
    scripts = write_console_scripts(monkeypatch, tmp_path)
    assert set(scripts) == {"hope-train", "hope-eval", "hope-learn"}
    trained = console(scripts["hope-train"], *tiny_run(corpus, tmp_path / "run", "--max_steps", "2"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "{'train_runtime'" not in trained.stderr
    evaluated = console(scripts["hope-eval"], "--model", str(tmp_path / "run"), "--data", str(corpus), "--seq_len", "32",
                        "--max_eval_samples", "4", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout[evaluated.stdout.index("{"):])["blocks"] == 4
    demo = console(scripts["hope-train"], "--demo", "--tiny", "--max-steps", "1", "--device", "cpu", "--num-threads", "1",
                   "--output-dir", str(tmp_path / "demo"), cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    missing = console(scripts["hope-eval"], "--model", str(tmp_path / "nope"), "--data", str(corpus), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"hope-eval: error: --model '{tmp_path / 'nope'}': no such "
                                                   "checkpoint directory"]
    learned = console(scripts["hope-learn"], "--model", str(tmp_path / "run"), "--data", str(corpus), "--max_texts", "2",
                      "--output_dir", str(tmp_path / "learned"), "--no_progress", cwd=tmp_path)
    assert learned.returncode == 0, learned.stderr[-3000:]
    assert (tmp_path / "learned" / "config.json").is_file() and "{'tokens'" not in learned.stderr
    bad_level = console(scripts["hope-learn"], "--model", str(tmp_path / "run"), "--data", str(corpus), "--levels", "9",
                        cwd=tmp_path)
    assert bad_level.returncode == 2 and "Traceback" not in bad_level.stderr
    assert bad_level.stderr.strip().splitlines()[-1].startswith("hope-learn: error: unknown level 9")


def test_ctrl_c_saves_a_checkpoint_that_the_printed_command_resumes(tmp_path, corpus, monkeypatch):
    """SIGINT during training finishes the step, saves checkpoint-N, exits 130 and prints the resume command;
    that command (--resume_from_checkpoint last) continues from step N to the end."""
    import shlex
    import signal

    script = write_console_scripts(monkeypatch, tmp_path)["hope-train"]
    steps = 40
    command = [sys.executable, str(script), *tiny_run(corpus, tmp_path / "run", "--max_steps", str(steps),
                                                        "--logging_steps", "1", "--save_strategy", "no")]
    process = subprocess.Popen(command, env=subprocess_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # the Trainer prints a dict per logged step
        if "'loss'" in line:
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    checkpoints = sorted(tmp_path.glob("run/checkpoint-*"))
    assert len(checkpoints) == 1
    stopped = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped < steps
    assert f"step {stopped} of {steps} saved to {checkpoints[0]}" in err
    resume = shlex.split(err.split("resume with:")[1].strip().splitlines()[0])
    assert resume[0] == "hope-train" and resume[-2:] == ["--resume_from_checkpoint", "last"]
    resumed = console(script, *resume[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("'loss'") == steps - stopped  # only the steps after the checkpoint ran
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, steps + 1))


DOCUMENTS = [f"Document {i:02d}: first line of {i:02d}.\n  its second line, indented, of {i:02d}\nlast of {i:02d}."
             for i in range(12)]


def test_text_files_are_read_as_documents_with_their_newlines(tmp_path):
    (tmp_path / "one.txt").write_text("\n\n\n".join(DOCUMENTS) + "\n")  # blank lines between the documents
    paragraphs = load_text_dataset(str(tmp_path / "one.txt"))  # the default: --text_split paragraph
    assert paragraphs["text"] == DOCUMENTS
    assert load_text_dataset(str(tmp_path / "one.txt"), text_split="document")["text"] == ["\n\n\n".join(DOCUMENTS) + "\n"]
    assert load_text_dataset(str(tmp_path / "one.txt"), text_split="line")["text"][:3] == DOCUMENTS[0].split("\n")
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(DOCUMENTS):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(text)
    assert load_text_dataset(str(tmp_path / "docs"), text_split="document")["text"] == DOCUMENTS  # a file a document


@pytest.mark.parametrize("text_split", ["paragraph", "document"])
def test_validation_holds_out_whole_documents_and_eos_ends_only_documents(tmp_path, text_split):
    from transformers import ByT5Tokenizer

    from hope.train import HopeTrainArguments, prepare_data

    if text_split == "paragraph":
        (tmp_path / "corpus.txt").write_text("\n\n".join(DOCUMENTS))
        data = tmp_path / "corpus.txt"
    else:
        data = tmp_path / "docs"
        data.mkdir()
        for i, text in enumerate(DOCUMENTS):
            (data / f"{i:02d}.txt").write_text(text)
    tokenizer = ByT5Tokenizer()
    args = HopeTrainArguments(model="tiny", data=str(data), seq_len=16, validation_split_percentage=25,
                              text_split=text_split)
    train, validation, _ = prepare_data(args, tokenizer, seed=0)

    def documents_in(blocks) -> list:
        """The stream of the blocks, cut at EOS: the documents they hold whole (the last piece may be cut)."""
        stream = [token for block in blocks["input_ids"] for token in block]
        assert blocks["labels"] == blocks["input_ids"]  # EOS is a target
        text = bytes(token - 3 if token != tokenizer.eos_token_id else 0 for token in stream).decode()
        return text.split("\0")

    import re

    trained, held_out = documents_in(train), documents_in(validation)
    # Every EOS ends a whole document, its newlines kept (the last piece is cut by the dropped remainder).
    assert all(piece in DOCUMENTS for piece in trained[:-1]) and all(piece in DOCUMENTS for piece in held_out[:-1])
    assert len(held_out) - 1 >= 2 and len(trained) - 1 >= 7 and "\n  its second line" in trained[0]
    numbers = [set(re.findall(r"of (\d\d)", "".join(pieces))) for pieces in (trained, held_out)]
    assert not numbers[0] & numbers[1]  # no line of a held-out document is trained on


def test_a_preset_trains_from_scratch_with_its_recipe_and_a_checkpoint_keeps_the_trainers(tmp_path, corpus, capsys):
    from hope.presets import training_defaults

    assert training_defaults("small") == training_defaults("transformer-tiny") == dict(
        learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01, adam_beta2=0.95,
        max_grad_norm=1.0)
    assert training_defaults("hope-1.3b") == dict(learning_rate=4e-4, lr_scheduler_type="cosine", warmup_steps=0.01,
                                                  weight_decay=0.1, max_grad_norm=1.0)

    def arguments(run: str):
        return torch.load(tmp_path / run / "training_args.bin", weights_only=False)

    run_command(tiny_run(corpus, tmp_path / "scratch", "--max_steps", "1"))
    chosen = arguments("scratch")
    assert (chosen.learning_rate, chosen.lr_scheduler_type.value, chosen.warmup_steps, chosen.weight_decay,
            chosen.adam_beta2) == (2e-3, "cosine", 0.05, 0.01, 0.95)
    assert "from scratch with preset tiny's recipe" in capsys.readouterr().out
    run_command(tiny_run(corpus, tmp_path / "mine", "--max_steps", "1", "--learning-rate", "1e-2",
                         "--lr_scheduler_type=linear"))
    chosen = arguments("mine")
    assert (chosen.learning_rate, chosen.lr_scheduler_type.value, chosen.weight_decay) == (1e-2, "linear", 0.01)
    assert "learning_rate=0.01 (yours)" in capsys.readouterr().out
    run_command(["--model", str(tmp_path / "scratch"), "--data", str(corpus), "--seq_len", "32", "--max_steps", "1",
                 "--use_cpu", "--output_dir", str(tmp_path / "tuned"), "--validation_split_percentage", "0",
                 "--disable_tqdm", "true"])
    chosen = arguments("tuned")
    assert (chosen.learning_rate, chosen.lr_scheduler_type.value, chosen.warmup_steps, chosen.weight_decay) == (
        5e-5, "linear", 0, 0.0)  # the Trainer's defaults
    assert "fine-tuning with the Trainer's defaults" in capsys.readouterr().out


def test_gradient_checkpointing_is_accepted_in_either_spelling_without_a_deprecation_warning(tmp_path, corpus):
    import dataclasses
    import warnings

    from transformers import TrainingArguments

    from hope.train import checkpointing_flags_for

    old = {"gradient_checkpointing", "gradient_checkpointing_kwargs"}  # transformers 5.17 knows only these
    new = old | {"activation_checkpointing", "activation_checkpointing_kwargs"}  # 5.24 warns on the old ones
    argv = ["--activation_checkpointing", "--gradient-checkpointing=true", "--gradient_checkpointing_kwargs",
            '{"use_reentrant": false}', "--config_overrides", "a=1"]
    assert checkpointing_flags_for(argv, old) == ["--gradient_checkpointing", "--gradient_checkpointing=true",
                                                  "--gradient_checkpointing_kwargs", *argv[3:]]
    assert checkpointing_flags_for(argv, new) == ["--activation_checkpointing", "--activation_checkpointing=true",
                                                  "--activation_checkpointing_kwargs", *argv[3:]]
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    for flag in ("--gradient_checkpointing", "--activation_checkpointing"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_command(tiny_run(corpus, tmp_path / flag, "--max_steps", "1", flag))
        assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
        chosen = torch.load(tmp_path / flag / "training_args.bin", weights_only=False)
        assert getattr(chosen, "activation_checkpointing" if "activation_checkpointing" in fields
                       else "gradient_checkpointing") is True


def test_num_threads_sets_torch_threads_for_the_run(tmp_path, corpus, capsys, monkeypatch):
    from transformers import Trainer

    before, seen, original = torch.get_num_threads(), [], Trainer.train

    def train_and_record(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train_and_record)
    run_command(tiny_run(corpus, tmp_path / "run", "--max_steps", "1", "--num_threads", "2"))
    assert seen == [2] and torch.get_num_threads() == before  # set for the run, restored after
    assert "2 CPU threads (from --num_threads)" in capsys.readouterr().out
