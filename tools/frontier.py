"""The sparsity/quality frontier: a recipe trained as its dense twin and with each spiking neuron, plus a sweep of
the adaptive neuron's threshold divisor k, all with the same data, tokens, seed and schedule.

Usage::

    python tools/frontier.py [--recipe recipes/shakespeare-tiny.yaml] [--out runs/frontier]
                             [--points none,adaptive-k3,lif] [--set train.max_steps=300 ...] [--tokens 16384]

A *point* is a name: ``none`` (the dense twin), ``lif``, ``gated`` or ``adaptive-k<K>`` (e.g. ``adaptive-k0.5``).
Each point is trained, evaluated and measured through the same code paths as ``spikelm train`` / ``spikelm eval``
/ ``spikelm sparsity`` (their CLI entry points, in this process or with ``--isolate`` in a fresh process per step),
in its own run directory ``<out>/<point>/``:

- ``spikelm train <out>/sweep-recipe.yaml --set model.neuron=... [--set model.adaptive_k=K] [your --set ...]
  --out <out>/<point>``; a half-finished run resumes from its latest checkpoint (``spikelm train`` does that in a
  run directory that has checkpoints); ``train-done.json`` marks a finished training.
- ``spikelm eval <point>/export --recipe <point>/recipe.yaml --tokens N --json <point>/eval.json``: held-out
  loss, perplexity and bits per byte (the recipe written by the run, so every ``--set`` applies).
- ``spikelm sparsity <point>/export --recipe <point>/recipe.yaml --tokens N --json <point>/sparsity.json``:
  whole-model zero fraction of the spike counts, synaptic operations and the energy ratio against the dense twin.
- ``point.json``: the point's figures, written last and atomically. A point that has it is finished and is never
  run or written again; the table is rebuilt from every ``point.json`` under ``<out>``.

Variants (``--variant 'NAME=BASE SECTION.KEY=VALUE ...'``) are points of their own: a base point trained with more
overrides, e.g. a learned threshold (``'lsq=adaptive-k0.4 model.adaptive_scale=channel'``) or distillation from the
sweep's dense twin (``'kd=adaptive-k0.4 distill.teacher={dense} distill.alpha=0.5'``).

Training budgets (``--budgets 240,1000,4000``): the whole sweep runs once per budget, in ``<out>/steps-<N>/`` with
``--set train.max_steps=N`` (each a sweep as described here, resumable the same way), and ``<out>/budgets.md``,
``budgets.json`` and ``budgets.png`` show each point's gap to the dense twin against training tokens.
``--combine`` over several such roots (one per seed) gives the mean and worst seed per point and budget (``--plot``
draws them).

Outputs under ``<out>``: ``frontier.csv``, ``frontier.json`` (settings, machine and rows), ``frontier.md`` (the
table in Markdown) and ``frontier.png`` (x = activation sparsity, y = held-out bits per byte relative to the dense
twin). ``frontier-settings.json`` pins
the recipe, overrides and token budget of the sweep: a later call with different ones is refused, so every row of
one table is comparable. Every point trains from ``sweep-recipe.yaml``, the copy of the recipe taken when the sweep
started, so an edit of the recipe file during a long sweep cannot change the schedule of later points.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "shakespeare-tiny.yaml"
DENSE_POINT = "none"
SWEEP_RECIPE = "sweep-recipe.yaml"
# Run order = priority: if a sweep is cut short, the dense twin and the default neuron are done first. The k values
# bracket the 70% sparsity goal: a token's channel is zero when |x| < V_th / 2 = mean|x| / (2k), so for roughly
# Gaussian inputs k = 3 (the default) leaves ~10% zeros at a site and k <= 0.5 is needed for >= 60%.
DEFAULT_POINTS = ("none", "adaptive-k3", "adaptive-k0.5", "adaptive-k0.25", "lif", "gated", "adaptive-k1",
                  "adaptive-k6")
_ADAPTIVE = re.compile(r"^adaptive-k(\d+(?:\.\d+)?)$")
CSV_COLUMNS = (
    "point", "neuron", "adaptive_k", "bits_per_byte", "bpb_vs_dense", "loss", "perplexity", "eval_tokens",
    "zero_fraction", "mean_abs_count", "firing_rate", "synops_per_token", "dense_macs_per_token", "energy_ratio",
    "sparsity_tokens", "train_steps", "train_tokens", "final_train_loss", "train_seconds",
)


class FrontierError(Exception):
    """A problem the user can fix (bad point name, settings that differ from the sweep's, a failed run)."""


@dataclass(frozen=True)
class Point:
    """One training configuration of the sweep."""

    name: str
    """Directory name and table label, e.g. ``adaptive-k0.5``."""
    neuron: str
    """``none``, ``lif``, ``gated`` or ``adaptive``."""
    adaptive_k: float | None = None
    """Threshold divisor k of the adaptive neuron (``None`` for the other neurons)."""
    extra: tuple[str, ...] = ()
    """A variant's own ``--set`` overrides on top of its base point (``{dense}`` / ``{dense@N}`` not yet resolved)."""

    @property
    def overrides(self) -> list[str]:
        """The ``--set`` overrides that select this point's neuron, then the variant's own."""
        sets = [f"model.neuron={self.neuron}"]
        if self.adaptive_k is not None:
            sets.append(f"model.adaptive_k={self.adaptive_k}")
        return sets + list(self.extra)


def parse_point(name: str) -> Point:
    """``"none"`` / ``"lif"`` / ``"gated"`` / ``"adaptive-k<K>"`` -> :class:`Point`; anything else raises
    ``FrontierError``."""
    name = name.strip()
    if name in ("none", "lif", "gated"):
        return Point(name, name)
    match = _ADAPTIVE.match(name)
    if match:
        k = float(match.group(1))
        if k <= 0:
            raise FrontierError(f"--points {name!r}: the adaptive neuron's k must be > 0, e.g. adaptive-k3")
        return Point(name, "adaptive", k)
    raise FrontierError(f"--points: unknown point {name!r}; use none, lif, gated or adaptive-k<K> (e.g. adaptive-k3)")


_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def parse_variant(text: str) -> Point:
    """``"NAME=BASE SECTION.KEY=VALUE ..."`` -> a point named NAME that trains BASE (a point name) with the extra
    overrides, e.g. ``"lsq=adaptive-k0.4 model.adaptive_scale=channel"``. In a value, ``{dense}`` stands for the
    export of the same sweep's dense twin and ``{dense@N}`` for that of the N-step budget (see ``--budgets``)."""
    name, sep, rest = text.partition("=")
    name, parts = name.strip(), rest.split()
    if not sep or not parts or not _VARIANT_NAME.match(name):
        raise FrontierError(f"--variant {text!r}: expected NAME=BASE SECTION.KEY=VALUE ..., e.g. "
                            "--variant 'lsq=adaptive-k0.4 model.adaptive_scale=channel'")
    base = parse_point(parts[0])
    extra = tuple(parts[1:])
    for item in extra:
        key = item.split("=", 1)[0]
        if "=" not in item or key in ("model.neuron", "model.adaptive_k"):
            raise FrontierError(f"--variant {text!r}: {item!r} must be SECTION.KEY=VALUE and not choose the neuron "
                                "(the base point does)")
    try:
        parse_point(name)
    except FrontierError:
        return Point(name, base.neuron, base.adaptive_k, extra)
    raise FrontierError(f"--variant {text!r}: {name!r} is a point name; give the variant a name of its own")


def resolve_overrides(sets: list[str], sweep_dir: Path, root: Path) -> list[str]:
    """Replace ``{dense}`` by ``<sweep_dir>/none/export`` and ``{dense@N}`` by ``<root>/steps-N/none/export``; a
    missing dense export is an error (run the dense twin first)."""
    out = []
    for text in sets:
        for match in re.finditer(r"\{dense(?:@(\d+))?\}", text):
            export = (root / f"steps-{match.group(1)}" if match.group(1) else sweep_dir) / DENSE_POINT / "export"
            if not (export / "config.json").is_file():
                raise FrontierError(f"{text!r} needs the dense twin's export {export}; train that point first")
            text = text.replace(match.group(0), str(export.resolve()))
        out.append(text)
    return out


def parse_points(text: str) -> list[Point]:
    """A comma-separated list of point names, in run order, without duplicates."""
    points = [parse_point(part) for part in text.split(",") if part.strip()]
    if not points:
        raise FrontierError("--points is empty; give e.g. --points none,adaptive-k3")
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FrontierError(f"--points names {', '.join(duplicates)} more than once")
    return points


# ------------------------------------------------------------------------------------------------ files


def write_json_atomically(path: Path, data: Any) -> None:
    """Write JSON so that a reader (or a crash) never sees half a file."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write atomically as PNG (a reader never sees half a plot) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: cores, CPU model, GPU, torch version and the git commit."""
    import torch

    cpu_model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


# ------------------------------------------------------------------------------------------------ running


def _environment() -> None:
    """What ``spikelm train`` needs on CPU, with the DeepSpeed op cache under the repo (as the Makefile does)."""
    import torch

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def spikelm_command(argv: list[str], *, isolate: bool) -> int:
    """Run ``spikelm <argv>``: in this process (fast: imports and the process group are reused) or, with
    ``isolate``, in a fresh Python process (nothing leaks from one run into the next)."""
    if isolate:
        return subprocess.call([sys.executable, "-m", "spikelm.commands.main", *argv])
    from spikelm.commands.main import main

    return main(argv)


def _settings(recipe: Path, overrides: list[str], tokens: int) -> dict[str, Any]:
    return {
        "recipe": str(recipe.resolve()),
        "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(),
        "set": list(overrides),
        "tokens": tokens,
    }


def pin_sweep(out: Path, recipe: Path, settings: dict[str, Any], log: Any = print) -> Path:
    """Pin the sweep on first use: ``<out>/frontier-settings.json`` and a copy of the recipe,
    ``<out>/sweep-recipe.yaml``, which every point trains from. Later calls must pass the same settings; a recipe
    file edited since then is ignored (with a note) so that every point keeps the same data, seed and schedule.
    Returns the pinned recipe."""
    path, snapshot = out / "frontier-settings.json", out / SWEEP_RECIPE
    if not path.exists():
        if recipe != snapshot.resolve():
            write_text_atomically(snapshot, recipe.read_text(encoding="utf-8"))
        write_json_atomically(path, settings)
        return snapshot
    pinned = read_json(path)
    differing = [key for key in ("recipe", "set", "tokens") if pinned.get(key) != settings[key]]
    if differing:
        details = "; ".join(f"{key}: sweep has {pinned.get(key)!r}, now {settings[key]!r}" for key in differing)
        raise FrontierError(f"{out} holds a sweep with other settings ({details}). Its points would not be "
                            "comparable with new ones: pass another --out, or the same settings to resume it")
    if not snapshot.is_file():  # a sweep pinned before the recipe was copied: only the unchanged recipe will do
        if pinned.get("recipe_sha256") != settings["recipe_sha256"]:
            raise FrontierError(f"{recipe} changed since the sweep in {out} started and the sweep has no copy of "
                                "the original; pass another --out")
        write_text_atomically(snapshot, recipe.read_text(encoding="utf-8"))
    elif hashlib.sha256(snapshot.read_bytes()).hexdigest() != pinned.get("recipe_sha256"):
        raise FrontierError(f"{snapshot} was edited after the sweep started; restore it or pass another --out")
    if pinned.get("recipe_sha256") != settings["recipe_sha256"]:
        log(f"[frontier] note: {recipe} changed since this sweep started; its points keep training from the "
            f"pinned copy {snapshot}")
    return snapshot


def run_point(point: Point, args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Train, evaluate and measure one point (each step skipped when its output exists); returns its figures."""
    run_dir: Path = args.out / point.name
    done = run_dir / "point.json"
    if done.exists():
        log(f"[frontier] {point.name}: finished earlier ({done}); kept as it is")
        return read_json(done)
    run_dir.mkdir(parents=True, exist_ok=True)
    export = run_dir / "export"

    train_done = run_dir / "train-done.json"
    if not train_done.exists():
        # the sweep's overrides (budget included) first: a variant may change any of them, e.g. train.max_steps
        sets = resolve_overrides([*args.overrides, *point.overrides], args.out, args.root)
        argv = ["train", str(args.pinned_recipe), "--out", str(run_dir)]
        for text in sets:
            argv += ["--set", text]
        if args.cache_dir is not None:
            argv += ["--cache-dir", str(args.cache_dir)]
        if not sys.stdout.isatty():
            argv.append("--no-progress")  # a bar redrawn 600 times makes an unreadable log file
        log(f"[frontier] {point.name}: spikelm " + " ".join(argv))
        start = time.perf_counter()
        code = spikelm_command(argv, isolate=args.isolate)
        seconds = time.perf_counter() - start
        if code != 0 or not (export / "config.json").is_file():
            raise FrontierError(f"training point {point.name} failed (spikelm train exit code {code}); see the "
                                f"output above. Run the same command again to resume it from its last checkpoint")
        # The last session's time; a run resumed across sessions reports only its final session.
        write_json_atomically(train_done, {"seconds": seconds, "set": sets})

    run_recipe = run_dir / "recipe.yaml"  # the recipe as trained, every --set applied
    measured = {}
    for command, name in (("eval", "eval.json"), ("sparsity", "sparsity.json")):
        path = run_dir / name
        if not path.exists():
            tmp = run_dir / f".{name}.partial"
            argv = [command, str(export), "--recipe", str(run_recipe), "--tokens", str(args.tokens), "--json",
                    str(tmp)]
            log(f"[frontier] {point.name}: spikelm " + " ".join(argv))
            code = spikelm_command(argv, isolate=args.isolate)
            if code != 0 or not tmp.is_file():
                raise FrontierError(f"spikelm {command} failed for point {point.name} (exit code {code})")
            os.replace(tmp, path)
        measured[command] = read_json(path)

    result = point_figures(point, run_dir, measured["eval"], measured["sparsity"], read_json(train_done))
    result["set"] = read_json(train_done).get("set")
    result["budget_steps"] = args.budget
    write_json_atomically(done, result)
    log(f"[frontier] {point.name}: bits/byte {result['bits_per_byte']:.4f}, zero fraction "
        f"{result['zero_fraction']:.3f}, energy ratio {result['energy_ratio']:.3f}")
    return result


def point_figures(point: Point, run_dir: Path, evaluation: dict[str, Any], sparsity: dict[str, Any],
                  train_done: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from the JSON files that ``spikelm eval`` / ``spikelm sparsity`` / training wrote."""
    total, encoding = sparsity["total"], sparsity["encoding"]
    tokens = sparsity["tokens"]
    train_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [row for row in train_rows if row.get("kind") == "train"]
    last = train_rows[-1] if train_rows else {}
    return {
        "point": point.name,
        "neuron": point.neuron,
        "adaptive_k": point.adaptive_k,
        "bits_per_byte": evaluation["bits_per_byte"],
        "loss": evaluation["loss"],
        "perplexity": evaluation["perplexity"],
        "eval_tokens": evaluation["tokens"],
        "zero_fraction": total["zero_fraction"],
        "mean_abs_count": total["mean_abs_count"],
        "firing_rate": total["firing_rate"].get(encoding),
        "encoding": encoding,
        "synops_per_token": total["synops"][encoding] / tokens if tokens else None,
        "dense_macs_per_token": total["dense_macs"] / tokens if tokens else None,
        "energy_ratio": sparsity["energy_ratio"],
        "energy_table": sparsity["energy_table"]["name"],
        "sparsity_tokens": tokens,
        "train_steps": last.get("step"),
        "train_tokens": last.get("tokens"),
        "final_train_loss": last.get("loss"),
        "train_seconds": train_done.get("seconds"),
    }


# ------------------------------------------------------------------------------------------------ table and plot


def collect_rows(out: Path, order: list[str]) -> list[dict[str, Any]]:
    """Every finished point under ``out`` (those named in ``order`` first, in that order), with ``bpb_vs_dense`` =
    bits per byte / the dense twin's - 1 when the dense twin is finished."""
    found = {path.parent.name: read_json(path) for path in sorted(out.glob("*/point.json"))}
    names = [n for n in order if n in found] + sorted(n for n in found if n not in order)
    rows = [found[name] for name in names]
    dense = found.get(DENSE_POINT)
    for row in rows:
        row["bpb_vs_dense"] = row["bits_per_byte"] / dense["bits_per_byte"] - 1.0 if dense else None
    return rows


def write_table(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any], machine: dict[str, Any]) -> None:
    """``frontier.csv`` (one row per point) and ``frontier.json`` (settings, machine, rows)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in CSV_COLUMNS})
    write_text_atomically(out / "frontier.csv", buffer.getvalue())
    write_json_atomically(out / "frontier.json", {"settings": settings, "machine": machine, "points": rows})
    write_text_atomically(out / "frontier.md", markdown_table(rows))


def _label(row: dict[str, Any]) -> str:
    return f"k={row['adaptive_k']:g}" if _ADAPTIVE.match(row["point"]) else row["point"]


def plot_frontier(rows: list[dict[str, Any]], path: Path, *, goal_sparsity: float = 0.70,
                  goal_bpb: float = 0.03, y_cap: float = 25.0) -> None:
    """x = activation sparsity (whole-model zero fraction), y = bits per byte relative to the dense twin (absolute
    bits per byte without a dense twin); the goal region is shaded. Right panel: energy ratio vs the same y.

    Relative y above ``y_cap`` percent is drawn at the cap as a triangle labelled with its value, so one far-off
    point does not flatten the region where the comparison happens.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    relative = all(row.get("bpb_vs_dense") is not None for row in rows)
    ys = [100.0 * row["bpb_vs_dense"] if relative else row["bits_per_byte"] for row in rows]
    capped = [relative and y > y_cap for y in ys]
    ylabel = "held-out bits per byte vs dense twin (%)" if relative else "held-out bits per byte"
    fig, (ax, ax_energy) = plt.subplots(1, 2, figsize=(12, 5))
    colours = {"none": "black", "adaptive": "tab:blue", "lif": "tab:orange", "gated": "tab:green"}
    for axis, xs, xlabel in ((ax, [100.0 * row["zero_fraction"] for row in rows], "activation sparsity (% zeros)"),
                             (ax_energy, [row["energy_ratio"] for row in rows], "energy ratio vs dense twin")):
        # alternate label offsets along x so neighbouring points do not print over each other
        order = sorted(range(len(rows)), key=lambda i: xs[i])
        for rank, i in enumerate(order):
            row, x, y = rows[i], xs[i], min(ys[i], y_cap) if capped[i] else ys[i]
            axis.scatter([x], [y], color=colours.get(row["neuron"], "grey"), marker="^" if capped[i] else "o",
                         zorder=3)
            label = f"{_label(row)} ({ys[i]:+.0f}%)" if capped[i] else _label(row)
            axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 5 if rank % 2 == 0 else -11),
                          fontsize=8)
        adaptive = sorted((xs[i], ys[i]) for i in range(len(rows))  # the k sweep, variants left out
                          if _ADAPTIVE.match(rows[i]["point"]) and not capped[i])
        if len(adaptive) > 1:
            axis.plot(*zip(*adaptive, strict=True), color=colours["adaptive"], alpha=0.4, zorder=2)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if relative:
            axis.axhline(0.0, color="black", lw=0.8)
            axis.axhline(100.0 * goal_bpb, color="tab:red", lw=0.8, ls="--")
            if any(capped):
                axis.set_ylim(top=y_cap + 1.5)
    ax.set_xlim(left=min(-2.0, ax.get_xlim()[0]), right=100.0)
    if relative:
        # The goal region: at least goal_sparsity zeros and at most goal_bpb worse than the dense twin.
        bottom, top = ax.get_ylim()
        ax.fill_between([100.0 * goal_sparsity, 100.0], bottom, 100.0 * goal_bpb, color="tab:green", alpha=0.12,
                        zorder=1, label="goal")
        ax.set_ylim(bottom, top)
        ax.axvline(100.0 * goal_sparsity, color="tab:red", lw=0.8, ls="--")
        ax.set_title(f"goal (shaded): sparsity >= {goal_sparsity:.0%}, bits/byte within {goal_bpb:.0%} of the dense "
                     "twin", fontsize=9)
        ax_energy.set_title("blue: adaptive neuron, k = threshold divisor; black: dense twin", fontsize=9)
    save_figure(fig, path)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown, for docs/results.md (every figure straight from the rows)."""
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| point | bits/byte | vs dense twin | zeros | mean \\|count\\| | SynOps/token | dense MACs/token "
             "| energy ratio | final train loss | train time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        rel = None if row.get("bpb_vs_dense") is None else 100.0 * row["bpb_vs_dense"]
        # the dense twin has no spike counts (its report's mean is of |activation|)
        mean_count = None if row["neuron"] == DENSE_POINT else row["mean_abs_count"]
        lines.append(
            f"| {row['point']} | {fmt(row['bits_per_byte'], '.4f')} | {fmt(rel, '+.2f')}% "
            f"| {fmt(100.0 * row['zero_fraction'], '.1f')}% | {fmt(mean_count, '.3f')} "
            f"| {fmt(row['synops_per_token'], ',.0f')} | {fmt(row['dense_macs_per_token'], ',.0f')} "
            f"| {fmt(row['energy_ratio'], '.3f')} | {fmt(row['final_train_loss'], '.3f')} "
            f"| {fmt(row['train_seconds'], '.0f')} s |")
    return "\n".join(lines) + "\n"


def _point_order(row: dict[str, Any]) -> tuple[int, float, int, str]:
    """Dense twin, then the adaptive neuron by k (plain points before variants), then the other neurons."""
    rank = {"none": 0, "adaptive": 1, "lif": 2, "gated": 3}.get(row["neuron"], 4)
    return rank, row.get("adaptive_k") or 0.0, 0 if _ADAPTIVE.match(row["point"]) else 1, row["point"]


# Config fields that change what each kind of neuron computes; a recipe copy does not pin them when a code default
# changes between sweeps.
NEURON_FIELDS = {
    "none": ("neuron",),
    "adaptive": ("neuron", "adaptive_k", "adaptive_site_k", "max_spikes", "adaptive_resolution", "adaptive_scale",
                 "adaptive_surrogate", "spike_phase_in", "spike_lm_head"),
    "lif": ("neuron", "lif_tau", "lif_threshold", "lif_reset", "lif_alpha", "spike_lm_head"),
    "gated": ("neuron", "gated_bits", "gated_threshold", "gated_forget_init", "spike_lm_head"),
}


# What an export written before a field existed trained with.
_FIELD_DEFAULTS = {"adaptive_site_k": None, "adaptive_resolution": 1, "adaptive_scale": "fixed",
                   "adaptive_surrogate": "ste", "spike_phase_in": 0.0}


def neuron_config(run_dir: Path) -> dict[str, Any]:
    """The fields of the neuron a point exported (what it really trained with, code defaults included)."""
    config = read_json(run_dir / "export" / "config.json")
    return {key: config.get(key, _FIELD_DEFAULTS.get(key)) for key in NEURON_FIELDS[config["neuron"]]}


def neuron_config_differences(dirs: list[Path], name: str) -> str:
    """The neuron config fields in which point ``name``'s finished runs under ``dirs`` differ, each with its values in
    the order of ``dirs`` (e.g. ``"max_spikes 8 / 4"``); empty when they agree."""
    configs = [neuron_config(d / name) for d in dirs if (d / name / "point.json").is_file()]
    differing = [key for key in configs[0] if len({json.dumps(c.get(key)) for c in configs}) > 1]
    return ", ".join(f"{key} {' / '.join(str(c.get(key)) for c in configs)}" for key in differing)


def combine_sweeps(dirs: list[Path]) -> str:
    """A Markdown table over finished sweeps of the same points (e.g. one per seed): per point, the mean and the
    range of bits per byte vs the dense twin of its own sweep, of the zero fraction and of the energy ratio.
    A note under the table names every point whose neuron config differs between the sweeps."""
    tables = [collect_rows(directory, []) for directory in dirs]
    if not any(tables):
        raise FrontierError(f"no finished points under {', '.join(map(str, dirs))}")
    first = {row["point"]: row for table in tables for row in table}
    names = sorted(first, key=lambda name: _point_order(first[name]))

    def stats(values: list[float], scale: float, spec: str) -> str:
        mean = sum(values) / len(values)
        text = format(scale * mean, spec)
        return text if len(values) == 1 else f"{text} ({format(scale * min(values), spec)} .. " \
                                             f"{format(scale * max(values), spec)})"

    lines = ["| point | sweeps | bits/byte vs dense twin, % | zeros, % | energy ratio |",
             "|---|---:|---:|---:|---:|"]
    for name in names:
        rows = [row for table in tables for row in table if row["point"] == name]
        rel = [row["bpb_vs_dense"] for row in rows if row.get("bpb_vs_dense") is not None]
        lines.append(f"| {name} | {len(rows)} | {stats(rel, 100.0, '+.2f') if rel else '-'} "
                     f"| {stats([row['zero_fraction'] for row in rows], 100.0, '.1f')} "
                     f"| {stats([row['energy_ratio'] for row in rows], 1.0, '.3f')} |")
    notes = []
    for name in names:
        values = neuron_config_differences(dirs, name)
        if values:
            notes.append(f"\nNote: the {name} points were not trained with the same neuron config ({values}, "
                         "in the order of the sweeps); their mean mixes two models.")
    return "\n".join(lines) + "\n" + "".join(note + "\n" for note in notes)


# ------------------------------------------------------------------------------------------------ budgets


def budget_dirs(root: Path) -> dict[int, Path]:
    """The per-budget sweeps ``<root>/steps-<N>`` of a ``--budgets`` run, by N."""
    found = {}
    for path in root.glob("steps-*"):
        if path.is_dir() and path.name[len("steps-"):].isdigit():
            found[int(path.name[len("steps-"):])] = path
    return dict(sorted(found.items()))


def budget_summary(roots: list[Path]) -> list[dict[str, Any]]:
    """Per (point, budget) over the roots (e.g. one per seed): mean and worst bits per byte vs each root's own dense
    twin, mean and lowest zero fraction, and the training tokens of the budget (the dense twin's)."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    tokens: dict[int, int] = {}
    for root in roots:
        for budget, directory in budget_dirs(root).items():
            for row in collect_rows(directory, []):
                cells.setdefault((row["point"], budget), []).append(row)
                if row["neuron"] == DENSE_POINT and row.get("train_tokens"):
                    tokens[budget] = row["train_tokens"]
    if not cells:
        raise FrontierError(f"no finished points under steps-*/ of {', '.join(map(str, roots))}")
    summary = []
    for (name, budget), rows in cells.items():
        gaps = [row["bpb_vs_dense"] for row in rows if row.get("bpb_vs_dense") is not None]
        zeros = [row["zero_fraction"] for row in rows]
        summary.append({
            "point": name, "neuron": rows[0]["neuron"], "adaptive_k": rows[0].get("adaptive_k"), "budget": budget,
            "tokens": tokens.get(budget), "seeds": len(rows),
            "bits_per_byte": sum(row["bits_per_byte"] for row in rows) / len(rows),
            "gap_mean": sum(gaps) / len(gaps) if gaps else None, "gap_worst": max(gaps) if gaps else None,
            "zeros_mean": sum(zeros) / len(zeros), "zeros_min": min(zeros),
        })
    summary.sort(key=lambda cell: (_point_order(cell), cell["budget"]))
    return summary


def budget_table(summary: list[dict[str, Any]]) -> str:
    """The budget summary as Markdown: one row per point and budget."""
    def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(scale * value, spec)

    lines = ["| point | steps | tokens | seeds | bits/byte (mean) | vs dense twin, mean | worst seed | zeros, mean "
             "| zeros, lowest |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in summary:
        lines.append(f"| {cell['point']} | {cell['budget']:,} | {fmt(cell['tokens'], ',.0f')} | {cell['seeds']} "
                     f"| {cell['bits_per_byte']:.4f} | {fmt(cell['gap_mean'], '+.2f', 100)}% "
                     f"| {fmt(cell['gap_worst'], '+.2f', 100)}% | {100 * cell['zeros_mean']:.1f}% "
                     f"| {100 * cell['zeros_min']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot_budgets(summary: list[dict[str, Any]], path: Path, *, goal_bpb: float = 0.03) -> None:
    """Left: bits per byte vs the dense twin (mean over seeds, bar up to the worst seed) against training tokens,
    one line per point; right: the zero fraction against the same x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_zeros) = plt.subplots(1, 2, figsize=(12, 5))
    names = list(dict.fromkeys(cell["point"] for cell in summary))
    for name in names:
        cells = sorted((c for c in summary if c["point"] == name and c["tokens"] and c["gap_mean"] is not None),
                       key=lambda c: c["budget"])
        if not cells or name == DENSE_POINT:
            continue
        xs = [c["tokens"] for c in cells]
        means = [100 * c["gap_mean"] for c in cells]
        worst = [100 * (c["gap_worst"] - c["gap_mean"]) for c in cells]
        line = ax.errorbar(xs, means, yerr=[[0] * len(cells), worst], marker="o", capsize=3, label=name)
        ax_zeros.plot(xs, [100 * c["zeros_mean"] for c in cells], marker="o", color=line[0].get_color(), label=name)
    ax.axhline(100 * goal_bpb, color="tab:red", lw=0.8, ls="--", label=f"goal: +{goal_bpb:.0%}")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("held-out bits per byte vs dense twin (%)")
    ax.set_title("mean over seeds; bars reach the worst seed", fontsize=9)
    ax_zeros.axhline(70.0, color="tab:red", lw=0.8, ls="--", label="goal: 70% zeros")
    ax_zeros.set_ylabel("activation sparsity (% zeros)")
    for axis in (ax, ax_zeros):
        axis.set_xscale("log")
        axis.set_xlabel("training tokens")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save_figure(fig, path)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A short aligned table for the terminal."""
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'point':<16} {'bits/byte':>9} {'vs dense':>9} {'zeros':>7} {'SynOps/tok':>11} {'energy':>7}"]
    for row in rows:
        rel = None if row["bpb_vs_dense"] is None else 100.0 * row["bpb_vs_dense"]
        lines.append(f"{row['point']:<16} {fmt(row['bits_per_byte'], '.4f'):>9} {fmt(rel, '+.2f'):>8}% "
                     f"{fmt(100.0 * row['zero_fraction'], '.1f'):>6}% {fmt(row['synops_per_token'], ',.0f'):>11} "
                     f"{fmt(row['energy_ratio'], '.3f'):>7}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/frontier.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the recipe every point trains")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "frontier", help="root of the point run dirs")
    parser.add_argument("--points", default=",".join(DEFAULT_POINTS),
                        help=f"comma-separated points in run order (default {','.join(DEFAULT_POINTS)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe override passed to every point's training (repeatable), e.g. train.max_steps=300")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens for eval and sparsity")
    parser.add_argument("--cache-dir", type=Path, default=None, help="tokenizer/data cache of spikelm train")
    parser.add_argument("--isolate", action="store_true", help="run each spikelm step in a fresh Python process")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="'NAME=BASE SET ...'",
                        help="an extra point: BASE (a point name) trained with more overrides, e.g. "
                        "'lsq=adaptive-k0.4 model.adaptive_scale=channel'; {dense} in a value is this sweep's dense "
                        "twin export, {dense@N} the N-step budget's (repeatable; run after --points)")
    parser.add_argument("--budgets", default=None, metavar="N,N,...",
                        help="training budgets in steps: each point is trained once per budget, in "
                        "<out>/steps-<N>/ (--set train.max_steps=N); <out>/budgets.{md,json,png} show the gap to the "
                        "dense twin against training tokens")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="OUT",
                        help="train nothing: print a Markdown table of mean and range per point over these finished "
                        "sweeps (e.g. one per seed); for --budgets sweeps, per point and budget with the worst seed")
    parser.add_argument("--plot", type=Path, default=None,
                        help="with --combine over --budgets sweeps: also draw the gap against training tokens here")
    return parser


def parse_budgets(text: str | None) -> list[int | None]:
    """``"240,1000,4000"`` -> ``[240, 1000, 4000]``; ``None`` -> ``[None]`` (one sweep, the recipe's length)."""
    if text is None:
        return [None]
    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FrontierError(f"--budgets {text!r}: expected comma-separated step counts, e.g. 240,1000,4000") from None
    if not budgets or min(budgets) < 1 or len(set(budgets)) != len(budgets):
        raise FrontierError(f"--budgets {text!r}: expected distinct positive step counts, e.g. 240,1000,4000")
    return budgets


def budget_config_notes(roots: list[Path]) -> list[str]:
    """A note per (point, budget) whose exported neuron config differs between the roots (e.g. a seed's sweep
    pinned after a recipe edit): their mean would mix two models."""
    notes = []
    budgets = sorted({budget for root in roots for budget in budget_dirs(root)})
    for budget in budgets:
        dirs = [root / f"steps-{budget}" for root in roots if (root / f"steps-{budget}").is_dir()]
        names = sorted({path.parent.name for d in dirs for path in d.glob("*/point.json")})
        for name in names:
            values = neuron_config_differences(dirs, name)
            if values:
                notes.append(f"Note: {name} at {budget} steps was not trained with the same neuron config in every "
                             f"root ({values}); its mean mixes two models.")
    return notes


def _combine(args: argparse.Namespace) -> None:
    if any(budget_dirs(root) for root in args.combine):
        summary = budget_summary(args.combine)
        print(budget_table(summary), end="")
        for note in budget_config_notes(args.combine):
            print("\n" + note)
        if args.plot is not None:
            plot_budgets(summary, args.plot)
            print(f"wrote {args.plot}")
        return
    print(combine_sweeps(args.combine), end="")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.combine is not None:
            _combine(args)
            return 0
        variants = [parse_variant(text) for text in args.variants]
        # --points '' with variants: only the variants (e.g. one more seed of a variant beside a running sweep)
        points = ([] if variants and not args.points.strip() else parse_points(args.points)) + variants
        names = [p.name for p in points]
        if len(set(names)) != len(names):
            raise FrontierError(f"--variant: a name is used twice in {', '.join(names)}")
        budgets = parse_budgets(args.budgets)
        if args.tokens < 1:
            raise FrontierError(f"--tokens {args.tokens}: must be a positive number of held-out tokens")
        if not args.recipe.is_file():
            raise FrontierError(f"--recipe {str(args.recipe)!r} does not exist; pass e.g. "
                                "recipes/shakespeare-tiny.yaml")
        for text in args.overrides:
            key = text.split("=", 1)[0].strip()
            if key in ("model.neuron", "model.adaptive_k"):
                raise FrontierError(f"--set {text!r}: the points choose model.neuron and model.adaptive_k")
            if key in ("train.max_steps", "train.max_tokens") and args.budgets is not None:
                raise FrontierError(f"--set {text!r}: --budgets sets the training length")
        args.recipe = args.recipe.resolve()
        args.root = args.out
        _environment()
        say = lambda message: print(message, flush=True)  # noqa: E731
        overrides = list(args.overrides)
        for budget in budgets:
            args.budget = budget
            args.out = args.root if budget is None else args.root / f"steps-{budget}"
            args.overrides = overrides + ([] if budget is None else [f"train.max_steps={budget}"])
            rows = run_sweep(points, args, say)
        if budgets != [None]:
            summary = budget_summary([args.root])
            write_text_atomically(args.root / "budgets.md", budget_table(summary))
            write_json_atomically(args.root / "budgets.json", summary)
            plot_budgets(summary, args.root / "budgets.png")
            print(budget_table(summary), end="")
            print(f"wrote {args.root / 'budgets.md'}, {args.root / 'budgets.json'} and {args.root / 'budgets.png'}")
            return 0
    except FrontierError as err:
        print(f"tools/frontier.py: error: {err}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    print(f"wrote {args.out / 'frontier.csv'}, {args.out / 'frontier.json'} and {args.out / 'frontier.png'}")
    return 0


def run_sweep(points: list[Point], args: argparse.Namespace, say: Any) -> list[dict[str, Any]]:
    """Every point in ``args.out`` with ``args.overrides``; the table and plot are rebuilt after each point."""
    args.out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args.recipe, args.overrides, args.tokens)
    args.pinned_recipe = pin_sweep(args.out, args.recipe, settings, log=say)
    # Captured once, when the sweep starts (later calls keep it): the commit and machine that trained it, not
    # those of a call that only redraws the table; other engineers may commit while a long sweep runs.
    table = args.out / "frontier.json"
    machine = read_json(table)["machine"] if table.is_file() else machine_info()
    rows: list[dict[str, Any]] = []
    where = "" if args.budget is None else f" ({args.budget} steps)"
    for index, point in enumerate(points, 1):
        print(f"[frontier] point {index}/{len(points)}{where}: {point.name}", flush=True)
        run_point(point, args, log=say)
        # Rebuilt after every point so a cut-short sweep still leaves a table of what finished.
        rows = collect_rows(args.out, [p.name for p in points])
        write_table(args.out, rows, settings, machine)
        plot_frontier(rows, args.out / "frontier.png")
    return rows


if __name__ == "__main__":
    sys.exit(main())
