"""TimeMix: the token-mixing half of a block (docs/design.md, "TimeMix"), ``rwkv6`` or ``rwkv4``.

Both modules take ``x [B, T, C]`` (already layer-normed), an optional per-module recurrent state (a dict) and a
``mask [B, T]`` (True = real token), and return ``(out [B, T, C], new_state)``. The same code serves the parallel
(whole sequence) and the recurrent (token by token, carrying state) form: only the scan's initial state and the
token-shift vector differ.

Padding: the input is zeroed at pads (after the norm: LayerNorm of a zero vector is its bias), and each scan gets
inputs that leave a zero state at zero (rwkv6: k = 0 and log-decay w = 0; rwkv4: k = -1e30), so left pads never
reach a state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from spikelm.kernels import rwkv4_scan, rwkv6_scan
from spikelm.model.config import SpikeLMConfig
from spikelm.model.event_kernel import event_linear, wkv6_sequence
from spikelm.model.neurons import (
    SpikingLinear,
    SpikingNeuron,
    cast,
    event_sites,
    kernel_backend,
    mask_tokens,
    plain_event_synapses,
)

State = dict[str, Any]


def token_shift(x: Tensor, previous: Tensor | None) -> Tensor:
    """``x_{t-1}`` for every t: ``[B, T, C]``, with ``previous [B, C]`` (the cache) or zeros before the first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if previous is None else cast(previous.unsqueeze(1), x.dtype)
    return first if x.shape[1] == 1 else torch.cat([first, x[:, :-1]], dim=1)


def channel_ramp(channels: int, device: torch.device | None = None) -> Tensor:
    """``i / C`` for each channel: RWKV's per-channel spread of shift mixes and decays."""
    return torch.arange(channels, dtype=torch.float32, device=device) / channels


def wkv6_step(r: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, bonus: Tensor,
              state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of ``rwkv6_scan`` (the same math as its naive loop, without the loop): r, k, v, log_decay
    ``[B, H, K]``, bonus ``[H, K]``, state ``[B, H, K, V]`` fp32 -> ``(o [B, H, V] fp32, new state)``."""
    B, H, K = r.shape
    kv = k.float().unsqueeze(-1) * v.float().unsqueeze(-2)  # (B, H, K, V)
    # r^T (S + u k v^T) per head as one batched [1, K] x [K, V] product (fewer ops than a 4-D matmul).
    out = torch.bmm(r.float().reshape(B * H, 1, K), torch.addcmul(state, bonus.unsqueeze(-1), kv).view(B * H, K, -1))
    return out.view(B, H, -1), torch.addcmul(kv, log_decay.float().exp().unsqueeze(-1), state)


class _SpikingMix(nn.Module):
    """Shared plumbing: spike sites whose (possibly stateful) neurons keep their state under their own name."""

    backend: str | None = None

    def _decoding_step_on_cpu(self, x: Tensor) -> bool:
        # The one-token path of the recurrence. One token on CPU with the automatic backend (a generation step): the
        # recurrence is the whole computation, and a handful of torch ops beat the chunked torch path (which pads the
        # token to a full chunk) 5-10x. On CUDA the kernel dispatcher already picks its fused-recurrent Triton kernel
        # for short inputs.
        return self.backend is None and x.shape[1] == 1 and not x.is_cuda

    def _recurrence_in_cpp(self, x: Tensor, *inputs: Tensor | None) -> bool:
        """Whether the recurrence may run in the C++ inference kernel: the automatic backend, CPU, and no autograd
        through any of ``inputs`` (so training and gradient checks keep the differentiable torch scan)."""
        return (self.backend is None and not x.is_cuda
                and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)))

    def _mixed_inputs(self, x: Tensor, previous: Tensor | None) -> Tensor:
        """Each row of ``shift_mix`` blends x_t with x_{t-1} (``token_shift``, ``previous [B, C]`` before the first
        token): ``[S, B, T, C]``."""
        mix = cast(self.shift_mix, x.dtype)
        return torch.addcmul(x, token_shift(x, previous) - x, mix.view(mix.shape[0], 1, 1, mix.shape[1]))

    def _scan_backend(self, x: Tensor) -> str | None:
        return "naive" if self._decoding_step_on_cpu(x) else self.backend

    def _sites(self, names: tuple[str, ...], stacked: Tensor, state: State | None, new_state: State,
               mask: Tensor | None) -> list[Tensor]:
        """Spike sites ``names`` on their stacked inputs ``[S, B, T, C]`` -> S outputs ``[B, T, out]``.

        When the sites' neurons are stateless, fire alike and nobody observes them, one neuron call on the whole
        stack replaces S calls (identical results: the rule is per token); decoding is dominated by such small ops.
        """
        sites = [getattr(self, name) for name in names]
        neurons = [site.neuron for site in sites]  # once: each submodule lookup is a slow nn.Module.__getattr__
        if _fire_together(neurons):
            S, B, T, C = stacked.shape
            stacked_mask = None if mask is None else mask.repeat(S, 1)
            linears = [site.linear for site in sites]
            fused = event_sites(neurons[0], linears, stacked, mask)  # one-token inference: one kernel call
            if fused is not None:
                return fused
            spikes, _ = neurons[0](stacked.reshape(S * B, T, C), None, stacked_mask)
            if T == 1 and plain_event_synapses(linears) and all(linear.takes_events(spikes) for linear in linears):
                # One kernel call for the whole stack (docs/design.md, "Event-driven decoding").
                outs = event_linear(spikes.view(S, B, C), [linear.weight.t() for linear in linears])
                return [out.view(B, 1, out.shape[-1]) for out in outs]
            # unbind: S views in one op (S indexing ops cost S dispatches, a visible share of a decoding step)
            return [linear(s) for linear, s in zip(linears, spikes.view(S, B, T, C).unbind(0), strict=True)]
        return [self._site(name, x, state, new_state, mask) for name, x in zip(names, stacked.unbind(0), strict=True)]

    def _site(self, name: str, x: Tensor, state: State | None, new_state: State, mask: Tensor | None) -> Tensor:
        out, neuron_state = getattr(self, name)(x, None if state is None else state.get(name), mask)
        if neuron_state is not None:
            new_state[name] = neuron_state
        return out


def _fire_together(neurons: list[SpikingNeuron]) -> bool:
    """Whether one call of the first neuron on the sites' stacked inputs gives exactly what each site's own call
    gives."""
    first = neurons[0]
    return all(first.fires_like(neuron) and not neuron.observers for neuron in neurons)


class RWKV6TimeMix(_SpikingMix):
    """RWKV-6 ("Finch") time mix with spiking inputs to every projection.

    Token shift with a learned per-channel mix for each of r, k, v, g and the decay input; spike sites
    ``receptance``, ``key``, ``value``, ``gate``, ``decay`` (the low-rank decay projection's input) and ``output``.
    Log-decay ``w_t = -exp(w0 + tanh(s(x_w) A) B)`` in fp32; WKV per head of size K; per-head GroupNorm;
    ``* silu(g)``. State: ``shift [B, C]``, ``wkv [B, H, K, K]`` fp32, and stateful neurons' states.
    """

    MIXES = ("receptance", "key", "value", "gate", "decay")

    def __init__(self, config: SpikeLMConfig, layer_id: int) -> None:
        super().__init__()
        self.config, self.layer_id = config, layer_id
        C, H, K = config.hidden_size, config.num_heads, config.head_size
        self.num_heads, self.head_size = H, K
        self.backend = kernel_backend(config)
        # Fraction of x_{t-1} mixed into each projection's input, one row per entry of MIXES.
        self.shift_mix = nn.Parameter(torch.zeros(len(self.MIXES), C))
        self.time_decay = nn.Parameter(torch.zeros(C))  # w0: log of the negated log-decay, fp32
        self.bonus = nn.Parameter(torch.zeros(H, K))  # u: weight of the current token instead of a decay
        out_std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        self.receptance = SpikingLinear(config, C, C)
        self.key = SpikingLinear(config, C, C)
        self.value = SpikingLinear(config, C, C)
        self.gate = SpikingLinear(config, C, C)
        self.decay = SpikingLinear(config, C, config.decay_lora_rank)
        self.decay_up = nn.Linear(config.decay_lora_rank, C, bias=False)
        self.decay_up.init_std = config.initializer_range
        # RWKV-6's ln_x: eps scaled by head_size_divisor**2 = 64 as in the reference implementation.
        self.group_norm = nn.GroupNorm(H, C, eps=config.layer_norm_epsilon * 64)
        self.output = SpikingLinear(config, C, C, init_std=out_std)

    @torch.no_grad()
    def init_recurrence_(self) -> None:
        """RWKV-6's init: shift mixes ramp across channels and layers, decays spread from slow to fast."""
        L, C = self.config.num_hidden_layers, self.config.hidden_size
        ratio_0_to_1 = self.layer_id / max(L - 1, 1)
        ratio_1_to_0 = 1.0 - self.layer_id / L
        ramp = channel_ramp(C, self.shift_mix.device)
        keep = torch.stack([
            ramp.pow(0.5 * ratio_1_to_0),  # receptance
            ramp.pow(ratio_1_to_0),  # key
            ramp.pow(ratio_1_to_0) + 0.3 * ratio_0_to_1,  # value
            ramp.pow(0.5 * ratio_1_to_0),  # gate
            ramp.pow(ratio_1_to_0),  # decay
        ])
        init.copy_(self.shift_mix, (1.0 - keep).clamp(0.0, 1.0))
        n = torch.arange(C, dtype=torch.float32, device=self.time_decay.device) / max(C - 1, 1)
        init.copy_(self.time_decay, -6.0 + 5.0 * n.pow(0.7 + 1.3 * ratio_0_to_1))
        zigzag = ((torch.arange(C, device=n.device) + 1) % 3 - 1).float() * 0.1
        init.copy_(self.bonus, (ratio_0_to_1 * (1.0 - n) + zigzag).view_as(self.bonus))

    def _log_decay(self, decay_lora: Tensor) -> Tensor:
        """``w = -exp(w0 + lora)`` in fp32 from the decay LoRA's output."""
        return -torch.exp(self.time_decay.float() + decay_lora.float())

    def forward(self, x: Tensor, state: State | None = None, mask: Tensor | None = None,
                use_cache: bool = False) -> tuple[Tensor, State | None]:
        """``x [B, T, C]`` -> ``(out [B, T, C], new_state or None)``."""
        B, T, C = x.shape
        H, K = self.num_heads, self.head_size
        new_state: State = {}
        x = mask_tokens(x, mask)
        mixed = self._mixed_inputs(x, None if state is None else state.get("shift"))  # (5, B, T, C)
        r, k, v, g, decay_in = self._sites(self.MIXES, mixed, state, new_state, mask)
        log_decay = self._log_decay(self.decay_up(torch.tanh(decay_in)))  # (B, T, C), fp32, <= 0
        if mask is not None:
            # A pad must leave the state untouched: no key written (k = 0), no decay (exp(0) = 1).
            k = mask_tokens(k, mask)
            log_decay = mask_tokens(log_decay, mask)
        previous = None if state is None else state.get("wkv")
        rkvw = (r.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, K), log_decay.view(B, T, H, K))
        # On CPU without autograd (prompts and one-token steps): the recurrence token by token in C++, the state in
        # cache; much faster there than the chunked torch scan, and the block kernel's own step. None without the
        # extension.
        sequence = (wkv6_sequence(*rkvw, self.bonus, previous)
                    if self._recurrence_in_cpp(x, *rkvw, self.bonus, previous) else None)
        if sequence is not None:
            wkv, wkv_state = sequence
        elif previous is not None and self._decoding_step_on_cpu(x):
            wkv, wkv_state = wkv6_step(*(t.view(B, H, -1) for t in rkvw), self.bonus.float(), previous)
            wkv = wkv.view(B, T, H, K)
        else:
            wkv, wkv_state = rwkv6_scan(*rkvw, self.bonus.float(), previous, output_final_state=use_cache,
                                        backend=self._scan_backend(x))  # (B, T, H, K)
        out = self.group_norm(cast(wkv.reshape(B * T, C), x.dtype)).view(B, T, C) * F.silu(g)
        out = self._site("output", out, state, new_state, mask)
        if not use_cache:
            return out, None
        new_state["shift"] = x[:, -1]
        new_state["wkv"] = wkv_state
        return out, new_state


class RWKV4TimeMix(_SpikingMix):
    """RWKV-4 / SpikeGPT time mix: per-channel vector WKV, sigmoid receptance, spiking inputs to every projection.

    Spike sites ``key``, ``value``, ``receptance`` and ``output``; decay ``-exp(time_decay)`` and bonus
    ``time_first`` (fp32); the scan keeps the numerically stable running-max form. State: ``shift [B, C]`` and
    ``wkv = (num, den, max)`` each ``[B, C]`` fp32, plus stateful neurons' states.
    """

    MIXES = ("key", "value", "receptance")
    # Log-weight of a pad's key: exp(-1e30 - max) is exactly 0, so a pad adds nothing to num/den.
    PAD_KEY = -1e30

    def __init__(self, config: SpikeLMConfig, layer_id: int) -> None:
        super().__init__()
        self.config, self.layer_id = config, layer_id
        C = config.hidden_size
        self.backend = kernel_backend(config)
        self.shift_mix = nn.Parameter(torch.zeros(len(self.MIXES), C))
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_first = nn.Parameter(torch.zeros(C))
        out_std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        self.key = SpikingLinear(config, C, C)
        self.value = SpikingLinear(config, C, C)
        self.receptance = SpikingLinear(config, C, C)
        self.output = SpikingLinear(config, C, C, init_std=out_std)

    @torch.no_grad()
    def init_recurrence_(self) -> None:
        """RWKV-4's init (as in transformers' RwkvSelfAttention): decays from slow to fast, zigzag bonus."""
        L, C = self.config.num_hidden_layers, self.config.hidden_size
        ratio_0_to_1 = self.layer_id / max(L - 1, 1)
        ratio_1_to_0 = 1.0 - self.layer_id / L
        ramp = channel_ramp(C, self.shift_mix.device)
        keep = torch.stack([ramp.pow(ratio_1_to_0), ramp.pow(ratio_1_to_0) + 0.3 * ratio_0_to_1,
                            ramp.pow(0.5 * ratio_1_to_0)])
        init.copy_(self.shift_mix, (1.0 - keep).clamp(0.0, 1.0))
        h = torch.arange(C, dtype=torch.float32, device=self.time_decay.device) / max(C - 1, 1)
        init.copy_(self.time_decay, -5.0 + 8.0 * h.pow(0.7 + 1.3 * ratio_0_to_1))
        zigzag = ((torch.arange(C, device=h.device) + 1) % 3 - 1).float() * 0.5
        init.copy_(self.time_first, math.log(0.3) + zigzag)

    def forward(self, x: Tensor, state: State | None = None, mask: Tensor | None = None,
                use_cache: bool = False) -> tuple[Tensor, State | None]:
        """``x [B, T, C]`` -> ``(out [B, T, C], new_state or None)``."""
        new_state: State = {}
        x = mask_tokens(x, mask)
        mixed = self._mixed_inputs(x, None if state is None else state.get("shift"))  # (3, B, T, C)
        k, v, r = self._sites(self.MIXES, mixed, state, new_state, mask)
        k, v, r = k.float(), v.float(), torch.sigmoid(r)
        if mask is not None:
            k = k.masked_fill(~mask.unsqueeze(-1), self.PAD_KEY)
        wkv, wkv_state = rwkv4_scan(-torch.exp(self.time_decay.float()), self.time_first.float(), k, v,
                                    None if state is None else state.get("wkv"), backend=self._scan_backend(x))
        out = self._site("output", r * cast(wkv, r.dtype), state, new_state, mask)
        if not use_cache:
            return out, None
        new_state["shift"] = x[:, -1]
        new_state["wkv"] = wkv_state
        return out, new_state


def build_time_mix(config: SpikeLMConfig, layer_id: int) -> RWKV6TimeMix | RWKV4TimeMix:
    """The TimeMix of ``config.time_mix`` for block ``layer_id``."""
    if config.time_mix == "rwkv6":
        return RWKV6TimeMix(config, layer_id)
    if config.time_mix == "rwkv4":
        return RWKV4TimeMix(config, layer_id)
    raise ValueError(f"SpikeLMConfig.time_mix={config.time_mix!r} is not one of 'rwkv6', 'rwkv4'")


__all__ = ["RWKV6TimeMix", "RWKV4TimeMix", "build_time_mix", "token_shift", "channel_ramp", "wkv6_step"]
