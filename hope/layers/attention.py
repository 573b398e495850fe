"""Causal multi-head attention with RoPE (SPEC §4): flash-attn on CUDA when installed, SDPA otherwise."""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers.utils import logging

from hope.cache_hope import HopeLayerCache

from .common import apply_rotary, rotary_tables

logger = logging.get_logger(__name__)


def flash_attn_available() -> bool:
    """flash-attn is an optional extra (`pip install hope[cuda]`), imported lazily."""
    return importlib.util.find_spec("flash_attn") is not None


class AttentionMixer(nn.Module):
    """x (B, T, D) -> causal softmax attention over x and the cached keys; the Transformer++ mixer."""

    def __init__(self, config):
        super().__init__()
        D, H = config.hidden_size, config.num_heads
        self.num_heads, self.head_dim = H, D // H
        self.rope_theta = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: Tensor, valid: Optional[Tensor], cache: Optional[HopeLayerCache], start: int) -> Tensor:
        """x: (B, T, D) normed input; valid: (B, T) bool or None; start: position of x's first token."""
        B, T, D = x.shape
        H, d = self.num_heads, self.head_dim
        if start + T > self.max_position_embeddings and not torch.compiler.is_compiling():
            # RoPE extrapolates past the positions the config declares; it runs, but the user should know. (One
            # message per model size: warning_once keys on the text.)
            logger.warning_once(
                f"the attention mixer reads positions beyond max_position_embeddings={self.max_position_embeddings}, "
                "the longest context the config declares: RoPE extrapolates there and quality may degrade"
            )
        q, k, v = (proj(x).view(B, T, H, d).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rotary_tables(torch.arange(start, start + T, device=x.device), d, self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
        # `valid` is None when every current token is valid (HopeModel decides once), so no host sync here.
        padded = valid is not None
        if cache is not None:
            if cache.key is not None:
                k = torch.cat([cache.key, k], dim=2)
                v = torch.cat([cache.value, v], dim=2)
                key_valid = torch.cat([cache.key_valid, key_valid], dim=1)
                padded = padded or cache.key_padded
            cache.key, cache.value, cache.key_valid, cache.key_padded = k, v, key_valid, padded
        past = k.shape[2] - T
        if not padded and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
            from flash_attn import flash_attn_func

            # flash-attn aligns the causal mask to the bottom right, which is what a KV cache needs.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return self.o_proj(out.reshape(B, T, D))
        if not padded and past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            # A query always sees itself, so a padded query row is never empty (no NaN); its output is unused.
            allowed = causal & key_valid[:, None, None, :]
            positions = torch.arange(past + T, device=x.device)
            allowed = allowed | (positions[None, :] == positions[past:, None])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, D))
