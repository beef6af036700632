"""Activation sparsity, synaptic operations and energy of a spiking LM (docs/design.md, "Sparsity and energy"): the
monitor that records them at every spike site; the figures and the table are in ``report.py``.

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

import warnings
from types import TracebackType

import torch
from torch import nn

from spikelm.measure.energy import DEFAULT_ENERGY_TABLE, EnergyTable, get_energy_table
from spikelm.measure.report import (
    COUNTED,
    DENSE_KIND,
    NOT_COUNTED,
    SparsityReport,
    SpikeStats,
    Totals,
    layer_order,
    site_totals,
    split_site_name,
)
from spikelm.model.neurons import ENCODINGS


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
        layer_totals: dict[str, Totals] = {}
        layer_kinds: dict[str, set[str]] = {}
        total = Totals()
        for name, module in self._sites:
            recorder = self._recorders.get(id(module))
            if recorder is None:
                continue  # a site the forward pass did not reach (e.g. an unused branch)
            raw = recorder.raw()
            if raw["overflow"]:
                problems.append(f"site {name}: {raw['overflow']} elements had |count| > max_count="
                                f"{recorder.max_count}, counted as max_count + 1: its figures are lower bounds")
            totals = site_totals(recorder.fan_out, recorder.max_count, raw)
            layer, site_type = split_site_name(name)
            sites.append(totals.stats(name, recorder.kind, table, fan_out=recorder.fan_out,
                                      max_count=recorder.max_count, histogram=raw["histogram"], layer=layer,
                                      site_type=site_type))
            layer_totals.setdefault(layer, Totals()).add(totals)
            layer_kinds.setdefault(layer, set()).add(recorder.kind)
            total.add(totals)
        kinds = sorted({site.kind for site in sites})
        layers = [totals.stats(layer, "/".join(sorted(layer_kinds[layer])), table)
                  for layer, totals in sorted(layer_totals.items(), key=lambda item: layer_order(item[0]))]
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


__all__ = ["SparsityMonitor", "find_spike_sites", "add_to_histogram"]
