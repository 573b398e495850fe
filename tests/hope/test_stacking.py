"""Level stacking (hope.stack_levels, arXiv §7.3): a Llama-family causal LM becomes a Hope-Attention model whose
CMS levels start from its MLPs. With the in-context steps off the logits equal the original's (fp32, 1e-5), GQA
included, for random models and for a Llama trained on the embedded corpus; greedy generation with the cache
equals the original's; unsupported models and level specs get clear errors."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    ByT5Tokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

import hope
from hope import HopeForCausalLM
from hope.data import load_topics

from .utils_hope import cache_of, max_diff

VOCAB = 61
TOLERANCE = 1e-5  # fp32 logits
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}


def pretrained_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random fp32 causal LM of `family` with GQA (4 query heads on 2 key/value heads), untied."""
    config_class, model_class = FAMILIES[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  rope_theta=500.0, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return model_class(config_class(**kwargs)).eval()


def random_ids(batch: int, length: int, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------- exact stacking


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("variant", ["independent", "sequential"])
def test_stacked_logits_equal_the_pretrained_with_steps_off(family, variant):
    pretrained = pretrained_model(family)
    ids = random_ids(2, 37)
    reference = logits(pretrained, ids)
    # sequential: the MLP in the first level, which learns in context (the switch check below needs one).
    level = {"pretrained_level": 0} if variant == "sequential" else {}
    model = hope.stack_levels(pretrained, [5, 7, None], cms_variant=variant, cms_objective="l2", cms_in_context=False,
                              **level)
    assert isinstance(model, HopeForCausalLM) and model.config.mixer == "attention"
    assert model.config.num_key_value_heads == 2 and model.config.cms_in_context is False
    assert model.config.attention_qkv_bias == (family == "qwen2")
    err = max_diff(logits(model, ids), reference)
    assert err < TOLERANCE, f"{family}/{variant}: stacked logits differ by {err:.3g}"
    # The switch is real: with the "l2" steps on, the zero target pulls the levels' outputs, so logits move.
    model.set_cms_in_context(True)
    assert model.config.cms_in_context is True
    assert max_diff(logits(model, ids), reference) > 1e-3, "switching the in-context steps on changed nothing"


@pytest.mark.parametrize("kv_heads, tied", [(4, False), (1, True)])  # plain multi-head / multi-query, tied head
def test_stacking_is_exact_for_mha_mqa_and_tied_embeddings(kv_heads, tied):
    pretrained = pretrained_model(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    ids = random_ids(3, 20)
    model = hope.stack_levels(pretrained, [4, None], cms_in_context=False)
    assert model.config.tie_word_embeddings is tied and model.config.num_key_value_heads == kv_heads
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert max_diff(logits(model, ids), logits(pretrained, ids)) < TOLERANCE


@pytest.mark.parametrize("variant", ["independent", "sequential"])
def test_dot_objective_with_zero_targets_is_exact_with_the_steps_on(variant):
    """The default objective ("dot") and P_v = 0 make every in-context step zero at the start."""
    pretrained = pretrained_model()
    ids = random_ids(2, 30)
    model = hope.stack_levels(pretrained, [3, 8, None], cms_variant=variant)
    assert model.config.cms_in_context is True and model.config.cms_objective == "dot"
    assert max_diff(logits(model, ids), logits(pretrained, ids)) < TOLERANCE
    # ...and outer training can reach the targets: the LM loss has a gradient for every P_v.
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if name.endswith("p_v"):
            assert param.grad is not None and bool((param.grad != 0).any()), f"no gradient for {name}"


def test_right_padded_batches_equal_the_pretrained_on_valid_tokens():
    """HF Llama and Hope agree on every valid position of a right-padded batch (RoPE positions from 0 in both;
    with left padding HF shifts the positions by the padding and Hope does not, SPEC §5)."""
    pretrained = pretrained_model()
    ids = random_ids(2, 15)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    model = hope.stack_levels(pretrained, [4, None], cms_objective="l2", cms_in_context=False)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, use_cache=False).logits
        theirs = pretrained(ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    assert max_diff(ours[valid], theirs[valid]) < TOLERANCE


def test_initialisation_of_the_levels():
    pretrained = pretrained_model()
    mlp = pretrained.model.layers[1].mlp
    independent = hope.stack_levels(pretrained, [5, 7, None]).model.layers[1].cms
    assert torch.allclose(independent.level_weights, torch.full((3,), 1 / 3))
    for level in independent.levels:
        assert torch.equal(level.w_gate, mlp.gate_proj.weight) and torch.equal(level.w_down, mlp.down_proj.weight)
        if level.learns_in_context:
            assert not level.p_v.any() and not level.w_eta.any() and level.b_eta == 0
    sequential = hope.stack_levels(pretrained, [5, 7, None], cms_variant="sequential", pretrained_level=1)
    levels = sequential.model.layers[1].cms.levels
    assert torch.equal(levels[1].w_up, mlp.up_proj.weight) and torch.equal(levels[1].w_down, mlp.down_proj.weight)
    assert not levels[0].w_down.any() and not levels[2].w_down.any()
    assert levels[0].w_gate.abs().sum() > 0  # the empty levels keep random features, only W_down is zero


def test_pretrained_model_is_left_unchanged_and_dtype_follows():
    pretrained = pretrained_model().to(torch.float64)
    before = {name: value.clone() for name, value in pretrained.state_dict().items()}
    model = hope.stack_levels(pretrained, [5, None], cms_in_context=False)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not model.training
    ids = random_ids(2, 16)
    assert max_diff(logits(model, ids), logits(pretrained, ids)) < 1e-6
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert all(torch.equal(before[name], value) for name, value in pretrained.state_dict().items())


def test_stacked_model_saves_and_loads(tmp_path):
    pretrained = pretrained_model()
    model = hope.stack_levels(pretrained, [5, None], cms_in_context=False)
    model.save_pretrained(tmp_path)
    loaded = HopeForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.cms_in_context is False and loaded.config.num_key_value_heads == 2
    ids = random_ids(2, 12)
    assert max_diff(logits(loaded, ids), logits(pretrained, ids)) < TOLERANCE


def test_kv_cache_holds_the_key_value_heads_only():
    model = hope.stack_levels(pretrained_model(num_key_value_heads=1), [5, None], cms_in_context=False)
    with torch.no_grad():
        out = model(random_ids(2, 9), use_cache=True)
    key = cache_of(out).layers[0].key
    assert key.shape == (2, 1, 9, 8), key.shape  # (B, H_kv, T, d)


# --------------------------------------------------------------------------------- a trained Llama, generation


@pytest.fixture(scope="module")
def trained_llama():
    """A tiny Llama (GQA, tied) trained 300 AdamW steps on the pydoc topics, byte-level; a few seconds on CPU."""
    tokenizer = ByT5Tokenizer()
    text = "\n".join(list(load_topics().values())[:40])
    stream = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        starts = torch.randint(0, len(stream) - 65, (8,), generator=generator)
        batch = torch.stack([stream[s : s + 64] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = sum(losses[-20:]) / 20
    assert final < 0.55 * math.log(len(tokenizer)), f"the tiny Llama did not learn: loss {final:.2f} nats/byte"
    return model.eval(), tokenizer, stream


@pytest.mark.parametrize("variant", ["independent", "sequential"])
def test_trained_llama_logits_and_loss_equal(trained_llama, variant):
    pretrained, _, stream = trained_llama
    ids = torch.stack([stream[1000:1100], stream[5000:5100]])
    model = hope.stack_levels(pretrained, [16, 64, None], cms_variant=variant, cms_in_context=False)
    with torch.no_grad():
        ours, theirs = model(ids, labels=ids), pretrained(ids, labels=ids)
    err = max_diff(ours.logits, theirs.logits)
    assert err < TOLERANCE, f"trained Llama, {variant}: logits differ by {err:.3g}"
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-6


@pytest.mark.parametrize("in_context, objective", [(False, "l2"), (True, "dot")])
def test_greedy_generation_with_the_cache_equals_the_pretrained(trained_llama, in_context, objective):
    pretrained, tokenizer, _ = trained_llama
    model = hope.stack_levels(pretrained, [16, 64, None], cms_objective=objective, cms_in_context=in_context)
    prompts = ["The for statement is used to", "Assignment statements are used to"]
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False, use_cache=True)
        with torch.no_grad():
            theirs = pretrained.generate(ids, **kwargs)
            ours = model.generate(ids, **kwargs)
        assert torch.equal(ours, theirs), (
            f"greedy generations differ:\n  Llama: {tokenizer.decode(theirs[0])!r}\n  Hope:  {tokenizer.decode(ours[0])!r}"
        )
        assert ours.shape[1] > ids.shape[1] + 10, "the generation stopped early: the comparison says little"


# ------------------------------------------------------------------------------------------------- errors


def _stack_error(model, match: list[str], *args, **kwargs) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        hope.stack_levels(model, *args, **kwargs)
    message = str(info.value)
    absent = [m for m in match if m not in message]
    assert not absent, f"error {message!r} does not mention {absent}"
    return message


def test_a_non_llama_model_is_rejected():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    _stack_error(gpt2, ["gpt2", "GPT2LMHeadModel", "llama", "mistral", "qwen2"], [16, None])
    _stack_error(torch.nn.Linear(2, 2), ["PreTrainedModel", "Linear"], [16, None])
    _stack_error(pretrained_model().model, ["causal LM", "LlamaModel"], [16, None])  # the base model, no head


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                                  {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_unsupported_rope_scaling_is_rejected(rope):
    model = pretrained_model(rope_parameters=rope)
    _stack_error(model, ["rope", repr(rope["rope_type"]), "default"], [16, None])


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
    (dict(mlp_bias=True), ["mlp_bias"]),
    (dict(attention_bias=True), ["attention_bias", "o_proj"]),
])
def test_layouts_that_do_not_map_are_rejected(overrides, match):
    _stack_error(pretrained_model(**overrides), match, [16, None])


def test_sliding_windows_are_rejected():
    _stack_error(pretrained_model("mistral", sliding_window=16), ["sliding_window=16", "full causal"], [16, None])
    qwen2 = pretrained_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    _stack_error(qwen2, ["layer_types", "sliding_attention", "full causal"], [16, None])
    # Qwen2 with the window switched off (its default) maps: the window size alone changes nothing.
    hope.stack_levels(pretrained_model("qwen2", use_sliding_window=False, sliding_window=16), [16, None])


@pytest.mark.parametrize("levels, match", [
    ([16, "slow"], ["cms_chunk_sizes[1]", "'slow'", "positive"]),
    ([0, None], ["cms_chunk_sizes[0]", "0"]),
    ([], ["cms_chunk_sizes", "non-empty"]),
    (16, ["cms_chunk_sizes=16", "list"]),
])
def test_unknown_level_specs_are_rejected(levels, match):
    _stack_error(pretrained_model(), match, levels)


def test_bad_stacking_arguments_are_rejected():
    model = pretrained_model()
    _stack_error(model, ["cms_variant", "'mixture'", "independent", "sequential"], [16, None], cms_variant="mixture")
    _stack_error(model, ["pretrained_level=2", "2 levels"], [16, None], cms_variant="sequential", pretrained_level=2)
    _stack_error(model, ["pretrained_level", "sequential"], [16, None], pretrained_level=0)
    _stack_error(model, ["hidden_size", "cannot be overridden"], [16, None], hidden_size=64)
    _stack_error(model, ["cms_in_context", "True or False"], [16, None], cms_in_context="no")


def test_set_cms_in_context_validates():
    model = hope.stack_levels(pretrained_model(), [5, None])
    with pytest.raises(ValueError, match="enabled"):
        model.set_cms_in_context(1)
