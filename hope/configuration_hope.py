"""HopeConfig: every field of SPEC §7, validated with errors that name the field and what is allowed."""
from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence, Union

from transformers import PretrainedConfig

MIXERS = ("titans", "attention")
OBJECTIVES = ("l2", "dot")
MEMORY_TARGETS = ("self", "value")
MEMORY_RETENTIONS = ("init", "zero")
MEMORY_DEPTHS = (1, 2)
ADAPTIVE = ("k", "v", "eta", "alpha")
CMS_VARIANTS = ("sequential", "independent")
CMS_STEPS = ("gauss_newton",)
# The CMS retention pull toward θ_0 per chunk update (SPEC §3 lambda_l). SPEC §3 v2 names 0 as the default; 0.05 is
# measured (benchmarks/cms_stability.py, docs/cms/): with 0 the fast-weight drift ‖θ_c − θ_0‖/‖θ_0‖ keeps growing
# over a 16K-32K stream (about as √T) under every step tried, with 0.05 it is flat, and held-out bits per byte
# at 4K-16K are better; 0 remains available.
CMS_DECAY = 0.05
KERNEL_BACKENDS = ("auto", "triton", "torch")
# The default bound on the Titans memories' eta (SPEC §2 v2): the delta-rule transition alpha (I - eta/alpha k kᵀ)
# contracts for 0 < eta < 1 + alpha; 1.0 is the largest value the stability figures
# (benchmarks/titans_stability.py, docs/stability/titans_stability.md) show safe.
ETA_MAX = 1.0


def _per_level(name: str, value, levels: int, default) -> list:
    """Broadcast a scalar CMS setting to one value per level, or check a list's length."""
    if value is None:
        value = default
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{name} has {len(value)} entries but cms_chunk_sizes has {levels} levels")
        return list(value)
    return [value] * levels


def _name_list(name: str, value, what: str) -> list:
    """A list field given as a list or tuple; a string or a scalar would be read by list() as something else."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}={value!r} is not allowed: it must be a list of {what}")
    return list(value)


class HopeConfig(PretrainedConfig):
    """Configuration of a Hope causal LM (SPEC §7); the names are the public API.

    Shape: vocab_size, hidden_size, num_hidden_layers, num_heads, mixer ("titans" | "attention"), conv_size.
    Attention mixer (SPEC §4): num_key_value_heads (grouped-query attention: num_heads / num_key_value_heads
    query heads share one key/value head; default num_heads), attention_qkv_bias (biases on the q, k and v
    projections, the Qwen2 layout; default False). Both need mixer="attention".
    Titans mixer (SPEC §2 v2): chunk_size (the main memory's gradient state), adaptive_chunk_size (the
    generating memories', default chunk_size, a multiple of it), momentum (default False), dgd, objective
    ("l2" | "dot"), memory_target ("self" | "value"), memory_residual (default True: M(z) = z + W z),
    memory_value_norm (default True: v_t is l2-normalised), memory_retention ("init", the default: alpha retains
    toward the meta-learned initial memories; "zero": toward 0, as Eq. 88 prints), memory_curvature_guard (default
    True: the deep memory's inner-gradient step is divided by max(1, its Gauss-Newton curvature)), adaptive
    (subset of k/v/eta/alpha), eta_max (default 1.0), memory_depth (1: linear main memory; 2: the deep memory
    M(z) = z + W1 silu(W2 z) of Eq. 91), memory_hidden (h, the hidden width of the deep memory, default the head
    dim d; read only with memory_depth=2).
    CMS (SPEC §3): cms_chunk_sizes (a list, None = a level that never learns in context), cms_hidden_size,
    cms_variant ("sequential" | "independent"), cms_objective ("l2" | "dot"), cms_eta_max, cms_decay, cms_step,
    cms_in_context (default True; False switches every level's in-context step off: each level then reads its
    parameters θ_0 on every token, a plain SwiGLU FFN that keeps its chunk size, eta and target parameters, as
    `hope.stack_levels` and `HopePreTrainedModel.set_cms_in_context` use it); cms_eta_max, cms_decay and
    cms_hidden_size take one value for all levels or a list with one per level.
    cms_step names the in-context step's normalisation N_c (SPEC §3 v2): "gauss_newton", the only one, divides
    each chunk's summed step by N_c = Σ_t mask_t (‖z_t‖² + ‖h_t‖² + ‖z_t‖² Σ_f r_tf² ‖W_down[:, f]‖²), a bound on
    its Gauss-Newton curvature (hope_kernels/cms/reference.py), so the step stays stable at any feature scale;
    cms_eta_max is then a fraction of that bound (default 1; < 2 is stable). cms_decay, the pull of θ_c toward
    θ_0 at each update, defaults to 0.05 (measured: it bounds the fast-weight drift on long streams).
    cms_hidden_size defaults to 8/3 hidden_size rounded up to 64.
    Execution: kernel_backend ("auto" | "triton" | "torch"), tie_word_embeddings, max_position_embeddings.
    """

    model_type = "hope"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_heads: int = 16,
        mixer: str = "titans",
        conv_size: int = 4,
        num_key_value_heads: Optional[int] = None,
        attention_qkv_bias: bool = False,
        chunk_size: int = 64,
        adaptive_chunk_size: Optional[int] = None,
        momentum: bool = False,
        dgd: bool = True,
        objective: str = "l2",
        memory_target: str = "self",
        memory_residual: bool = True,
        memory_value_norm: bool = True,
        memory_retention: str = "init",
        memory_curvature_guard: bool = True,
        adaptive: Sequence[str] = ADAPTIVE,
        eta_max: float = ETA_MAX,
        memory_depth: int = 1,
        memory_hidden: Optional[int] = None,
        cms_chunk_sizes: Sequence[Optional[int]] = (16, 128, None),
        cms_hidden_size: Union[int, Sequence[int], None] = None,
        cms_variant: str = "sequential",
        cms_objective: str = "l2",
        cms_eta_max: Union[float, Sequence[float]] = 1.0,
        cms_decay: Union[float, Sequence[float]] = CMS_DECAY,
        cms_step: str = "gauss_newton",
        cms_in_context: bool = True,
        kernel_backend: str = "auto",
        tie_word_embeddings: bool = True,
        max_position_embeddings: int = 8192,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        **kwargs,
    ):
        # The fields left to their derived defaults: saved as null (`to_dict`), so that a reload with other
        # num_heads or hidden_size (from_pretrained(path, num_heads=8)) derives them again instead of keeping
        # values that no longer fit.
        self._derived_fields = tuple(name for name, value in (("num_key_value_heads", num_key_value_heads),
                                                              ("memory_hidden", memory_hidden),
                                                              ("cms_hidden_size", cms_hidden_size)) if value is None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.mixer = mixer
        self.conv_size = conv_size
        self.num_key_value_heads = num_heads if num_key_value_heads is None else num_key_value_heads
        self.attention_qkv_bias = attention_qkv_bias
        self.chunk_size = chunk_size
        self.adaptive_chunk_size = adaptive_chunk_size
        self.momentum = momentum
        self.dgd = dgd
        self.objective = objective
        self.memory_target = memory_target
        self.memory_residual = memory_residual
        self.memory_value_norm = memory_value_norm
        self.memory_retention = memory_retention
        self.memory_curvature_guard = memory_curvature_guard
        self.adaptive = _name_list("adaptive", adaptive, f"names from {list(ADAPTIVE)} (e.g. ['k', 'v'])")
        self.eta_max = eta_max
        self.memory_depth = memory_depth
        # A non-int hidden_size / num_heads is rejected by _validate below.
        if memory_hidden is None and isinstance(hidden_size, int) and isinstance(num_heads, int) and num_heads > 0:
            memory_hidden = self._derived_default("memory_hidden")
        self.memory_hidden = memory_hidden
        self.cms_chunk_sizes = _name_list("cms_chunk_sizes", cms_chunk_sizes,
                                          "chunk sizes, one per level (None = a level that never learns in context)")
        levels = len(self.cms_chunk_sizes)
        self.cms_hidden_size = _per_level("cms_hidden_size", cms_hidden_size, levels,
                                          self._derived_default("cms_hidden_size"))
        self.cms_variant = cms_variant
        self.cms_objective = cms_objective
        self.cms_step = cms_step
        # The step is divided by N_c, a bound on the chunk's Gauss-Newton curvature (SPEC §3 v2), so cms_eta_max is
        # a fraction of the stability bound whatever C_l, D and the feature scale: 1 (with the gate at 1/2 at
        # initialisation, half the bound).
        self.cms_eta_max = _per_level("cms_eta_max", cms_eta_max, levels, 1.0)
        self.cms_decay = _per_level("cms_decay", cms_decay, levels, CMS_DECAY)
        self.cms_in_context = cms_in_context
        self.kernel_backend = kernel_backend
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        if not isinstance(tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings={tie_word_embeddings!r} is not allowed: it must be True or False")
        self._validate()
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """PretrainedConfig.from_dict, with overrides of HopeConfig's own fields (`from_pretrained(path,
        cms_eta_max=0.25)`, `hope-train --config_overrides`) passed to __init__ like the saved values, so that they
        are validated and broadcast per level; PretrainedConfig would set them as attributes after __init__."""
        fields = inspect.signature(cls.__init__).parameters
        own = {key: kwargs.pop(key) for key in list(kwargs)
               if key in fields and fields[key].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}
        return super().from_dict({**config_dict, **own}, **kwargs)

    def to_dict(self) -> dict:
        """PretrainedConfig.to_dict, with the fields left to their derived defaults as None (unless set to another
        value after construction)."""
        output = super().to_dict()
        for name in output.pop("_derived_fields", ()):
            default = self._derived_default(name)
            if name == "cms_hidden_size":
                default = [default] * len(self.cms_chunk_sizes)
            if getattr(self, name) == default:
                output[name] = None
        return output

    def _derived_default(self, name: str):
        """The default of num_key_value_heads, memory_hidden or cms_hidden_size (each level's) from the other
        fields."""
        if name == "num_key_value_heads":
            return self.num_heads
        if name == "memory_hidden":
            # The deep memory's hidden width defaults to the head dim d (W1, W2 square): as many fast weights as
            # two linear memories.
            return self.hidden_size // self.num_heads
        # SwiGLU keeps the FFN's parameter count at 8/3 D per level, rounded for matmul-friendly shapes.
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def _validate(self) -> None:
        def positive_int(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: it must be a positive int")

        def choice(name: str, value, allowed: Sequence) -> None:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not allowed: choose one of {list(allowed)}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "conv_size", "chunk_size",
                     "max_position_embeddings"):
            positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not allowed with num_heads={self.num_heads}: "
                "hidden_size must be divisible by num_heads"
            )
        choice("mixer", self.mixer, MIXERS)
        if self.mixer == "attention" and self.head_dim % 2:
            raise ValueError(
                f"hidden_size={self.hidden_size} / num_heads={self.num_heads} gives head dim {self.head_dim}: the "
                "attention mixer needs an even head dim (RoPE rotates pairs of dimensions)"
            )
        positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} is not allowed with num_heads={self.num_heads}: "
                "num_heads must be a multiple of num_key_value_heads (grouped-query attention)"
            )
        for name in ("attention_qkv_bias", "cms_in_context"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: it must be True or False")
        if self.mixer != "attention" and (self.num_key_value_heads != self.num_heads or self.attention_qkv_bias):
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} / attention_qkv_bias={self.attention_qkv_bias} "
                f"are not allowed with mixer={self.mixer!r}: they configure the attention mixer only (use "
                "num_key_value_heads=num_heads and attention_qkv_bias=False, or mixer='attention')"
            )
        choice("objective", self.objective, OBJECTIVES)
        choice("memory_target", self.memory_target, MEMORY_TARGETS)
        choice("cms_variant", self.cms_variant, CMS_VARIANTS)
        choice("cms_objective", self.cms_objective, OBJECTIVES)
        choice("cms_step", self.cms_step, CMS_STEPS)
        choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        if not isinstance(self.memory_depth, int) or isinstance(self.memory_depth, bool) or (
                self.memory_depth not in MEMORY_DEPTHS):
            raise ValueError(
                f"memory_depth={self.memory_depth!r} is not allowed: choose 1 (linear main memory) or 2 (the deep "
                "memory M(z) = z + W1 silu(W2 z) of SPEC §2 / Eq. 91)"
            )
        positive_int("memory_hidden", self.memory_hidden)
        if self.adaptive_chunk_size is not None and (
            isinstance(self.adaptive_chunk_size, bool) or not isinstance(self.adaptive_chunk_size, int)
            or self.adaptive_chunk_size < 1 or self.adaptive_chunk_size % self.chunk_size
        ):
            raise ValueError(
                f"adaptive_chunk_size={self.adaptive_chunk_size!r} is not allowed: it must be None (= chunk_size) or "
                f"a positive multiple of chunk_size={self.chunk_size}"
            )
        choice("memory_retention", self.memory_retention, MEMORY_RETENTIONS)
        for name in ("momentum", "dgd", "memory_residual", "memory_value_norm", "memory_curvature_guard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: it must be True or False")
        for name in ("adaptive", "cms_chunk_sizes", "cms_hidden_size", "cms_eta_max", "cms_decay"):
            # set as attributes after __init__ (config.cms_eta_max = 0.25) they skip __init__'s conversions
            if not isinstance(getattr(self, name), list):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed here: it must be a list (HopeConfig("
                                 f"{name}=...) broadcasts one value to every level)")
        for name in ("cms_hidden_size", "cms_eta_max", "cms_decay"):
            if len(getattr(self, name)) != len(self.cms_chunk_sizes):
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but cms_chunk_sizes has "
                                 f"{len(self.cms_chunk_sizes)} levels")
        bad = [entry for entry in self.adaptive if entry not in ADAPTIVE]
        if bad or len(set(self.adaptive)) != len(self.adaptive):
            raise ValueError(f"adaptive={self.adaptive!r} is not allowed: entries must be distinct, from {list(ADAPTIVE)}")
        for name, allow_zero in (("eta_max", False), ("rope_theta", False), ("rms_norm_eps", False),
                                 ("initializer_range", True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                               and (value > 0 or allow_zero and value == 0)):
                raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number "
                                 f"{'>= 0' if allow_zero else '> 0'}")
        if not self.cms_chunk_sizes:
            raise ValueError("cms_chunk_sizes=[] is not allowed: give at least one level (None = a plain FFN)")
        for level, size in enumerate(self.cms_chunk_sizes):
            if size is not None:
                positive_int(f"cms_chunk_sizes[{level}]", size)
        for level, size in enumerate(self.cms_hidden_size):
            positive_int(f"cms_hidden_size[{level}]", size)
        for level, eta in enumerate(self.cms_eta_max):
            if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and eta > 0 and math.isfinite(eta)):
                raise ValueError(f"cms_eta_max[{level}]={eta!r} is not allowed: it must be a finite number > 0 "
                                 "(a fraction of the Gauss-Newton step bound; the default 1, < 2 is stable)")
        for level, decay in enumerate(self.cms_decay):
            if isinstance(decay, bool) or not (isinstance(decay, (int, float)) and 0 <= decay <= 1):
                raise ValueError(f"cms_decay[{level}]={decay!r} is not allowed: it must be in [0, 1]")
