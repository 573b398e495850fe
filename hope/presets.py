"""Named model sizes: Hope and its Transformer++ twin at one parameter budget.

`get_preset("hope-340m")` returns a HopeConfig; `transformer-340m` is the twin with the same width, depth and
heads. The paper's scales (340M, 760M, 1.3B) use a 32k vocabulary with tied embeddings; Hope's CMS levels
[16, 128, None] share the FFN budget of its twin, their width solved so the totals match.
"""
from __future__ import annotations

from typing import Any

import torch

from .configuration_hope import HopeConfig

# name: (hidden_size, num_hidden_layers, num_heads, vocab_size)
SHAPES = {
    "tiny": (128, 2, 2, 384),
    "small": (256, 4, 4, 384),
    "340m": (1024, 24, 16, 32000),
    "760m": (1536, 24, 16, 32000),
    "1.3b": (2048, 24, 16, 32000),
}
HOPE_CMS_CHUNK_SIZES = [16, 128, None]


def count_parameters(config: HopeConfig) -> int:
    """Parameters of HopeForCausalLM(config), tied embeddings counted once; built on the meta device."""
    from .modeling_hope import HopeForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = HopeForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def transformer_config(**shape: Any) -> HopeConfig:
    """Transformer++: attention mixer and one plain SwiGLU FFN of the default width (8/3 D rounded to 64)."""
    return HopeConfig(**{"mixer": "attention", "cms_chunk_sizes": [None], **shape})


def matched_hope_config(multiple: int = 64, **shape: Any) -> HopeConfig:
    """Hope (Titans mixer, CMS levels [16, 128, None]) whose per-level width, a multiple of `multiple`, brings
    its parameter count closest to its Transformer++ twin's."""

    def hope(width: int) -> HopeConfig:
        return HopeConfig(**{"mixer": "titans", "cms_chunk_sizes": list(HOPE_CMS_CHUNK_SIZES), **shape,
                             "cms_hidden_size": width})

    twin = {key: value for key, value in shape.items() if key not in ("mixer", "cms_chunk_sizes", "chunk_size")}
    budget = count_parameters(transformer_config(**twin))
    # The count is affine in the CMS width: two probes give the slope.
    low, high = count_parameters(hope(multiple)), count_parameters(hope(2 * multiple))
    slope = (high - low) / multiple
    width = max(multiple, multiple * round((multiple + (budget - low) / slope) / multiple))
    return hope(width)


def get_preset(name: str, **overrides: Any) -> HopeConfig:
    """HopeConfig of a preset: "tiny", "small", "hope-340m", "hope-760m", "hope-1.3b" (Hope), or the
    Transformer++ twins "transformer-tiny", ..., "transformer-1.3b". `overrides` are further config fields."""
    family, _, size = name.partition("-")
    if family not in ("hope", "transformer") or size not in SHAPES:
        if name in SHAPES:  # "tiny" and "small" name the Hope model
            family, size = "hope", name
        else:
            names = [f"{f}-{s}" for f in ("hope", "transformer") for s in SHAPES] + ["tiny", "small"]
            raise ValueError(f"unknown preset {name!r}; choose one of {names}")
    hidden, layers, heads, vocab = SHAPES[size]
    shape = {**dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads), **overrides}
    if family == "transformer":
        return transformer_config(**shape)
    if "cms_hidden_size" in overrides:  # an explicit width wins over the budget match
        return HopeConfig(**{"mixer": "titans", "cms_chunk_sizes": list(HOPE_CMS_CHUNK_SIZES), **shape})
    # Small models need a finer width step to land near their twin's budget.
    return matched_hope_config(multiple=64 if shape["hidden_size"] >= 1024 else 16, **shape)
