"""auto_map shim for a saved SpikeLM model: the config class of the installed ``spikelm`` package.

``save_pretrained`` copies this file next to the weights so that programs that never ``import spikelm`` can load
the model with ``AutoConfig/AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; the code itself
stays in the installed package (``pip install spikelm``), so a saved model never runs stale copied code.
"""

from spikelm import SpikeLMConfig

__all__ = ["SpikeLMConfig"]
