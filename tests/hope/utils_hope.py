"""Tiny Hope configs and models shared by the model-level tests (tests/hope)."""
from __future__ import annotations

import torch

from hope import HopeCache, HopeConfig, HopeForCausalLM  # importing hope registers the Auto* classes

F64 = torch.float64
VOCAB = 50
CHUNK = 4  # Titans chunk size C of every tiny config
CMS_CHUNKS = [5, 7, None]  # no divisor of the test prompt lengths 3, 4 (= C), 11 (= 2C + 3)

# Named variants: each a set of overrides on top of `tiny_config`'s defaults.
VARIANTS = {
    "hope": {},  # titans + CMS [5, 7, None], sequential
    "titans": {"cms_chunk_sizes": [None]},  # titans + plain FFN
    "transformer++": {"mixer": "attention", "cms_chunk_sizes": [None]},
    "hope_attention": {"mixer": "attention"},
    "gqa": {"mixer": "attention", "num_key_value_heads": 1, "attention_qkv_bias": True},  # MQA + Qwen2 biases
    "independent": {"cms_variant": "independent"},
    "dot": {"objective": "dot", "cms_objective": "dot"},
    "value_target": {"memory_target": "value"},
    "momentum": {"momentum": True},
    "no_residual": {"memory_residual": False},
    "adaptive_chunk": {"adaptive_chunk_size": 2 * CHUNK},
    "no_dgd": {"dgd": False},
    "non_adaptive_kv": {"adaptive": ["eta", "alpha"]},
}


def tiny_config(**overrides) -> HopeConfig:
    """A 2-layer, 16-wide Hope whose in-context learning rates are large enough to matter in tests."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_heads=2, conv_size=4, chunk_size=CHUNK,
        cms_chunk_sizes=list(CMS_CHUNKS), cms_hidden_size=32, eta_max=0.5, cms_eta_max=1.0, cms_decay=0.0,
        initializer_range=0.2, max_position_embeddings=512, use_cache=True,
    )
    kwargs.update(overrides)
    return HopeConfig(**kwargs)


def variant_config(name: str, **overrides) -> HopeConfig:
    return tiny_config(**{**VARIANTS[name], **overrides})


def tiny_model(config: HopeConfig, dtype: torch.dtype = F64, seed: int = 0) -> HopeForCausalLM:
    """An eval-mode model with seeded random weights; float64 by default for exact-ish comparisons."""
    torch.manual_seed(seed)
    return HopeForCausalLM(config).to(dtype).eval()


def random_ids(batch: int, length: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


def cache_of(output) -> HopeCache | None:
    """The HopeCache of a model output (the field is `cache` or `past_key_values`, by transformers version)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def same_to_rounding(a: torch.Tensor, b: torch.Tensor, scale: float = 1e-12) -> bool:
    """float64 outputs of the same weight values computed from tensors in other memory (a parameter and
    parameter + δ materialised apart, a merged adapter): CPU BLAS and PyTorch's vectorised loops choose code paths
    by alignment and layout, so such results may differ in the last bits (2e-15 seen on an AMD EPYC box) but not
    beyond; a wrong weight changes them by orders of magnitude more."""
    return max_diff(a, b) <= scale * max(1.0, b.abs().max().item())
