"""auto_map shim for a saved SpikeLM model: the model classes of the installed ``spikelm`` package.

See ``configuration_spikelm.py``: copied next to the weights by ``save_pretrained``; loading it imports ``spikelm``,
which also registers the classes with the Auto factories.
"""

from spikelm import SpikeLMForCausalLM, SpikeLMModel

__all__ = ["SpikeLMModel", "SpikeLMForCausalLM"]
