"""The model: config, spiking neurons, time/channel mix, the Hugging Face model classes and the recurrent cache.

Imports only ``spikelm.kernels`` and ``spikelm.errors``; nothing here reads files other than through
``from_pretrained``/``save_pretrained``, except ``convert`` (which reads other models' weight files).
"""
