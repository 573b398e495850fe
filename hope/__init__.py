"""Hope (Nested Learning, NeurIPS 2025) as a Hugging Face model.

`import hope` registers HopeConfig, HopeModel and HopeForCausalLM with AutoConfig, AutoModel and
AutoModelForCausalLM.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_hope import HopeCache
from .configuration_hope import HopeConfig
from .continual import OnlineLearner
from .modeling_hope import HopeForCausalLM, HopeModel, HopePreTrainedModel
from .presets import get_preset
from .stacking import stack_levels

AutoConfig.register(HopeConfig.model_type, HopeConfig, exist_ok=True)
AutoModel.register(HopeConfig, HopeModel, exist_ok=True)
AutoModelForCausalLM.register(HopeConfig, HopeForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["HopeCache", "HopeConfig", "HopeForCausalLM", "HopeModel", "HopePreTrainedModel", "OnlineLearner",
           "get_preset", "stack_levels"]
