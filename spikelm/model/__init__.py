"""The model: config, spiking neurons, time/channel mix, the Hugging Face model classes, the recurrent cache and
conversion from other models.

Imports only ``spikelm.kernels`` and ``spikelm.errors``; nothing here reads files other than through
``from_pretrained``/``save_pretrained``, except ``convert`` (which reads other models' weight files) and ``event``
(its "auto" choice is cached in ``$SPIKELM_CACHE/event_decoding.json``; ``event_kernel`` builds a C++ extension).
"""
