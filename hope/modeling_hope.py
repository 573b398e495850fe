"""Hope causal LM on the Hugging Face API (SPEC §1):

    HopeForCausalLM: embed -> L x HopeBlock -> RMSNorm -> lm_head
    HopeBlock(x):    h = x + Mixer(RMSNorm(x));  out = CMS(h)

`mixer="titans"` is Hope; `mixer="attention"` is Hope-Attention, and Transformer++ when every CMS level is None.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_hope import HopeCache, HopeLayerCache
from .configuration_hope import HopeConfig
from .layers.attention import AttentionMixer
from .layers.cms import CMS, CMSLevel
from .layers.common import RMSNorm
from .layers.titans_mixer import TitansMixer

# transformers renamed the cache field of model outputs from `past_key_values` to `cache` during 5.x.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
# generate()'s bookkeeping keywords, which prepare_inputs_for_generation consumes instead of passing to forward.
_NOT_FORWARDED = ("labels", "next_sequence_length", "is_first_iteration", "cache_position")


class HopeBlock(GradientCheckpointingLayer):
    """One block; a GradientCheckpointingLayer, so transformers' activation checkpointing (every_n_layers too)
    recomputes it in backward."""

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
    # The recurrent state cannot be rewound to a prefix: generate() then refuses assisted decoding with its own
    # clear message, as for Mamba and RWKV.
    _is_stateful = True

    def save_pretrained(self, save_directory: Union[str, os.PathLike], is_main_process: bool = True, *args: Any,
                        **kwargs: Any) -> Any:
        """As `PreTrainedModel.save_pretrained`, plus the modeling code next to the weights (`hope.remote_code`), so
        that `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` needs no `import hope`."""
        if __package__ != "hope":
            # Loaded from such a checkpoint: transformers copies this code itself (custom_object_save).
            return super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if kwargs.pop("push_to_hub", False):
            # The upload inside save_pretrained sends only files written after it starts; push_to_hub saves into a
            # fresh folder through this method and uploads all of it, the code included.
            hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private")
                   if key in kwargs}
            result = self.save_pretrained(save_directory, is_main_process, *args, **kwargs)
            if is_main_process:
                self.push_to_hub(hub.pop("repo_id", os.path.basename(os.path.normpath(save_directory))),
                                 token=kwargs.get("token"), **hub)
            return result
        if is_main_process:
            from .remote_code import save_remote_code

            save_remote_code(save_directory, self.config)  # sets config.auto_map before config.json is written
        return super().save_pretrained(save_directory, is_main_process, *args, **kwargs)

    def set_cms_in_context(self, enabled: bool) -> None:
        """Switch every CMS level's in-context step on or off (config `cms_in_context`), between sequences.

        Off, each level reads its parameters θ_0 on every token (a plain SwiGLU FFN); its chunk size, eta and
        target parameters stay, so the steps can be switched back on; meanwhile they take no part in the forward
        (no gradient: freeze them, or give DDP find_unused_parameters=True). The config follows, so a checkpoint
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
        # transformers.initialization leaves every tensor that from_pretrained loaded as it is (`_is_hf_initialized`):
        # after a load this only fills the missing ones.
        std = self.config.initializer_range
        # Residual outputs are scaled down with depth (GPT-2) so the stream's variance stays bounded.
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, TitansMixer):
            module.reset_memory_parameters()
        elif isinstance(module, CMSLevel):
            init.normal_(module.w_gate, 0.0, std)
            init.normal_(module.w_up, 0.0, std)
            init.normal_(module.w_down, 0.0, residual_std)
            if module.learns_in_context:
                init.normal_(module.p_v, 0.0, std)  # targets start at the scale of the other projections
                init.zeros_(module.w_eta)
                init.zeros_(module.b_eta)  # eta starts at cms_eta_max / 2
        elif isinstance(module, CMS) and hasattr(module, "level_weights"):
            init.ones_(module.level_weights)
        if isinstance(module, (TitansMixer, AttentionMixer)):
            init.normal_(module.o_proj.weight, 0.0, residual_std)


class HopeModel(HopePreTrainedModel):
    """Embeddings, blocks and the final norm; returns the last hidden states (B, T, D)."""

    def __init__(self, config: HopeConfig):
        config._validate()  # again: a field set as an attribute after HopeConfig() was not checked there
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
        # The range check reads values on the host: eager only, so that torch.compile and torch.export trace
        # through (an out-of-range id then fails in the embedding lookup instead).
        if input_ids.numel() and not torch.compiler.is_compiling():
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
        output_attentions = kwargs.get("output_attentions")
        if self.config.output_attentions if output_attentions is None else output_attentions:
            raise ValueError("output_attentions=True is not supported: Hope's mixers return no attention weights")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
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
        if cache is not None and len(cache) != self.config.num_hidden_layers:
            raise ValueError(f"the cache holds {len(cache)} layers but the model has num_hidden_layers="
                             f"{self.config.num_hidden_layers}: create it as HopeCache({self.config.num_hidden_layers})")
        cached_batch = None if cache is None else cache.batch_size()
        if cached_batch is not None and cached_batch != B:
            raise ValueError(f"the cache holds {cached_batch} sequences but the input has batch {B}: a cache continues "
                             "the same sequences (reorder_cache / batch_repeat_interleave change its rows)")
        # A cache the caller passes in is always continued; use_cache only decides whether to create one.
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if use_cache and cache is None and not checkpointing:
            cache = HopeCache(self.config.num_hidden_layers)
        start = cache.seen_tokens if cache is not None else 0
        valid = self._token_validity(attention_mask, B, T, start)

        hidden = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            if T == 0:
                continue  # nothing to read: the states stay as they are (every block maps no token to no token)
            layer_cache = cache.layers[i] if cache is not None else None
            with _no_checkpointing(layer) if layer_cache is not None and checkpointing else contextlib.nullcontext():
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
        return output if return_dict else output.to_tuple()

    def _token_validity(self, attention_mask: Optional[Tensor], B: int, T: int, start: int) -> Optional[Tensor]:
        """(B, T) bool validity of the current tokens, or None when every token is valid."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, start + T):
            raise ValueError(
                f"attention_mask must be (batch, seq_len) = ({B}, {T}) or include the cached tokens "
                f"({B}, {start + T}); got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask[:, attention_mask.shape[1] - T :].bool()
        if torch.compiler.is_compiling():
            return valid  # no host sync on a traced path: the masked code path is exact for an all-ones mask too
        if attention_mask.dtype == torch.bool:
            all_valid = bool(valid.all())
        else:
            # A float mask of 0.5s is not "half valid": a token is either read or padding (SPEC §5).
            non_binary = (attention_mask != 0) & (attention_mask != 1)
            any_non_binary, all_valid = torch.stack([non_binary.any(), valid.all()]).tolist()  # one host sync
            if any_non_binary:
                bad = attention_mask[non_binary][0].item()
                raise ValueError(
                    f"attention_mask must hold only 0 (padding) and 1 (token); got the value {bad} "
                    f"({attention_mask.dtype})"
                )
        return None if all_valid else valid


@contextlib.contextmanager
def _no_checkpointing(layer: HopeBlock) -> Iterator[None]:
    """Run a block that continues a cache without activation checkpointing: the backward recompute would read the
    state that this forward has already advanced."""
    enabled, layer.gradient_checkpointing = layer.gradient_checkpointing, False
    try:
        yield
    finally:
        layer.gradient_checkpointing = enabled


class HopeForCausalLM(HopePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.model = HopeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def _keys_to_ignore_on_save(self) -> set[str]:
        """A tied head is saved once, as the embedding; Trainer's resume loads the state dict and treats missing
        keys listed here as tied instead of warning about them. Read from the live modules, so a head untied
        later is saved again."""
        keys = set(self.__dict__.get("_keys_ignored_on_save", ()))
        modules = self.__dict__.get("_modules", {})
        if "lm_head" in modules and "model" in modules and self.lm_head.weight is self.model.embed_tokens.weight:
            keys.add("lm_head.weight")
        return keys

    @_keys_to_ignore_on_save.setter
    def _keys_to_ignore_on_save(self, keys) -> None:
        self.__dict__["_keys_ignored_on_save"] = set(keys or ())

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
        """As `HopeModel.forward`; `labels` (B, T) give the shifted next-token loss (-100 = ignored), or
        `shift_labels` (B, T) the already shifted targets (context parallelism shards them so); `num_items_in_batch`
        (passed by Trainer) normalises it over gradient-accumulation steps."""
        shift_labels = kwargs.get("shift_labels")
        has_targets = labels is not None or shift_labels is not None
        if has_targets and use_cache is None and cache is None and past_key_values is None:
            use_cache = False  # training needs no cache, but a given one is continued (truncated BPTT)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
            past_key_values=past_key_values, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_dict=True, output_attentions=kwargs.get("output_attentions"),
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if has_targets:
            for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
                if targets is not None and targets.shape != logits.shape[:2]:
                    raise ValueError(
                        f"{name} must be (batch, seq_len) = {tuple(logits.shape[:2])}, got {tuple(targets.shape)}"
                    )
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)}
        )
        return output if return_dict else output.to_tuple()

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
        """Feed only the tokens the cache has not consumed yet (the prompt first, then one token a step).

        With `inputs_embeds` the sequence is the embedded prompt followed by `input_ids`, which then hold only the
        generated tokens (generate starts them empty); a returned cache continues from a longer `inputs_embeds`.
        Every other keyword (output_hidden_states, logits_to_keep, ...) goes on to forward.
        """
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = HopeCache(self.config.num_hidden_layers)
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, "cache": cache}
        seen = cache.seen_tokens if cache is not None else 0
        prompt = inputs_embeds.shape[1] if inputs_embeds is not None else 0
        if inputs_embeds is not None and cache is None:
            # Without a state every step reads the whole sequence.
            inputs["inputs_embeds"] = torch.cat([inputs_embeds, self.get_input_embeddings()(input_ids)], dim=1)
        elif inputs_embeds is not None and seen < prompt:
            inputs["inputs_embeds"] = inputs_embeds[:, seen:]
        elif inputs_embeds is not None and input_ids.shape[1] <= seen:
            inputs["input_ids"] = input_ids[:, seen - prompt :]
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        for key, value in kwargs.items():
            if key not in inputs and key not in _NOT_FORWARDED:
                inputs[key] = value
        return inputs

    def _reorder_cache(self, cache: HopeCache, beam_idx: Tensor) -> HopeCache:
        cache.reorder_cache(beam_idx)
        return cache
