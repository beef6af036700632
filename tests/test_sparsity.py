"""Sparsity monitor, report, energy and the `spikelm sparsity` CLI.

Hand-count tests drive fake spike sites (modules that follow the SpikingNeuron contract and emit counts chosen
here) and recount every figure with plain Python loops; model tests run a tiny SpikeLM built from a config.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from spikelm.energy import ENERGY_TABLES, EnergyTable, get_energy_table
from spikelm.sparsity import SparsityMonitor, split_site_name, summarize_for_logging, time_steps

# ----------------------------------------------------------------------------------------------------------------
# Fake spike sites with counts chosen by the test


class FakeSite(nn.Module):
    """Follows the SpikingNeuron contract: reports ``counts`` to its observers and passes them on."""

    stateful = False

    def __init__(self, site: str, kind: str, fan_out: int, max_count: int | None) -> None:
        super().__init__()
        self.site, self.kind, self.fan_out, self.max_count = site, kind, fan_out, max_count
        self.observers: list = []

    def forward(self, counts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.observers:
            for observer in self.observers:
                observer(self, counts, mask)
        return counts


class FakeModel(nn.Module):
    """Two layers, each with one site; ``forward`` feeds them the given counts."""

    def __init__(self, kind: str, max_counts: tuple[int | None, int | None], fan_outs: tuple[int, int]) -> None:
        super().__init__()
        self.key = FakeSite("layers.0.time_mix.key", kind, fan_outs[0], max_counts[0])
        self.value = FakeSite("layers.1.channel_mix.value", kind, fan_outs[1], max_counts[1])

    def forward(self, counts0, counts1, mask=None):
        return self.key(counts0, mask).sum() + self.value(counts1, mask).sum()


# counts [B=2, T=3, C=4]; the mask drops the last token of row 1, which holds large counts that must not count
COUNTS0 = torch.tensor([
    [[0, 1, -2, 3], [0, 0, 0, 0], [3, -3, 1, 0]],
    [[2, 0, 0, -1], [1, 1, 1, 1], [3, 3, 3, 3]],
], dtype=torch.float32)
COUNTS1 = torch.tensor([
    [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]],
    [[0, 0, 1, 0], [1, 0, 1, 0], [1, 1, 1, 1]],
], dtype=torch.float32)
MASK = torch.tensor([[True, True, True], [True, True, False]])


def hand_count(counts: torch.Tensor, mask: torch.Tensor, max_count: int, fan_out: int) -> dict:
    """Every figure of one site, counted element by element."""
    elements = zeros = total = bits = 0
    for b in range(counts.shape[0]):
        for t in range(counts.shape[1]):
            if not mask[b, t]:
                continue
            for value in counts[b, t].tolist():
                magnitude = int(abs(value))
                elements += 1
                zeros += magnitude == 0
                total += magnitude
                bits += bin(magnitude).count("1")
    bit_steps = len(bin(max_count)) - 2
    return {
        "elements": elements, "zeros": zeros, "sum": total, "bits": bits,
        "zero_fraction": zeros / elements, "mean": total / elements,
        "rate_binary": total / (elements * max_count), "rate_bitwise": bits / (elements * bit_steps),
        "synops": total * fan_out, "synops_bitwise": bits * fan_out, "macs": elements * fan_out,
        "bit_steps": bit_steps,
    }


def test_hand_counted_figures_per_site_layer_and_total():
    model = FakeModel("adaptive", (3, 1), (5, 7))
    with SparsityMonitor(model) as monitor:
        model(COUNTS0, COUNTS1, MASK)
    report = monitor.report(energy="45nm-fp32")
    a = hand_count(COUNTS0, MASK, 3, 5)
    b = hand_count(COUNTS1, MASK, 1, 7)
    assert (a["elements"], a["zeros"], a["sum"], a["bits"]) == (20, 8, 20, 15)  # sanity of the hand count itself

    assert [site.name for site in report.sites] == ["layers.0.time_mix.key", "layers.1.channel_mix.value"]
    for site, hand, max_count in ((report.sites[0], a, 3), (report.sites[1], b, 1)):
        assert site.tokens == 5 and site.elements == hand["elements"]
        assert site.zero_fraction == pytest.approx(hand["zero_fraction"])
        assert site.mean_abs_count == pytest.approx(hand["mean"])
        assert site.firing_rate["binary"] == pytest.approx(hand["rate_binary"])
        assert site.firing_rate["ternary"] == pytest.approx(hand["rate_binary"])
        assert site.firing_rate["bitwise"] == pytest.approx(hand["rate_bitwise"])
        assert site.synops == {"binary": hand["synops"], "ternary": hand["synops"], "bitwise": hand["synops_bitwise"]}
        assert site.dense_macs == hand["macs"] and site.model_macs == 0
        assert site.energy_pj["binary"] == pytest.approx(hand["synops"] * 0.9)
        assert site.energy_pj["bitwise"] == pytest.approx(hand["synops_bitwise"] * 0.9)
        assert site.dense_energy_pj == pytest.approx(hand["macs"] * 4.6)
        assert site.energy_ratio["binary"] == pytest.approx(hand["synops"] * 0.9 / (hand["macs"] * 4.6))
        assert site.max_count == max_count and sum(site.histogram) == hand["elements"]
    assert report.sites[0].max_abs_count == 3
    assert report.sites[0].histogram == [8, 7, 2, 3]  # the padded token's four 3s are not in it

    # a layer here holds one site; the total adds both
    assert [layer.name for layer in report.layers] == ["layer.0", "layer.1"]
    assert report.layers[1].synops["binary"] == b["synops"]
    total = report.total
    assert total.elements == a["elements"] + b["elements"]
    assert total.zero_fraction == pytest.approx((a["zeros"] + b["zeros"]) / total.elements)
    assert total.firing_rate["binary"] == pytest.approx((a["sum"] + b["sum"]) / (20 * 3 + 20 * 1))
    assert total.firing_rate["bitwise"] == pytest.approx((a["bits"] + b["bits"]) / (20 * 2 + 20 * 1))
    assert total.synops["binary"] == a["synops"] + b["synops"]
    assert total.dense_macs == a["macs"] + b["macs"]
    expected_ratio = (a["synops"] + b["synops"]) * 0.9 / ((a["macs"] + b["macs"]) * 4.6)
    assert report.energy_ratio == pytest.approx(expected_ratio)

    # another table changes only the energies
    int8 = monitor.report(energy="45nm-int8", encoding="bitwise")
    assert int8.total.energy_pj["bitwise"] == pytest.approx((a["synops_bitwise"] + b["synops_bitwise"]) * 0.03)
    assert int8.energy_ratio == pytest.approx(int8.total.energy_pj["bitwise"] / ((a["macs"] + b["macs"]) * 0.23))


def test_analytic_event_counts_match_expand_counts():
    neurons = pytest.importorskip("spikelm.neurons")
    if not hasattr(neurons, "expand_counts"):
        pytest.skip("spikelm.neurons.expand_counts not written yet")
    torch.manual_seed(0)
    counts = torch.randint(-7, 8, (3, 5, 6)).float()
    mask = torch.rand(3, 5) > 0.3
    model = FakeModel("adaptive", (7, 7), (4, 4))
    with SparsityMonitor(model) as monitor:
        model(counts, counts, mask)
    site = monitor.report().sites[0]
    real = mask[:, :, None].expand_as(counts)
    for encoding in ("binary", "ternary", "bitwise"):
        events = neurons.expand_counts(counts, encoding, 7)  # [S, B, T, C]
        assert events.shape[0] == time_steps(encoding, 7)
        n_events = int(events.abs()[:, real].sum())
        assert site.events[encoding] == n_events
        assert site.firing_rate[encoding] == pytest.approx(n_events / (int(real.sum()) * events.shape[0]))


def test_dense_twin_costs_every_element_as_a_mac_whatever_its_zeros():
    model = FakeModel("none", (None, None), (5, 7))
    dense = torch.zeros(2, 3, 4)
    dense[0, 0, 0] = -0.25  # mostly zeros, one real value
    with SparsityMonitor(model) as monitor:
        model(dense, torch.randn(2, 3, 4), MASK)
    report = monitor.report()
    assert report.energy_ratio == 1.0
    site = report.sites[0]
    assert site.zero_fraction == pytest.approx(19 / 20) and site.mean_abs_count == pytest.approx(0.25 / 20)
    assert site.synops == {"binary": 0, "ternary": 0, "bitwise": 0}
    assert site.model_macs == site.dense_macs == 20 * 5
    assert site.firing_rate == {"binary": None, "ternary": None, "bitwise": None}
    assert report.total.energy_pj["binary"] == report.total.dense_energy_pj == pytest.approx((20 * 5 + 20 * 7) * 4.6)


def test_mask_none_counts_everything_and_cache_masks_take_the_last_tokens():
    model = FakeModel("lif", (1, 1), (2, 2))
    spikes = (COUNTS1 > 0).float()
    with SparsityMonitor(model) as monitor:
        model(spikes, spikes)
    assert monitor.report().sites[0].elements == 24
    # decoding with a cache: a [B, past + T] attention mask; the current token is the last column
    past_and_now = torch.tensor([[False, True, True], [True, True, False]])
    with SparsityMonitor(model) as monitor:
        model(spikes[:, :1], spikes[:, :1], past_and_now)
    site = monitor.report().sites[0]
    assert site.tokens == 1 and site.elements == 4 and site.zero_fraction == pytest.approx(2 / 4)


def test_observers_removed_after_the_block_and_after_an_exception():
    model = FakeModel("adaptive", (3, 1), (5, 7))
    existing = lambda neuron, counts, mask: None  # noqa: E731  (someone else's observer must survive)
    model.key.observers.append(existing)
    with SparsityMonitor(model):
        assert len(model.key.observers) == 2 and len(model.value.observers) == 1
    assert model.key.observers == [existing] and model.value.observers == []
    with pytest.raises(RuntimeError, match="boom"), SparsityMonitor(model):
        model(COUNTS0, COUNTS1, MASK)
        raise RuntimeError("boom")
    assert model.key.observers == [existing] and model.value.observers == []


def test_bad_use_gives_clear_errors():
    with pytest.raises(ValueError, match="no spike sites"):
        SparsityMonitor(nn.Linear(2, 2))
    model = FakeModel("adaptive", (3, 1), (5, 7))
    monitor = SparsityMonitor(model)
    with pytest.raises(ValueError, match="recorded nothing"):
        monitor.report()
    with monitor:
        model(COUNTS0, COUNTS1, MASK)
        with pytest.raises(ValueError, match="mask must be"):
            model(COUNTS0, COUNTS1, MASK[:1])
    with pytest.raises(ValueError, match="encoding='unary'"):
        monitor.report(encoding="unary")
    with pytest.raises(ValueError, match="45nm-fp32"):
        monitor.report(energy="7nm")


def test_energy_tables_follow_horowitz_and_accept_custom_values():
    # ISSCC 2014, 45 nm: MAC = mult + add; AC = add
    for name, mult, add in (("45nm-fp32", 3.7, 0.9), ("45nm-fp16", 1.1, 0.4), ("45nm-int8", 0.2, 0.03)):
        table = ENERGY_TABLES[name]
        assert table.mac_pj == pytest.approx(mult + add) and table.ac_pj == add
        assert get_energy_table(name) is table and f"{table.mac_pj:g} pJ" in table.describe()
    custom = get_energy_table("mac=2,ac=0.5")
    assert (custom.mac_pj, custom.ac_pj) == (2.0, 0.5)
    with pytest.raises(ValueError, match="mac_pj"):
        EnergyTable("bad", mac_pj=-1.0, ac_pj=1.0, source="test")


def test_table_logging_and_json_forms():
    model = FakeModel("adaptive", (3, 1), (5, 7))
    with SparsityMonitor(model) as monitor:
        model(COUNTS0, COUNTS1, MASK)
    report = monitor.report()
    text = report.format_table(per_site=True)
    assert "layer.0" in text and "time_mix.key" in text and "total" in text
    assert "MAC 4.6 pJ, AC 0.9 pJ" in text and "dense twin" in text and "not counted" in text
    scalars = summarize_for_logging(report)
    assert scalars["sparsity/zero_fraction"] == pytest.approx(report.total.zero_fraction)
    assert scalars["sparsity/layer.1/zero_fraction"] == pytest.approx(report.layers[1].zero_fraction)
    assert scalars["sparsity/energy_ratio"] == pytest.approx(report.energy_ratio)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["total"]["synops"]["binary"] == report.total.synops["binary"]
    assert data["energy_table"]["name"] == "45nm-fp32"
    assert split_site_name("model.layers.12.channel_mix.key") == ("layer.12", "channel_mix.key")
    assert split_site_name("lm_head") == ("lm_head", "lm_head")
