"""The deep Titans memory at model level (SPEC §2 "Deep memory", Eq. 91, memory_depth=2): config fields, the
mixer's parameters and their gradients, cached decoding and generate() == the full forward, save/load, and
kernel_backend="triton" == "torch" is checked with the other ops in test_kernel_backends.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hope import HopeCache, HopeConfig
from hope.layers.titans_mixer import TitansMixer
from hope_kernels.deep_titans import DeepTitansState
from tests.hope_kernels.deep_titans.oracle import deep_titans_oracle
from tests.hope.utils_hope import CHUNK, cache_of, max_diff, random_ids, tiny_config, tiny_model

DEEP_VARIANTS = {
    "deep": dict(memory_depth=2, cms_chunk_sizes=[None]),
    "deep_hope": dict(memory_depth=2, memory_hidden=12),  # with the CMS levels, h != d = 8
    "deep_value_nomom_dot": dict(memory_depth=2, memory_target="value", momentum=False, objective="dot",
                                 cms_chunk_sizes=[None]),
    "deep_nodgd_adaptive_eta": dict(memory_depth=2, dgd=False, adaptive=["eta"], cms_chunk_sizes=[None]),
}
GEN = dict(pad_token_id=0, eos_token_id=None)


def deep_config(name: str, **overrides) -> HopeConfig:
    return tiny_config(**{**DEEP_VARIANTS[name], **overrides})


# ---------------------------------------------------------------------------------------------- config


def test_config_fields_and_defaults():
    config = tiny_config(memory_depth=2)
    assert config.memory_depth == 2 and config.memory_hidden == config.head_dim == 8
    assert tiny_config(memory_depth=2, memory_hidden=5).memory_hidden == 5
    again = HopeConfig.from_dict(tiny_config(memory_depth=2, memory_hidden=5).to_dict())
    assert (again.memory_depth, again.memory_hidden) == (2, 5)
    assert HopeConfig().memory_hidden == 1024 // 16


@pytest.mark.parametrize("field, bad, words", [
    ("memory_depth", 3, ["memory_depth", "3", "1", "2"]),
    ("memory_depth", 0, ["memory_depth", "0"]),
    ("memory_depth", True, ["memory_depth", "True"]),
    ("memory_hidden", 0, ["memory_hidden", "0", "positive int"]),
    ("memory_hidden", 4.0, ["memory_hidden", "4.0", "positive int"]),
])
def test_config_rejects_bad_values(field, bad, words):
    with pytest.raises(ValueError) as info:
        tiny_config(**{"memory_depth": 2, field: bad})
    absent = [w for w in words if w not in str(info.value)]
    assert not absent, f"{info.value!r} does not mention {absent}"


# ---------------------------------------------------------------------------------------------- mixer


def test_mixer_parameters_and_init():
    config = deep_config("deep_hope")
    model = tiny_model(config, dtype=torch.float32)
    mixer = model.model.layers[0].mixer
    assert isinstance(mixer, TitansMixer)
    H, d, h = config.num_heads, config.head_dim, config.memory_hidden
    assert mixer.memory_w1.shape == (H, d, h) and mixer.memory_w2.shape == (H, h, d)
    assert mixer.adaptive_init.shape == (H, 2 * d + 2, d)
    assert not hasattr(mixer, "memory_init")
    assert abs(mixer.memory_w2.std().item() - d**-0.5) < 0.5 * d**-0.5
    assert 0 < mixer.memory_w1.abs().max().item() and mixer.memory_w1.std().item() < 2 * config.initializer_range


def test_mixer_reads_the_deep_memory():
    """The mixer's memory read is the deep op on its own q, a and parameters: checked against the oracle."""
    config = deep_config("deep")
    model = tiny_model(config)
    mixer = model.model.layers[0].mixer
    B, T, D = 2, 9, config.hidden_size
    x = torch.randn(B, T, D, dtype=torch.float64)
    captured = {}
    handle = mixer.o_norm.register_forward_hook(lambda mod, args, out: captured.setdefault("o", args[0]))
    with torch.no_grad():
        mixer(x, None, None)
    handle.remove()
    H, d = mixer.num_heads, mixer.head_dim
    with torch.no_grad():
        q, _ = mixer.q_conv(mixer.q_proj(x), None, None)
        a, _ = mixer.a_conv(mixer.a_proj(x), None, None)
        q = F.normalize(F.silu(q).view(B, T, H, d), dim=-1)
        a = F.silu(a).view(B, T, H, d)
        o, _ = deep_titans_oracle(
            q, a, mixer.memory_w1, mixer.memory_w2, mixer.adaptive_init, mixer.b_eta, mixer.b_alpha,
            mixer.momentum_logit, chunk_size=config.chunk_size, eta_max=config.eta_max)
    assert max_diff(captured["o"], o) < 1e-10
    assert max_diff(o, q) > 1e-3  # the deep memory contributes


@pytest.mark.parametrize("name", ["deep", "deep_hope"])
def test_every_parameter_gets_a_gradient(name):
    model = tiny_model(deep_config(name)).train()
    ids = random_ids(2, 13)
    model(ids, labels=ids).loss.backward()
    offenders = [n for n, p in model.named_parameters() if p.grad is None or not bool((p.grad != 0).any())]
    d = model.config.head_dim
    for n, p in model.named_parameters():
        if n.endswith(("memory_w1", "memory_w2")):
            offenders += [f"{n}[head {h}]" for h in range(p.shape[0]) if not bool((p.grad[h] != 0).any())]
        if n.endswith("adaptive_init"):
            for block, rows in {"M_k": slice(0, d), "M_v": slice(d, 2 * d), "m_eta": slice(2 * d, 2 * d + 1),
                                "m_alpha": slice(2 * d + 1, 2 * d + 2)}.items():
                offenders += [f"{n}[head {h}, {block}]" for h in range(p.shape[0])
                              if not bool((p.grad[h, rows] != 0).any())]
    assert not offenders, f"no gradient from the LM loss for {offenders}"


# ---------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("name, prompt_length", [("deep", 1), ("deep", CHUNK - 1), ("deep", CHUNK),
                                                 ("deep", 2 * CHUNK + 3), ("deep_hope", CHUNK + 1),
                                                 ("deep_value_nomom_dot", 2 * CHUNK + 3),
                                                 ("deep_nodgd_adaptive_eta", CHUNK - 1)])
def test_cached_decoding_matches_full_forward(name, prompt_length):
    """Prefill the prompt with the cache, then feed the rest one token at a time across chunk boundaries."""
    model = tiny_model(deep_config(name))
    T = prompt_length + 2 * CHUNK + 2
    ids = random_ids(2, T)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prompt_length], use_cache=True)
        cache = cache_of(out)
        assert isinstance(cache, HopeCache)
        assert isinstance(cache.layers[0].memory, DeepTitansState)
        assert cache.layers[0].memory.w1.dtype == torch.float64  # fp64 model: fp64 state (fp32 otherwise)
        pieces = [out.logits]
        for t in range(prompt_length, T):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
    assert cache.get_seq_length() == T
    assert cache.layers[0].memory.position == T
    err = max_diff(torch.cat(pieces, dim=1), full)
    assert err < 1e-9, f"{name}, prompt {prompt_length}: cached decoding differs from the full forward by {err:.3g}"


def test_multi_token_continuations_match_full_forward():
    model = tiny_model(deep_config("deep_hope"))
    pieces = [3, 6, 1, 5, 2]
    ids = random_ids(2, sum(pieces))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, start, logits = None, 0, []
        for length in pieces:
            out = model(ids[:, start : start + length], cache=cache, use_cache=True)
            cache, start = cache_of(out), start + length
            logits.append(out.logits)
    assert max_diff(torch.cat(logits, dim=1), full) < 1e-9


def test_fp32_state_for_a_bf16_model():
    model = tiny_model(deep_config("deep"), dtype=torch.bfloat16)
    with torch.no_grad():
        cache = cache_of(model(random_ids(1, 6), use_cache=True))
    assert all(t.dtype == torch.float32 for t in cache.layers[0].memory[:9] if t is not None)


def test_greedy_generate_equals_argmax_loop():
    model = tiny_model(deep_config("deep"))
    prompt = random_ids(2, 6)
    out = model.generate(prompt, max_new_tokens=9, do_sample=False, use_cache=True, **GEN)
    sequence = prompt
    with torch.no_grad():
        for _ in range(9):
            sequence = torch.cat([sequence, model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, sequence)


def test_right_padding_changes_no_state():
    model = tiny_model(deep_config("deep"))
    ids = random_ids(2, 11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :7]).logits
    assert max_diff(padded[1:, :7], alone) < 1e-10


def test_save_load_round_trip(tmp_path):
    config = deep_config("deep_hope")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.memory_depth, loaded.config.memory_hidden) == (2, 12)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = random_ids(2, 11)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
