"""Placeholder: the model helper replaces this file with the real SpikeLMModel / SpikeLMForCausalLM."""

from transformers import GenerationMixin, PreTrainedModel

from spikelm.config import SpikeLMConfig


class SpikeLMPreTrainedModel(PreTrainedModel):
    config_class = SpikeLMConfig
    base_model_prefix = "model"


class SpikeLMModel(SpikeLMPreTrainedModel):
    def __init__(self, config):
        raise NotImplementedError("SpikeLMModel is being written")


class SpikeLMForCausalLM(SpikeLMPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        raise NotImplementedError("SpikeLMForCausalLM is being written")
