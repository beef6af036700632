"""ChannelMix: the per-token feed-forward half of a block (docs/design.md, "ChannelMix").

``k = relu(W_k s_k(x_k))^2``, ``out = sigmoid(W_r s_r(x_r)) * W_v s_v(k)``, with ``x_k``/``x_r`` token-shift mixes
of ``x_t`` and ``x_{t-1}`` and ``s_*`` spike sites.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import initialization as init

from spikelm.model.config import SpikeLMConfig
from spikelm.model.neurons import SpikingLinear, mask_tokens
from spikelm.model.time_mix import State, _SpikingMix, channel_ramp


class ChannelMix(_SpikingMix):
    """RWKV channel mix with spike sites ``key``, ``receptance`` and ``value`` (the last sees ``relu(.)^2``).

    State: ``shift [B, C]`` (the last token's normed input) plus stateful neurons' states.
    """

    def __init__(self, config: SpikeLMConfig, layer_id: int) -> None:
        super().__init__()
        self.config, self.layer_id = config, layer_id
        C, F = config.hidden_size, config.intermediate_size
        self.shift_mix = nn.Parameter(torch.zeros(2, C))  # fraction of x_{t-1} for key, receptance
        self.key = SpikingLinear(config, C, F)
        self.receptance = SpikingLinear(config, C, C)
        self.value = SpikingLinear(config, F, C,
                                   init_std=config.initializer_range / math.sqrt(2 * config.num_hidden_layers))

    @torch.no_grad()
    def init_recurrence_(self) -> None:
        """RWKV's init: deeper layers and later channels look less at the previous token."""
        ratio_1_to_0 = 1.0 - self.layer_id / self.config.num_hidden_layers
        keep = channel_ramp(self.config.hidden_size, self.shift_mix.device).pow(ratio_1_to_0)
        init.copy_(self.shift_mix, (1.0 - keep).expand_as(self.shift_mix))

    def forward(self, x: Tensor, state: State | None = None, mask: Tensor | None = None,
                use_cache: bool = False) -> tuple[Tensor, State | None]:
        """``x [B, T, C]`` -> ``(out [B, T, C], new_state or None)``."""
        new_state: State = {}
        x = mask_tokens(x, mask)
        mixed = self._mixed_inputs(x, None if state is None else state.get("shift"))  # (2, B, T, C)
        k, r = self._sites(("key", "receptance"), mixed, state, new_state, mask)
        out = torch.sigmoid(r) * self._site("value", torch.relu(k).square(), state, new_state, mask)
        if not use_cache:
            return out, None
        new_state["shift"] = x[:, -1]
        return out, new_state


__all__ = ["ChannelMix"]
