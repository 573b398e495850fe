"""hope.OnlineLearner (SPEC §6): steps exactly every C_l tokens across sequences and calls, learning persists and
consolidates exactly, masked tokens teach nothing, pieces reproduce the full forward, the state round-trips,
bad input gets clear errors, and `hope-learn` runs end to end."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hope import HopeCache, HopeForCausalLM
from hope.continual import IGNORE_INDEX, OnlineLearner, main as learn_main

from .utils_hope import VOCAB, same_to_rounding, tiny_config, tiny_model, variant_config

PERIODS = {"0": 5, "1": 7}  # CMS_CHUNKS of the tiny config: [5, 7, None]


def stream_of(lengths, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def learner_for(model, **kwargs):
    kwargs = {"lr": 1e-2, "progress": False, **kwargs}
    return OnlineLearner(model, **kwargs)


def deltas_equal(a: OnlineLearner, b: OnlineLearner) -> bool:
    da, db = a.deltas(), b.deltas()
    return da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def spy_steps(learner: OnlineLearner) -> dict:
    """Record the clock (learner.tokens_read) at every optimizer step of every group."""
    seen = {key: [] for key in learner.groups}
    for key, optimizer in learner.optimizers().items():
        original = optimizer.step

        def step(*args, _key=key, _original=original, **kwargs):
            seen[_key].append(learner.tokens_read)
            return _original(*args, **kwargs)

        optimizer.step = step
    return seen


# ------------------------------------------------------------------------------------------ schedule


def test_each_level_steps_exactly_every_period_across_sequences_and_calls():
    model = tiny_model(tiny_config())
    learner = learner_for(model, extra_trainable=["model.layers.*.cms.levels.0.p_v"], extra_period=9)
    assert learner.periods == {**PERIODS, "extra": 9}
    seen = spy_steps(learner)
    lengths = [13, 3, 22, 1, 8]  # sequence boundaries that fall anywhere in the levels' windows
    learner.learn(stream_of(lengths[:3]))
    learner.learn(stream_of(lengths[3:], seed=1))  # a second call continues the clock
    total = sum(lengths)
    assert learner.tokens_read == total
    for key, period in learner.periods.items():
        assert seen[key] == list(range(period, total + 1, period)), key
        assert learner.steps[key] == total // period
    # The partial windows are pending until flush(), which steps each of them once and leaves the clock alone.
    pending = {key: total % period for key, period in learner.periods.items()}
    assert {key: group.tokens for key, group in learner.groups.items()} == pending
    assert sorted(learner.flush()) == sorted(key for key, n in pending.items() if n)
    assert learner.tokens_read == total and all(group.tokens == 0 for group in learner.groups.values())


def test_one_call_equals_many_calls_and_state_dict_resumes_exactly():
    stream = stream_of([9, 17, 4, 12])
    whole = learner_for(tiny_model(tiny_config()))
    whole.learn(stream)
    split = learner_for(tiny_model(tiny_config()))
    split.learn(stream[:2])
    saved = copy.deepcopy(split.state_dict())
    split.learn(stream[2:])
    assert deltas_equal(whole, split)
    resumed = learner_for(tiny_model(tiny_config()))
    resumed.load_state_dict(saved)
    resumed.learn(stream[2:])
    assert deltas_equal(whole, resumed) and resumed.steps == whole.steps
    other = learner_for(tiny_model(tiny_config()), levels=[0])
    with pytest.raises(ValueError, match="other levels, periods or parameters"):
        other.load_state_dict(saved)


def test_deterministic_under_a_seed_and_sensitive_to_the_data():
    a, b, c = (learner_for(tiny_model(tiny_config(), seed=3)) for _ in range(3))
    a.learn(stream_of([20, 11], seed=5))
    b.learn(stream_of([20, 11], seed=5))
    c.learn(stream_of([20, 11], seed=6))
    assert deltas_equal(a, b)
    assert any(d.abs().max() > 0 for d in a.deltas().values())
    assert not deltas_equal(a, c)


# ------------------------------------------------------------------------------------------ what is learned


@pytest.mark.parametrize("variant", ["hope", "hope_attention", "independent"])
def test_consolidate_is_exact_and_survives_save_pretrained(tmp_path, variant):
    model = tiny_model(variant_config(variant))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    learner = learner_for(model)  # (lr 5e-2 grows the weights until this config's in-context CMS step diverges)
    learner.learn(stream_of([30, 17]))
    # Until consolidation the model itself is untouched.
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    probes = torch.randint(0, VOCAB, (3, 19), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        learned = learner(input_ids=probes, use_cache=False).logits
        plain = model(input_ids=probes, use_cache=False).logits
        assert (learned - plain).abs().max() > 1e-6  # the learner did learn something
        with learner.applied():
            applied = model(input_ids=probes, use_cache=False).logits
        assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
        effective = {name: (before[name] + delta).to(before[name].dtype) for name, delta in learner.deltas().items()}
        learner.consolidate()
        consolidated = model(input_ids=probes, use_cache=False).logits
        after = learner(input_ids=probes, use_cache=False).logits
    # the weights bit for bit; the logits to rounding (the learner's θ_0 + δ are other tensors: `same_to_rounding`)
    assert all(torch.equal(p, effective[name]) for name, p in model.named_parameters() if name in effective)
    assert same_to_rounding(consolidated, learned) and same_to_rounding(applied, learned)
    assert same_to_rounding(after, learned)
    assert all(not d.any() for d in learner.deltas().values())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(learner.deltas())  # only the levels' W_gate, W_up, W_down moved
    model.save_pretrained(tmp_path)
    reloaded = HopeForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probes, use_cache=False).logits, consolidated)


def test_extra_trainable_tied_embedding_learns_as_one_tensor():
    """The tied embedding / LM head is one tensor: the learner must override both of its names, or its model
    would differ from the consolidated one (where the shared tensor changes in both places)."""
    model = tiny_model(tiny_config())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    learner = learner_for(model, levels=[0], extra_trainable=["model.embed_tokens.weight"], extra_period=6)
    assert learner.periods == {"0": 5, "extra": 6}
    learner.learn(stream_of([20, 9]))
    assert learner.deltas()["model.embed_tokens.weight"].abs().max() > 0
    probes = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        learned = learner(input_ids=probes, use_cache=False).logits
        learner.consolidate()
        assert same_to_rounding(model(input_ids=probes, use_cache=False).logits, learned)


def test_reset_forgets_what_was_not_consolidated():
    model = tiny_model(tiny_config())
    learner = learner_for(model)
    learner.learn(stream_of([25]))
    learner.consolidate()
    kept = {name: p.detach().clone() for name, p in model.named_parameters()}
    learner.learn(stream_of([25], seed=1))
    learner.reset()
    assert learner.tokens_read == 0 and all(n == 0 for n in learner.steps.values())
    assert all(not d.any() and d.grad is None for d in learner.deltas().values())
    assert all(torch.equal(p, kept[name]) for name, p in model.named_parameters())
    fresh = learner_for(copy.deepcopy(model))
    learner.learn(stream_of([12], seed=2))
    fresh.learn(stream_of([12], seed=2))
    assert deltas_equal(learner, fresh)  # the optimizer state was reset too


def test_pieces_with_carried_cache_reproduce_the_full_forward():
    """With lr = 0 nothing changes, so the summed loss the learner reads piece by piece (cache carried,
    detached, CMS fast weights rebased on θ_0 + δ) must equal the full-sequence forward's."""
    for variant in ("hope", "hope_attention"):
        model = tiny_model(variant_config(variant))
        ids = torch.randint(0, VOCAB, (29,), generator=torch.Generator().manual_seed(4))
        learner = learner_for(model, lr=0.0, optimizer="sgd")
        summary = learner.learn([ids])
        with torch.no_grad():
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
        full = F.cross_entropy(logits[:-1], ids[1:], reduction="mean").item()
        assert summary["targets"] == 28 and summary["mean_loss"] == pytest.approx(full, rel=1e-10, abs=1e-12)


def test_a_step_moves_the_fast_weights_of_the_sequence_in_progress():
    """After a mid-sequence step, the next piece must read the carried fast weights rebased on the new θ_0 + δ
    (not the θ_c the cache computed from the old weights). One layer and a vanishing in-context step (offset
    exactly 0 in float64) make everything after the mixer position-wise, so the second piece's loss must equal a
    fresh forward with the stepped weights."""
    config = tiny_config(num_hidden_layers=1, cms_eta_max=1e-30, cms_chunk_sizes=[5, None])
    model = tiny_model(config)
    ids = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[5] = IGNORE_INDEX  # the first window then has the 4 targets of a run on ids[:5] alone
    learner = learner_for(model, optimizer="sgd", lr=0.5, max_grad_norm=None)
    losses = []
    original = learner._read_piece

    def record(*args, **kwargs):
        result = original(*args, **kwargs)
        losses.append(result[0])
        return result

    learner._read_piece = record
    learner.learn([{"input_ids": ids, "labels": labels}])
    assert len(losses) == 2 and learner.steps == {"0": 2}
    replay = learner_for(copy.deepcopy(model), optimizer="sgd", lr=0.5, max_grad_norm=None)
    replay.learn([ids[:5]])  # the learner's first step, alone
    assert replay.steps == {"0": 1}
    with torch.no_grad():
        logits = replay(input_ids=ids[None], use_cache=False).logits[0]
    second = F.cross_entropy(logits[5:9], ids[6:10], reduction="sum").item()  # positions 5..8 of piece 2
    assert losses[1] == pytest.approx(second, rel=1e-10)


def test_only_the_levels_learn_and_requires_grad_is_restored():
    model = tiny_model(tiny_config())
    model.lm_head.weight.requires_grad_(True)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    learner = learner_for(model, levels=[1])
    learner.learn(stream_of([16]))
    assert set(learner.deltas()) == {f"model.layers.{i}.cms.levels.1.{w}" for i in range(2)
                                     for w in ("w_gate", "w_up", "w_down")}
    assert all(p.grad is None for p in model.parameters())
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}


def test_sgd_step_is_the_mean_loss_gradient_of_the_window_and_masked_labels_teach_nothing():
    """levels={0: 100} over 20 tokens: one window, flushed. Its SGD step must be -lr x the gradient of the mean
    loss over the labelled predictions only (Eq. 71's error signal), computed here by autograd."""
    model = tiny_model(tiny_config())
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[[3, 4, 11, 19]] = IGNORE_INDEX
    learner = learner_for(model, levels={0: 100}, optimizer="sgd", lr=0.1, max_grad_norm=None)
    learner.learn([{"input_ids": ids, "labels": labels}], flush=True)
    assert learner.steps == {"0": 1}
    reference = learner_for(copy.deepcopy(model), levels={0: 100}, optimizer="sgd", lr=0.1)
    logits = reference(input_ids=ids[None], use_cache=False).logits[0]
    loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)  # mean over its 15 targets
    names = list(reference.deltas())
    grads = torch.autograd.grad(loss, list(reference.deltas().values()))
    # RMSNorm computes in fp32 even in a float64 model, so the two orders (mean, then backward; summed backward,
    # then / 15) agree to ~1e-7; a wrong window or count would be off by percents (e.g. 15/16).
    for name, grad in zip(names, grads):
        error = (learner.deltas()[name] + 0.1 * grad).norm() / (0.1 * grad).norm()
        assert error < 1e-5, (name, error)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_masked_and_padded_tokens_teach_nothing(optimizer):
    model = tiny_model(tiny_config())
    kwargs = dict(optimizer=optimizer, optimizer_kwargs={"weight_decay": 0.1} if optimizer == "adamw" else None)
    s1, s2 = stream_of([35, 23], seed=7)  # 35 = lcm(5, 7): the windows after s1 line up with a fresh clock
    # A sequence whose labels are all masked: no step, so no moment, counter or weight decay moves.
    masked = learner_for(copy.deepcopy(model), **kwargs)
    spy = spy_steps(masked)
    masked.learn([{"input_ids": s1, "labels": torch.full_like(s1, IGNORE_INDEX)}, s2])
    plain = learner_for(copy.deepcopy(model), **kwargs)
    plain.learn([s2])
    assert deltas_equal(masked, plain) and all(clock > 35 for clocks in spy.values() for clock in clocks)
    # Padding (attention_mask 0) anywhere in a row is dropped: it changes nothing and does not move the clock.
    padded = learner_for(copy.deepcopy(model), **kwargs)
    ids = torch.cat([torch.zeros(3, dtype=torch.long), s2[:10], torch.ones(4, dtype=torch.long), s2[10:]])
    mask = torch.cat([torch.zeros(3), torch.ones(10), torch.zeros(4), torch.ones(13)]).long()
    padded.learn([{"input_ids": ids, "attention_mask": mask}])
    assert deltas_equal(padded, plain) and padded.tokens_read == plain.tokens_read == 23


def test_texts_need_a_tokenizer_and_2d_items_are_rows():
    from transformers import ByT5Tokenizer

    model = tiny_model(tiny_config(vocab_size=384))
    learner = learner_for(model, tokenizer=ByT5Tokenizer())
    summary = learner.learn(["hello", "Hope, online"])
    assert summary["tokens"] == len("hello") + 1 + len("Hope, online") + 1 and summary["sequences"] == 2
    rows = learner_for(tiny_model(tiny_config()))
    assert rows.learn(torch.randint(0, VOCAB, (3, 6)))["sequences"] == 3


def test_attention_keeps_a_bounded_window():
    model = tiny_model(variant_config("hope_attention"))
    learner = learner_for(model, attention_window=6)
    lengths = []
    original = learner._carry

    def record(cache, *args):
        original(cache, *args)
        lengths.append(max(layer.key.shape[2] for layer in cache.layers))

    learner._carry = record
    learner.learn(stream_of([40]))
    assert max(lengths) == 6 and len(lengths) > 6


def test_triton_backend_learns_what_the_torch_backend_learns():
    """The learner through the Triton kernels: a model whose every op has one (the Titans mixer with a plain-FFN CMS
    level when the Titans op has a kernel, else Hope-Attention with a learning CMS level) learns what the
    reference learns."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    import hope_kernels.cms as cms_kernels
    import hope_kernels.titans as titans_kernels

    if titans_kernels.HAS_TRITON:  # the plain-FFN level learns every 4 tokens (levels={0: 4})
        name, levels, periods = "hope", [None], {0: 4}
    elif cms_kernels.HAS_TRITON:
        name, levels, periods = "hope_attention", [4, None], None
    else:
        pytest.skip("no op has a Triton kernel on this commit (the v2 kernels of issues #11 and #13)")
    stream = stream_of([12])
    learned = {}
    for backend in ("torch", "triton"):
        model = tiny_model(variant_config(name, kernel_backend=backend, cms_chunk_sizes=levels),
                           dtype=torch.float32)
        learner = learner_for(model, lr=1e-2, **({} if periods is None else {"levels": periods}))
        learner.learn(stream)
        learned[backend] = learner.deltas()
    for name, value in learned["torch"].items():
        torch.testing.assert_close(learned["triton"][name], value, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ errors


def test_clear_errors():
    model = tiny_model(tiny_config())
    with pytest.raises(ValueError, match=r"unknown level 3: the model has levels 0\.\.2"):
        OnlineLearner(model, levels=[3])
    with pytest.raises(ValueError, match=r"level 2 has chunk size None.*levels=\{2: 512\}"):
        OnlineLearner(model, levels=[2])
    assert OnlineLearner(model, levels={2: 9}, progress=False).periods == {"2": 9}
    with pytest.raises(ValueError, match="no CMS level that learns"):
        OnlineLearner(tiny_model(variant_config("transformer++")))
    with pytest.raises(TypeError, match="needs a HopeForCausalLM, got LlamaForCausalLM.*stack_levels"):
        from transformers import LlamaConfig, LlamaForCausalLM

        OnlineLearner(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2)))
    with pytest.raises(ValueError, match="optimizer='rmsprop' is not allowed"):
        OnlineLearner(model, optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr has 3 entries but 2 levels"):
        OnlineLearner(model, lr=[1e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="matches no parameter"):
        OnlineLearner(model, extra_trainable=["model.nothing.*"])
    try:
        from hope.optim import M3  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"needs hope\.optim\.M3"):
            OnlineLearner(model, optimizer="m3")
    else:
        assert type(OnlineLearner(model, optimizer="m3").optimizers()["0"]).__name__ == "M3"
    learner = learner_for(model)
    bad = [
        ("some text", ValueError, "is a text, but the learner has no tokenizer"),
        ([torch.randn(5)], ValueError, "stream item 0: item must hold integers"),
        ([torch.arange(3), 7], TypeError, "stream item 1: item is a int"),
        ([{"ids": torch.arange(3)}], ValueError, "dict without 'input_ids'"),
        ([{"input_ids": torch.arange(4), "labels": torch.arange(3)}], ValueError, "labels has shape"),
        ([torch.tensor([1, VOCAB])], ValueError, rf"token ids must lie in \[0, vocab_size={VOCAB}\)"),
        ([torch.zeros(2, 2, 2, dtype=torch.long)], ValueError, "must be 1-D"),
    ]
    for stream, error, message in bad:
        with pytest.raises(error, match=message):
            learner.learn(stream)


# ------------------------------------------------------------------------------------------ hope-learn


def test_hope_learn_cli(tmp_path):
    from transformers import ByT5Tokenizer

    model = tiny_model(tiny_config(vocab_size=384), dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    ByT5Tokenizer().save_pretrained(tmp_path / "ckpt")
    data = tmp_path / "notes.txt"
    data.write_text("the first note\nanother line of text\n\nthird\n")
    out = tmp_path / "learned"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hope.continual", "--model", str(tmp_path / "ckpt"), "--data", str(data),
         "--output_dir", str(out), "--lr", "0:1e-2,1:1e-3", "--num_threads", "1", "--no_progress"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "learn_results.json").read_text())
    # A .txt file is cut at blank lines (--text_split paragraph, as hope-train): 2 texts, each + EOS.
    tokens = sum(len(text) + 1 for text in ("the first note\nanother line of text", "third"))
    assert summary["sequences"] == 2 and summary["tokens"] == tokens == 42
    assert summary["total_steps"] == {"0": 42 // 5 + 1, "1": 42 // 7}  # level 0's partial window is flushed
    learned = HopeForCausalLM.from_pretrained(out)
    assert not torch.equal(learned.model.layers[0].cms.levels[0].w_up, model.model.layers[0].cms.levels[0].w_up)
    assert torch.equal(learned.model.layers[0].cms.levels[2].w_up, model.model.layers[0].cms.levels[2].w_up)
    assert (out / "learner_state.pt").is_file() and (out / "tokenizer_config.json").is_file()
    # Errors: one line, status 2 (in process: a subprocess per case would cost seconds each).
    assert learn_main(["--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert learn_main(["--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "missing.txt"),
                       "--no_progress"]) == 2
    assert learn_main(["--model", str(tmp_path / "ckpt"), "--data", str(data), "--text_split", "line", "--lr", "0",
                       "--no_progress", "--output_dir", str(tmp_path / "lines")]) == 0
    assert json.loads((tmp_path / "lines" / "learn_results.json").read_text())["sequences"] == 3
    assert learn_main(["--model", str(tmp_path / "ckpt"), "--data", str(data), "--levels", "5",
                       "--no_progress", "--output_dir", str(tmp_path / "x")]) == 2
