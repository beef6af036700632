"""Spiking neurons: the spike sites in front of every weight matmul (docs/design.md, "Neurons").

Every neuron maps a dense input ``x [B, T, C]`` to what the next projection consumes and reports integer-valued
spike counts to its ``observers`` (the sparsity monitor). Four kinds, one per ``SpikeLMConfig.neuron``:

- ``adaptive`` (SpikingBrain): per-token threshold, integer counts in [-max_spikes, max_spikes], stateless.
- ``lif`` (SpikeGPT): leaky integrate-and-fire over the token axis, binary spikes, membrane carried across calls.
- ``gated`` (Ponghiran & Roy): gated leaky integration plus an error-keeping accumulator, multi-bit counts.
- ``none``: identity, the dense twin.

Padding: at positions where ``mask`` is False the input is zeroed before anything else, so a zero initial state
stays zero and no neuron fires at a pad (left-padded batches then equal each prompt alone).

Why one file of ~450 lines: the four neurons share the base class, the padding rule and the observer protocol the
sparsity monitor relies on; the adaptive neuron's options (learned step, surrogate, resolution) are its largest part.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from spikelm.kernels import gated_scan, lif_scan
from spikelm.model import event_kernel
from spikelm.model.config import SpikeLMConfig
from spikelm.model.event_kernel import adaptive_event_linear, event_linear

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


def _mean_abs(x32: Tensor) -> Tensor:
    """``mean(|x|)`` over the last dimension as one fused L1 reduction, kept ``[..., 1]``, without autograd."""
    return torch.linalg.vector_norm(x32.detach(), 1, dim=-1, keepdim=True).mul_(1.0 / x32.shape[-1])


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


class _LearnedQuantize(torch.autograd.Function):
    """``(V_th / r) * q(r x / V_th)`` with ``V_th = a * s``: ``a [..., 1]`` the token's mean |x| (no gradient), ``s``
    a trainable step multiplier (``[1]`` per site or ``[C]`` per channel), ``r`` the resolution and ``q(u) =
    clamp(round(u), -m, m)``, 0 in the silent set ``|u| < r / 2`` (``|x| < V_th / 2``; for r = 1 that is round's own
    zero). A learned multiplier thus moves the silent set of its channel(s) and the step size together.

    Gradients (LSQ, Esser et al. 2020, with ``u = r x / V_th``):
    - x: passed unchanged (``clipped=False``, the STE of :class:`_AdaptiveQuantize`), or zeroed where |u| > m;
    - s: ``(a / r) * (q(u) - u)`` where |u| <= m (``-(a / r) u`` in the silent set) and ``(a / r) * (+-m)`` where
      clipped, summed over the elements sharing the multiplier and scaled by ``grad_scale`` (LSQ's ``1 / sqrt(N *
      m)``), so the step size learns at a rate comparable to the weights whatever the number of elements.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mean_abs: Tensor, scale: Tensor, max_spikes: int, clipped: bool,
                grad_scale: float, resolution: int = 1) -> tuple[Tensor, Tensor]:
        step = mean_abs * scale / resolution
        u = x / step
        counts = torch.round(u).clamp_(-max_spikes, max_spikes)
        if resolution > 1:  # r = 1: round already gives 0 below V_th / 2
            counts.masked_fill_(u.abs() < resolution / 2, 0.0)
        ctx.save_for_backward(u, counts, mean_abs, scale)
        ctx.clipped, ctx.grad_scale, ctx.max_spikes, ctx.resolution = clipped, grad_scale, max_spikes, resolution
        ctx.mark_non_differentiable(counts)
        return counts * step, counts

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_counts: Tensor) -> tuple[Tensor | None, ...]:
        u, counts, mean_abs, scale = ctx.saved_tensors
        inside = u.abs() <= ctx.max_spikes
        grad_x = grad_y * inside if ctx.clipped else grad_y
        # counts - u inside the range; counts (= +-m) where clipped.
        grad_step = grad_y * (mean_abs / ctx.resolution) * torch.where(inside, counts - u, counts)
        grad_scale = grad_step.reshape(-1, scale.numel()).sum(0) if scale.numel() > 1 else grad_step.sum().reshape(1)
        return grad_x, None, grad_scale.view_as(scale) * ctx.grad_scale, None, None, None, None


class AdaptiveNeuron(SpikingNeuron):
    """SpikingBrain's adaptive-threshold neuron (arXiv 2509.05276, §3.3.1); stateless.

    Per token: ``V_th = clamp(mean_c |x|, min=eps) / k``, ``s = clamp(round(x / V_th), -max_spikes, max_spikes)``
    and the projection sees ``V_th * s``. All threshold math is in fp32 whatever the model dtype.

    Options (``SpikeLMConfig.adaptive_scale`` / ``adaptive_surrogate`` / ``spike_phase_in``): a trainable step
    multiplier replacing ``1 / k`` (``scale="site"``, ``"channel"`` or ``"channel_mean"`` with the channels' mean held
    at ``1 / k``; LSQ gradient, initialised to ``1 / k``), a
    clipped straight-through gradient, and ``mix`` < 1 while spikes are phased in (output ``x + mix * (spikes - x)``;
    the observers always see the integer counts).

    ``resolution`` r > 1 (``SpikeLMConfig.adaptive_resolution``) separates the silent set from the step: a channel
    stays silent when ``|x| < V_th / 2`` exactly as with r = 1 (the same zeros), and fires ``clamp(round(r x /
    V_th), -max_spikes, max_spikes)`` spikes of size ``V_th / r`` otherwise: r times finer values for r times more
    spikes per active channel. With a learned multiplier, ``V_th = mean|x| * s`` moves both (LSQ gradient of
    :class:`_LearnedQuantize`).
    """

    kind = "adaptive"
    # mean |x| of a (masked) all-zero token; the clamp keeps V_th away from 0 so x / V_th stays finite (and is 0).
    eps = 1e-6
    # Smallest learned multiplier: keeps V_th > 0 whatever the optimizer does to the parameter.
    min_scale = 1e-4

    def __init__(self, fan_out: int, k: float = 3.0, max_spikes: int = 8, *, scale: str = "fixed",
                 channels: int | None = None, surrogate: str = "ste", resolution: int = 1) -> None:
        super().__init__(fan_out, max_spikes)
        self.k = float(k)
        self.resolution = int(resolution)
        self.max_spikes = int(max_spikes)
        self.scale_mode, self.surrogate = scale, surrogate
        self.mix = 1.0  # 1 = spikes; set below 1 by SpikeLMForCausalLM.set_training_progress while phasing in
        # Smooth zero fraction of the last training forward and its element count, kept only while a zero target is
        # set (SpikeLMConfig.adaptive_zero_target; read and cleared by SpikeLMForCausalLM.zero_target_loss).
        self.track_zeros = False
        self.soft_zeros: tuple[Tensor, int] | None = None
        if scale == "fixed":
            self.step_scale = None
        else:
            size = 1 if scale == "site" else channels  # "channel" or "channel_mean"
            if not size:
                raise ValueError("AdaptiveNeuron(scale='channel') needs the number of input channels")
            self.step_scale = nn.Parameter(torch.full((size,), 1.0 / self.k))

    def _simple(self) -> bool:
        """The SpikingBrain rule exactly: fixed 1/k, plain STE, full spikes (the fast path)."""
        return self.step_scale is None and self.surrogate == "ste" and self.mix == 1.0 and self.resolution == 1

    def forward(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> tuple[Tensor, None]:
        x32 = mask_tokens(x.float(), mask)
        training = torch.is_grad_enabled() and (x32.requires_grad or self.step_scale is not None)
        if not training and not self.observers and x32.device.type == "cpu" and self.has_event_rule() \
                and event_kernel.extension(build=False) is not None:
            # CPU inference: V_th and the rule below (division, rounding, clamp, the silent set, V_th * counts) in
            # one C++ call, the same fp32 operations in the same order, so the same values bit for bit (a prompt's 9
            # sites per layer made ~8 full passes each).
            y = event_kernel.adaptive_fire(x32, self.k, self.resolution, self.max_spikes, self.eps)
            return cast(y, x.dtype), None
        # mean(|x|) as one fused L1 reduction on the small [B, T, 1] result. No gradient flows through it (LSQ
        # learns the multiplier instead), so autograd need not record it.
        mean_abs = _mean_abs(x32)
        if self._simple():
            threshold = self._simple_threshold(mean_abs)
            if training:
                y, counts = _AdaptiveQuantize.apply(x32, threshold, self.max_spikes)
            else:  # inference: no autograd.Function call, and V_th * counts in place unless observers need counts
                counts = _spike_counts(x32, threshold, self.max_spikes)
                y = counts * threshold if self.observers else counts.mul_(threshold)
        else:
            y, counts = self._general(x32, mean_abs, training)
        if self.observers:
            self._notify(counts, mask)
        return cast(y, x.dtype), None

    def _simple_threshold(self, mean_abs: Tensor) -> Tensor:
        return mean_abs.div_(self.k).clamp_(min=self.eps / self.k)

    def _fine_threshold(self, mean_abs: Tensor) -> Tensor:
        return mean_abs.clamp_(min=self.eps).div_(self.k)

    def has_event_rule(self) -> bool:
        """Whether ``event_kernel.adaptive_event_linear`` reproduces this neuron's inference rule (fixed multiplier,
        full spikes)."""
        return self.step_scale is None and self.mix == 1.0 and (self.resolution > 1 or self._simple())

    def event_threshold(self, x: Tensor) -> Tensor | None:
        """``V_th [..., 1]`` (fp32) of ``x [..., C]`` exactly as ``forward`` computes it at inference, when the
        rule is one ``event_kernel.adaptive_event_linear`` reproduces (``has_event_rule``); else None."""
        if not self.has_event_rule():
            return None
        mean_abs = _mean_abs(x.float())
        return self._simple_threshold(mean_abs) if self.resolution == 1 else self._fine_threshold(mean_abs)

    def _general(self, x32: Tensor, mean_abs: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        """Learned multiplier, finer counts, clipped STE and/or phase-in (the options of the class docstring)."""
        if self.resolution > 1 and self.step_scale is None:
            y, counts = self._fine_counts(x32, self._fine_threshold(mean_abs), training)
        else:
            y, counts = self._lsq(x32, mean_abs.clamp_(min=self.eps), training)
        if self.mix != 1.0:
            y = x32 + self.mix * (y - x32)
        return y, counts

    def _lsq(self, x32: Tensor, mean_abs: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        """``V_th = mean|x| * s`` with ``s`` the learned multiplier (or the fixed 1/k); LSQ gradient for ``s``."""
        if self.step_scale is None:
            scale = torch.full((1,), 1.0 / self.k, device=x32.device)
        else:
            scale = self.step_scale.float().clamp(min=self.min_scale)
            if self.scale_mode == "channel_mean":  # mean pinned at 1/k; autograd carries LSQ's gradient through it
                scale = scale * ((1.0 / self.k) / scale.mean())
        if training and self.track_zeros:
            self.soft_zeros = (self.soft_zero_fraction(x32, mean_abs * scale), x32.numel())
        if training:
            shared = x32.numel() // scale.numel()  # elements per multiplier: LSQ's N
            return _LearnedQuantize.apply(x32, mean_abs, scale, self.max_spikes, self.surrogate == "clipped",
                                          1.0 / math.sqrt(shared * self.max_spikes), self.resolution)
        threshold = mean_abs * scale
        if self.resolution > 1:
            return self._fine_counts(x32, threshold, False)
        counts = _spike_counts(x32, threshold, self.max_spikes)
        return counts * threshold, counts

    # Width of the smooth silent-set indicator, in thresholds: sigmoid((1/2 - |x| / V_th) / width).
    zero_width = 0.05

    @classmethod
    def soft_zero_fraction(cls, x32: Tensor, threshold: Tensor) -> Tensor:
        """Smooth fraction of ``x`` inside the silent set ``|x| < V_th / 2``, differentiable in ``V_th`` only: the
        gradient of a zero target reaches the thresholds, not the activations."""
        return torch.sigmoid((0.5 - x32.detach().abs() / threshold) / cls.zero_width).mean()

    def _fine_counts(self, x32: Tensor, threshold: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        """``resolution`` > 1: silent below ``V_th / 2``, counts of ``V_th / r`` above; straight-through gradient
        (zeroed where the count is clipped with ``surrogate="clipped"``)."""
        with torch.no_grad():
            step = threshold / self.resolution
            fine = torch.div(x32, step).round_()
            counts = fine.clamp(-self.max_spikes, self.max_spikes).masked_fill_(x32.abs() < threshold / 2, 0.0)
            quantized = counts * step
        if not training:
            return quantized, counts
        source = x32 * (fine.abs() <= self.max_spikes) if self.surrogate == "clipped" else x32
        return source + (quantized - source).detach(), counts

    def fires_like(self, other: SpikingNeuron) -> bool:
        # Learned multipliers differ per site; the rule of one site is not the rule of another.
        return (isinstance(other, AdaptiveNeuron) and self.step_scale is None and other.step_scale is None
                and (other.k, other.max_spikes, other.surrogate, other.mix, other.resolution)
                == (self.k, self.max_spikes, self.surrogate, self.mix, self.resolution))

    def extra_repr(self) -> str:
        extra = f", scale={self.scale_mode!r}" if self.scale_mode != "fixed" else ""
        extra += f", surrogate={self.surrogate!r}" if self.surrogate != "ste" else ""
        extra += f", resolution={self.resolution}" if self.resolution != 1 else ""
        return f"{super().extra_repr()}, k={self.k}{extra}"


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
        neuron = AdaptiveNeuron(fan_out, k=config.adaptive_k, max_spikes=config.max_spikes,
                                scale=config.adaptive_scale, channels=channels, surrogate=config.adaptive_surrogate,
                                resolution=config.adaptive_resolution)
        neuron.track_zeros = config.adaptive_zero_target is not None
        return neuron
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
    that can be event-driven (docs/design.md, "Event-driven decoding").

    With ``event_driven`` (``SpikeLMForCausalLM.set_event_decoding``) and in eval mode, the weight is stored
    input-major: the same ``[out, in]`` parameter with the same values, laid out as the transpose of a contiguous
    ``[in, out]`` tensor (``weight.t()`` is then contiguous), so the model holds one copy of its weights, not two.
    One-token calls without autograd on CPU then read only the synapses of inputs that fired:
    ``out[n] = sum over fired i of spikes[n, i] * W[:, i]``, rows of ``weight.t()`` (``event_kernel.event_linear``:
    each fired row read once for the whole batch). A decoding step reads every weight once from memory, so at sizes
    where the weights do not fit in cache the step time falls with the fraction of zero spikes.

    Every other call (training, prompts, autograd on, CUDA, a weight that is not input-major because something
    replaced it) takes ``nn.Linear``'s dense product on the same parameter: results equal the dense path up to float
    summation order. ``train(True)`` restores the standard contiguous layout, ``train(False)`` re-applies the
    event layout, and ``state_dict`` always gives contiguous ``[out, in]`` tensors, so saved files do not change.
    """

    event_driven = False

    def set_event_driven(self, enabled: bool) -> None:
        """Switch event-driven calls on or off and lay the weight out to match (input-major only in eval mode)."""
        self.event_driven = enabled
        self._lay_out(enabled and not self.training)

    def is_input_major(self) -> bool:
        """Whether ``weight.t()`` is contiguous (and the weight is not, so that the layout is unambiguous)."""
        weight = self.weight
        return (isinstance(weight, Tensor) and weight.dim() == 2 and weight.stride() == (1, weight.shape[0])
                and weight.shape[0] > 1)

    @torch.no_grad()
    def _lay_out(self, input_major: bool) -> None:
        weight = self.weight
        if not isinstance(weight, nn.Parameter) or weight.device.type == "meta" or input_major == self.is_input_major():
            return
        with torch.inference_mode(False):  # also from inside inference_mode (auto mode decides on a first call)
            data = weight.detach()
            # ``.data =`` keeps the Parameter object (optimizers and wrappers hold it), replacing only its storage.
            weight.data = data.t().contiguous().t() if input_major else data.contiguous()

    def train(self, mode: bool = True) -> Synapses:
        super().train(mode)
        if self.event_driven:
            self._lay_out(not mode)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if not keep_vars and key in destination and not destination[key].is_contiguous():
            destination[key] = destination[key].contiguous()  # the standard layout: saved files do not change

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, in]`` -> ``[B, T, out]``."""
        if not self.takes_events(x):
            return super().forward(x)
        out = event_linear(x.reshape(1, -1, x.shape[-1]), [self.weight.t()])[0]
        out = out if self.bias is None else out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])

    def takes_events(self, x: Tensor) -> bool:
        """Whether a call on ``x`` goes the event-driven way: event-driven, a one-token call without autograd on
        CPU, and the weight still input-major."""
        return (self.event_driven and x.dim() == 3 and x.shape[1] == 1 and not torch.is_grad_enabled()
                and x.device.type == "cpu" and self.is_input_major())


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
        fused = event_sites(self.neuron, [self.linear], x.unsqueeze(0), mask)
        if fused is not None:
            return fused[0], None
        spikes, state = self.neuron(x, state, mask)
        return self.linear(spikes), state


def plain_event_synapses(linears: list[nn.Module]) -> bool:
    """Whether these synapses may run as one kernel call without their module calls: each an event-driven
    ``Synapses`` itself (no wrapper such as a LoRA layer, no bias, no hooks of its own), input-major on CPU, and no
    global module hooks."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    return all(type(linear) is Synapses and linear.event_driven and linear.bias is None
               and not linear._forward_hooks and not linear._forward_pre_hooks and linear.is_input_major()
               and linear.weight.device.type == "cpu" for linear in linears)


def event_sites(neuron: SpikingNeuron, linears: list[nn.Module], x: Tensor, mask: Tensor | None) -> list[Tensor] | None:
    """Sites that share one adaptive neuron rule, fired and summed in one kernel call (one-token inference calls):
    ``x [S, B, 1, C]`` (the S sites' inputs) -> S outputs ``[B, 1, out_s]``, or ``None`` when the call must go
    through the modules (autograd on, a mask, observers, hooks or wrappers, another rule, dense or non-CPU weights).

    The spikes are the neuron's bit for bit (``AdaptiveNeuron.event_threshold``, then the same fp32 rule in C++);
    the sums are the dense product's up to float summation order (docs/design.md, "Event-driven decoding").
    """
    if (mask is not None or x.shape[-2] != 1 or type(neuron) is not AdaptiveNeuron or neuron.observers
            or torch.is_grad_enabled() or x.device.type != "cpu" or neuron._forward_hooks
            or neuron._forward_pre_hooks or not plain_event_synapses(linears)):
        return None
    S, B, _, C = x.shape
    threshold = neuron.event_threshold(x.reshape(S * B, C))
    if threshold is None:
        return None
    outs = adaptive_event_linear(x.reshape(S, B, C), threshold.view(S, B), neuron.resolution, neuron.max_spikes,
                                 [linear.weight.t() for linear in linears])
    return [out.view(B, 1, out.shape[-1]) for out in outs]


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
