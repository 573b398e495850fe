"""Named model sizes: Hope and its Transformer++ twin at one parameter budget.

`get_preset("hope-340m")` returns a HopeConfig; `transformer-340m` is the twin with the same width, depth and
heads. The paper's scales (340M, 760M, 1.3B) use a 32k vocabulary with tied embeddings; Hope's CMS levels
(`HOPE_CMS_CHUNK_SIZES`: [512, 2048, None] at those scales, [16, 128, None] for the CPU sizes) share the FFN
budget of its twin, their width solved so the totals match.

`training_defaults("hope-340m")` is the from-scratch training recipe of a preset (TrainingArguments fields),
which `hope-train` applies unless a flag overrides it.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

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
# CMS levels by size, set from the chunk-size study (benchmarks/cms_chunk_study.py, docs/cms/README.md §4) and the
# cost model (SPEC §3, README). The paper's scales train on 4K-token rows: on 8192-token rows at CPU scale and the
# default cms_eta_max a fastest level of 16 trained far slower (validation bits per byte, 2 seeds) than
# [512, 2048, None], which matched the plain FFN (a 4x smaller step closed the gap), and on an H200 a level of 16
# is memory-bound by 8x where 512 and 2048 are compute-bound.
# The CPU sizes keep [16, 128, None]: the demo and the CPU comparisons train on rows of <= 512 tokens, where a
# level of chunk >= 512 would never update (the study's rule: rows of >= 4x the largest chunk), and at those
# lengths the measured CMS gains (README) come from these levels.
HOPE_CMS_CHUNK_SIZES = {
    "tiny": [16, 128, None],
    "small": [16, 128, None],
    "340m": [512, 2048, None],
    "760m": [512, 2048, None],
    "1.3b": [512, 2048, None],
}

# From-scratch training recipes (TrainingArguments fields) by preset size; the Hope model and its twin share one.
# tiny, small: the demo's recipe (hope.demo; "tiny" is the demo's size, D=128 and 2 layers). 100-200-step sweeps
#   there put Hope's best peak learning rate near 3e-3 and Transformer++'s near 1e-3; 2e-3 serves both.
# 340m, 760m, 1.3b: the paper's recipe. Nested Learning (Behrouz et al., NeurIPS 2025, Sec. 4) follows Titans
#   for its language-modeling table; Titans (Behrouz, Zhong, Mirrokni 2024, Sec. 5.1) trains with AdamW, peak
#   learning rate 4e-4, cosine annealing, weight decay 0.1, 0.5M tokens a batch, 4K tokens a sequence, after
#   Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025, Sec. 4), which adds gradient clipping at 1.0 and a
#   warm-up of 1B tokens. The warm-up is given here as that fraction of the paper's token budget for the size
#   (15B, 30B and 100B tokens: 1/15, 1/30, 1/100). Adam's betas and epsilon are not stated: Trainer defaults.
_SMALL_SCALE_RECIPE = dict(learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
                           adam_beta2=0.95, max_grad_norm=1.0)
_PAPER_RECIPE = dict(learning_rate=4e-4, lr_scheduler_type="cosine", weight_decay=0.1, max_grad_norm=1.0)
TRAINING_DEFAULTS = {
    "tiny": _SMALL_SCALE_RECIPE,
    "small": _SMALL_SCALE_RECIPE,
    "340m": {**_PAPER_RECIPE, "warmup_steps": 1 / 15},
    "760m": {**_PAPER_RECIPE, "warmup_steps": 1 / 30},
    "1.3b": {**_PAPER_RECIPE, "warmup_steps": 1 / 100},
}
TRAINING_RECIPE_SOURCE = {"tiny": "the demo's recipe", "small": "the demo's recipe", "340m": "the paper's recipe",
                          "760m": "the paper's recipe", "1.3b": "the paper's recipe"}


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
    """Hope (Titans mixer; CMS levels `shape["cms_chunk_sizes"]`, by default HopeConfig's [16, 128, None]) whose
    per-level width, a multiple of `multiple`, brings its parameter count closest to its Transformer++ twin's."""

    def hope(width: int) -> HopeConfig:
        return HopeConfig(**{"mixer": "titans", **shape, "cms_hidden_size": width})

    twin = {key: value for key, value in shape.items() if key not in ("mixer", "cms_chunk_sizes", "chunk_size")}
    budget = count_parameters(transformer_config(**twin))
    # The count is affine in the CMS width: two probes give the slope.
    low, high = count_parameters(hope(multiple)), count_parameters(hope(2 * multiple))
    slope = (high - low) / multiple
    width = max(multiple, multiple * round((multiple + (budget - low) / slope) / multiple))
    return hope(width)


def parse_preset_name(name: str) -> Tuple[str, str]:
    """("hope" or "transformer", size key of SHAPES) for a preset name; ValueError for an unknown one."""
    family, _, size = name.partition("-")
    if family in ("hope", "transformer") and size in SHAPES:
        return family, size
    if name in SHAPES:  # "tiny" and "small" name the Hope model
        return "hope", name
    names = [f"{f}-{s}" for f in ("hope", "transformer") for s in SHAPES] + ["tiny", "small"]
    raise ValueError(f"unknown preset {name!r}; choose one of {names}")


def training_defaults(name: str) -> Dict[str, Any]:
    """The from-scratch training recipe of a preset: TrainingArguments fields (learning rate, schedule, warm-up
    as a fraction of the steps, weight decay, ...); see TRAINING_DEFAULTS for where the numbers come from."""
    return dict(TRAINING_DEFAULTS[parse_preset_name(name)[1]])


def get_preset(name: str, **overrides: Any) -> HopeConfig:
    """HopeConfig of a preset: "tiny", "small", "hope-340m", "hope-760m", "hope-1.3b" (Hope), or the
    Transformer++ twins "transformer-tiny", ..., "transformer-1.3b". `overrides` are further config fields."""
    family, size = parse_preset_name(name)
    hidden, layers, heads, vocab = SHAPES[size]
    shape = {**dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads), **overrides}
    if family == "transformer":
        return transformer_config(**shape)
    shape = {"cms_chunk_sizes": list(HOPE_CMS_CHUNK_SIZES[size]), **shape}
    if "cms_hidden_size" in overrides:  # an explicit width wins over the budget match
        return HopeConfig(**{"mixer": "titans", **shape})
    # Small models need a finer width step to land near their twin's budget.
    return matched_hope_config(multiple=64 if shape["hidden_size"] >= 1024 else 16, **shape)
