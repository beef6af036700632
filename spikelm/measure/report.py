"""The figures of a sparsity measurement: per site, per layer and for the whole model, with the energy estimate
(docs/design.md, "Sparsity and energy").

``SparsityMonitor`` (``sparsity.py``) records; ``SparsityReport`` here turns the totals into figures and a table.
What is counted is stated in ``sparsity.py`` and repeated with every report (``counted`` / ``not_counted``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from spikelm.measure.energy import EnergyTable, format_energy
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
class Totals:
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

    def add(self, other: Totals) -> None:
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


def site_totals(fan_out: int, max_count: int | None, raw: dict) -> Totals:
    """The additive totals of one site from its recorder's ``raw()`` figures (``max_count=None``: a dense site)."""
    totals = Totals(tokens=raw["tokens"], elements=raw["elements"], zeros=raw["zeros"], sum_abs=raw["sum_abs"],
                     max_abs=raw["max_abs"])
    totals.dense_macs = raw["elements"] * fan_out
    if max_count is None:
        totals.model_macs = totals.dense_macs
        return totals
    histogram = raw["histogram"]
    for encoding in ENCODINGS:
        steps = time_steps(encoding, max_count)
        if encoding == "bitwise":
            events = sum(n * bin(level).count("1") for level, n in enumerate(histogram))
        else:  # one event per unit of |c|
            events = round(raw["sum_abs"])
        totals.events[encoding] = events
        totals.slots[encoding] = raw["elements"] * steps
        totals.synops[encoding] = events * fan_out
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




def layer_order(name: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"layer\.(\d+)", name)
    return (0, int(match.group(1)), "") if match else (1, 0, name)


__all__ = ["SparsityReport", "SpikeStats", "Totals", "site_totals", "split_site_name", "layer_order", "COUNTED",
           "NOT_COUNTED", "DENSE_KIND"]
