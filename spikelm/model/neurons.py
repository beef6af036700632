"""Spiking neurons: the spike sites in front of every weight matmul (docs/design.md, "Neurons").

Every neuron maps a dense input ``x [B, T, C]`` to what the next projection consumes and reports integer-valued
spike counts to its ``observers`` (the sparsity monitor). Four kinds, one per ``SpikeLMConfig.neuron``:

- ``adaptive`` (SpikingBrain): per-token threshold, integer counts in [-max_spikes, max_spikes], stateless.
- ``lif`` (SpikeGPT): leaky integrate-and-fire over the token axis, binary spikes, membrane carried across calls.
- ``gated`` (Ponghiran & Roy): gated leaky integration plus an error-keeping accumulator, multi-bit counts.
- ``none``: identity, the dense twin.

Padding: at positions where ``mask`` is False the input is zeroed before anything else, so a zero initial state
stays zero and no neuron fires at a pad (left-padded batches then equal each prompt alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spikelm.kernels import gated_scan, lif_scan
from spikelm.model.config import SpikeLMConfig

ENCODINGS = ("binary", "ternary", "bitwise")

Observer = Callable[["SpikingNeuron", Tensor, "Tensor | None"], None]


def kernel_backend(config: SpikeLMConfig) -> str | None:
    """The ``backend=`` argument for the scans: ``None`` lets the kernel dispatcher pick (Triton on CUDA)."""
    return None if config.kernel_backend == "auto" else config.kernel_backend


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without the dispatcher round trip when ``x`` already has it (the usual case): a one-token
    decoding step makes dozens of such calls, and each costs microseconds even though it returns ``x`` itself."""
    return x if x.dtype == dtype else x.to(dtype)


def mask_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero ``x [B, T, C]`` where ``mask [B, T]`` is False (pads), so that no pad reaches a state or fires."""
    return x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)


class SpikingNeuron(nn.Module):
    """Base class of every spike site.

    Attributes (the sparsity monitor reads them):
        site: the site's name under ``SpikeLMModel``, e.g. ``"layers.3.time_mix.key"`` (set by the model).
        fan_out: out_features of the projection that consumes this site (synaptic operations per spike).
        kind: ``"adaptive"``, ``"lif"``, ``"gated"`` or ``"none"``.
        max_count: largest |count| per element and token (``None`` for the dense ``none`` neuron).
        stateful: whether the neuron carries a state across calls (kept in the recurrent cache).
        observers: callables ``fn(neuron, counts [B, T, C], mask [B, T] | None)`` run after each forward; with no
            observer nothing is computed for them.
    """

    kind: str = "none"
    stateful: bool = False

    def __init__(self, fan_out: int, max_count: int | None) -> None:
        super().__init__()
        self.site = ""
        self.fan_out = fan_out
        self.max_count = max_count
        self.observers: list[Observer] = []

    def fires_like(self, other: SpikingNeuron) -> bool:
        """True when both neurons are stateless and apply the same per-token rule, so one call on their stacked
        inputs gives exactly what each would give alone (the model then fires several sites in one call)."""
        return False

    def _notify(self, counts: Tensor, mask: Tensor | None) -> None:
        for observer in self.observers:
            observer(self, counts, mask)

    def forward(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """``x [B, T, C]``, ``mask [B, T]`` bool (True = real token) -> ``(y [B, T, C], new_state)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"site={self.site!r}, fan_out={self.fan_out}, max_count={self.max_count}"


def _spike_counts(x: Tensor, threshold: Tensor, max_spikes: int) -> Tensor:
    # In place after the division: two fewer [B, T, C] temporaries on the hot path.
    return torch.div(x, threshold).round_().clamp_(-max_spikes, max_spikes)


def _adaptive_quantize(x: Tensor, threshold: Tensor, max_spikes: int) -> tuple[Tensor, Tensor]:
    counts = _spike_counts(x, threshold, max_spikes)
    return threshold * counts, counts


class _AdaptiveQuantize(torch.autograd.Function):
    """``V_th * clamp(round(x / V_th), -m, m)`` with a straight-through gradient.

    The gradient passes unchanged, clamp included. Clipped channels sit beyond ``max_spikes * V_th`` (about 2.7x the
    token's mean |x| with the defaults) and carry the strongest signal of the token; zeroing their gradient (a
    clipped STE) would freeze exactly those channels, and the adaptive threshold rescales with the input anyway, so
    there is no runaway to guard against. No gradient flows through ``V_th`` itself, as in SpikingBrain.
    """

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, max_spikes: int) -> tuple[Tensor, Tensor]:
        y, counts = _adaptive_quantize(x, threshold, max_spikes)
        ctx.mark_non_differentiable(counts)
        return y, counts

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_counts: Tensor) -> tuple[Tensor, None, None]:
        return grad_y, None, None


class AdaptiveNeuron(SpikingNeuron):
    """SpikingBrain's adaptive-threshold neuron (arXiv 2509.05276, §3.3.1); stateless.

    Per token: ``V_th = clamp(mean_c |x|, min=eps) / k``, ``s = clamp(round(x / V_th), -max_spikes, max_spikes)``
    and the projection sees ``V_th * s``. All threshold math is in fp32 whatever the model dtype.
    """

    kind = "adaptive"
    # mean |x| of a (masked) all-zero token; the clamp keeps V_th away from 0 so x / V_th stays finite (and is 0).
    eps = 1e-6

    def __init__(self, fan_out: int, k: float = 3.0, max_spikes: int = 8) -> None:
        super().__init__(fan_out, max_spikes)
        self.k = float(k)
        self.max_spikes = int(max_spikes)

    def forward(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> tuple[Tensor, None]:
        x32 = mask_tokens(x.float(), mask)
        training = torch.is_grad_enabled() and x32.requires_grad
        # mean(|x|) / k as one fused L1 reduction, scaled and clamped in place on the small [B, T, 1] result. No
        # gradient flows through V_th (see _AdaptiveQuantize), so autograd need not record it.
        threshold = torch.linalg.vector_norm(x32.detach() if training else x32, 1, dim=-1, keepdim=True)  # [B, T, 1]
        threshold = threshold.mul_(1.0 / (x.shape[-1] * self.k)).clamp_(min=self.eps / self.k)
        if training:
            y, counts = _AdaptiveQuantize.apply(x32, threshold, self.max_spikes)
        else:  # inference: no autograd.Function call, and V_th * counts in place unless observers need the counts
            counts = _spike_counts(x32, threshold, self.max_spikes)
            y = counts * threshold if self.observers else counts.mul_(threshold)
        if self.observers:
            self._notify(counts, mask)
        return cast(y, x.dtype), None

    def fires_like(self, other: SpikingNeuron) -> bool:
        return isinstance(other, AdaptiveNeuron) and (other.k, other.max_spikes) == (self.k, self.max_spikes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


class LIFNeuron(SpikingNeuron):
    """SpikeGPT's multi-step leaky integrate-and-fire neuron over the token axis; binary spikes, stateful.

    ``v_t = v_{t-1} + (x_t - v_{t-1}) / tau``, spike when ``v_t >= v_th``, hard or soft reset, ATan surrogate
    gradient. The state is the membrane ``[B, C]`` (fp32) after the last token.
    """

    kind = "lif"
    stateful = True

    def __init__(self, fan_out: int, tau: float = 2.0, threshold: float = 1.0, reset: str = "hard",
                 alpha: float = 2.0, backend: str | None = None) -> None:
        super().__init__(fan_out, 1)
        self.tau, self.threshold, self.reset, self.alpha = float(tau), float(threshold), reset, float(alpha)
        self.backend = backend

    def forward(self, x: Tensor, state: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        spikes, membrane = lif_scan(mask_tokens(x, mask), state, self.tau, self.threshold, self.reset, self.alpha,
                                    backend=self.backend)
        if self.observers:
            self._notify(spikes, mask)
        return cast(spikes, x.dtype), membrane

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}, v_th={self.threshold}, reset={self.reset!r}"


class GatedNeuron(SpikingNeuron):
    """Ponghiran & Roy's gated spiking neuron (AAAI 2022); multi-bit counts, stateful.

    ``I_t = f * I_{t-1} + (1 - f) * x_t`` with a learned per-channel forget gate ``f = sigmoid(forget_logit)``;
    ``acc += I_t``, emit ``counts = Q(acc)`` (``bits``-bit, dead zone below ``threshold``), ``acc -= threshold *
    counts``. The projection sees ``threshold * counts``. State: ``(I, acc)``, each ``[B, C]`` fp32.
    """

    kind = "gated"
    stateful = True

    def __init__(self, channels: int, fan_out: int, bits: int = 2, threshold: float = 0.25,
                 forget_init: float = 0.5, backend: str | None = None) -> None:
        super().__init__(fan_out, 2**bits - 1)
        self.bits, self.threshold, self.backend = int(bits), float(threshold), backend
        self.forget_init = float(forget_init)
        # A logit, so the gate stays in (0, 1) under any update; fp32 like every recurrence parameter.
        self.forget_logit = nn.Parameter(torch.full((channels,), math.log(forget_init / (1 - forget_init))))

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        current, accumulator = state if state is not None else (None, None)
        forget = torch.sigmoid(self.forget_logit.float())
        counts, new_state = gated_scan(mask_tokens(x, mask), forget, current, accumulator, self.bits, self.threshold,
                                       backend=self.backend)
        if self.observers:
            self._notify(counts, mask)
        return cast(self.threshold * counts, x.dtype), new_state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, threshold={self.threshold}"


class IdentityNeuron(SpikingNeuron):
    """The dense twin: passes ``x`` through; observers see the dense input itself."""

    kind = "none"

    def __init__(self, fan_out: int) -> None:
        super().__init__(fan_out, None)

    def fires_like(self, other: SpikingNeuron) -> bool:
        return isinstance(other, IdentityNeuron)

    def forward(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> tuple[Tensor, None]:
        x = mask_tokens(x, mask)
        if self.observers:
            self._notify(x, mask)
        return x, None


def build_neuron(config: SpikeLMConfig, fan_out: int, channels: int | None = None) -> SpikingNeuron:
    """The neuron of ``config.neuron`` for a site with ``channels`` inputs (default hidden_size) feeding a
    projection with ``fan_out`` outputs."""
    channels = config.hidden_size if channels is None else channels
    backend = kernel_backend(config)
    if config.neuron == "adaptive":
        return AdaptiveNeuron(fan_out, k=config.adaptive_k, max_spikes=config.max_spikes)
    if config.neuron == "lif":
        return LIFNeuron(fan_out, tau=config.lif_tau, threshold=config.lif_threshold, reset=config.lif_reset,
                         alpha=config.lif_alpha, backend=backend)
    if config.neuron == "gated":
        return GatedNeuron(channels, fan_out, bits=config.gated_bits, threshold=config.gated_threshold,
                           forget_init=config.gated_forget_init, backend=backend)
    if config.neuron == "none":
        return IdentityNeuron(fan_out)
    raise ValueError(f"SpikeLMConfig.neuron={config.neuron!r} is not one of 'adaptive', 'lif', 'gated', 'none'")


class Synapses(nn.Linear):
    """The weights behind a spike site: an ``nn.Linear`` (so LoRA and quantisation libraries wrap it like any other)
    that can be event-driven.

    With ``event_driven`` (``SpikeLMForCausalLM.set_event_decoding``), one-token calls without autograd read only the
    synapses of inputs that fired: ``out[n] = sum over fired i of spikes[n, i] * W[:, i]``, a weighted gather of rows
    of an input-major copy of the weight (``F.embedding_bag``). A decoding step reads every weight once from memory,
    so at sizes where the weights do not fit in cache the step time falls with the fraction of zero spikes. The copy
    costs the weight's memory again; it is rebuilt whenever the weight changes (another version, storage or dtype).
    A write through ``weight.data`` bumps no version (peft's ``merge`` adds the adapter that way): after one, call
    ``set_event_driven`` (``SpikeLMForCausalLM.set_event_decoding``) again to refresh the copy.
    Results equal the dense product up to float summation order. Training and multi-token calls stay dense.
    """

    event_driven = False
    _input_major_key: tuple | None = None  # what the input-major weight copy was built from

    def set_event_driven(self, enabled: bool) -> None:
        """Switch event-driven calls on or off; either way the input-major copy is dropped (rebuilt on next use)."""
        self.event_driven = enabled
        self.__dict__.pop("_input_major", None)
        self.__dict__.pop("_input_major_key", None)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, in]`` -> ``[B, T, out]``."""
        if not self.event_driven or x.dim() != 3 or x.shape[1] != 1 or torch.is_grad_enabled():
            return super().forward(x)
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._input_major_key != key:
            self._input_major = weight.detach().t().contiguous()  # [in, out]: one row per input synapse bundle
            self._input_major_key = key
        spikes = x.reshape(-1, x.shape[-1])
        rows, columns = spikes.nonzero(as_tuple=True)  # row-major order: each row's events are contiguous
        per_row = torch.bincount(rows, minlength=spikes.shape[0])
        out = F.embedding_bag(columns, self._input_major, torch.cumsum(per_row, 0) - per_row, mode="sum",
                              per_sample_weights=spikes[rows, columns].to(weight.dtype))
        out = out if self.bias is None else out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


class SpikingLinear(nn.Module):
    """A spike site followed by its synapses: ``linear(neuron(x))``, bias-free (``linear`` is a ``Synapses``).

    ``init_std`` (read by the model's weight init) scales the normal init of ``linear.weight``; output projections
    into the residual stream use a smaller one so a deep stack starts near the identity.
    """

    def __init__(self, config: SpikeLMConfig, in_features: int, out_features: int, init_std: float | None = None):
        super().__init__()
        self.neuron = build_neuron(config, out_features, in_features)
        self.linear = Synapses(in_features, out_features, bias=False)
        self.linear.init_std = config.initializer_range if init_std is None else init_std

    def forward(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """``x [B, T, in]`` -> ``(linear(spikes) [B, T, out], neuron state)``."""
        spikes, state = self.neuron(x, state, mask)
        return self.linear(spikes), state


def time_steps(encoding: str, max_count: int) -> int:
    """Virtual time steps S of an event train that carries counts up to ``max_count``: ``max_count`` for the binary
    and ternary trains, ``ceil(log2(max_count + 1))`` bits for the bitwise one."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r} is not one of {', '.join(map(repr, ENCODINGS))}")
    if encoding == "bitwise":
        return max(1, int(max_count).bit_length())  # == ceil(log2(max_count + 1))
    return int(max_count)


def expand_counts(counts: Tensor, encoding: str, max_count: int) -> Tensor:
    """Expand integer spike counts into event trains over virtual time steps; returns ``[S, *counts.shape]``.

    - ``"binary"``: S = max_count; event j is 1 when j < |c|. The sign rides on the synapse:
      ``sign(c) * events.sum(0) == c``.
    - ``"ternary"``: S = max_count; event j is sign(c) when j < |c|: ``events.sum(0) == c``.
    - ``"bitwise"``: S = ceil(log2(max_count + 1)); event i is bit i of |c|:
      ``sign(c) * sum_i 2**i * events[i] == c``.

    Events have the dtype of ``counts``. Raises ``ValueError`` for an unknown encoding, a non-positive
    ``max_count``, or counts that are not integers within [-max_count, max_count].
    """
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count <= 0:
        raise ValueError(f"max_count={max_count!r} must be a positive integer (the neuron's max_count)")
    steps = time_steps(encoding, max_count)
    magnitude = counts.abs()
    if counts.numel() and (bool((magnitude > max_count).any()) or not torch.equal(counts, torch.round(counts))):
        raise ValueError(f"counts must be integers in [-{max_count}, {max_count}]; got values in "
                         f"[{counts.min().item()}, {counts.max().item()}]")
    if encoding == "bitwise":
        bits = torch.arange(steps, device=counts.device).view(-1, *([1] * counts.dim()))
        return ((magnitude.long().unsqueeze(0) >> bits) & 1).to(counts.dtype)
    step = torch.arange(steps, device=counts.device).view(-1, *([1] * counts.dim()))
    events = (step < magnitude.unsqueeze(0)).to(counts.dtype)  # [S, ...]
    return events * torch.sign(counts).unsqueeze(0) if encoding == "ternary" else events


__all__ = ["SpikingNeuron", "AdaptiveNeuron", "LIFNeuron", "GatedNeuron", "IdentityNeuron", "SpikingLinear", "Synapses",
           "build_neuron", "expand_counts", "time_steps", "mask_tokens", "kernel_backend", "cast", "ENCODINGS"]
