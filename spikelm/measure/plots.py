"""PNG of a sparsity report: per-layer zero fraction and firing rate, one line per site type."""

from __future__ import annotations

from pathlib import Path

from spikelm.measure.report import SparsityReport, split_site_name


def plot_report(report: SparsityReport, path: str | Path) -> Path:
    """Draw two panels over the layers: zero fraction (activation sparsity) and the firing rate of the report's
    event train, one line per site type (``time_mix.key``, ``channel_mix.value``...). Sites outside the blocks
    (a spiking LM head) appear as one more point after the last layer. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    path = Path(path)
    layer_names = [layer.name for layer in report.layers]
    position = {name: index for index, name in enumerate(layer_names)}
    by_type: dict[str, list] = {}
    for site in report.sites:
        layer, site_type = split_site_name(site.name)
        by_type.setdefault(site_type, []).append((position[layer], site))

    figure, (zero_axis, rate_axis) = plt.subplots(2, 1, figsize=(max(9.0, 0.4 * len(layer_names) + 6), 7),
                                                  sharex=True)
    for site_type, points in sorted(by_type.items()):
        points.sort(key=lambda item: item[0])
        xs = [x for x, _ in points]
        zero_axis.plot(xs, [site.zero_fraction for _, site in points], marker="o", label=site_type)
        rates = [site.firing_rate[report.encoding] for _, site in points]
        if any(rate is not None for rate in rates):
            rate_axis.plot(xs, [float("nan") if rate is None else rate for rate in rates], marker="o", label=site_type)
    total = report.total
    zero_axis.set_ylabel("zero fraction")
    zero_axis.set_ylim(0.0, 1.0)
    ratio = "-" if report.energy_ratio is None else f"{report.energy_ratio:.3g}"
    figure.suptitle(
        f"neuron {'/'.join(report.kinds)}, {report.tokens} tokens: zero fraction {_pct(total.zero_fraction)}, "
        f"energy vs dense twin {ratio} ({report.energy_table.name}, {report.encoding} train)", fontsize="medium"
    )
    rate_axis.set_ylabel(f"firing rate ({report.encoding} train)")
    if total.firing_rate[report.encoding] is None:
        rate_axis.text(0.5, 0.5, "dense twin (neuron: none): no event train", ha="center", va="center",
                       transform=rate_axis.transAxes)
    rate_axis.set_xticks(range(len(layer_names)), layer_names, rotation=45, ha="right")
    rate_axis.set_xlabel("layer")
    for axis in (zero_axis, rate_axis):
        axis.grid(alpha=0.3)
    # one legend for both panels, outside the plotting area so it never hides a line
    handles, labels = zero_axis.get_legend_handles_labels()
    figure.legend(handles, labels, title="site type", fontsize="small", loc="center right")
    figure.tight_layout(rect=(0.0, 0.0, 0.78, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


__all__ = ["plot_report"]
