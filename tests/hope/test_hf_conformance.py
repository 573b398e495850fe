"""Hope's own version of transformers' common model checks (ModelTesterMixin / GenerationTesterMixin), written for
this model over its main configs: outputs and return_dict, hidden states, save/load (every parameter set, every
dtype route), the training step, activation checkpointing, generate with every output flag, padding, a cache
continued from a prefix, inputs_embeds, resized embeddings, the loss keywords, and the checks on bad input."""
from __future__ import annotations

import inspect
import logging
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from hope import HopeCache, HopeForCausalLM
from tests.hope.utils_hope import CHUNK, F64, VOCAB, cache_of, max_diff, random_ids, tiny_config, tiny_model

# The main configs. momentum=False is the SPEC v2 default, so it is spelled out in both directions.
MAIN_CONFIGS = {
    "titans": dict(momentum=False),
    "attention": dict(mixer="attention"),
    "deep_memory": dict(memory_depth=2, momentum=False),
    "momentum": dict(momentum=True),
    "value_target_independent": dict(momentum=False, memory_target="value", cms_variant="independent"),
}
MAIN = sorted(MAIN_CONFIGS)
# Tiny random models never stop early. A prompt of random ids may hold pad_token_id, so the tests pass explicit
# masks (generate() would otherwise mask those tokens).
GEN = dict(pad_token_id=0, eos_token_id=None, do_sample=False)
# generate() takes the cache as `cache` in newer transformers 5.x and `past_key_values` in older ones.
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


def main_model(name: str, **overrides) -> HopeForCausalLM:
    return tiny_model(tiny_config(**{**MAIN_CONFIGS[name], **overrides}))


def _layers(model: HopeForCausalLM) -> int:
    return model.config.num_hidden_layers


# ------------------------------------------------------------------------------------ outputs and return_dict


@pytest.mark.parametrize("name", MAIN)
def test_outputs_and_return_dict(name):
    model = main_model(name)
    ids = random_ids(2, 9)
    with torch.no_grad():
        out = model(ids, labels=ids)
        assert isinstance(out, CausalLMOutputWithPast) and out.logits.shape == (2, 9, VOCAB)
        as_tuple = model(ids, labels=ids, return_dict=False)
        assert isinstance(as_tuple, tuple)
        assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
        model.config.return_dict = False  # the config's default is honoured (model and base model alike)
        assert isinstance(model(ids), tuple) and isinstance(model.model(ids), tuple)
        assert isinstance(model(ids, return_dict=True), CausalLMOutputWithPast)


@pytest.mark.parametrize("name", MAIN)
def test_hidden_states(name):
    """L + 1 states: the embeddings, then each block's output, the last one after the final norm."""
    model = main_model(name)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert model(ids).hidden_states is None
        states = model(ids, output_hidden_states=True).hidden_states
        assert len(states) == _layers(model) + 1
        assert all(h.shape == (2, 9, model.config.hidden_size) for h in states)
        assert torch.equal(states[0], model.get_input_embeddings()(ids))
        assert torch.equal(states[-1], model.model(ids).last_hidden_state)
        after_first = model.model.layers[0](states[0], None, None, 0)
        assert torch.equal(states[1], after_first)
        model.config.output_hidden_states = True  # the config's default is honoured
        assert len(model(ids).hidden_states) == _layers(model) + 1
        assert model(ids, output_hidden_states=False).hidden_states is None


def test_output_attentions_is_refused():
    model = main_model("attention")
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(random_ids(1, 4), output_attentions=True)


# ------------------------------------------------------------------------------------------------ save / load

# Every flag that changes the parameter or buffer set, and their combinations; the last one changes no
# parameter (objectives and the value target) and stands for those.
ROUND_TRIP_CONFIGS = {
    "titans": dict(momentum=False),
    "titans_momentum": dict(momentum=True),
    "deep": dict(memory_depth=2, momentum=False),
    "deep_momentum": dict(memory_depth=2, momentum=True),
    "deep_independent_untied": dict(memory_depth=2, momentum=False, cms_variant="independent",
                                    tie_word_embeddings=False),
    "titans_plain_ffn_untied": dict(momentum=False, cms_chunk_sizes=[None], tie_word_embeddings=False),
    "titans_learning_cms_only": dict(momentum=False, cms_chunk_sizes=[5, 7]),
    "transformer++_untied": dict(mixer="attention", cms_chunk_sizes=[None], tie_word_embeddings=False),
    "attention_independent": dict(mixer="attention", cms_chunk_sizes=[5, None], cms_variant="independent"),
    "objectives_value_target": dict(momentum=False, objective="dot", cms_objective="dot", memory_target="value"),
}


def _state(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CONFIGS))
def test_save_load_round_trip_is_exact(tmp_path, name):
    """Bug 1 of issue 12: a momentum=False checkpoint came back with freshly initialised mixer weights."""
    model = tiny_model(tiny_config(**ROUND_TRIP_CONFIGS[name]))
    ids = random_ids(2, 11)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=F64, output_loading_info=True)
    assert type(loaded) is HopeForCausalLM
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    expected, actual = _state(model), _state(loaded)
    assert expected.keys() == actual.keys()
    changed = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not changed, f"reloaded with other values: {changed}"
    assert len(list(loaded.buffers())) == 0, "every tensor of the model is a saved parameter"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, logits)


def test_a_missing_parameter_is_initialised_and_nothing_else(tmp_path):
    """Loading a momentum=False checkpoint with momentum=True: only momentum_logit is missing; it gets its init,
    and the loaded tensors of the same modules keep their values (the init is guarded per tensor)."""
    model = tiny_model(tiny_config(momentum=False))
    model.save_pretrained(tmp_path)
    loaded, info = HopeForCausalLM.from_pretrained(tmp_path, dtype=F64, momentum=True, output_loading_info=True)
    missing = {f"model.layers.{i}.mixer.momentum_logit" for i in range(_layers(model))}
    assert set(info["missing_keys"]) == missing
    saved = _state(model)
    for key, tensor in _state(loaded).items():
        if key in missing:
            assert torch.equal(tensor, torch.zeros_like(tensor))  # beta = 0.5, the init (SPEC §2)
        else:
            assert torch.equal(tensor, saved[key]), f"{key} was overwritten by the init"


@pytest.mark.parametrize("name", ["titans", "attention"])
def test_load_dtype_routes(tmp_path, name):
    """dtype=<torch dtype> converts, dtype="auto" keeps the saved dtype, and no dtype means "auto" in 5.x."""
    model = main_model(name).float()
    ids = random_ids(2, 9)
    with torch.no_grad():
        reference = model.double()(ids).logits
    model.float().save_pretrained(tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.float()
    for route, folder, dtype in [({"dtype": F64}, "fp32", F64), ({"dtype": "auto"}, "fp32", torch.float32),
                                 ({}, "fp32", torch.float32), ({"dtype": "auto"}, "bf16", torch.bfloat16),
                                 ({"dtype": torch.bfloat16}, "fp32", torch.bfloat16)]:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder, **route).eval()
        assert {p.dtype for p in loaded.parameters()} == {dtype}, (route, folder)
        with torch.no_grad():
            logits = loaded(ids).logits
        assert logits.dtype == dtype
        tolerance = 1e-5 if (folder, dtype) == ("fp32", F64) or dtype == torch.float32 else 0.15
        assert max_diff(logits.double(), reference) < tolerance, (route, folder)


def test_resume_of_a_tied_model_reports_no_missing_key(tmp_path):
    """Issue 15: Trainer's resume loads the state dict, where a tied head is absent; that must not be reported."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model(tiny_config(momentum=False), dtype=torch.float32)
    model.save_pretrained(tmp_path)
    state_dict = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state_dict  # saved once, as the embedding
    result = model.load_state_dict(state_dict, strict=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    try:
        args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
        Trainer(model=model, args=args)._issue_warnings_after_load(result)
    finally:
        trainer_logger.removeHandler(handler)
    assert not [r for r in records if "missing keys" in r.getMessage()], [r.getMessage() for r in records]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = tiny_model(tiny_config(momentum=False, tie_word_embeddings=False))
    assert "lm_head.weight" not in untied._keys_to_ignore_on_save  # an untied head is saved
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)  # untied after the fact
    model.save_pretrained(tmp_path / "untied_later")
    assert "lm_head.weight" in safetensors.torch.load_file(tmp_path / "untied_later" / "model.safetensors")


# ------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", MAIN)
def test_training_step(name):
    """The loss is the shifted cross-entropy, every gradient is finite, and one AdamW step lowers it."""
    model = main_model(name).train()
    ids = random_ids(3, 12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)  # (transformers takes the loss in fp32)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    with torch.no_grad():
        assert model(ids, labels=ids).loss < out.loss - 1e-3


def test_loss_keywords_shift_labels_and_num_items_in_batch():
    """`shift_labels` are targets already shifted (context parallelism shards them so): used as given (bug 4);
    `num_items_in_batch` divides the summed loss."""
    model = main_model("titans")
    ids = random_ids(2, 10)
    targets = random_ids(2, 10)
    targets[0, :3] = -100
    close = lambda loss, expected: loss.item() == pytest.approx(expected.item(), rel=1e-6)  # noqa: E731 (fp32 loss)
    with torch.no_grad():
        logits = model(ids).logits
        unshifted = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
        assert close(model(ids, shift_labels=targets).loss, unshifted)
        assert close(model(ids, labels=ids, shift_labels=targets).loss, unshifted)
        shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        assert model(ids, shift_labels=shifted).loss == model(ids, labels=ids).loss
        summed = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100, reduction="sum")
        assert close(model(ids, shift_labels=targets, num_items_in_batch=torch.tensor(7)).loss, summed / 7)
    with pytest.raises(ValueError, match="shift_labels must be"):
        model(ids, shift_labels=targets[:, :-1])


def _enable_checkpointing(model, **kwargs) -> None:
    # transformers 5.24 renamed gradient_checkpointing_enable (now a deprecated alias); 5.17 has the old name only.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(**kwargs)


def _loss_and_grads(model, ids, cache=None):
    model.zero_grad()
    loss = model(ids, labels=ids, cache=cache).loss
    loss.backward()
    # (Continuing a cache, the initial memories are not read and get no gradient.)
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["titans", "attention"])
def test_activation_checkpointing(name):
    """Blocks are GradientCheckpointingLayers: transformers' switch (every_n_layers too) checkpoints them with the
    same loss and gradients. A block that continues a given cache runs un-checkpointed (the recompute would read
    the advanced state), so truncated BPTT under checkpointing keeps exact gradients and state."""
    model = main_model(name).train()
    assert all(isinstance(block, GradientCheckpointingLayer) for block in model.model.layers)
    ids, prefix = random_ids(2, 9), random_ids(2, 5)
    with torch.no_grad():
        cache, same_cache = (cache_of(model(prefix, use_cache=True)) for _ in range(2))
    plain = _loss_and_grads(model, ids)
    plain_cached = _loss_and_grads(model, ids, same_cache)
    recomputed = []
    for block in model.model.layers:
        block.mixer_norm.register_forward_pre_hook(lambda module, args: recomputed.append(1))
    _enable_checkpointing(model, every_n_layers=2)
    assert [block.gradient_checkpointing for block in model.model.layers] == [True, False]
    _enable_checkpointing(model)
    assert all(block.gradient_checkpointing for block in model.model.layers)
    recomputed.clear()
    checkpointed = _loss_and_grads(model, ids)
    assert len(recomputed) == 2 * _layers(model), "each block runs again in backward"
    checkpointed_cached = _loss_and_grads(model, ids, cache)
    for (loss_a, grads_a), (loss_b, grads_b) in [(plain, checkpointed), (plain_cached, checkpointed_cached)]:
        assert abs(loss_a.item() - loss_b.item()) < 1e-12 and grads_a.keys() == grads_b.keys(), set(grads_a) ^ set(grads_b)
        assert max(max_diff(grads_a[key], grads_b[key]) for key in grads_a) < 1e-12
    assert cache.seen_tokens == 5 + 9 and all(block.gradient_checkpointing for block in model.model.layers)


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("name", MAIN)
def test_generate_with_every_output_flag(name):
    """scores, logits and hidden states of every step (bug 2: the hidden states were None), and the cache."""
    model = main_model(name)
    prompt = random_ids(2, 7)
    new = 4
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                         return_dict_in_generate=True, output_hidden_states=True,
                         output_scores=True, output_logits=True, **GEN)
    assert out.sequences.shape == (2, 7 + new)
    with torch.no_grad():
        full = model(out.sequences, output_hidden_states=True, use_cache=False)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == new
    for step in range(new):
        position = 7 + step - 1  # step s reads the token at this position last
        assert max_diff(out.logits[step], full.logits[:, position]) < 1e-6  # (generate keeps fp32 logits)
        assert torch.equal(out.sequences[:, 7 + step], out.scores[step].argmax(-1))
        states = out.hidden_states[step]
        assert len(states) == _layers(model) + 1 and all(h is not None for h in states)
        length = 7 if step == 0 else 1
        for h, h_full in zip(states, full.hidden_states):
            assert h.shape == (2, length, model.config.hidden_size)
            assert max_diff(h[:, -1], h_full[:, position]) < 1e-10
    cache = cache_of(out)
    assert isinstance(cache, HopeCache) and cache.seen_tokens == 7 + new - 1


def test_assisted_generation_is_refused_as_for_stateful_models():
    """Bug 6: transformers' own message for models whose state cannot be rewound (Mamba, RWKV)."""
    model, assistant = main_model("titans"), main_model("titans", num_hidden_layers=1)
    assert model._is_stateful
    with pytest.raises(ValueError, match="assisted generation is not supported with stateful models"):
        model.generate(random_ids(1, 5), assistant_model=assistant, max_new_tokens=3, **GEN)


@pytest.mark.parametrize("name", MAIN)
def test_left_and_right_padding(name):
    """Right padding: the valid logits equal the unpadded run. Left padding: the padded row generates what it
    generates alone when the pad keeps every chunk phase (SPEC §5), here one chunk: CMS chunks of 4 like the Titans
    chunk keep the prompt short (the tiny config's large in-context rates diverge on long random sequences)."""
    model = main_model(name, cms_chunk_sizes=[CHUNK, None])
    ids = random_ids(2, 9)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 9:] = 0
    right = torch.cat([ids, random_ids(2, 3)], dim=1)
    right[0, 9:] = 0
    with torch.no_grad():
        padded = model(right, attention_mask=mask, use_cache=False).logits
        assert max_diff(padded[0, :9], model(ids[:1], use_cache=False).logits[0]) < 1e-10
        assert max_diff(padded[1], model(right[1:], use_cache=False).logits[0]) < 1e-10
    pad = math.lcm(model.config.chunk_size, *(size for size in model.config.cms_chunk_sizes if size))
    left = torch.cat([torch.zeros(2, pad, dtype=torch.long), ids], dim=1)
    left[1, :pad] = random_ids(1, pad)
    left_mask = torch.ones_like(left)
    left_mask[0, :pad] = 0
    out = model.generate(left, attention_mask=left_mask, max_new_tokens=4, **GEN)
    alone = lambda row: model.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=4, **GEN)[0]  # noqa: E731
    assert torch.equal(out[0, pad:], alone(ids[:1]))  # (an explicit mask: a random id may equal pad_token_id)
    assert torch.equal(out[1], alone(left[1:]))


@pytest.mark.parametrize("name", MAIN)
def test_cache_continued_from_a_prefix(name):
    model = main_model(name)
    ids = random_ids(2, 13)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        cache = cache_of(out)
        rest = model(ids[:, 6:11], cache=cache).logits
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in (11, 12)]
    assert max_diff(out.logits, full[:, :6]) < 1e-10
    assert max_diff(rest, full[:, 6:11]) < 1e-10
    assert max_diff(torch.cat(steps, dim=1), full[:, 11:]) < 1e-10
    assert cache.get_seq_length() == 13


@pytest.mark.parametrize("name", MAIN)
def test_inputs_embeds(name):
    """Forward and generate from inputs_embeds equal the ids route, and a returned cache continues from longer
    inputs_embeds (bug 5: that crashed in conv1d)."""
    model = main_model(name)
    prompt = random_ids(2, 6)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        embeds = embed(prompt)
        assert torch.equal(model(inputs_embeds=embeds).logits, model(prompt).logits)
    whole = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, **GEN)[:, 6:]
    first = model.generate(inputs_embeds=embeds, max_new_tokens=3, return_dict_in_generate=True, **GEN)
    assert torch.equal(first.sequences, whole[:, :3])  # only the new tokens come back from an embedded prompt
    with torch.no_grad():
        longer = torch.cat([embeds, embed(first.sequences)], dim=1)
    rest = model.generate(inputs_embeds=longer, max_new_tokens=3, **{CACHE_KWARG: cache_of(first)}, **GEN)
    assert torch.equal(rest, whole[:, 3:])
    # Without a cache every step reads the embedded prompt and the tokens generated so far.
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=3, use_cache=False, **GEN), whole[:, :3])


@pytest.mark.parametrize("name", ["titans", "attention"])
@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings(tmp_path, name, tie):
    model = main_model(name, tie_word_embeddings=tie)
    before_embed = model.get_input_embeddings().weight.detach().clone()
    before_head = model.get_output_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 7, mean_resizing=False)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert model.config.vocab_size == VOCAB + 7 and embed.shape[0] == head.shape[0] == VOCAB + 7
    assert (embed.data_ptr() == head.data_ptr()) == tie
    assert torch.equal(embed[:VOCAB], before_embed) and torch.equal(head[:VOCAB], before_head)
    ids = random_ids(2, 6, VOCAB + 7)
    ids[0, 0] = VOCAB + 6  # a new token is accepted
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 6, VOCAB + 7)
    model.save_pretrained(tmp_path)
    loaded = HopeForCausalLM.from_pretrained(tmp_path, dtype=F64).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    model.resize_token_embeddings(VOCAB - 10)
    assert model(random_ids(1, 4, VOCAB - 10)).logits.shape == (1, 4, VOCAB - 10)


# ------------------------------------------------------------------------------------------ inputs, issue 15


@pytest.mark.parametrize("name", ["titans", "attention", "deep_memory"])
def test_zero_length_input(name):
    """T = 0 with or without a cache: empty outputs, and the cache is left exactly as it was."""
    model = main_model(name)
    ids = random_ids(2, 7)
    with torch.no_grad():
        empty = model(ids[:, :0], output_hidden_states=True)
        assert empty.logits.shape == (2, 0, VOCAB)
        assert len(empty.hidden_states) == _layers(model) + 1
        assert cache_of(empty).seen_tokens == 0
        cache = cache_of(model(ids, use_cache=True))
        before = _cache_tensors(cache)
        out = model(ids[:, :0], cache=cache, attention_mask=torch.ones(2, 7, dtype=torch.long))
        assert out.logits.shape == (2, 0, VOCAB) and cache_of(out) is cache and cache.seen_tokens == 7
        after = _cache_tensors(cache)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert model(inputs_embeds=torch.zeros(2, 0, model.config.hidden_size, dtype=F64)).logits.shape == (2, 0, VOCAB)


def _cache_tensors(cache: HopeCache) -> dict:
    tensors = {}

    def collect(prefix, value):
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value.clone()
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                collect(f"{prefix}.{index}", item)

    for i, layer in enumerate(cache.layers):
        collect(str(i), list(vars(layer).values()))
    return tensors


@pytest.mark.parametrize("mask_value, dtype", [(0.5, torch.float32), (2, torch.long), (-1.0, torch.float64)])
def test_non_binary_attention_mask_is_rejected(mask_value, dtype):
    model = main_model("titans")
    ids = random_ids(2, 5)
    mask = torch.ones(2, 5, dtype=dtype)
    mask[1, 2] = mask_value
    with pytest.raises(ValueError, match=rf"attention_mask must hold only 0 \(padding\) and 1 \(token\); got the value"):
        model(ids, attention_mask=mask)
    binary = torch.ones(2, 5, dtype=dtype)
    binary[1, 3:] = 0
    with torch.no_grad():
        reference = model(ids, attention_mask=binary.bool()).logits
        assert torch.equal(model(ids, attention_mask=binary).logits, reference)


def test_attention_beyond_max_position_embeddings_warns_once():
    model = main_model("attention", max_position_embeddings=8)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    mixer_logger = logging.getLogger("hope.layers.attention")
    mixer_logger.addHandler(handler)
    try:
        with torch.no_grad():
            model(random_ids(1, 8))
            assert not records, "within max_position_embeddings there is nothing to say"
            cache = cache_of(model(random_ids(1, 10)))
            model(random_ids(1, 1), cache=cache)
    finally:
        mixer_logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and "max_position_embeddings=8" in messages[0], messages
