"""HopeConfig (SPEC §7): every public field with its default, validation errors, serialisation, Auto*."""
from __future__ import annotations

import math
import re

import pytest
from transformers import AutoConfig

import hope  # noqa: F401  (registers "hope" with AutoConfig)
from hope import HopeConfig

# SPEC §7 fields and their defaults (SPEC §2/§3 where it names one: conv_size 4, chunk_size 64, adaptive
# k/v/eta/alpha, cms_variant "sequential", cms_objective "l2", kernel_backend "auto"); the others are
# the project's documented choices. eta_max defaults to 1.0 (SPEC §2 v2: of order 1, the largest value the
# stability figures show safe); cms_eta_max is a fraction of the CMS step's Gauss-Newton bound (SPEC §3 v2),
# 1 whatever the shape.
SPEC_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_heads": 16,
    "mixer": "titans",
    "conv_size": 4,
    "chunk_size": 64,
    "adaptive_chunk_size": None,
    "momentum": False,
    "memory_residual": True,
    "memory_value_norm": True,
    "memory_retention": "init",
    "memory_curvature_guard": True,
    "eta_max": 1.0,
    "dgd": True,
    "objective": "l2",
    "memory_target": "self",
    "adaptive": ["k", "v", "eta", "alpha"],
    "memory_depth": 1,
    "cms_chunk_sizes": [16, 128, None],
    "cms_hidden_size": [64 * math.ceil(8 * 1024 / 3 / 64)] * 3,  # SwiGLU 8/3 D, rounded up to 64, per level
    "cms_variant": "sequential",
    "cms_objective": "l2",
    "cms_decay": [0.05] * 3,  # SPEC §3 v2 says 0; measured: 0.05 bounds the fast-weight drift (docs/cms)
    "cms_eta_max": [1.0] * 3,
    "cms_step": "gauss_newton",
    "kernel_backend": "auto",
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
}
SPEC_FIELDS = list(SPEC_DEFAULTS)


def test_every_spec_field_has_its_default():
    config = HopeConfig()
    missing = [name for name in SPEC_FIELDS if not hasattr(config, name)]
    assert not missing, f"HopeConfig lacks SPEC §7 fields {missing}"
    wrong = {name: getattr(config, name) for name, want in SPEC_DEFAULTS.items() if getattr(config, name) != want}
    assert not wrong, f"fields with an unexpected default: {wrong}"
    assert config.model_type == "hope"
    assert config.head_dim == 1024 // 16


def test_per_level_settings_broadcast_and_keep_lists():
    config = HopeConfig(hidden_size=32, num_heads=2, cms_chunk_sizes=[4, None], cms_hidden_size=48,
                        cms_eta_max=[0.1, 0.2], cms_decay=0.5)
    assert config.cms_hidden_size == [48, 48]
    assert config.cms_eta_max == [0.1, 0.2]
    assert config.cms_decay == [0.5, 0.5]
    explicit = HopeConfig(eta_max=0.25, cms_chunk_sizes=[4, None], cms_eta_max=0.125)
    assert explicit.eta_max == 0.25 and explicit.cms_eta_max == [0.125, 0.125]


def _raises(match: list[str], **kwargs) -> str:
    """HopeConfig(**kwargs) raises a ValueError whose message contains every string of `match`."""
    with pytest.raises(ValueError) as info:
        HopeConfig(**kwargs)
    message = str(info.value)
    absent = [m for m in match if m not in message]
    assert not absent, f"ValueError {message!r} does not mention {absent}"
    return message


@pytest.mark.parametrize(
    "field, bad, allowed",
    [
        ("mixer", "mamba", ["titans", "attention"]),
        ("cms_variant", "parallel", ["sequential", "independent"]),
        ("objective", "l1", ["l2", "dot"]),
        ("cms_objective", "huber", ["l2", "dot"]),
        ("memory_target", "key", ["self", "value"]),
        ("kernel_backend", "cuda", ["auto", "triton", "torch"]),
    ],
)
def test_unknown_choice_names_field_value_and_allowed(field, bad, allowed):
    _raises([field, repr(bad), *allowed], **{field: bad})


def test_hidden_size_not_divisible_by_heads():
    _raises(["hidden_size", "30", "num_heads", "4", "divisible"], hidden_size=30, num_heads=4)


@pytest.mark.parametrize("bad", [0, -4, 2.5])
def test_non_positive_chunk_size(bad):
    _raises(["chunk_size", repr(bad), "positive"], chunk_size=bad)


@pytest.mark.parametrize("bad", [0, -8])
def test_non_positive_cms_chunk_size_entry(bad):
    message = _raises(["cms_chunk_sizes", repr(bad), "positive"], cms_chunk_sizes=[4, bad, None])
    assert "[1]" in message, f"the error should say which level is bad: {message!r}"


@pytest.mark.parametrize("bad", [["k", "q"], ["k", "k"], ["value"]])
def test_adaptive_entries_outside_k_v_eta_alpha(bad):
    _raises(["adaptive", *("'" + b + "'" for b in bad), "eta", "alpha"], adaptive=bad)


@pytest.mark.parametrize("field", ["cms_hidden_size", "cms_eta_max", "cms_decay"])
def test_cms_per_level_list_of_wrong_length(field):
    value = {"cms_hidden_size": [32, 32], "cms_eta_max": [0.1, 0.1], "cms_decay": [0.0, 0.0]}[field]
    message = _raises([field, "cms_chunk_sizes"], cms_chunk_sizes=[4, 8, None], **{field: value})
    assert re.search(r"\b2\b", message) and re.search(r"\b3\b", message), (
        f"the error should give the wrong length (2) and the number of levels (3): {message!r}"
    )


def test_cms_step_and_eta_max_are_validated():
    """cms_step names the step normalisation N_c of SPEC §3 v2; "gauss_newton" is the only one."""
    _raises(["cms_step", "'v1'", "gauss_newton"], cms_step="v1")
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        message = _raises(["cms_eta_max", "[1]", "> 0"], cms_chunk_sizes=[4, 8, None], cms_eta_max=[1.0, bad, 1.0])
        assert repr(bad) in message, message
    assert HopeConfig(cms_chunk_sizes=[4, None], cms_eta_max=1.9).cms_eta_max == [1.9, 1.9]


@pytest.mark.parametrize("field,bad", [("rope_theta", 0.0), ("rope_theta", -10.0), ("rms_norm_eps", -1.0),
                                       ("rms_norm_eps", math.nan), ("initializer_range", -0.1),
                                       ("initializer_range", "x")])
def test_rope_norm_and_init_scales_are_validated(field, bad):
    """rope_theta <= 0 gave NaN RoPE tables, a negative rms_norm_eps NaN losses, a negative or non-numeric
    initializer_range an error inside torch's init: each is a ValueError naming the field and the rule."""
    _raises([f"{field}={bad!r}", "finite number"], **{field: bad})
    assert HopeConfig(initializer_range=0.0).initializer_range == 0.0


def test_empty_cms_is_rejected():
    _raises(["cms_chunk_sizes"], cms_chunk_sizes=[])


def test_valid_variants_construct():
    for kwargs in (
        dict(mixer="attention", cms_chunk_sizes=[None]),
        dict(adaptive=[], momentum=False, dgd=False, objective="dot", memory_target="value"),
        dict(cms_variant="independent", cms_objective="dot", kernel_backend="torch", cms_chunk_sizes=[1, None]),
    ):
        HopeConfig(**kwargs)


def test_to_dict_from_dict_round_trip(tmp_path):
    config = HopeConfig(
        vocab_size=77, hidden_size=24, num_hidden_layers=3, num_heads=3, mixer="attention", conv_size=3,
        chunk_size=5, momentum=False, dgd=False, objective="dot", memory_target="value", adaptive=["v", "alpha"],
        eta_max=0.3, cms_chunk_sizes=[2, 9, None], cms_hidden_size=[8, 16, 24], cms_variant="independent",
        cms_objective="dot", cms_eta_max=[0.1, 0.2, 0.3], cms_decay=[0.0, 0.5, 1.0], cms_step="gauss_newton",
        kernel_backend="torch",
        tie_word_embeddings=False, max_position_embeddings=128,
    )
    as_dict = config.to_dict()
    again = HopeConfig.from_dict(as_dict)
    assert again.to_dict() == as_dict
    for name in SPEC_FIELDS:
        assert getattr(again, name) == getattr(config, name), name
    config.save_pretrained(tmp_path)
    loaded = HopeConfig.from_pretrained(tmp_path)
    assert {name: getattr(loaded, name) for name in SPEC_FIELDS} == {name: getattr(config, name) for name in SPEC_FIELDS}


def test_from_dict_validates():
    as_dict = HopeConfig(hidden_size=32, num_heads=2).to_dict()
    as_dict["mixer"] = "rnn"
    with pytest.raises(ValueError, match="mixer"):
        HopeConfig.from_dict(as_dict)


def test_auto_config_for_model():
    config = AutoConfig.for_model("hope", hidden_size=32, num_heads=4, chunk_size=8)
    assert isinstance(config, HopeConfig)
    assert (config.hidden_size, config.num_heads, config.chunk_size, config.head_dim) == (32, 4, 8, 8)


def test_attention_and_cms_switch_fields():
    """num_key_value_heads (GQA), attention_qkv_bias and cms_in_context: defaults, validation, round trip."""
    default = HopeConfig(hidden_size=32, num_heads=4)
    assert (default.num_key_value_heads, default.attention_qkv_bias, default.cms_in_context) == (4, False, True)
    gqa = HopeConfig(hidden_size=32, num_heads=4, num_key_value_heads=2, attention_qkv_bias=True, mixer="attention",
                     cms_in_context=False)
    again = HopeConfig.from_dict(gqa.to_dict())
    assert (again.num_key_value_heads, again.attention_qkv_bias, again.cms_in_context) == (2, True, False)
    _raises(["num_key_value_heads=3", "num_heads=4", "multiple"], hidden_size=32, num_heads=4,
            num_key_value_heads=3, mixer="attention")
    _raises(["num_key_value_heads", "positive"], num_key_value_heads=0, mixer="attention")
    _raises(["num_key_value_heads=2", "mixer='titans'", "attention"], hidden_size=32, num_heads=4,
            num_key_value_heads=2)
    _raises(["attention_qkv_bias=True", "mixer='titans'"], attention_qkv_bias=True)
    _raises(["attention_qkv_bias", "True or False"], attention_qkv_bias="yes", mixer="attention")
    _raises(["cms_in_context", "True or False"], cms_in_context=0)


def test_a_malformed_cms_chunk_size_is_named_not_a_type_error():
    _raises(["cms_chunk_sizes[1]", "'slow'", "positive"], cms_chunk_sizes=[16, "slow", None])


@pytest.mark.parametrize("field,bad,words", [
    ("eta_max", math.inf, ["eta_max=inf", "finite"]),
    ("memory_depth", 2.0, ["memory_depth=2.0", "choose 1"]),
    ("cms_decay", True, ["cms_decay[0]=True", "[0, 1]"]),
    ("tie_word_embeddings", "no", ["tie_word_embeddings='no'", "True or False"]),
    ("adaptive", "kv", ["adaptive='kv'", "list of names"]),
    ("adaptive", None, ["adaptive=None", "list of names"]),
    ("cms_chunk_sizes", 16, ["cms_chunk_sizes=16", "list of chunk sizes"]),
    ("cms_chunk_sizes", None, ["cms_chunk_sizes=None", "list of chunk sizes"]),
])
def test_values_of_the_wrong_kind_are_named(field, bad, words):
    """A string where a list is due (list() would split it into letters), a bool or float where an int or a number
    is due (True == 1, 2.0 == 2), an infinite eta_max: each a ValueError naming the field, not a TypeError later."""
    _raises(words, **{field: bad})


def test_the_attention_mixer_needs_an_even_head_dim():
    """RoPE rotates pairs of dimensions; the Titans mixer takes any head dim."""
    _raises(["head dim 9", "even"], hidden_size=36, num_heads=4, mixer="attention")
    assert HopeConfig(hidden_size=36, num_heads=4).head_dim == 9


def test_from_pretrained_overrides_are_validated_and_broadcast(tmp_path):
    """Overrides of saved fields go through __init__ like the saved values (PretrainedConfig would set them as
    attributes after it): a scalar per-level setting is broadcast, a bad value names its field, and a keyword that
    is no field is still returned as unused."""
    HopeConfig(hidden_size=32, num_heads=2, cms_chunk_sizes=[4, None]).save_pretrained(tmp_path)
    config = HopeConfig.from_pretrained(tmp_path, cms_eta_max=0.25, cms_decay=0.0, chunk_size=8)
    assert (config.cms_eta_max, config.cms_decay, config.chunk_size) == ([0.25, 0.25], [0.0, 0.0], 8)
    for bad, words in ((dict(memory_depth=7), ["memory_depth=7"]), (dict(chunk_size=0), ["chunk_size=0"]),
                       (dict(kernel_backend="bogus"), ["kernel_backend='bogus'"])):
        with pytest.raises(ValueError, match=".*".join(map(re.escape, words))):
            HopeConfig.from_pretrained(tmp_path, **bad)
    config, unused = AutoConfig.from_pretrained(tmp_path, return_unused_kwargs=True, chunk_sz=8)
    assert unused == {"chunk_sz": 8} and config.chunk_size == 64


def test_derived_defaults_are_derived_again_on_reload(tmp_path):
    """num_key_value_heads, memory_hidden and cms_hidden_size left to their defaults are saved as null, so a reload
    with another num_heads or hidden_size derives them from the new values (before: num_key_value_heads=2 was
    refused with num_heads=4, and memory_hidden stayed the old head dim); given or set values are kept."""
    HopeConfig(hidden_size=32, num_heads=2, memory_depth=2, cms_chunk_sizes=[4, None]).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, num_heads=4)
    assert (config.num_key_value_heads, config.memory_hidden, config.cms_hidden_size) == (4, 8, [128, 128])
    config = AutoConfig.from_pretrained(tmp_path, hidden_size=64)
    assert (config.num_key_value_heads, config.memory_hidden, config.cms_hidden_size) == (2, 32, [192, 192])
    given = HopeConfig(hidden_size=32, num_heads=2, memory_hidden=8, cms_hidden_size=[64, 96],
                       cms_chunk_sizes=[4, None])
    later = HopeConfig(hidden_size=32, num_heads=2, mixer="attention")
    later.num_key_value_heads = 1
    assert (given.to_dict()["memory_hidden"], given.to_dict()["cms_hidden_size"]) == (8, [64, 96])
    assert later.to_dict()["num_key_value_heads"] == 1 and "_derived_fields" not in later.to_dict()
    assert HopeConfig.from_dict(given.to_dict()).to_dict() == given.to_dict()


def test_a_field_set_after_construction_is_checked_when_the_model_is_built():
    from hope import HopeForCausalLM

    config = HopeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2, cms_chunk_sizes=[4, None])
    config.cms_eta_max = 0.25  # not broadcast: __init__ did that
    with pytest.raises(ValueError, match=r"cms_eta_max=0\.25.*must be a list"):
        HopeForCausalLM(config)
    config.cms_eta_max, config.chunk_size = [0.25, 0.25], 0
    with pytest.raises(ValueError, match="chunk_size=0"):
        HopeForCausalLM(config)
