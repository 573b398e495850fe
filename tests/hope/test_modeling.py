"""HopeModel / HopeForCausalLM (SPEC §1-§5): shapes, causality, gradients, loss, backends, bad input,
padding masks, and the Hugging Face plumbing (Auto*, save/load, tied embeddings, gradient checkpointing)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM

from hope import HopeCache, HopeConfig, HopeForCausalLM, HopeModel
from tests.hope.utils_hope import (
    F64, VARIANTS, VOCAB, cache_of, max_diff, random_ids, tiny_config, tiny_model, variant_config,
)

ALL_VARIANTS = sorted(VARIANTS)


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_forward_shapes(name):
    config = variant_config(name)
    model = tiny_model(config)
    B, T = 2, 11
    ids = random_ids(B, T)
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (B, T, VOCAB)
    assert out.logits.dtype == F64
    assert torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (B, T, config.hidden_size) for h in out.hidden_states)
    cache = cache_of(out)
    assert isinstance(cache, HopeCache) and cache.get_seq_length() == T
    assert model(ids, use_cache=False, return_dict=False)[0].shape == (B, T, VOCAB)
    last = model(ids, use_cache=False, logits_to_keep=1).logits
    assert last.shape == (B, 1, VOCAB) and max_diff(last[:, 0], out.logits[:, -1]) < 1e-12
    base = HopeModel(config).to(F64).eval()
    base.load_state_dict({k[len("model."):]: v for k, v in model.state_dict().items() if k.startswith("model.")})
    assert base(ids).last_hidden_state.shape == (B, T, config.hidden_size)
    assert max_diff(base(ids).last_hidden_state, out.hidden_states[-1]) < 1e-12


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_causality(name):
    """Changing tokens after position t never changes the logits at positions <= t."""
    model = tiny_model(variant_config(name))
    T = 14
    ids = random_ids(2, T)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        for t in (0, 3, 6, 10):
            changed = ids.clone()
            changed[:, t + 1 :] = (ids[:, t + 1 :] + 1 + random_ids(2, T - t - 1, VOCAB - 1)) % VOCAB
            logits = model(changed, use_cache=False).logits
            assert max_diff(logits[:, : t + 1], reference[:, : t + 1]) < 1e-10, f"position <= {t} saw the future"
            assert max_diff(logits[:, t + 1 :], reference[:, t + 1 :]) > 1e-6, "later tokens should matter"


def _params_without_gradient(model: HopeForCausalLM, config: HopeConfig) -> list[str]:
    """Parameters (and memory_init row blocks, per-head and per-level scalars) whose LM-loss gradient is zero."""
    d = config.head_dim
    blocks = {"M": slice(0, d), "M_k": slice(d, 2 * d), "M_v": slice(2 * d, 3 * d), "m_eta": slice(3 * d, 3 * d + 1),
              "m_alpha": slice(3 * d + 1, 3 * d + 2)}
    offenders = []
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None or not bool((grad != 0).any()):
            offenders.append(name)
        elif name.endswith("memory_init"):  # (H, 3d+2, d): every head and every stacked memory
            offenders += [f"{name}[head {h}, {block}]" for h in range(grad.shape[0]) for block, rows in blocks.items()
                          if not bool((grad[h, rows] != 0).any())]
        elif name.endswith(("mixer.b_eta", "mixer.b_alpha", "momentum_logit")):  # (H,)
            offenders += [f"{name}[head {h}]" for h in range(grad.shape[0]) if grad[h] == 0]
    return offenders


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_every_parameter_gets_a_gradient(name):
    config = variant_config(name)
    model = tiny_model(config).train()
    ids = random_ids(2, 13)
    model(ids, labels=ids).loss.backward()
    offenders = _params_without_gradient(model, config)
    assert not offenders, f"{name}: no gradient from the LM loss for {offenders}"


# --------------------------------------------------------------------------------------------------- loss


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = tiny_model(variant_config("hope"))
    ids = random_ids(3, 12)
    labels = ids.clone()
    labels[0, 2] = -100
    labels[1, 5:] = -100
    labels[2, :4] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.loss.ndim == 0
    assert abs(out.loss.item() - manual.item()) < 1e-5 * manual.item()
    # The ignored targets really are ignored: changing them changes nothing.
    other = labels.clone()
    other[labels == -100] = -100
    other[0, 2] = -100
    assert model(ids, labels=other).loss.item() == out.loss.item()
    with_all = model(ids, labels=ids).loss.item()
    assert abs(with_all - out.loss.item()) > 1e-6


def test_loss_with_num_items_in_batch_is_sum_over_n():
    model = tiny_model(variant_config("titans"))
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels, num_items_in_batch=torch.tensor(23))
    token_sum = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100,
                                reduction="sum")
    assert abs(out.loss.item() - token_sum.item() / 23) < 1e-5 * out.loss.item()
    assert abs(model(ids, labels=labels, num_items_in_batch=23).loss.item() - out.loss.item()) < 1e-7


def test_labels_default_to_no_cache():
    model = tiny_model(variant_config("titans"))
    ids = random_ids(2, 6)
    assert cache_of(model(ids, labels=ids)) is None


@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_labels_with_a_given_cache_continue_it(name):
    """Truncated BPTT over a stream: a detached cache plus labels continues the sequence (not a fresh start)."""
    model = tiny_model(variant_config(name)).train()
    ids = random_ids(2, 14)
    full = model(ids, use_cache=False).logits.detach()
    cache = cache_of(model(ids[:, :6], use_cache=True)).detach()
    for layer in cache.layers:
        states = [layer.memory.z] if layer.memory is not None else [layer.key]
        states += [state.w_gate for state in layer.cms if state is not None]
        assert not any(state.requires_grad for state in states)
    out = model(ids[:, 6:], cache=cache, labels=ids[:, 6:])
    assert cache_of(out) is cache and cache.get_seq_length() == 14
    assert max_diff(out.logits, full[:, 6:]) < 1e-10
    out.loss.backward()
    assert model.lm_head.weight.grad is not None


def test_initialisation_follows_spec():
    """SPEC §2: alpha starts about 0.99; every parameter is initialised (finite, nothing left from torch.empty)."""
    model = HopeForCausalLM(tiny_config(initializer_range=0.02))
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all() and param.abs().max() < 50, name
    for layer in model.model.layers:
        alpha = torch.sigmoid(layer.mixer.b_alpha.detach())
        assert torch.allclose(alpha, torch.full_like(alpha, 0.99), atol=5e-3), alpha
        assert layer.mixer.momentum_logit is None  # momentum is off by default (SPEC §2 v2)
    for layer in HopeForCausalLM(tiny_config(initializer_range=0.02, momentum=True)).model.layers:
        assert 0 < float(torch.sigmoid(layer.mixer.momentum_logit.detach()).min()) < 1


def test_bfloat16_keeps_fp32_states():
    """SPEC §5: states and inner-gradient sums are fp32 whatever the activation dtype."""
    model = tiny_model(variant_config("hope"), dtype=torch.bfloat16)
    ids = random_ids(2, 11)
    out = model(ids, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    reference = tiny_model(variant_config("hope"), dtype=torch.float32)(ids).logits
    assert max_diff(out.logits.float(), reference) < 0.25  # bf16 activations, same model
    states = _states(cache_of(out))
    assert states and all(t.dtype == torch.float32 for t in states.values()), {k: t.dtype for k, t in states.items()}
    step = model(random_ids(2, 1), cache=cache_of(out), use_cache=True)
    assert all(t.dtype == torch.float32 for t in _states(cache_of(step)).values())
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_torch_backend_equals_auto_on_cpu(name):
    ids = random_ids(2, 13)
    auto = tiny_model(variant_config(name, kernel_backend="auto"))(ids).logits
    torch_ = tiny_model(variant_config(name, kernel_backend="torch"))(ids).logits
    assert torch.equal(auto, torch_)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def hope_model():
    return tiny_model(variant_config("hope"))


@pytest.mark.parametrize("shift", [VOCAB, -VOCAB - 1])
def test_token_ids_outside_vocab(hope_model, shift):
    ids = random_ids(2, 6)
    ids[1, 3] += shift
    with pytest.raises(ValueError, match="vocab_size"):
        hope_model(ids)


def test_float_input_ids(hope_model):
    with pytest.raises(ValueError, match="input_ids"):
        hope_model(random_ids(2, 6).float())


@pytest.mark.parametrize("shape", [(2, 5), (2, 6, 1), (3, 6), (6,)])
def test_attention_mask_of_wrong_shape(hope_model, shape):
    with pytest.raises(ValueError, match="attention_mask"):
        hope_model(random_ids(2, 6), attention_mask=torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(2, 5), (1, 6), (2, 6, 1)])
def test_labels_of_wrong_shape(hope_model, shape):
    with pytest.raises(ValueError, match="labels"):
        hope_model(random_ids(2, 6), labels=torch.zeros(shape, dtype=torch.long))


def test_both_or_neither_of_input_ids_and_inputs_embeds(hope_model):
    ids = random_ids(2, 6)
    embeds = hope_model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="input_ids"):
        hope_model(input_ids=ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="input_ids"):
        hope_model()
    assert max_diff(hope_model(inputs_embeds=embeds).logits, hope_model(ids).logits) < 1e-12


def test_inputs_embeds_of_wrong_width(hope_model):
    with pytest.raises(ValueError, match="inputs_embeds"):
        hope_model(inputs_embeds=torch.zeros(2, 6, 15, dtype=F64))


# -------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", ["hope", "titans", "hope_attention", "transformer++", "independent"])
def test_right_padding_equals_unpadded_runs(name):
    model = tiny_model(variant_config(name))
    lengths = [14, 9, 6, 1]
    T = max(lengths)
    ids = random_ids(len(lengths), T)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, use_cache=False).logits
        for row, length in enumerate(lengths):
            alone = model(ids[row : row + 1, :length], use_cache=False).logits
            assert max_diff(padded[row, :length], alone[0]) < 1e-10, f"row {row} (length {length})"


def _states(cache: HopeCache) -> dict[str, torch.Tensor]:
    """Every Titans and CMS state tensor of a cache, by name; CMS levels also as θ_eff = θ_c - Σ eta ∇ℓ / N_c
    (what θ_{c+1} becomes when the chunk closes, with cms_decay 0; SPEC §3 v2)."""
    states = {}
    for i, layer in enumerate(cache.layers):
        if layer.memory is not None:
            for field in ("z_chunk", "z", "s"):
                if getattr(layer.memory, field) is not None:  # s is None without momentum
                    states[f"layer{i}.titans.{field}"] = getattr(layer.memory, field)
        for level, state in enumerate(layer.cms):
            if state is None:
                continue
            n_c = state.curvature_sum[:, None, None]  # N_c so far; 0 before the chunk's first valid token
            n_c = torch.where(n_c > 0, n_c, torch.ones_like(n_c))
            for field in ("w_gate", "w_up", "w_down"):
                grad = getattr(state, "grad_" + field[2:])
                states[f"layer{i}.cms{level}.{field}"] = getattr(state, field)
                states[f"layer{i}.cms{level}.grad_{field[2:]}"] = grad
                states[f"layer{i}.cms{level}.{field}_eff"] = getattr(state, field) - grad / n_c
    return states


def _crosses_boundary(valid: int, pad: int, sizes) -> bool:
    """Does a chunk of any size close inside the padded tail (after token p with (p + 1) % C == 0)?"""
    return any((p + 1) % size == 0 for size in sizes if size for p in range(valid, valid + pad))


@pytest.mark.parametrize("valid, pad", [(16, 3), (10, 1), (9, 4), (5, 9)])
def test_padded_positions_change_no_state(valid, pad):
    config = variant_config("hope")
    model = tiny_model(config)
    ids = random_ids(2, valid + pad)
    mask = torch.ones(2, valid + pad, dtype=torch.long)
    mask[:, valid:] = 0
    with torch.no_grad():
        padded = cache_of(model(ids, attention_mask=mask, use_cache=True))
        prefix = cache_of(model(ids[:, :valid], use_cache=True))
    assert padded.get_seq_length() == valid + pad and prefix.get_seq_length() == valid
    got, want = _states(padded), _states(prefix)
    assert got.keys() == want.keys() and any(".titans." in k for k in got) and any(".cms" in k for k in got)
    crossing = _crosses_boundary(valid, pad, [config.chunk_size, *config.cms_chunk_sizes])
    if crossing:
        # A chunk closed inside the pad: the chunk-start copies and the pending CMS sums moved on, but the
        # memories themselves (Z_t, S_t, and each CMS level's θ_c - pending update) must not have.
        names = [k for k in got if k.endswith((".titans.z", ".titans.s", "_eff"))]
    else:
        names = list(got)
    bad = {k: max_diff(got[k], want[k]) for k in names if max_diff(got[k], want[k]) > 1e-12}
    assert not bad, f"padded positions changed state (valid={valid}, pad={pad}, crossing={crossing}): {bad}"
    assert crossing == ((valid, pad) in {(9, 4), (5, 9)})  # both kinds of tail are exercised


def test_padded_attention_keys_are_marked_invalid():
    model = tiny_model(variant_config("transformer++"))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cache = cache_of(model(random_ids(2, 5), attention_mask=mask, use_cache=True))
    for layer in cache.layers:
        assert torch.equal(layer.key_valid, mask.bool())


# ----------------------------------------------------------------------------------------- Hugging Face


def test_auto_model_round_trip(tmp_path):
    config = tiny_config(tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert isinstance(model, HopeForCausalLM)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HopeForCausalLM)
    ids = random_ids(2, 11)
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(loaded(ids).logits, logits)
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert type(base) is HopeModel
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)
    assert type(AutoModel.from_config(config)) is HopeModel


@pytest.mark.parametrize("tie", [True, False])
def test_tie_word_embeddings(tmp_path, tie):
    model = AutoModelForCausalLM.from_config(tiny_config(tie_word_embeddings=tie))
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == tie
    if not tie:
        assert not torch.equal(head, embed)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in model.model.parameters()) + (0 if tie else head.numel())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    embed2, head2 = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert (head2.data_ptr() == embed2.data_ptr()) == tie
    assert torch.equal(head2, head) and torch.equal(embed2, embed)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_gradient_checkpointing_same_loss_and_gradients(name):
    model = tiny_model(variant_config(name)).train()
    ids = random_ids(2, 13)
    calls = []
    for block in model.model.layers:  # a block's sub-modules run again when checkpointing recomputes it
        block.mixer_norm.register_forward_pre_hook(lambda module, args: calls.append(1))

    def loss_and_grads():
        model.zero_grad()
        calls.clear()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss, grads, plain_calls = loss_and_grads()
    model.gradient_checkpointing_enable()
    model.train()
    loss_ckpt, grads_ckpt, ckpt_calls = loss_and_grads()
    n_layers = model.config.num_hidden_layers
    assert plain_calls == n_layers and ckpt_calls == 2 * n_layers, "the blocks should be recomputed in backward"
    assert abs(loss.item() - loss_ckpt.item()) < 1e-12
    bad = {n: max_diff(grads[n], grads_ckpt[n]) for n in grads if max_diff(grads[n], grads_ckpt[n]) > 1e-12}
    assert not bad, f"gradients differ under gradient checkpointing: {bad}"


def test_momentum_off_has_no_momentum_parameter():
    """Without momentum beta is never read, so no trainable parameter may exist for it (DDP would stall on it)."""
    names = {name for name, _ in tiny_model(tiny_config(momentum=False)).named_parameters()}
    assert not any(name.endswith("momentum_logit") for name in names)
    names = {name for name, _ in tiny_model(tiny_config(momentum=True)).named_parameters()}
    assert any(name.endswith("momentum_logit") for name in names)


def test_masked_tokens_change_no_conv_state():
    """SPEC §5: masked tokens inside a sequence leave every state alone, the short-convolution window too. With
    chunk_size 1 and no CMS learning the chunk phase cannot matter, so the valid logits must equal the run
    without the masked tokens."""
    model = tiny_model(variant_config("titans", chunk_size=1))
    ids = random_ids(2, 10)
    padded = torch.cat([ids[:, :4], random_ids(2, 2), ids[:, 4:]], dim=1)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, 4:6] = 0
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        out = model(padded, attention_mask=mask, use_cache=False).logits
    keep = mask[0].bool()
    assert max_diff(out[:, keep], reference) < 1e-10


def test_right_padded_prefill_then_continue_equals_unpadded():
    """A right-padded segment followed by more tokens through the cache (truncated BPTT over a stream)."""
    model = tiny_model(variant_config("titans", chunk_size=1))
    ids = random_ids(1, 9)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        first = torch.cat([ids[:, :5], random_ids(1, 2)], dim=1)
        mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
        cache = cache_of(model(first, attention_mask=mask, use_cache=True))
        rest = model(ids[:, 5:], cache=cache, use_cache=True).logits
    assert max_diff(rest, reference[:, 5:]) < 1e-10


def test_a_passed_cache_is_continued_even_with_use_cache_false():
    model = tiny_model(variant_config("hope"))
    ids = random_ids(1, 11)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        cache = cache_of(model(ids[:, :6], use_cache=True))
        rest = model(ids[:, 6:], cache=cache, use_cache=False).logits
    assert cache.seen_tokens == 11
    assert max_diff(rest, reference[:, 6:]) < 1e-10


def test_a_cache_of_another_model_or_batch_is_named():
    """A cache continues the same layers and the same sequences: a mismatch is a ValueError saying which."""
    model = tiny_model(tiny_config())
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match=rf"holds 1 layers but the model has num_hidden_layers="
                                         rf"{model.config.num_hidden_layers}"):
        model(ids, cache=HopeCache(1))
    cache = cache_of(model(ids))
    with pytest.raises(ValueError, match="holds 2 sequences but the input has batch 3"):
        model(random_ids(3, 1), cache=cache)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_computes_in_at_least_fp32(dtype):
    """fp64 stays fp64 (so that fp64 checks of the whole model are exact), 16-bit inputs are normalised in fp32."""
    from hope.layers.common import RMSNorm

    norm = RMSNorm(8).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8, dtype=torch.float64).to(dtype)
    exact = x.double() / x.double().pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt() * norm.weight.double()
    out = norm(x)
    assert out.dtype == dtype
    tol = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert (out.double() - exact).abs().max() <= tol * exact.abs().max()
