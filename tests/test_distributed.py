"""Two gloo processes (ZeRO-2, ZeRO-3) follow the one-process loss curve with the same global batch, and their
checkpoints resume in one process.

``spikelm train --nproc-per-node 2`` re-launches itself under torchrun; on CPU DeepSpeed talks over gloo.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_train import read_metrics, train_cli, write_corpus, write_tiny_recipe

from spikelm.train.checkpoint import find_latest_checkpoint

STEPS = 6
MICRO = 4  # per rank with 2 ranks; the one-process reference uses 2 x MICRO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _recipe(directory: Path, corpus: Path, zero_stage: int, micro: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_tiny_recipe(directory, corpus, train={"max_steps": STEPS, "micro_batch_size": micro},
                             deepspeed={"zero_stage": zero_stage}, eval={"every_steps": 0, "sample_tokens": 4})


def _curve(run_dir: Path) -> list[float]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path, cache: Path) -> list[float]:
    """The one-process loss curve with the global batch of the two-process runs."""
    directory = tmp_path_factory.mktemp("reference")
    assert train_cli(_recipe(directory, corpus, 0, 2 * MICRO), directory / "run", cache) == 0
    return _curve(directory / "run")


def _two_processes(recipe: Path, out: Path, cache: Path, *extra: str) -> int:
    # The launcher starts fresh processes; rendezvous variables of this (single-process) session must not leak in.
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             if k in os.environ}
    try:
        return train_cli(recipe, out, cache, "--nproc-per-node", "2", *extra)
    finally:
        os.environ.update(saved)


@pytest.mark.slow
def test_zero2_two_processes_match_one_and_resume_in_one_process(tmp_path, corpus, cache, reference):
    out = tmp_path / "run"
    assert _two_processes(_recipe(tmp_path / "two", corpus, 2, MICRO), out, cache, "--stop-at-step", "3") == 0
    assert find_latest_checkpoint(out).name == "step-00000003"
    # Continue the same run in one process with the same global batch: ZeRO-2 state is re-partitioned.
    assert train_cli(_recipe(tmp_path / "one", corpus, 2, 2 * MICRO), out, cache) == 0
    assert _curve(out) == pytest.approx(reference, rel=2e-4, abs=2e-4)
    assert (out / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_zero3_two_processes_match_one_and_resume_in_one_process(tmp_path, corpus, cache, reference):
    out = tmp_path / "run"
    assert _two_processes(_recipe(tmp_path / "two", corpus, 3, MICRO), out, cache, "--stop-at-step", "3") == 0
    assert find_latest_checkpoint(out).name == "step-00000003"
    # ZeRO-3 partitions the parameters too: one process rebuilds them through DeepSpeed's universal checkpoint.
    assert train_cli(_recipe(tmp_path / "one", corpus, 3, 2 * MICRO), out, cache) == 0
    assert _curve(out) == pytest.approx(reference, rel=2e-4, abs=2e-4)
    # The ZeRO-3 export gathers the partitioned parameters into one full model.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "export")
    assert all(p.numel() > 0 for p in model.parameters())


def test_hostfile_goes_through_the_deepspeed_launcher(tmp_path, corpus, monkeypatch):
    # Multi-node needs ssh between hosts, which a test machine does not have: check the command we hand over.
    import spikelm.commands.train as train_command

    calls = []
    monkeypatch.setattr(train_command, "_run_forwarding_signals",
                        lambda cmd, env, to_ranks: calls.append((cmd, env)) or (0, None))
    monkeypatch.delenv("SPIKELM_LAUNCHED", raising=False)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    recipe = _recipe(tmp_path, corpus, 2, MICRO)
    assert train_cli(recipe, tmp_path / "run", tmp_path / "cache", "--hostfile", str(hostfile),
                     "--nproc-per-node", "8", "--master-port", "29555") == 0
    (cmd, env), = calls
    launcher = cmd[cmd.index("deepspeed.launcher.runner") - 1:]
    assert launcher[:9] == ["-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_port", "29555",
                            "--no_local_rank", "--num_gpus", "8"]
    assert "--no_ssh_check" not in cmd  # two real nodes: DeepSpeed's ssh check stays
    assert cmd[cmd.index("--module") + 1:][:3] == ["spikelm", "train", str(recipe.resolve())]
    assert "--nproc-per-node" not in cmd and "--hostfile" not in cmd[cmd.index("--module"):]
    assert env["SPIKELM_LAUNCHED"] == "1"
    assert train_cli(recipe, tmp_path / "run", tmp_path / "cache", "--hostfile", str(tmp_path / "missing")) == 2


def test_gpus_is_the_number_of_processes_per_node():
    import argparse

    import spikelm.commands.train as train_command

    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    assert parser.parse_args(["r.yaml", "--gpus", "4"]).nproc_per_node == 4
    assert parser.parse_args(["r.yaml", "--nproc-per-node", "2"]).nproc_per_node == 2


@pytest.mark.slow
def test_one_host_hostfile_runs_through_the_deepspeed_launcher(tmp_path, corpus, cache, reference):
    # The multi-node path for real: DeepSpeed's runner and launch with a one-host hostfile (no ssh needed for this
    # machine), two gloo ranks; the same losses as the one-process run with the same global batch.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             if k in os.environ}
    try:
        assert train_cli(_recipe(tmp_path / "two", corpus, 2, MICRO), out, cache, "--hostfile", str(hostfile)) == 0
    finally:
        os.environ.update(saved)
    assert _curve(out) == pytest.approx(reference, rel=2e-4, abs=2e-4)
    assert (out / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_distillation_with_zero3_two_processes_matches_one_and_resumes(tmp_path, corpus, cache):
    """The teacher runs unsharded on every rank beside a ZeRO-3 student; the curve and resume stay exact."""
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    recipe = write_tiny_recipe(teacher_dir, corpus, model={"neuron": "none"}, train={"max_steps": 2},
                               eval={"every_steps": 0, "sample_tokens": 0})
    assert train_cli(recipe, teacher_dir / "run", cache) == 0
    distill = {"teacher": str(teacher_dir / "run" / "export"), "alpha": 0.5, "temperature": 2.0}

    def recipe_for(name: str, zero_stage: int, micro: int) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        return write_tiny_recipe(directory, corpus, train={"max_steps": STEPS, "micro_batch_size": micro},
                                 deepspeed={"zero_stage": zero_stage}, eval={"every_steps": 0, "sample_tokens": 0},
                                 distill=distill)

    assert train_cli(recipe_for("reference", 0, 2 * MICRO), tmp_path / "reference" / "run", cache) == 0
    out = tmp_path / "run"
    assert _two_processes(recipe_for("two", 3, MICRO), out, cache, "--stop-at-step", "3") == 0
    assert train_cli(recipe_for("one", 3, 2 * MICRO), out, cache) == 0
    reference_rows, rows = read_metrics(tmp_path / "reference" / "run"), read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "kl"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference_rows], rel=2e-4, abs=2e-4)
