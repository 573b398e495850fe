"""Level stacking (arXiv §7.3, SPEC §6): a pretrained Llama-family causal LM becomes a Hope-Attention model
whose CMS levels start from its MLPs.

    import hope
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(path)                 # Llama, Mistral or Qwen2
    model = hope.stack_levels(llama, cms_chunk_sizes=[16, 128, None])  # HopeForCausalLM, mixer="attention"

The map is exact: attention (GQA, RoPE, Qwen2's q/k/v biases), the norms, the embeddings and the head are
copied; every CMS level starts from the layer's MLP. With the in-context steps off (`cms_in_context=False`,
or `model.set_cms_in_context(False)`), the stacked model's logits equal the pretrained model's (fp32: to
1e-5; tests/hope/test_stacking.py).

How k levels start from one MLP per layer (`cms_variant`):

- "independent" (default, Eq. 74): h + Σ_l w_l MLP_l(RMSNorm(h)), every level a copy of the MLP, w_l = 1/k,
  the norm the layer's post-attention norm. Σ_l (1/k) MLP(z) = MLP(z), so the block is the Llama block.
- "sequential" (Eq. 30): h <- h + MLP_l(RMSNorm_l(h)); the level `pretrained_level` (default the last, the
  slowest) is the MLP with its norm, and every other level starts with W_down = 0, so it adds nothing.

Why the copies are the default: every level then starts in the pretrained basin, with the pretrained
features. A fast level's first steps fine-tune a working MLP, with gradients of the size the pretrained model
gives, rather than train random features behind a zero W_down (whose W_gate and W_up get no gradient until
W_down has grown). And the pretrained knowledge sits at every frequency: while a fast level drifts to follow a
stream, the slower copies still hold it (weight 1/k each) and the outer optimiser can move w_l toward them,
the recovery the paper's CMS argument relies on. The sequential start keeps the pretrained MLP whole in one
level and is there for when the extra levels should start empty (e.g. to bound their compute or drift).

The new levels' in-context parameters start at P_v = 0, w_eta = 0, b_eta = 0 (eta = cms_eta_max / 2, the
fresh-model value). With `cms_objective="dot"` (the default here) a zero target makes the in-context gradient
-J^T (z P_v) exactly zero, so the stacked model equals the pretrained one even with the steps on, and the
outer gradient reaches P_v (the step is linear in it): training decides how far the levels learn in context.
With "l2" the zero target is M(z) ≈ 0, so a level's step pulls its output toward zero until P_v is trained:
start "l2" with the steps off.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .configuration_hope import HopeConfig
from .modeling_hope import HopeForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# HopeConfig fields that stacking sets from the pretrained model; they cannot be overridden.
_MAPPED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_key_value_heads", "attention_qkv_bias",
    "mixer", "cms_hidden_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
    "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range",
)


def _rope_theta(config: Any) -> float:
    """The RoPE base of an HF config, after checking that the RoPE is the plain (unscaled) kind we implement."""
    parameters = getattr(config, "rope_parameters", None)  # transformers 5: {"rope_type": ..., "rope_theta": ...}
    scaling = getattr(config, "rope_scaling", None)  # older configs keep the scaling here
    if isinstance(parameters, dict) and "rope_type" in parameters:
        rope_type, theta = parameters.get("rope_type"), parameters.get("rope_theta")
    else:
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = getattr(config, "rope_theta", None)
    if rope_type != "default":
        raise ValueError(
            f"stack_levels: rope type {rope_type!r} (rope scaling) is not supported: Hope's attention implements "
            "plain RoPE only (rope_type 'default'); convert a model without rope scaling"
        )
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"stack_levels: the pretrained config has no usable rope_theta (got {theta!r})")
    return float(theta)


def _check_layout(pretrained: nn.Module) -> Any:
    """Reject every model whose computation the Hope-Attention block does not reproduce; returns its config."""
    from transformers import PreTrainedModel

    if not isinstance(pretrained, PreTrainedModel):
        raise TypeError(f"stack_levels expects a Hugging Face PreTrainedModel, got {type(pretrained).__name__}")
    config = pretrained.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"stack_levels supports Llama-family causal LMs (model_type one of {list(SUPPORTED_MODEL_TYPES)}); got "
            f"{type(pretrained).__name__} with model_type {model_type!r}"
        )
    if not (isinstance(getattr(pretrained, "lm_head", None), nn.Linear) and hasattr(pretrained, "model")):
        raise ValueError(
            f"stack_levels needs the causal LM (e.g. LlamaForCausalLM, with an lm_head), got {type(pretrained).__name__}"
        )
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (the CMS levels are SwiGLU with silu)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True (the CMS levels have no biases)")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=True (an o_proj bias; only Qwen2's q/k/v biases are supported)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim={head_dim} with num_attention_heads * head_dim != hidden_size={config.hidden_size}")
    # Mistral applies sliding_window to every layer; Qwen2 to the layers that layer_types marks.
    sliding = getattr(config, "sliding_window", None)
    if model_type == "mistral" and sliding is not None and sliding < config.max_position_embeddings:
        problems.append(f"sliding_window={sliding} (Hope's attention is full causal attention)")
    layer_types = getattr(config, "layer_types", None) or []
    windowed = sorted(set(layer_types) - {"full_attention"})
    if windowed:
        problems.append(f"layer_types with {windowed} layers (sliding_window={sliding}; Hope's attention is full "
                        "causal attention)")
    if problems:
        raise ValueError(
            f"stack_levels cannot map this {type(pretrained).__name__} exactly: " + "; ".join(problems)
        )
    for i, layer in enumerate(pretrained.model.layers):
        attention = layer.self_attn
        qkv_bias = [getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj")]
        if len(set(qkv_bias)) != 1 or attention.o_proj.bias is not None:
            raise ValueError(
                f"stack_levels: layer {i} has q/k/v biases {qkv_bias} and o_proj bias "
                f"{attention.o_proj.bias is not None}; supported: none, or q, k and v together without o_proj's"
            )
    return config


def stack_levels(
    pretrained: nn.Module,
    cms_chunk_sizes: Sequence[Optional[int]],
    *,
    cms_variant: str = "independent",
    pretrained_level: Optional[int] = None,
    cms_objective: str = "dot",
    cms_in_context: bool = True,
    **config_overrides: Any,
) -> HopeForCausalLM:
    """A Hope-Attention HopeForCausalLM whose CMS levels start from the MLPs of `pretrained` (arXiv §7.3).

    pretrained: an HF LlamaForCausalLM, MistralForCausalLM (without a sliding window) or Qwen2ForCausalLM; it
        is not modified. GQA, tied or untied embeddings, rope_theta and rms_norm_eps carry over; rope scaling,
        sliding windows, MLP or o_proj biases and non-silu activations are rejected with an error.
    cms_chunk_sizes: one entry per CMS level, e.g. [16, 128, None] (None: a level that never learns in
        context), as HopeConfig takes it.
    cms_variant: "independent" (every level a copy of the MLP, level weights 1/k) or "sequential" (the level
        `pretrained_level` is the MLP, the others start with W_down = 0); see the module docstring for why.
    pretrained_level: with "sequential" only, the index of the level that holds the MLP (default -1, the last).
    cms_objective: the levels' in-context objective; "dot" (default) with the zero-initialised target P_v
        takes exactly zero steps at the start, so the model is exact with the steps on as well.
    cms_in_context: False switches the in-context steps off (config `cms_in_context`; toggle later with
        `model.set_cms_in_context`); with it the logits equal the pretrained model's whatever the objective.
    config_overrides: other HopeConfig fields (cms_eta_max, cms_decay, kernel_backend, ...); the fields that
        the pretrained model sets (hidden_size, heads, vocabulary, rope, norms, ...) cannot be overridden.

    Returns the model on the device and in the dtype of `pretrained`, in the same train/eval mode, with its
    generation_config.
    """
    config = _check_layout(pretrained)
    clashes = sorted(set(config_overrides) & set(_MAPPED_FIELDS))
    if clashes:
        raise ValueError(f"stack_levels: {clashes} are set from the pretrained model and cannot be overridden")
    levels = list(cms_chunk_sizes) if isinstance(cms_chunk_sizes, (list, tuple)) else None
    if not levels:
        raise ValueError(f"stack_levels: cms_chunk_sizes={cms_chunk_sizes!r} must be a non-empty list such as [16, 128, None]")
    if cms_variant != "sequential" and pretrained_level is not None:
        raise ValueError(
            f"stack_levels: pretrained_level={pretrained_level} is only for cms_variant='sequential' (with "
            f"cms_variant={cms_variant!r} every level is a copy of the MLP)"
        )
    pretrained_level = -1 if pretrained_level is None else pretrained_level
    if isinstance(pretrained_level, bool) or not isinstance(pretrained_level, int) or not (
            -len(levels) <= pretrained_level < len(levels)):
        raise ValueError(
            f"stack_levels: pretrained_level={pretrained_level!r} is not a level index for {len(levels)} levels"
        )
    hope_config = HopeConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        attention_qkv_bias=pretrained.model.layers[0].self_attn.q_proj.bias is not None,
        mixer="attention",
        cms_chunk_sizes=levels,
        cms_hidden_size=config.intermediate_size,
        cms_variant=cms_variant,
        cms_objective=cms_objective,
        cms_in_context=cms_in_context,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=_rope_theta(config),
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        initializer_range=getattr(config, "initializer_range", 0.02),
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        **config_overrides,
    )
    reference = pretrained.get_input_embeddings().weight
    with torch.device(reference.device):
        model = HopeForCausalLM(hope_config)
    model.to(reference.dtype)
    _copy_weights(pretrained, model, pretrained_level % len(levels))
    model.generation_config = copy.deepcopy(pretrained.generation_config)
    model.train(pretrained.training)
    return model


@torch.no_grad()
def _copy_weights(pretrained: nn.Module, model: HopeForCausalLM, pretrained_level: int) -> None:
    source, target = pretrained.model, model.model
    target.embed_tokens.weight.copy_(source.embed_tokens.weight)
    target.norm.weight.copy_(source.norm.weight)
    if not model.config.tie_word_embeddings:
        model.lm_head.weight.copy_(pretrained.lm_head.weight)
    for layer, block in zip(source.layers, target.layers):
        block.mixer_norm.weight.copy_(layer.input_layernorm.weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ours, theirs = getattr(block.mixer, name), getattr(layer.self_attn, name)
            ours.weight.copy_(theirs.weight)
            if ours.bias is not None:
                ours.bias.copy_(theirs.bias)
        cms, mlp = block.cms, layer.mlp
        for index, level in enumerate(cms.levels):
            if cms.variant == "independent" or index == pretrained_level:
                level.w_gate.copy_(mlp.gate_proj.weight)
                level.w_up.copy_(mlp.up_proj.weight)
                level.w_down.copy_(mlp.down_proj.weight)
            else:
                level.w_down.zero_()  # an empty level: adds nothing until it learns
            if level.learns_in_context:
                level.p_v.zero_()
                level.w_eta.zero_()
                level.b_eta.zero_()
        if cms.variant == "independent":
            cms.norm.weight.copy_(layer.post_attention_layernorm.weight)
            cms.level_weights.fill_(1.0 / len(cms.levels))
        else:
            cms.norms[pretrained_level].weight.copy_(layer.post_attention_layernorm.weight)
