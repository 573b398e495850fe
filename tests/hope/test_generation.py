"""HopeCache and generate() (SPEC §5): cached decoding reproduces the full forward, and the Hugging Face
generation API (greedy, sampling, beams, padding, num_return_sequences, inputs_embeds) works on top of it."""
from __future__ import annotations

import pytest
import torch

from hope import HopeCache
from hope_kernels.cms import CMSState
from tests.hope.utils_hope import (
    CHUNK, CMS_CHUNKS, VARIANTS, VOCAB, cache_of, max_diff, random_ids, tiny_model, variant_config,
)

DECODE_VARIANTS = ["titans", "transformer++", "hope_attention", "hope"]
PROMPT_LENGTHS = [1, CHUNK - 1, CHUNK, 2 * CHUNK + 3]
GEN = dict(pad_token_id=0, eos_token_id=None)  # tiny random models: never stop early


def _cache_of(output) -> HopeCache:
    cache = cache_of(output)
    assert isinstance(cache, HopeCache)
    return cache


def _greedy_without_cache(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by repeated full forwards: the oracle for generate()."""
    sequence = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(sequence, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


def _record_input_lengths(model) -> list[int]:
    """Lengths of the input_ids of every forward call from now on."""
    lengths = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None
                                                    else -1),
        with_kwargs=True,
    )
    return lengths


def test_prompt_lengths_are_no_multiple_of_the_cms_chunks():
    for size in (s for s in CMS_CHUNKS if s):
        assert all(length == 1 or length % size for length in PROMPT_LENGTHS)


OTHER_VARIANT_CASES = [(name, length) for name in sorted(set(VARIANTS) - set(DECODE_VARIANTS))
                       for length in (CHUNK - 1, 2 * CHUNK + 3)]


@pytest.mark.parametrize(
    "name, prompt_length",
    [(name, length) for name in DECODE_VARIANTS for length in PROMPT_LENGTHS] + OTHER_VARIANT_CASES,
)
def test_cached_decoding_matches_full_forward(name, prompt_length):
    """Prefill the prompt with the cache, then feed the rest one token at a time."""
    model = tiny_model(variant_config(name))
    T = prompt_length + 2 * CHUNK + 2  # the decode crosses several Titans and CMS chunk boundaries
    ids = random_ids(2, T)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prompt_length], use_cache=True)
        cache = _cache_of(out)
        pieces = [out.logits]
        for t in range(prompt_length, T):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            assert _cache_of(out) is cache
            pieces.append(out.logits)
    assert cache.get_seq_length() == T
    decoded = torch.cat(pieces, dim=1)
    err = max_diff(decoded, full)
    assert err < 1e-9, f"{name}, prompt {prompt_length}: cached decoding differs from the full forward by {err:.3g}"


@pytest.mark.parametrize("name", DECODE_VARIANTS)
def test_multi_token_continuations_match_full_forward(name):
    """The cache also continues with several tokens at a time, starting and ending mid-chunk."""
    model = tiny_model(variant_config(name))
    pieces = [3, 6, 1, 5, 2]
    ids = random_ids(2, sum(pieces))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, start, logits = None, 0, []
        for length in pieces:
            out = model(ids[:, start : start + length], cache=cache, use_cache=True)
            cache, start = _cache_of(out), start + length
            logits.append(out.logits)
    assert max_diff(torch.cat(logits, dim=1), full) < 1e-9


def _generate_with_logits(model, prompt, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """generate() -> (sequences, the raw logits of every step (B, new_tokens, V))."""
    out = model.generate(prompt, return_dict_in_generate=True, output_logits=True, **GEN, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("name", ["titans", "transformer++", "hope"])
def test_greedy_generate_equals_argmax_loop(name):
    model = tiny_model(variant_config(name))
    prompt = random_ids(2, 6)
    lengths = _record_input_lengths(model)
    out, logits = _generate_with_logits(model, prompt, max_new_tokens=9, do_sample=False, use_cache=True)
    assert lengths == [6] + [1] * 8, f"generate() should prefill once, then feed one token a step: {lengths}"
    assert out.shape == (2, 15)
    assert torch.equal(out, _greedy_without_cache(model, prompt, 9))
    # The tokens of a tiny random model can repeat; its logits show any difference.
    with torch.no_grad():
        full = model(out[:, :-1], use_cache=False).logits[:, 5:]
    assert max_diff(logits, full) < 1e-5  # generate() hands out float32 logits
    assert torch.equal(model.generate(prompt, max_new_tokens=9, do_sample=False, use_cache=False, **GEN), out)


@pytest.mark.parametrize("name", ["titans", "hope_attention"])
def test_sampling_shape_and_seed_reproducibility(name):
    model = tiny_model(variant_config(name))
    prompt = random_ids(3, 4)
    kwargs = dict(max_new_tokens=7, do_sample=True, top_k=5, **GEN)
    torch.manual_seed(123)
    first = model.generate(prompt, **kwargs)
    torch.manual_seed(123)
    second = model.generate(prompt, **kwargs)
    assert first.shape == (3, 11)
    assert torch.equal(first[:, :4], prompt)
    assert bool(((first >= 0) & (first < VOCAB)).all())
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["titans", "transformer++", "hope"])
def test_generate_with_left_padding(name):
    """A left-padded batch generates, and the unpadded row equals its generation alone (rows are independent).
    The padded row equals its own unpadded generation when the pad keeps every chunk phase (SPEC §5: padding
    changes no state, the chunk phase counts from position 0): pad = C tokens for Titans, and any pad for
    attention, whose RoPE is relative. The CMS chunks (5, 7) of "hope" are out of phase after 4 pads."""
    config = variant_config(name)
    model = tiny_model(config)
    pad = CHUNK
    prompt = random_ids(2, pad + 5)
    mask = torch.ones_like(prompt)
    mask[0, :pad] = 0
    prompt[0, :pad] = 0
    out, logits = _generate_with_logits(model, prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, pad + 11)
    alone, alone_logits = _generate_with_logits(model, prompt[1:], max_new_tokens=6, do_sample=False)
    assert torch.equal(out[1], alone[0])
    assert max_diff(logits[1], alone_logits[0]) < 1e-5
    in_phase = all(pad % size == 0 for size in config.cms_chunk_sizes if size) and (
        config.mixer == "attention" or pad % config.chunk_size == 0)
    assert in_phase == (name != "hope")
    if in_phase:
        alone, alone_logits = _generate_with_logits(model, prompt[:1, pad:], max_new_tokens=6, do_sample=False)
        assert torch.equal(out[0, pad:], alone[0])
        assert max_diff(logits[0], alone_logits[0]) < 1e-5


def _assert_cms_states_equal(actual: HopeCache, row: int, expected: HopeCache, expected_row: int) -> int:
    """Every CMS level's θ, running sums and chunk_has_valid of `actual[row]` equal `expected[expected_row]`;
    returns how many levels were compared."""
    compared = 0
    for layer_a, layer_e in zip(actual.layers, expected.layers):
        for level_a, level_e in zip(layer_a.cms, layer_e.cms):
            assert (level_a is None) == (level_e is None)
            if level_a is None:
                continue
            for name in CMSState._fields:
                if name != "position":
                    a, e = getattr(level_a, name)[row], getattr(level_e, name)[expected_row]
                    assert max_diff(a.double(), e.double()) < 1e-12, f"{name} of a CMS level"
            compared += 1
    return compared


def test_cms_decay_right_padding_over_whole_chunks_changes_no_state():
    """SPEC §5 with cms_decay > 0: right padding that covers whole CMS chunks leaves every level as the unpadded
    run left it. 35 valid tokens end a chunk of both levels (5, 7); the 15 pads close 3 and 2 chunks of padding,
    which must not pull θ toward θ_0. The other row has no padding and equals its own run."""
    model = tiny_model(variant_config("hope", cms_decay=0.5))
    ids = random_ids(2, 50)
    mask = torch.ones_like(ids)
    mask[0, 35:] = 0
    with torch.no_grad():
        padded = _cache_of(model(ids, attention_mask=mask, use_cache=True))
        alone = _cache_of(model(ids[:1, :35], use_cache=True))
        full = _cache_of(model(ids[1:], use_cache=True))
    assert _assert_cms_states_equal(padded, 0, alone, 0) == 4  # 2 layers x 2 learning levels
    assert _assert_cms_states_equal(padded, 1, full, 0) == 4
    level = alone.layers[0].cms[0]  # θ moved away from θ_0, so a wrong pull would show
    assert max_diff(level.w_gate[0], model.model.layers[0].cms.levels[0].w_gate) > 1e-6


@pytest.mark.parametrize("one_token_at_a_time", [False, True])
def test_cms_decay_padding_only_continuation_changes_no_state(one_token_at_a_time):
    """A cached stream continued by a row of nothing but padding (SPEC §5, cms_decay > 0): 35 pads from a
    boundary of both CMS levels close only padding chunks, so that row's CMS states stay as the prompt left them,
    whether the pads come as one chunked call or decode steps; the other row keeps learning."""
    model = tiny_model(variant_config("hope", cms_decay=0.5))
    ids = random_ids(2, 70)
    mask = torch.ones_like(ids)
    mask[0, 35:] = 0
    with torch.no_grad():
        cache = _cache_of(model(ids[:, :35], use_cache=True))
        before = _cache_of(model(ids[:, :35], use_cache=True))  # a copy: `cache` is updated in place
        if one_token_at_a_time:
            for t in range(35, 70):
                model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        else:
            model(ids[:, 35:], attention_mask=mask, cache=cache, use_cache=True)
        full = _cache_of(model(ids[1:], use_cache=True))
    assert cache.get_seq_length() == 70
    assert _assert_cms_states_equal(cache, 0, before, 0) == 4
    assert _assert_cms_states_equal(cache, 1, full, 0) == 4


def test_num_return_sequences():
    model = tiny_model(variant_config("hope"))
    prompt = random_ids(2, 5)
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=4, do_sample=True, num_return_sequences=2, **GEN)
    assert out.shape == (4, 9)
    assert torch.equal(out[:, :5], prompt.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("name", ["titans", "transformer++"])
def test_beam_search_with_and_without_cache(name):
    """Beam search reorders the cache (HopeCache.reorder_cache): with and without it the beams agree."""
    model = tiny_model(variant_config(name))
    prompt = random_ids(2, 5)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, **GEN)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert cached.shape == (2, 10)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("name", ["titans", "transformer++", "hope"])
def test_generate_from_inputs_embeds(name):
    model = tiny_model(variant_config(name))
    prompt = random_ids(2, 6)
    embeds = model.get_input_embeddings()(prompt).detach()
    from_ids = model.generate(prompt, max_new_tokens=5, do_sample=False, **GEN)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False, **GEN)
    assert torch.equal(from_embeds, from_ids[:, 6:])  # generate() returns only the new tokens here


def test_cache_reorder_and_repeat_select_batch_rows():
    model = tiny_model(variant_config("hope_attention"))
    ids = random_ids(3, 6)
    with torch.no_grad():
        cache = _cache_of(model(ids, use_cache=True))
        cache.reorder_cache(torch.tensor([2, 0]))
        nxt = random_ids(2, 1)
        logits = model(nxt, cache=cache, use_cache=True).logits
        want = model(torch.cat([ids[[2, 0]], nxt], dim=1), use_cache=False).logits[:, -1:]
        assert max_diff(logits, want) < 1e-9
        cache.batch_repeat_interleave(2)
        nxt2 = random_ids(4, 1)
        logits = model(nxt2, cache=cache, use_cache=True).logits
        history = torch.cat([ids[[2, 0]], nxt], dim=1).repeat_interleave(2, dim=0)
        want = model(torch.cat([history, nxt2], dim=1), use_cache=False).logits[:, -1:]
        assert max_diff(logits, want) < 1e-9


def test_cache_reorder_and_repeat_carry_chunk_has_valid():
    """Each CMS state's chunk_has_valid (B,) is per batch row like θ: beam search reorders and repeats it."""
    model = tiny_model(variant_config("hope", cms_decay=0.5))
    ids = random_ids(3, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # row 1: the chunks in progress, [5, 10) and [7, 14), hold no valid token yet
    with torch.no_grad():
        cache = _cache_of(model(ids, attention_mask=mask, use_cache=True))
    levels = cache.layers[1].cms[:2]
    assert [level.chunk_has_valid.tolist() for level in levels] == [[True, False, True]] * 2
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.batch_repeat_interleave(2)
    cache.detach()
    for before, after in zip(levels, cache.layers[1].cms):
        assert after.chunk_has_valid.tolist() == [False, False, True, True]
        assert torch.equal(after.w_gate, before.w_gate[[1, 1, 0, 0]])


def test_generate_with_a_user_supplied_cache():
    """A HopeCache handed to generate() is filled in place and gives the tokens of an automatic cache."""
    import inspect

    import transformers

    model = tiny_model(variant_config("hope")).eval()
    ids = random_ids(2, 7)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    cache = HopeCache(model.config.num_hidden_layers)
    params = inspect.signature(transformers.GenerationMixin.prepare_inputs_for_generation).parameters
    name = "cache" if "cache" in params else "past_key_values"
    out = model.generate(ids, max_new_tokens=5, do_sample=False, **{name: cache})
    assert torch.equal(out, expected)
    assert cache.seen_tokens == 7 + 5 - 1  # the last sampled token is never fed back
