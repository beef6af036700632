"""Event-driven decoding on/off/"auto" for a ``SpikeLMForCausalLM`` (docs/design.md, "Event-driven decoding").

The synapses themselves live in ``neurons.Synapses``; this module decides which of them are event-driven:

- ``True``: every spiking site's ``Synapses`` (also inside a wrapper such as a peft LoRA layer) is event-driven and,
  in eval mode, stores its weight input-major. Refused for a model in training mode (one line).
- ``False``: dense synapses, standard layout.
- ``"auto"`` (the default): decided at the first one-token inference call. Dense on CUDA (never measured faster
  there), for a model without spiking sites, and for models whose spiking weights fit in this CPU's last-level
  cache (``SMALL_BYTES``, where a dense product from cache beats the gather). Otherwise a short calibration on the
  model itself (a few one-token steps in each layout, interleaved, median) picks the faster one; the choice is
  cached per process and on disk (``$SPIKELM_CACHE/event_decoding.json``, default ``~/.cache/spikelm``), keyed by the
  model's shape and neuron settings, the dtype, the CPU model, the torch version and its thread count.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from spikelm.model import event_kernel
from spikelm.model.neurons import AdaptiveNeuron, SpikingLinear, Synapses, plain_event_synapses
from spikelm.model.time_mix import RWKV6TimeMix

MODES = (True, False, "auto")
# Spiking weights below this many bytes stay dense under "auto" without calibrating: they sit in cache, where a
# dense matrix-vector product is cheaper than a gather (the tiny preset: ~0.3 MB).
SMALL_BYTES = 16 * 2**20
CALIBRATION_STEPS = 3  # one-token steps per timing
CALIBRATION_REPEATS = 5  # interleaved timings per layout (median)
CACHE_FILE = "event_decoding.json"

_decisions: dict[str, bool] = {}  # this process's choices by key


def check_mode(mode: Any) -> bool | str:
    """``mode`` if it is ``True``, ``False`` or ``"auto"`` (``"on"``/``"off"`` are read as True/False), else
    ``ValueError``."""
    if mode is True or mode is False or mode == "auto":
        return mode
    if mode in ("on", "off"):
        return mode == "on"
    raise ValueError(f"event_decoding must be True, False or 'auto', got {mode!r}")


def event_synapses(model: nn.Module) -> list[Synapses]:
    """The ``Synapses`` of every spiking site (dense-twin sites excluded), also inside wrappers (LoRA layers)."""
    found = []
    for site in model.modules():
        if isinstance(site, SpikingLinear) and site.neuron.kind != "none":
            found.extend(m for m in site.linear.modules() if isinstance(m, Synapses))
    return found


def apply(model: nn.Module, enabled: bool) -> None:
    """Make the spiking sites' synapses event-driven (input-major in eval mode) or dense (standard layout)."""
    if enabled and model.training:
        raise ValueError("event-driven decoding is for inference: call model.eval() first (training keeps the dense "
                         "layout)")
    for synapses in event_synapses(model):
        synapses.set_event_driven(enabled)


def decision_key(model: nn.Module) -> str:
    """What the "auto" choice depends on: the model's shape and neuron settings, dtype, CPU, torch and threads."""
    config = model.config
    fields = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "head_size", "decay_lora_rank",
              "time_mix", "neuron", "adaptive_k", "adaptive_resolution", "max_spikes", "spike_lm_head")
    shape = ",".join(f"{name}={getattr(config, name, None)}" for name in fields)
    return (f"{shape}|dtype={model.dtype}|cpu={cpu_name()}|torch={torch.__version__}"
            f"|threads={torch.get_num_threads()}")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    return Path(os.environ.get("SPIKELM_CACHE", Path.home() / ".cache" / "spikelm")) / CACHE_FILE


def _read_disk() -> dict[str, bool]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, bool)} if isinstance(data, dict) else {}


def _write_disk(key: str, value: bool) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_disk()
        data[key] = value
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only home: the choice is still cached for this process


def spiking_weight_bytes(model: nn.Module) -> int:
    return sum(s.weight.numel() * s.weight.element_size() for s in event_synapses(model))


def fits_in_cache(model: nn.Module) -> bool:
    """Whether the model's spiking weights are under ``SMALL_BYTES``: dense under "auto", and its prompts keep the
    torch ops rather than wait for the C++ extension's first build."""
    return spiking_weight_bytes(model) < SMALL_BYTES


def decide(model: nn.Module) -> bool:
    """The "auto" choice for ``model`` as it is now (eval mode, called from a one-token inference call)."""
    synapses = event_synapses(model)
    if not synapses or any(s.weight.device.type != "cpu" for s in synapses):
        return False
    if fits_in_cache(model):
        return False
    key = decision_key(model)
    if key not in _decisions:
        disk = _read_disk()
        if key in disk:
            _decisions[key] = disk[key]
        else:
            _decisions[key] = calibrate(model)
            _write_disk(key, _decisions[key])
    return _decisions[key]


@torch.inference_mode()
def calibrate(model: nn.Module) -> bool:
    """Time a few one-token steps dense and event-driven on ``model`` (interleaved, median); True if events win.

    The steps start from a short prompt's state; the model's own spikes decide, whatever its zero fraction.
    """
    vocab = model.config.vocab_size
    prompt = (torch.arange(8, device=model.device) * 7919 % vocab).view(1, -1)
    cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
    token = prompt[:, -1:]

    def steps() -> float:
        layers, seen = list(cache.layers), cache.seen_tokens
        start = time.perf_counter()
        for _ in range(CALIBRATION_STEPS):
            model(token, past_key_values=cache, use_cache=True)
        cache.layers, cache.seen_tokens = layers, seen  # each call replaces the per-layer states: restore them
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    apply(model, True)  # input-major once; the dense product on that layout is as fast as on the standard one
    synapses = event_synapses(model)
    for round_ in range(CALIBRATION_REPEATS + 1):  # the first round warms up
        for enabled in (False, True):
            for s in synapses:
                s.event_driven = enabled
            seconds = steps()
            if round_:
                times[enabled].append(seconds)
    return statistics.median(times[True]) < statistics.median(times[False])


def _rule(neuron: nn.Module) -> tuple[float, int, int] | None:
    """``(k, resolution, max_spikes)`` of an adaptive neuron whose inference rule the kernel reproduces, with no
    observers; else None."""
    if type(neuron) is not AdaptiveNeuron or neuron.observers or not neuron.has_event_rule():
        return None
    return neuron.k, neuron.resolution, neuron.max_spikes


def _group_rule(sites: list[nn.Module]) -> tuple[float, int, int] | None:
    rules = {_rule(site.neuron) for site in sites}
    return rules.pop() if len(rules) == 1 and None not in rules else None


class _BlockPlan:
    """What ``rwkv6_block_step`` reads from a block besides its input and state, found eligible once, and the
    modules, neurons and synapses whose Python-side settings its fingerprint covers."""

    __slots__ = ("fingerprint", "modules", "neurons", "synapses", "norms", "params", "scalars", "ints")


def _fingerprint(block: nn.Module, plan: _BlockPlan) -> tuple:
    """Everything the eligibility checks read that can change without a new plan being asked for, in cheap reads:
    hook registrations anywhere (``RemovableHandle.next_id`` counts them), the block's submodules and parameter
    objects (a module or parameter replaced, e.g. by a LoRA wrapper), the neurons' rule settings and observers, the
    synapses' event switch, the norms' eps and the scan backend. Tensor layouts, dtypes and devices are checked by
    the kernel itself on every call."""
    parts: list[Any] = [RemovableHandle.next_id, block.time_mix.backend]
    for module in plan.modules:
        parts.extend(map(id, module._modules.values()))
        parts.extend(map(id, module._parameters.values()))
    for neuron in plan.neurons:
        parts.extend((neuron.k, neuron.resolution, neuron.max_spikes, neuron.mix, neuron.surrogate,
                      len(neuron.observers)))
    parts.extend(synapses.event_driven for synapses in plan.synapses)
    parts.extend(norm.eps for norm in plan.norms)
    return tuple(parts)


def _plan(block: nn.Module) -> _BlockPlan | None:
    """The block's plan when its modules qualify for ``rwkv6_block_step`` (see ``block_step``), else None."""
    time_mix, channel_mix = block.time_mix, block.channel_mix
    if type(time_mix) is not RWKV6TimeMix or time_mix.backend is not None:
        return None
    tm_sites = [getattr(time_mix, name) for name in RWKV6TimeMix.MIXES]
    cm_sites = [channel_mix.key, channel_mix.receptance]
    groups = [tm_sites, [time_mix.output], cm_sites, [channel_mix.value]]
    rules = [_group_rule(group) for group in groups]
    linears = [site.linear for group in groups for site in group]
    decay_up, ln1, ln2, group_norm = time_mix.decay_up, block.ln1, block.ln2, time_mix.group_norm
    if (None in rules or not plain_event_synapses(linears)
            or type(decay_up) is not nn.Linear or decay_up.bias is not None or type(ln1) is not nn.LayerNorm
            or type(ln2) is not nn.LayerNorm or type(group_norm) is not nn.GroupNorm or ln1.weight is None
            or ln2.weight is None or group_norm.weight is None):
        return None
    modules = list(block.modules())
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return None
    plan = _BlockPlan()
    plan.modules, plan.synapses, plan.norms = modules, linears, [ln1, group_norm, ln2]
    plan.neurons = [site.neuron for group in groups for site in group]
    weights = [linear.weight for linear in linears]
    plan.params = [ln1.weight, ln1.bias, time_mix.shift_mix, time_mix.time_decay, time_mix.bonus, *weights[:5],
                   decay_up.weight, group_norm.weight, group_norm.bias, weights[5], ln2.weight, ln2.bias,
                   channel_mix.shift_mix, *weights[6:]]
    plan.scalars = [ln1.eps, group_norm.eps, ln2.eps, *(rule[0] for rule in rules), AdaptiveNeuron.eps]
    plan.ints = [*(rule[1] for rule in rules), *(rule[2] for rule in rules)]
    plan.fingerprint = _fingerprint(block, plan)
    return plan


def block_step(block: nn.Module, x: Tensor, state: dict[str, Any] | None, mask: Tensor | None,
               use_cache: bool) -> tuple[Tensor, dict[str, Any]] | None:
    """One token of an RWKV-6 ``SpikeLMBlock`` in one C++ call (``event_kernel``'s ``rwkv6_block_step``: the same
    operations as the modules' one-token path, the spike sites through the event kernel), or ``None`` when the
    call must go through the modules: autograd on, a mask, not fp32 on CPU, no state yet, a forced scan backend, a
    hook anywhere in the block, observers, wrapped or dense synapses, or a neuron rule the kernel does not have.

    The module checks run once and are kept as the block's plan (its arguments), reused while a fingerprint of
    what they read is unchanged (``_fingerprint``); an ineligible block is checked again at its next token."""
    if (not use_cache or mask is not None or state is None or x.shape[1] != 1 or torch.is_grad_enabled()
            or x.dtype != torch.float32 or x.device.type != "cpu"):
        return None
    if not getattr(getattr(block.channel_mix.value, "linear", None), "event_driven", False):
        return None  # the usual case of a dense model, decided first
    tm_state, cm_state = state.get("time_mix"), state.get("channel_mix")
    if not tm_state or not cm_state or set(tm_state) != {"shift", "wkv"} or set(cm_state) != {"shift"}:
        return None
    plan = block.__dict__.get("_event_plan")
    if plan is None or plan.fingerprint != _fingerprint(block, plan):
        plan = block.__dict__["_event_plan"] = _plan(block)
        if plan is None:
            return None
    module = event_kernel.extension()  # built on first use: only once the block qualifies
    if module is None:
        return None
    B, _, C = x.shape
    stepped = module.rwkv6_block_step(x.reshape(B, C), tm_state["shift"], tm_state["wkv"], cm_state["shift"],
                                      plan.params, plan.scalars, plan.ints)
    if not stepped:  # a weight no longer input-major, or a tensor not float32 on CPU
        return None
    y, tm_shift, wkv, cm_shift = stepped
    return y.view(B, 1, C), {"time_mix": {"shift": tm_shift, "wkv": wkv}, "channel_mix": {"shift": cm_shift}}


__all__ = ["MODES", "check_mode", "event_synapses", "apply", "decide", "calibrate", "decision_key", "cache_path",
           "block_step"]
