"""Activation sparsity, synaptic operations and energy of a spiking LM (see docs/design.md, "Sparsity and energy").

Python API::

    with SparsityMonitor(model) as monitor:
        model(input_ids, attention_mask=mask)
    report = monitor.report(energy="45nm-fp32")
    print(report.format_table())

The monitor appends one observer to every spike site (a ``SpikingNeuron``: ``site``, ``fan_out``, ``kind``,
``max_count``, ``observers``); each site calls it with its spike counts ``[B, T, C]`` and the token mask ``[B, T]``.
It only reads, so outputs are unchanged, and it removes its observers when the block ends (also on exceptions).

What is counted (``SparsityReport.counted`` / ``not_counted`` repeat this with every result):

- An *element* is one neuron at one real (non-pad) token. Its spike count ``c`` is an integer, ``|c| <= max_count``.
- A spiking projection pays one accumulate (AC) per unit of ``|c|`` per output of the projection that consumes the
  site (``fan_out``): ``synops = sum |c| * fan_out`` for the binary and ternary event trains. For the bitwise train
  each event (a set bit of ``|c|``) is one AC; its power-of-two weight is a shift and not counted.
- The dense twin (``neuron: none``) pays one multiply-accumulate (MAC) per element per output: ``elements * fan_out``,
  whatever zeros its activations hold. A model with ``neuron: none`` is costed that way too, so its ratio is 1.
- Firing rate of an encoding: events / (elements x S), S its virtual time steps (binary/ternary ``max_count``,
  bitwise ``ceil(log2(max_count + 1))``); events are counted from the histogram of ``|c|`` without expanding.
  Binary and ternary trains carry the same ``|c|`` events over the same S (binary puts the sign on the synapse,
  ternary on the event), so their rates and SynOps agree; they are both reported because hardware differs.

The ``spikelm sparsity`` subcommand lives in ``spikelm/commands/sparsity.py``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from types import TracebackType

import torch
from torch import nn

from spikelm.measure.energy import DEFAULT_ENERGY_TABLE, EnergyTable, format_energy, get_energy_table
from spikelm.model.neurons import ENCODINGS, time_steps

DENSE_KIND = "none"

COUNTED = [
    "inputs of every weight projection inside the blocks (the spike sites): one AC per unit of |spike count| per "
    "output of the consuming projection; the dense twin: one MAC per element per output",
    "bitwise event trains: one AC per set bit per output (the power-of-two bit weight is a shift, not counted)",
]
NOT_COUNTED = [
    "LayerNorm / GroupNorm",
    "decays, token shift and the WKV recurrence (elementwise state updates, no weight matrix)",
    "neuron dynamics (thresholds, membranes, gates) and the adaptive neuron's per-token threshold rescale "
    "(one multiply per output per token)",
    "activations and gating products (relu^2, sigmoid, silu)",
    "the embedding lookup",
    "the LM head, unless the model has a spike site in front of it (spike_lm_head)",
    "memory traffic (loads of weights and activations)",
]

_LAYER_SITE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def split_site_name(site: str) -> tuple[str, str]:
    """``"model.layers.3.time_mix.key"`` -> ``("layer.3", "time_mix.key")``; a site outside the blocks (``lm_head``)
    is its own group."""
    match = _LAYER_SITE.search(site)
    if match:
        return f"layer.{match.group(1)}", match.group(2)
    return site, site


def _is_spike_site(module: nn.Module) -> bool:
    # Duck-typed on the SpikingNeuron contract so that any module following it (and test doubles) is measured.
    return isinstance(getattr(module, "observers", None), list) and all(
        hasattr(module, name) for name in ("site", "fan_out", "kind", "max_count")
    )


def find_spike_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every spike site of ``model`` as ``(site name, module)``, in module order."""
    return [(getattr(module, "site", None) or path, module) for path, module in model.named_modules()
            if _is_spike_site(module)]


def add_to_histogram(histogram: torch.Tensor, bins: torch.Tensor, scatter: bool) -> None:
    """``histogram[k] += number of bins == k`` for ``bins`` (1-D ints in ``[0, len(histogram))``), in place.

    ``scatter=True`` uses an atomic scatter (``index_add_``), which never syncs the host: use it on CUDA, where
    ``bincount`` reads the maximum back to size its output. On CPU ``bincount`` is faster than the serial scatter.
    """
    if scatter:
        ones = torch.ones((), dtype=histogram.dtype, device=bins.device).expand(bins.numel())
        histogram.index_add_(0, bins, ones)
    else:
        histogram += torch.bincount(bins, minlength=histogram.numel())


class _SiteRecorder:
    """Running totals of one spike site, kept on the device of its counts so that recording never syncs the host.

    Spiking sites keep only a histogram of ``|c|`` with ``max_count + 2`` bins: ``|c| = 0 .. max_count`` and an
    overflow bin (a neuron that broke its ``max_count`` contract). Zeros, sums, events and the maximum all follow from
    it. Padded positions are zeroed before binning and their zeros taken back out of bin 0 (``pad_elements``).
    Dense sites (``neuron: none``) keep zeros, sum and maximum of ``|x|``.
    """

    def __init__(self, name: str, neuron: nn.Module, counts: torch.Tensor) -> None:
        self.name = name
        self.kind = str(neuron.kind)
        self.fan_out = int(neuron.fan_out)
        self.max_count = None if self.kind == DENSE_KIND or neuron.max_count is None else int(neuron.max_count)
        self.channels = counts.shape[-1]
        device = counts.device
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.pad_elements = torch.zeros((), dtype=torch.int64, device=device)
        self.zeros = torch.zeros((), dtype=torch.int64, device=device)
        self.sum_abs = torch.zeros((), dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
        self.max_abs = torch.zeros((), dtype=torch.float32, device=device)
        bins = 1 if self.max_count is None else self.max_count + 2
        self.histogram = torch.zeros(bins, dtype=torch.int64, device=device)

    def update(self, counts: torch.Tensor, mask: torch.Tensor | None) -> None:
        if counts.dim() != 3 or counts.shape[-1] != self.channels:
            raise ValueError(f"site {self.name}: counts must be [B, T, {self.channels}], got {tuple(counts.shape)}")
        batch, steps, _ = counts.shape
        if mask is not None:
            if mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] > steps:
                mask = mask[:, -steps:]  # decoding with a cache: the attention mask also covers the past tokens
            if mask.shape != (batch, steps):
                raise ValueError(f"site {self.name}: mask must be [B, T] = [{batch}, {steps}], got {tuple(mask.shape)}")
            mask = mask.to(device=counts.device, dtype=torch.bool)[:, :, None]  # [B, T, 1]
            real_tokens = mask.sum()
            self.tokens += real_tokens
            pad_elements = (batch * steps - real_tokens) * self.channels
        else:
            self.tokens += batch * steps
        # A fresh tensor, so the in-place steps below leave the model's counts alone. Each step is one cheap pass;
        # this runs at every site of every forward, so no bool or int64 temporaries of the full size.
        magnitude = counts.detach().abs()
        if mask is not None:
            magnitude.mul_(mask)  # pads -> 0: no sum, no maximum, and zeros that are taken back out below
        if self.max_count is None:  # dense twin: the values themselves
            elements = magnitude.numel()
            self.zeros += elements - torch.count_nonzero(magnitude) - (0 if mask is None else pad_elements)
            self.sum_abs += magnitude.sum(dtype=torch.float32).to(self.sum_abs.dtype)
            self.max_abs = torch.maximum(self.max_abs, magnitude.amax().float())
            return
        if mask is not None:
            self.pad_elements += pad_elements
        if magnitude.is_floating_point():
            magnitude.round_()  # integer-valued by contract; rounding absorbs float noise before the cast
        bins = magnitude.clamp_(max=self.max_count + 1).to(torch.int32).flatten()  # beyond max_count: overflow bin
        add_to_histogram(self.histogram, bins, scatter=bins.is_cuda)

    def raw(self) -> dict[str, object]:
        """The totals on the host (one sync per tensor; called by ``report``)."""
        tokens = int(self.tokens.item())
        if self.max_count is None:
            return {"tokens": tokens, "elements": tokens * self.channels, "zeros": int(self.zeros.item()),
                    "sum_abs": float(self.sum_abs.item()), "max_abs": float(self.max_abs.item()), "overflow": 0,
                    "histogram": None}
        counts = self.histogram.tolist()
        counts[0] -= int(self.pad_elements.item())
        histogram, overflow = counts[:-1], counts[-1]
        # overflowing elements enter sums as max_count + 1, so every figure of such a site is a lower bound
        levels = range(self.max_count + 2)
        seen = [level for level, n in zip(levels, counts, strict=True) if n]
        return {
            "tokens": tokens,
            "elements": tokens * self.channels,
            "zeros": histogram[0],
            "sum_abs": float(sum(level * n for level, n in zip(levels, counts, strict=True))),
            "max_abs": float(max(seen, default=0)),
            "overflow": overflow,
            "histogram": histogram,
        }

    def all_reduce(self) -> None:
        import torch.distributed as dist

        for total in (self.tokens, self.pad_elements, self.zeros, self.sum_abs, self.histogram):
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.max_abs, op=dist.ReduceOp.MAX)


@dataclass
class SpikeStats:
    """Figures of one site, one layer or the whole model, over the real (non-pad) tokens seen.

    ``elements`` = neurons x real tokens. Per-encoding dicts are keyed by ``binary`` / ``ternary`` / ``bitwise``.
    Firing rates are ``None`` for dense (``neuron: none``) sites, which have no event train.
    """

    name: str
    kind: str
    tokens: int
    elements: int
    zero_fraction: float | None
    mean_abs_count: float | None  # mean |spike count| per neuron per token
    max_abs_count: float
    events: dict[str, int]
    firing_rate: dict[str, float | None]  # events per neuron per virtual time step
    synops: dict[str, int]  # accumulates (ACs) the spiking projections perform
    model_macs: int  # MACs the model itself performs at these sites (dense sites only)
    dense_macs: int  # MACs of the dense twin for the same tokens: elements x fan_out
    energy_pj: dict[str, float]  # model_macs x E_MAC + synops x E_AC
    dense_energy_pj: float  # dense_macs x E_MAC
    energy_ratio: dict[str, float | None]  # energy_pj / dense_energy_pj (1 for neuron: none)
    fan_out: int | None = None  # sites only
    max_count: int | None = None  # sites only
    histogram: list[int] | None = None  # sites only: number of elements with |count| = 0, 1, ..., max_count
    layer: str | None = None
    site_type: str | None = None


@dataclass
class _Totals:
    """Additive totals from which every figure of a site or a group is derived."""

    tokens: int = 0
    elements: int = 0
    zeros: int = 0
    sum_abs: float = 0.0
    max_abs: float = 0.0
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENCODINGS, 0))
    slots: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENCODINGS, 0))  # elements x S
    synops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENCODINGS, 0))
    model_macs: int = 0
    dense_macs: int = 0

    def add(self, other: _Totals) -> None:
        self.tokens = max(self.tokens, other.tokens)  # every site of a group sees the same tokens
        for name in ("elements", "zeros", "sum_abs", "model_macs", "dense_macs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_abs = max(self.max_abs, other.max_abs)
        for encoding in ENCODINGS:
            self.events[encoding] += other.events[encoding]
            self.slots[encoding] += other.slots[encoding]
            self.synops[encoding] += other.synops[encoding]

    def stats(self, name: str, kind: str, table: EnergyTable, **site_fields: object) -> SpikeStats:
        def ratio(num: float, den: float) -> float | None:
            return num / den if den else None

        energy = {enc: self.model_macs * table.mac_pj + self.synops[enc] * table.ac_pj for enc in ENCODINGS}
        dense_energy = self.dense_macs * table.mac_pj
        return SpikeStats(
            name=name, kind=kind, tokens=self.tokens, elements=self.elements,
            zero_fraction=ratio(self.zeros, self.elements), mean_abs_count=ratio(self.sum_abs, self.elements),
            max_abs_count=self.max_abs, events=dict(self.events),
            firing_rate={enc: ratio(self.events[enc], self.slots[enc]) for enc in ENCODINGS},
            synops=dict(self.synops), model_macs=self.model_macs, dense_macs=self.dense_macs,
            energy_pj=energy, dense_energy_pj=dense_energy,
            energy_ratio={enc: ratio(energy[enc], dense_energy) for enc in ENCODINGS}, **site_fields,
        )


def _site_totals(recorder: _SiteRecorder, raw: dict) -> _Totals:
    totals = _Totals(tokens=raw["tokens"], elements=raw["elements"], zeros=raw["zeros"], sum_abs=raw["sum_abs"],
                     max_abs=raw["max_abs"])
    totals.dense_macs = raw["elements"] * recorder.fan_out
    if recorder.max_count is None:
        totals.model_macs = totals.dense_macs
        return totals
    histogram = raw["histogram"]
    for encoding in ENCODINGS:
        steps = time_steps(encoding, recorder.max_count)
        if encoding == "bitwise":
            events = sum(n * bin(level).count("1") for level, n in enumerate(histogram))
        else:  # one event per unit of |c|
            events = round(raw["sum_abs"])
        totals.events[encoding] = events
        totals.slots[encoding] = raw["elements"] * steps
        totals.synops[encoding] = events * recorder.fan_out
    return totals


@dataclass
class SparsityReport:
    """Per-site, per-layer and whole-model spike statistics with an energy estimate against the dense twin.

    ``encoding`` names the event train whose ACs the headline figures (``energy_ratio``, the table) use;
    ``uncounted_macs`` gives dense MACs that are left out of every total (the LM head without a spike site).
    """

    energy_table: EnergyTable
    encoding: str
    kinds: list[str]
    tokens: int
    sites: list[SpikeStats]
    layers: list[SpikeStats]
    total: SpikeStats
    counted: list[str]
    not_counted: list[str]
    uncounted_macs: dict[str, int]
    warnings: list[str]

    @property
    def energy_ratio(self) -> float | None:
        """Energy of this model / energy of its dense twin for the same tokens (1 for ``neuron: none``)."""
        return self.total.energy_ratio[self.encoding]

    def to_dict(self) -> dict:
        """Plain JSON-ready data."""
        data = asdict(self)
        data["energy_table"] = self.energy_table.to_dict()
        data["energy_ratio"] = self.energy_ratio
        return data

    def format_table(self, per_site: bool = False) -> str:
        """A readable table: one row per layer (and per site with ``per_site``), the totals, the energy table and
        the comparison with the dense twin."""
        enc = self.encoding
        header = (f"{'layer':<28} {'elements':>10} {'zero %':>7} {'mean|c|':>8} {'rate bin':>8} {'rate ter':>8} "
                  f"{'rate bit':>8} {'SynOps(AC)':>11} {'dense MAC':>10} {'energy':>10} {'ratio':>6}")

        def row(stats: SpikeStats, name: str) -> str:
            rates = [_fmt(stats.firing_rate[e], ".4f") for e in ENCODINGS]
            return (f"{name:<28} {_si(stats.elements):>10} {_fmt(stats.zero_fraction, '.2%'):>7} "
                    f"{_fmt(stats.mean_abs_count, '.4f'):>8} {rates[0]:>8} {rates[1]:>8} {rates[2]:>8} "
                    f"{_si(stats.synops[enc]):>11} {_si(stats.dense_macs):>10} "
                    f"{format_energy(stats.energy_pj[enc]):>10} "
                    f"{_fmt(stats.energy_ratio[enc], '.3f'):>6}")

        lines = [f"spike statistics over {self.tokens} tokens (neuron: {', '.join(self.kinds)}; "
                 f"SynOps and energy for the {enc} event train)", header, "-" * len(header)]
        for layer in self.layers:
            lines.append(row(layer, layer.name))
            if per_site:
                lines.extend(row(site, "  " + (site.site_type or site.name)) for site in self.sites
                             if site.layer == layer.name)
        lines += ["-" * len(header), row(self.total, "total"), ""]
        total = self.total
        lines.append(self.energy_table.describe())
        ratio = self.energy_ratio
        if ratio is None or ratio == 0 or abs(ratio - 1) < 1e-9:
            saving = ""
        else:
            saving = f" = {1 / ratio:.3g}x less" if ratio < 1 else f" = {ratio:.3g}x more"
        per_token = max(self.tokens, 1)
        lines.append(
            f"this model: {_si(total.synops[enc])} ACs + {_si(total.model_macs)} MACs = "
            f"{format_energy(total.energy_pj[enc])} ({format_energy(total.energy_pj[enc] / per_token)}/token)")
        lines.append(
            f"dense twin (neuron: none), same tokens: {_si(total.dense_macs)} MACs = "
            f"{format_energy(total.dense_energy_pj)} ({format_energy(total.dense_energy_pj / per_token)}/token)")
        lines.append(f"energy ratio (this model / dense twin): {_fmt(ratio, '.4f')}{saving}")
        lines.append("counted:")
        lines.extend(f"  - {item}" for item in self.counted)
        lines.append("not counted (in neither the model nor its dense twin):")
        lines.extend(f"  - {item}" for item in self.not_counted)
        for name, macs in self.uncounted_macs.items():
            lines.append(f"  - {name}, left out of the totals: {_si(macs)} MACs = "
                         f"{format_energy(macs * self.energy_table.mac_pj)}")
        lines.extend(f"warning: {message}" for message in self.warnings)
        return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _si(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:g}"


class SparsityMonitor:
    """Records spike statistics at every spike site of ``model`` while the ``with`` block runs.

    Recording is read-only (outputs stay bit-identical), accumulates on the device without host syncs, and
    excludes padded positions through the mask each site receives. Observers are removed when the block exits,
    also on an exception. Totals survive the block: call ``report()`` after it, ``reset()`` to start again.
    Under activation checkpointing a recomputed forward is recorded twice; measure in eval mode.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._sites = find_spike_sites(model)
        if not self._sites:
            raise ValueError(
                "model has no spike sites (modules with site, fan_out, kind, max_count and observers); "
                "pass a SpikeLM model (spikelm.model.modeling.SpikeLMForCausalLM)"
            )
        self._names = {id(module): name for name, module in self._sites}
        self._recorders: dict[int, _SiteRecorder] = {}
        self._attached = False

    @property
    def site_names(self) -> list[str]:
        return [name for name, _ in self._sites]

    def _observe(self, neuron: nn.Module, counts: torch.Tensor, mask: torch.Tensor | None) -> None:
        recorder = self._recorders.get(id(neuron))
        if recorder is None:
            recorder = _SiteRecorder(self._names.get(id(neuron), str(neuron.site)), neuron, counts)
            self._recorders[id(neuron)] = recorder
        recorder.update(counts, mask)

    def attach(self) -> SparsityMonitor:
        if not self._attached:
            for _, module in self._sites:
                module.observers.append(self._observe)
            self._attached = True
        return self

    def detach(self) -> None:
        for _, module in self._sites:
            # Bound methods are new objects on each access, so compare by equality (same monitor, same function).
            module.observers[:] = [fn for fn in module.observers if fn != self._observe]
        self._attached = False

    def __enter__(self) -> SparsityMonitor:
        return self.attach()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._recorders.clear()

    def all_reduce(self) -> None:
        """Sum the totals over the ranks of ``torch.distributed`` (every rank must have run every site)."""
        for _, module in self._sites:
            recorder = self._recorders.get(id(module))
            if recorder is None:
                raise ValueError(f"site {self._names[id(module)]} recorded nothing on this rank; run a batch first")
            recorder.all_reduce()

    def report(self, energy: str | EnergyTable = DEFAULT_ENERGY_TABLE, encoding: str = "binary") -> SparsityReport:
        """Per-site, per-layer and whole-model figures over everything recorded so far.

        Args:
            energy: an energy table name (``45nm-fp32``, ``45nm-fp16``, ``45nm-int8``), ``"mac=<pJ>,ac=<pJ>"`` or an
                ``EnergyTable``.
            encoding: the event train (``binary``, ``ternary``, ``bitwise``) whose ACs the headline energy uses; the
                figures of all three are in every ``SpikeStats`` anyway.
        """
        table = get_energy_table(energy)
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding={encoding!r} is not one of {', '.join(map(repr, ENCODINGS))}")
        if not self._recorders:
            raise ValueError("the monitor recorded nothing: run the model inside `with SparsityMonitor(model):`")
        sites, problems = [], []
        layer_totals: dict[str, _Totals] = {}
        layer_kinds: dict[str, set[str]] = {}
        total = _Totals()
        for name, module in self._sites:
            recorder = self._recorders.get(id(module))
            if recorder is None:
                continue  # a site the forward pass did not reach (e.g. an unused branch)
            raw = recorder.raw()
            if raw["overflow"]:
                problems.append(f"site {name}: {raw['overflow']} elements had |count| > max_count="
                                f"{recorder.max_count}, counted as max_count + 1: its figures are lower bounds")
            totals = _site_totals(recorder, raw)
            layer, site_type = split_site_name(name)
            sites.append(totals.stats(name, recorder.kind, table, fan_out=recorder.fan_out,
                                      max_count=recorder.max_count, histogram=raw["histogram"], layer=layer,
                                      site_type=site_type))
            layer_totals.setdefault(layer, _Totals()).add(totals)
            layer_kinds.setdefault(layer, set()).add(recorder.kind)
            total.add(totals)
        kinds = sorted({site.kind for site in sites})
        layers = [totals.stats(layer, "/".join(sorted(layer_kinds[layer])), table)
                  for layer, totals in sorted(layer_totals.items(), key=lambda item: _layer_order(item[0]))]
        for message in problems:
            warnings.warn(message, stacklevel=2)
        return SparsityReport(
            energy_table=table, encoding=encoding, kinds=kinds, tokens=total.tokens, sites=sites, layers=layers,
            total=total.stats("total", "/".join(kinds), table), counted=list(COUNTED), not_counted=list(NOT_COUNTED),
            uncounted_macs=self._uncounted_macs(sites, total.tokens), warnings=problems,
        )

    def _uncounted_macs(self, sites: list[SpikeStats], tokens: int) -> dict[str, int]:
        """Dense MACs of the LM head when no spike site feeds it: the same in the model and its twin."""
        if any("lm_head" in site.name for site in sites):
            return {}
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return {}
        return {"lm_head": tokens * weight.shape[0] * weight.shape[1]}


def _layer_order(name: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"layer\.(\d+)", name)
    return (0, int(match.group(1)), "") if match else (1, 0, name)


__all__ = [
    "SparsityMonitor", "SparsityReport", "SpikeStats", "find_spike_sites", "split_site_name", "add_to_histogram",
]
