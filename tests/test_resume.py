"""Checkpoints: stop-and-resume equals an uninterrupted run step for step; damaged checkpoints are never loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import read_metrics, train_cli, write_corpus, write_tiny_recipe

from spikelm.train.checkpoint import COMPLETE, find_latest_checkpoint
from spikelm.train.schedule import lr_at


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, corpus, cache):
    # Accumulation, periodic eval + sampling and a periodic checkpoint all sit inside the interrupted stretch.
    sections = {"train": {"max_steps": 10, "grad_accum": 2}, "eval": {"every_steps": 3},
                "checkpoint": {"every_steps": 3}}
    recipe = write_tiny_recipe(tmp_path, corpus, **sections)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_cli(recipe, straight, cache) == 0

    assert train_cli(recipe, split, cache, "--stop-at-step", "4") == 0
    assert find_latest_checkpoint(split).name == "step-00000004"
    assert max(_losses(split)) == 4
    assert train_cli(recipe, split, cache) == 0  # resumes automatically from the run directory

    expected, resumed = _losses(straight), _losses(split)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    final = [read_metrics(run, "eval")[-1] for run in (straight, split)]
    assert final[0]["loss"] == pytest.approx(final[1]["loss"], rel=1e-6)
    assert final[0]["sample"] == final[1]["sample"]
    # Both exports hold the same weights.
    from safetensors.torch import load_file

    a, b = (load_file(run / "export" / "model.safetensors") for run in (straight, split))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_damaged_checkpoints_are_never_loaded(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache, "--stop-at-step", "2") == 0
    good = find_latest_checkpoint(out)

    # A crash mid-write leaves a temporary folder and no pointer update: it is ignored.
    (out / "checkpoints" / ".tmp-step-00000003").mkdir()
    assert find_latest_checkpoint(out) == good
    # A folder that lost its completion marker is not a checkpoint, even if `latest` names it.
    unfinished = out / "checkpoints" / "step-00000009"
    unfinished.mkdir()
    (out / "checkpoints" / "latest").write_text(unfinished.name + "\n")
    assert find_latest_checkpoint(out) == good
    assert train_cli(recipe, tmp_path / "other", cache, "--resume", str(unfinished)) == 2
    assert COMPLETE in capsys.readouterr().err

    # A corrupt file gives an error naming it.
    (good / "trainer_state.pt").write_bytes(b"garbage")
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err
    assert "trainer_state.pt" in err and "corrupt" in err


def test_resume_with_a_different_model_shape_is_an_error(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 4})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache, "--stop-at-step", "2") == 0
    assert train_cli(recipe, out, cache, "--set", "model.hidden_size=48") == 2
    err = capsys.readouterr().err
    assert "hidden_size: checkpoint 32 vs recipe 48" in err


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues(tmp_path, corpus, cache):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 100_000})
    out = tmp_path / "run"
    # A fresh single-process job: drop the rendezvous variables an in-process run of this session may have set.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "spikelm.commands.main", "train", str(recipe), "--out", str(out),
                             "--cache-dir", str(cache), "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "stopped by signal" in output
    checkpoint = find_latest_checkpoint(out)
    stopped_at = int(checkpoint.name.split("-")[1])
    assert stopped_at == max(r["step"] for r in read_metrics(out)) >= 1
    # Resume continues from the next step (the LR schedule is a pure function of the step).
    assert train_cli(recipe, out, cache, "--set", f"train.max_steps={stopped_at + 2}") == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows][-2:] == [stopped_at + 1, stopped_at + 2]


def test_lr_schedule_is_warmup_then_cosine():
    lrs = [lr_at(s, lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=20) for s in range(25)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[19] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(15 / 16 * torch.pi)).item()))
    assert lrs[20:] == [pytest.approx(0.1)] * 5
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=20)


def test_streaming_data_resumes_exactly(tmp_path, corpus, cache):
    # Streaming: the loader position (documents consumed + carried-over tokens) is in the checkpoint.
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 6}, data={"streaming": True, "shuffle_buffer": 50})
    assert train_cli(recipe, tmp_path / "straight", cache) == 0
    assert train_cli(recipe, tmp_path / "split", cache, "--stop-at-step", "3") == 0
    assert train_cli(recipe, tmp_path / "split", cache) == 0
    expected, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(1, 7)] == pytest.approx([expected[s] for s in range(1, 7)], rel=1e-6)


def _two_file_source(directory: Path, corpus: Path, chars: int = 9_000) -> Path:
    directory.mkdir(parents=True)
    text = corpus.read_text(encoding="utf-8")
    (directory / "a.txt").write_text(text[:chars], encoding="utf-8")
    (directory / "b.txt").write_text(text[chars:2 * chars], encoding="utf-8")
    return directory


def _snapshot(run_dir: Path) -> dict[str, int]:
    root = run_dir / "checkpoints"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_a_streaming_resume_on_another_source_is_refused_leaving_the_checkpoint(tmp_path, corpus, cache, capsys):
    source = _two_file_source(tmp_path / "src", corpus)
    recipe = write_tiny_recipe(tmp_path, corpus, data={"source": str(source), "streaming": True},
                               tokenizer={"sample_chars": 6_000})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache, "--stop-at-step", "3") == 0
    before = _snapshot(out)
    (source / "c.txt").write_text("More text arrives.\n\nAnd more.\n", encoding="utf-8")
    capsys.readouterr()
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err.strip()
    assert "data.source" in err and "step-00000003" in err and "Traceback" not in err and "\n" not in err
    assert _snapshot(out) == before


def test_a_stream_file_vanishing_mid_run_is_named_and_the_checkpoint_kept(tmp_path, corpus, cache, capsys,
                                                                          monkeypatch):
    from spikelm.train import loop

    source = _two_file_source(tmp_path / "src", corpus, chars=4_000)  # a pass is ~30 steps
    recipe = write_tiny_recipe(tmp_path, corpus, data={"source": str(source), "streaming": True},
                               tokenizer={"sample_chars": 6_000}, train={"max_steps": 150},
                               checkpoint={"every_steps": 5}, logging={"every_steps": 5})
    real_save = loop.save
    moved = tmp_path / "b.txt.away"

    def save_then_lose_a_file(run):
        real_save(run)
        if not moved.exists():
            (source / "b.txt").rename(moved)  # the next pass over the stream needs it

    monkeypatch.setattr(loop, "save", save_then_lose_a_file)
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err.strip()
    assert str(source / "b.txt") in err and "cannot be read" in err and "\n" not in err
    latest = find_latest_checkpoint(out)
    assert (latest / COMPLETE).is_file()
    monkeypatch.setattr(loop, "save", real_save)
    moved.rename(source / "b.txt")  # restored: the run continues from its last checkpoint
    assert train_cli(recipe, out, cache) == 0
    assert max(r["step"] for r in read_metrics(out)) == 150
