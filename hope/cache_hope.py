"""HopeCache: the recurrent state of every layer (SPEC §5), so that decoding token by token reproduces
the full-sequence forward exactly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class HopeLayerCache:
    """State of one HopeBlock.

    conv: the short-convolution tails by name, each (B, K-1, D).
    memory: the Titans TitansState (Z_c, Z_t, S_t, position; S_t is None without momentum), or with
            memory_depth=2 a DeepTitansState (the generating memories' and W1's and W2's chunk-start copy, current
            value and momentum, position); None before the first token.
    cms: one entry per CMS level: a CMSState (θ_c, this chunk's summed inner gradients, position, and
         chunk_has_valid (B,) bool: whether this chunk has seen a valid token, so its cms_decay pull applies),
         or None for a level that never learns in context. Every tensor is per batch row (reorder/repeat/detach).
    key, value: (B, H, T_past, d) of an attention layer; key_valid: (B, T_past) bool, which past keys exist;
    key_padded: whether any of them is padding.
    """

    conv: dict[str, Tensor] = field(default_factory=dict)
    memory: Optional[Any] = None
    cms: list[Optional[Any]] = field(default_factory=list)
    key: Optional[Tensor] = None
    value: Optional[Tensor] = None
    key_valid: Optional[Tensor] = None
    key_padded: bool = False  # some cached key is padding: attention needs the explicit mask


def _map_tensors(obj: Any, fn) -> Any:
    """Apply fn to every tensor of a cache entry (NamedTuples, lists, dicts), keeping the structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(value, fn) for value in obj))
    if isinstance(obj, list):
        return [_map_tensors(value, fn) for value in obj]
    if isinstance(obj, dict):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    return obj


def _first_tensor(obj: Any) -> Optional[Tensor]:
    """The first tensor of a cache entry (NamedTuples, lists, dicts), or None."""
    if isinstance(obj, Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


class HopeCache:
    """Per-layer recurrent state of a Hope model, plus the number of tokens consumed.

    It is passed to and returned by `HopeModel.forward` (as `cache` / `past_key_values`, depending on the
    transformers version) and created automatically by `generate()`.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers = [HopeLayerCache() for _ in range(num_layers)]
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        """Tells generate() not to slice inputs by a KV length: HopeForCausalLM feeds the unseen tokens itself."""
        return [True] * len(self.layers)

    def batch_size(self) -> Optional[int]:
        """Rows of the cached states, or None before any state exists."""
        for layer in self.layers:
            tensor = _first_tensor(layer.__dict__)
            if tensor is not None:
                return tensor.shape[0]
        return None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (the position of the next token)."""
        return self.seen_tokens

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Select batch rows (beam search): every state tensor is indexed along dim 0."""
        for i, layer in enumerate(self.layers):
            self.layers[i] = _map_tensors(layer.__dict__, lambda t: t.index_select(0, beam_idx.to(t.device)))
            self.layers[i] = HopeLayerCache(**self.layers[i])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times (generate with num_return_sequences)."""
        for i, layer in enumerate(self.layers):
            self.layers[i] = HopeLayerCache(**_map_tensors(layer.__dict__, lambda t: t.repeat_interleave(repeats, 0)))

    def detach(self) -> "HopeCache":
        """Cut the autograd history of every state (truncated BPTT over long streams)."""
        for i, layer in enumerate(self.layers):
            self.layers[i] = HopeLayerCache(**_map_tensors(layer.__dict__, torch.Tensor.detach))
        return self
