"""Presets (issue #5): the paper's scales and their Transformer++ twins, counted on the meta device."""
from __future__ import annotations

import pytest

import hope
from hope.presets import count_parameters

NOMINAL = {"340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}


@pytest.mark.parametrize("size", list(NOMINAL))
@pytest.mark.parametrize("family", ["hope", "transformer"])
def test_parameter_count_within_10_percent_of_the_name(family, size):
    config = hope.get_preset(f"{family}-{size}")
    count = count_parameters(config)
    assert abs(count - NOMINAL[size]) <= 0.10 * NOMINAL[size], f"{family}-{size}: {count / 1e6:.1f}M"


@pytest.mark.parametrize("size", ["tiny", "small", "340m", "760m", "1.3b"])
def test_hope_matches_its_transformer_twin(size):
    hope_config = hope.get_preset(f"hope-{size}")
    twin = hope.get_preset(f"transformer-{size}")
    levels = [16, 128, None] if size in ("tiny", "small") else [512, 2048, None]  # docs/cms/README.md §4
    assert hope_config.mixer == "titans" and hope_config.cms_chunk_sizes == levels
    assert twin.mixer == "attention" and twin.cms_chunk_sizes == [None]
    for field in ("hidden_size", "num_hidden_layers", "num_heads", "vocab_size"):
        assert getattr(hope_config, field) == getattr(twin, field)
    assert abs(count_parameters(hope_config) - count_parameters(twin)) <= 0.03 * count_parameters(twin)


def test_short_names_overrides_and_errors():
    assert hope.get_preset("tiny").to_dict() == hope.get_preset("hope-tiny").to_dict()
    config = hope.get_preset("hope-small", chunk_size=32)
    assert config.chunk_size == 32 and config.adaptive_chunk_size is None  # the generating chunk follows C
    with pytest.raises(ValueError, match="unknown preset 'hope-7b'"):
        hope.get_preset("hope-7b")
