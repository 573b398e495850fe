"""Hope causal LM on the Hugging Face API (SPEC §1):

    HopeForCausalLM: embed -> L x HopeBlock -> RMSNorm -> lm_head
    HopeBlock(x):    h = x + Mixer(RMSNorm(x));  out = CMS(h)

`mixer="titans"` is Hope; `mixer="attention"` is Hope-Attention, and Transformer++ when every CMS level is None.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_hope import HopeCache, HopeLayerCache
from .configuration_hope import HopeConfig
from .layers.attention import AttentionMixer
from .layers.cms import CMS, CMSLevel
from .layers.common import RMSNorm
from .layers.titans_mixer import TitansMixer

# transformers renamed the cache field of model outputs from `past_key_values` to `cache` during 5.x.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class HopeBlock(nn.Module):
    def __init__(self, config: HopeConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = TitansMixer(config) if config.mixer == "titans" else AttentionMixer(config)
        self.cms = CMS(config)

    def forward(self, x: Tensor, valid: Optional[Tensor], cache: Optional[HopeLayerCache], start: int) -> Tensor:
        """x: (B, T, D); valid: (B, T) bool or None; start: absolute position of x's first token."""
        normed = self.mixer_norm(x)
        if isinstance(self.mixer, AttentionMixer):
            h = x + self.mixer(normed, valid, cache, start)
        else:
            h = x + self.mixer(normed, valid, cache)
        return self.cms(h, valid, cache)


class HopePreTrainedModel(PreTrainedModel):
    config_class = HopeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HopeBlock"]
    _supports_sdpa = True

    def set_cms_in_context(self, enabled: bool) -> None:
        """Switch every CMS level's in-context step on or off (config `cms_in_context`), between sequences.

        Off, each level reads its parameters θ_0 on every token (a plain SwiGLU FFN); its chunk size, eta and
        target parameters stay, so the steps can be switched back on. The config follows, so a checkpoint
        saved afterwards loads in the same mode.
        """
        if not isinstance(enabled, bool):
            raise ValueError(f"set_cms_in_context(enabled={enabled!r}): enabled must be True or False")
        self.config.cms_in_context = enabled
        for module in self.modules():
            if isinstance(module, CMSLevel):
                module.in_context = enabled

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Hope's state is not a key/value cache: generate() gets a HopeCache from the first forward instead.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        # Residual outputs are scaled down with depth (GPT-2) so the stream's variance stays bounded.
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, TitansMixer):
            module.reset_memory_parameters()
        elif isinstance(module, CMSLevel):
            module.w_gate.normal_(0.0, std)
            module.w_up.normal_(0.0, std)
            module.w_down.normal_(0.0, residual_std)
            if module.learns_in_context:
                module.p_v.normal_(0.0, std)  # targets start at the scale of the other projections
                module.w_eta.zero_()
                module.b_eta.zero_()  # eta starts at cms_eta_max / 2
        elif isinstance(module, CMS) and hasattr(module, "level_weights"):
            module.level_weights.fill_(1.0)
        if isinstance(module, (TitansMixer, AttentionMixer)):
            module.o_proj.weight.normal_(0.0, residual_std)


class HopeModel(HopePreTrainedModel):
    """Embeddings, blocks and the final norm; returns the last hidden states (B, T, D)."""

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HopeBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.numel():
            low, high = torch.stack(torch.aminmax(input_ids.long())).tolist()  # one host sync for both bounds
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={self.config.vocab_size}); got values in [{low}, {high}]"
                )

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        cache: Optional[HopeCache] = None,
        past_key_values: Optional[HopeCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[tuple, BaseModelOutputWithPast]:
        """input_ids (B, T) or inputs_embeds (B, T, D); attention_mask (B, T) or (B, T_past + T), 0 = padding.

        With a `cache` (HopeCache), the tokens continue the cached sequence and the cache is updated in place.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, seq_len, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}")
        B, T, _ = inputs_embeds.shape
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, HopeCache):
            raise TypeError(f"cache must be a HopeCache, got {type(cache).__name__}")
        # A cache the caller passes in is always continued; use_cache only decides whether to create one.
        if use_cache and cache is None and not (self.gradient_checkpointing and self.training):
            cache = HopeCache(self.config.num_hidden_layers)
        start = cache.seen_tokens if cache is not None else 0
        valid = self._token_validity(attention_mask, B, T, start)

        hidden = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            layer_cache = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and layer_cache is None and torch.is_grad_enabled():
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, valid, None, start)
            else:
                hidden = layer(hidden, valid, layer_cache, start)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        if cache is not None:
            cache.seen_tokens += T
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{_CACHE_FIELD: cache},
        )
        return output if return_dict is not False else output.to_tuple()

    def _token_validity(self, attention_mask: Optional[Tensor], B: int, T: int, start: int) -> Optional[Tensor]:
        """(B, T) bool validity of the current tokens, or None when every token is valid."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, start + T):
            raise ValueError(
                f"attention_mask must be (batch, seq_len) = ({B}, {T}) or include the cached tokens "
                f"({B}, {start + T}); got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask[:, -T:].bool()
        return None if bool(valid.all()) else valid


class HopeForCausalLM(HopePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.model = HopeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        cache: Optional[HopeCache] = None,
        past_key_values: Optional[HopeCache] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, Tensor] = 0,
        **kwargs: Any,
    ) -> Union[tuple, CausalLMOutputWithPast]:
        """As `HopeModel.forward`; `labels` (B, T) give the shifted next-token loss (-100 = ignored), and
        `num_items_in_batch` (passed by Trainer) normalises it over gradient-accumulation steps."""
        if labels is not None and use_cache is None and cache is None and past_key_values is None:
            use_cache = False  # training needs no cache, but a given one is continued (truncated BPTT)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
            past_key_values=past_key_values, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must be (batch, seq_len) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)}
        )
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: Optional[HopeCache] = None,
        past_key_values: Optional[HopeCache] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict:
        """Feed only the tokens the cache has not consumed yet (the prompt first, then one token a step)."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = HopeCache(self.config.num_hidden_layers)
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, "cache": cache}
        seen = cache.seen_tokens if cache is not None else 0
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        elif cache is None:
            inputs["input_ids"] = input_ids
        elif inputs_embeds is not None and input_ids.shape[1] <= seen:
            # The prompt came as inputs_embeds, so input_ids holds only the generated tokens.
            inputs["input_ids"] = input_ids[:, seen - inputs_embeds.shape[1] :]
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, cache: HopeCache, beam_idx: Tensor) -> HopeCache:
        cache.reorder_cache(beam_idx)
        return cache
