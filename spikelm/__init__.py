"""SpikeLM: spiking RWKV language models, trained from recipes with DeepSpeed, served through Hugging Face.

``import spikelm`` registers the model with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from spikelm.model.config import PRESETS, SpikeLMConfig
from spikelm.model.modeling import SpikeLMForCausalLM, SpikeLMModel

AutoConfig.register(SpikeLMConfig.model_type, SpikeLMConfig, exist_ok=True)
AutoModel.register(SpikeLMConfig, SpikeLMModel, exist_ok=True)
AutoModelForCausalLM.register(SpikeLMConfig, SpikeLMForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["SpikeLMConfig", "SpikeLMModel", "SpikeLMForCausalLM", "PRESETS"]
