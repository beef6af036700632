"""The recurrent state cache returned as ``past_key_values``.

An RWKV model needs no key/value history: per layer it keeps the time-mix token-shift vector and WKV state, the
channel-mix token-shift vector and the states of stateful neurons (LIF membranes, gated (I, acc)). Its size is
fixed, so each generated token costs O(1) in the context length.

Layout: ``layers[i]`` is ``{"time_mix": {...}, "channel_mix": {...}}``; each inner dict maps a state name
(``"shift"``, ``"wkv"``, or a spike site such as ``"key"``) to a tensor or a tuple of tensors, batch first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _map_state(state: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {name: _map_state(value, fn) for name, value in state.items()}
    if isinstance(state, tuple | list):
        return type(state)(_map_state(value, fn) for value in state)
    return state


class SpikeLMCache:
    """Per-layer recurrent states plus the number of tokens seen (``get_seq_length``, used by ``generate``).

    The model updates it in place and returns it; pass it back as ``past_key_values`` to continue.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int) -> None:
        self.layers: list[dict[str, Any] | None] = [None] * num_layers
        self.head_state: Any = None  # state of a stateful spike site in front of the LM head (spike_lm_head)
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> dict[str, Any] | None:
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (pads of a left-padded prompt included, as generate's attention mask counts)."""
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int | None:
        """``None``: a recurrent state has no length limit."""
        return None

    def map_(self, fn: Callable[[Tensor], Tensor]) -> SpikeLMCache:
        """Apply ``fn`` to every state tensor (batch on dim 0), in place; returns self."""
        self.layers = [_map_state(layer, fn) for layer in self.layers]
        self.head_state = _map_state(self.head_state, fn)
        return self

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows ``beam_idx`` (beam search picks which hypotheses continue)."""
        self.map_(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the batch rows ``indices``."""
        self.map_(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row ``repeats`` times (expanding a prompt's state to several beams/samples)."""
        self.map_(lambda t: t.repeat_interleave(repeats, dim=0))

    def detach_(self) -> SpikeLMCache:
        """Cut the autograd graph through the states (truncated BPTT across calls)."""
        return self.map_(Tensor.detach)

    def __repr__(self) -> str:
        return f"SpikeLMCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"


__all__ = ["SpikeLMCache"]
