"""``tools/frontier.py`` end to end on a two-point sweep (dense twin + adaptive k=3) at test size: a tiny model, a
few steps, a slice of real Shakespeare. Checks the table, the plot and that a second call retrains nothing and
overwrites no finished point."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from test_train import write_corpus, write_tiny_recipe  # noqa: F401  (also sets the DeepSpeed CPU environment)

REPO = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location("frontier_tool", REPO / "tools" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


frontier = _load_tool()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A finished two-point sweep and the arguments that made it."""
    root = tmp_path_factory.mktemp("frontier")
    corpus = write_corpus(root / "corpus", chars=20_000)
    recipe = write_tiny_recipe(root, corpus, train={"max_steps": 40},
                               eval={"every_steps": 0, "max_batches": 1, "sample_tokens": 0})
    out = root / "out"
    # --set reaches every point's training: 3 steps instead of the recipe's 40.
    argv = ["--recipe", str(recipe), "--out", str(out), "--points", "none,adaptive-k3", "--set", "train.max_steps=3",
            "--tokens", "200", "--cache-dir", str(root / "cache")]
    assert frontier.main(argv) == 0
    return out, argv


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    """Modification time and content of every file of the finished points."""
    return {str(path.relative_to(out)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(out.glob("*/**/*")) if path.is_file()}


def test_two_point_sweep_writes_table_and_plot(sweep):
    out, _ = sweep
    with open(out / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["point"] for row in rows] == ["none", "adaptive-k3"]
    table = json.loads((out / "frontier.json").read_text())
    points = {row["point"]: row for row in table["points"]}
    assert set(points) == {"none", "adaptive-k3"}
    assert table["settings"]["set"] == ["train.max_steps=3"] and table["settings"]["tokens"] == 200
    assert table["machine"]["nproc"] >= 1 and table["machine"]["torch"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "frontier.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in markdown[2:]] == ["none", "adaptive-k3"]

    dense, spiking = points["none"], points["adaptive-k3"]
    for name, row in points.items():
        # every figure comes from the files spikelm train / eval / sparsity wrote for that point
        evaluation = json.loads((out / name / "eval.json").read_text())
        sparsity = json.loads((out / name / "sparsity.json").read_text())
        assert row["bits_per_byte"] == evaluation["bits_per_byte"] > 0
        assert row["zero_fraction"] == sparsity["total"]["zero_fraction"]
        assert row["energy_ratio"] == sparsity["energy_ratio"]
        assert row["train_steps"] == 3 and row["train_tokens"] == 3 * 4 * 16
        assert row["eval_tokens"] == 200 and row["sparsity_tokens"] == 200

    assert yaml.safe_load((out / "adaptive-k3" / "recipe.yaml").read_text())["model"]["adaptive_k"] == 3.0
    assert yaml.safe_load((out / "none" / "recipe.yaml").read_text())["model"]["neuron"] == "none"
    assert dense["bpb_vs_dense"] == 0.0 and dense["energy_ratio"] == 1.0 and dense["synops_per_token"] == 0
    assert spiking["bpb_vs_dense"] == pytest.approx(spiking["bits_per_byte"] / dense["bits_per_byte"] - 1)
    assert spiking["synops_per_token"] > 0 and 0 < spiking["energy_ratio"] < 1
    assert spiking["dense_macs_per_token"] == dense["dense_macs_per_token"] > 0  # same sites, same fan-out


def test_rerun_retrains_nothing_and_keeps_finished_points(sweep, capsys):
    out, argv = sweep
    before = _snapshot(out)
    assert frontier.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 2
    assert "spikelm train" not in printed
    assert _snapshot(out) == before


def test_a_point_without_results_is_measured_again_without_retraining(sweep, capsys):
    out, argv = sweep
    point = out / "adaptive-k3"
    kept = {name: (point / name).read_bytes() for name in ("point.json", "metrics.jsonl", "train-done.json")}
    weights = (point / "export" / "model.safetensors").stat().st_mtime_ns
    (point / "point.json").unlink()
    (point / "sparsity.json").unlink()
    assert frontier.main(argv) == 0
    printed = capsys.readouterr().out
    assert "spikelm sparsity" in printed and "spikelm train" not in printed and "spikelm eval" not in printed
    assert (point / "export" / "model.safetensors").stat().st_mtime_ns == weights
    for name, content in kept.items():
        assert (point / name).read_bytes() == content, name


def test_other_settings_for_the_same_sweep_are_refused(sweep, capsys):
    out, argv = sweep
    before = _snapshot(out)
    changed = [*argv[:-4], "--tokens", "300", *argv[-2:]]
    assert frontier.main(changed) == 2
    assert "tokens: sweep has 200, now 300" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_combine_summarises_sweeps_without_training(sweep, capsys):
    out, _ = sweep
    before = _snapshot(out)
    assert frontier.main(["--combine", str(out), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = json.loads((out / "frontier.json").read_text())["points"]
    spiking = next(row for row in table if row["point"] == "adaptive-k3")
    cells = next(line for line in lines if line.startswith("| adaptive-k3 ")).split("|")
    rel = f"{100 * spiking['bpb_vs_dense']:+.2f}"
    assert cells[2].strip() == "2" and cells[3].strip() == f"{rel} ({rel} .. {rel})"
    assert lines[2].startswith("| none ")
    assert not any(line.startswith("Note:") for line in lines)
    assert _snapshot(out) == before


def test_combine_names_points_whose_neuron_config_differs(sweep, tmp_path, capsys):
    """A code default that changes between two sweeps is caught from the exported configs."""
    import shutil

    out, _ = sweep
    other = tmp_path / "other"
    shutil.copytree(out, other)
    config_path = other / "adaptive-k3" / "export" / "config.json"
    config = json.loads(config_path.read_text())
    config["max_spikes"] = 4
    config_path.write_text(json.dumps(config))
    assert frontier.main(["--combine", str(out), str(other)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note:")]
    assert len(notes) == 1 and "adaptive-k3" in notes[0] and "max_spikes 8 / 4" in notes[0]


@pytest.mark.parametrize("text", ["adaptive", "adaptive-k0", "adaptive-kx", "relu", "none,none", ""])
def test_bad_points_are_refused(text):
    with pytest.raises(frontier.FrontierError, match="points"):
        frontier.parse_points(text)


def test_point_names_select_the_neuron():
    assert frontier.parse_point("adaptive-k0.5").overrides == ["model.neuron=adaptive", "model.adaptive_k=0.5"]
    assert frontier.parse_point("lif").overrides == ["model.neuron=lif"]
    assert [p.name for p in frontier.parse_points("none, gated")] == ["none", "gated"]


def test_set_may_not_choose_the_neuron(tmp_path, capsys):
    code = frontier.main(["--out", str(tmp_path), "--points", "none", "--set", "model.neuron=lif"])
    assert code == 2
    assert "the points choose model.neuron" in capsys.readouterr().err


def test_an_edited_recipe_does_not_change_later_points(sweep, capsys):
    """Points train from the copy of the recipe taken when the sweep started, whatever happens to the file later."""
    out, argv = sweep
    recipe = Path(argv[argv.index("--recipe") + 1])
    assert (out / "sweep-recipe.yaml").read_text() == recipe.read_text()
    edited = yaml.safe_load(recipe.read_text())
    edited["optim"]["warmup_steps"] = 1
    recipe.write_text(yaml.safe_dump(edited))
    points = argv.index("--points") + 1
    assert frontier.main([*argv[:points], "none,adaptive-k3,adaptive-k1", *argv[points + 1:]]) == 0
    assert "changed since this sweep started" in capsys.readouterr().out
    trained = yaml.safe_load((out / "adaptive-k1" / "recipe.yaml").read_text())
    assert trained["optim"]["warmup_steps"] == 2 and trained["model"]["adaptive_k"] == 1.0
    rows = json.loads((out / "frontier.json").read_text())["points"]
    assert [row["point"] for row in rows] == ["none", "adaptive-k3", "adaptive-k1"]


@pytest.fixture(scope="module")
def budget_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two budgets (2 and 3 steps) of the dense twin, adaptive k=3 and a variant of it with a clipped STE."""
    root = tmp_path_factory.mktemp("budgets")
    corpus = write_corpus(root / "corpus", chars=20_000)
    recipe = write_tiny_recipe(root, corpus, train={"max_steps": 40},
                               eval={"every_steps": 0, "max_batches": 1, "sample_tokens": 0})
    out = root / "out"
    argv = ["--recipe", str(recipe), "--out", str(out), "--points", "none,adaptive-k3", "--budgets", "2,3",
            "--variant", "clip=adaptive-k3 model.adaptive_surrogate=clipped", "--tokens", "200",
            "--cache-dir", str(root / "cache")]
    assert frontier.main(argv) == 0
    return out


def test_budgets_train_each_point_per_budget_and_plot_the_gap(budget_sweep):
    out = budget_sweep
    assert sorted(frontier.budget_dirs(out)) == [2, 3]
    for steps in (2, 3):
        sweep = out / f"steps-{steps}"
        assert json.loads((sweep / "frontier-settings.json").read_text())["set"] == [f"train.max_steps={steps}"]
        rows = {row["point"]: row for row in json.loads((sweep / "frontier.json").read_text())["points"]}
        assert list(rows) == ["none", "adaptive-k3", "clip"]
        assert all(row["train_steps"] == steps and row["budget_steps"] == steps for row in rows.values())
        trained = yaml.safe_load((sweep / "clip" / "recipe.yaml").read_text())
        assert trained["model"]["adaptive_surrogate"] == "clipped" and trained["model"]["adaptive_k"] == 3.0
        assert trained["train"]["max_steps"] == steps
        assert rows["clip"]["set"][-1] == "model.adaptive_surrogate=clipped"
    summary = json.loads((out / "budgets.json").read_text())
    cells = {(cell["point"], cell["budget"]): cell for cell in summary}
    assert set(cells) == {(p, b) for p in ("none", "adaptive-k3", "clip") for b in (2, 3)}
    three = json.loads((out / "steps-3" / "frontier.json").read_text())["points"]
    clip = next(row for row in three if row["point"] == "clip")
    assert cells[("clip", 3)]["gap_mean"] == cells[("clip", 3)]["gap_worst"] == clip["bpb_vs_dense"]
    assert cells[("none", 2)]["tokens"] == 2 * 4 * 16 and cells[("clip", 3)]["seeds"] == 1
    assert (out / "budgets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "budgets.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["none", "none", "adaptive-k3", "adaptive-k3",
                                                                   "clip", "clip"]


def test_combine_over_budget_roots_gives_mean_and_worst_seed(budget_sweep, tmp_path, capsys):
    import shutil

    out = budget_sweep
    other = tmp_path / "seed1"
    shutil.copytree(out, other)
    # a worse second "seed": its clip point 10% above its dense twin at 3 steps
    path = other / "steps-3" / "clip" / "point.json"
    point = json.loads(path.read_text())
    dense = json.loads((other / "steps-3" / "none" / "point.json").read_text())
    point["bits_per_byte"] = 1.1 * dense["bits_per_byte"]
    path.write_text(json.dumps(point))
    first = json.loads((out / "steps-3" / "clip" / "point.json").read_text())["bits_per_byte"]
    plot = tmp_path / "curve.png"
    assert frontier.main(["--combine", str(out), str(other), "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = next(line for line in lines if line.startswith("| clip | 3 |")).split("|")
    gap = first / dense["bits_per_byte"] - 1
    assert cells[4].strip() == "2"
    assert cells[6].strip() == f"{100 * (gap + 0.1) / 2:+.2f}%" and cells[7].strip() == "+10.00%"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_and_budgets_are_parsed_and_checked(tmp_path, capsys):
    variant = frontier.parse_variant("kd=adaptive-k0.4 distill.teacher={dense} distill.alpha=0.5")
    assert (variant.name, variant.neuron, variant.adaptive_k) == ("kd", "adaptive", 0.4)
    assert variant.overrides == ["model.neuron=adaptive", "model.adaptive_k=0.4", "distill.teacher={dense}",
                                 "distill.alpha=0.5"]
    for bad in ("kd", "kd=", "kd=relu x.y=1", "kd=adaptive-k0.4 model.adaptive_k=1", "kd=none oops",
                "adaptive-k1=none a.b=1", "a/b=none a.b=1"):
        with pytest.raises(frontier.FrontierError, match="--"):
            frontier.parse_variant(bad)
    assert frontier.parse_budgets("240, 1000") == [240, 1000] and frontier.parse_budgets(None) == [None]
    for bad in ("", "0", "10,10", "ten"):
        with pytest.raises(frontier.FrontierError, match="--budgets"):
            frontier.parse_budgets(bad)
    assert frontier.main(["--out", str(tmp_path), "--budgets", "10", "--set", "train.max_steps=5"]) == 2
    assert "--budgets sets the training length" in capsys.readouterr().err
    # {dense} is this sweep's dense export, {dense@N} the N-step budget's; missing ones are an error
    export = tmp_path / "steps-7" / "none" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    sweep = tmp_path / "steps-9"
    assert frontier.resolve_overrides(["init.from={dense@7}", "seed=1"], sweep, tmp_path) == [
        f"init.from={export.resolve()}", "seed=1"]
    with pytest.raises(frontier.FrontierError, match="train that point first"):
        frontier.resolve_overrides(["distill.teacher={dense}"], sweep, tmp_path)


def test_empty_points_with_a_variant_runs_only_the_variant(tmp_path, capsys):
    """--points '' is allowed beside variants (a seed of one variant), and still refused alone."""
    assert frontier.main(["--out", str(tmp_path), "--points", ""]) == 2
    assert "--points is empty" in capsys.readouterr().err
    code = frontier.main(["--out", str(tmp_path / "v"), "--points", "", "--variant", "x=adaptive-k0.4 model.y=1",
                          "--recipe", str(tmp_path / "missing.yaml")])
    assert code == 2 and "--recipe" in capsys.readouterr().err  # got past the points: only the variant is left


def test_combine_over_budget_roots_names_a_point_trained_otherwise(budget_sweep, tmp_path, capsys):
    """A seed's sweep whose point trained with another neuron config (e.g. pinned after a recipe edit) is named."""
    import shutil

    other = tmp_path / "seed1"
    shutil.copytree(budget_sweep, other)
    config_path = other / "steps-2" / "adaptive-k3" / "export" / "config.json"
    config = json.loads(config_path.read_text())
    config["adaptive_resolution"] = 4
    config_path.write_text(json.dumps(config))
    assert frontier.main(["--combine", str(budget_sweep), str(other)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note:")]
    assert notes == ["Note: adaptive-k3 at 2 steps was not trained with the same neuron config in every root "
                     "(adaptive_resolution 1 / 4); its mean mixes two models."]
