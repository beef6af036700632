"""Nothing lost, nothing silently wrong: run-directory safety, safe checkpoint loading, one-line errors (issue 11)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import read_metrics, train_cli, write_corpus, write_tiny_recipe

from spikelm.errors import SpikeLMError
from spikelm.train.checkpoint import find_latest_checkpoint, read_trainer_state
from spikelm.train.rundir import LOCK, run_lock


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


# ------------------------------------------------------------------------------------------------ --no-resume


def test_no_resume_archives_the_previous_run_and_keeps_the_new_checkpoints(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 8}, checkpoint={"every_steps": 2, "keep_last": 2})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache) == 0
    assert _checkpoints(out) == ["step-00000006", "step-00000008"]

    assert train_cli(recipe, out, cache, "--no-resume", "--stop-at-step", "3") == 0
    assert "moved the previous run's checkpoints" in capsys.readouterr().out
    # The new run's checkpoints survive pruning and `latest` names one of them.
    assert _checkpoints(out) == ["step-00000002", "step-00000003"]
    assert find_latest_checkpoint(out).name == "step-00000003"
    assert _steps(out) == [1, 2, 3]
    # The old run is moved aside whole, not deleted.
    (archive,) = (out / "archive").iterdir()
    assert sorted(p.name for p in (archive / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000008"]
    assert [r["step"] for r in read_metrics(archive)] == list(range(1, 9))
    assert (archive / "export" / "model.safetensors").is_file() and not (out / "export").exists()

    # A plain rerun continues the new run from step 3, not the old one from step 8.
    assert train_cli(recipe, out, cache) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _steps(out) == list(range(1, 9))


def test_no_resume_with_resume_is_refused(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus)
    assert train_cli(recipe, tmp_path / "run", cache, "--no-resume", "--resume", str(tmp_path)) == 2
    assert "contradict" in capsys.readouterr().err


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    from spikelm.train.checkpoint import COMPLETE, _prune

    root = tmp_path / "checkpoints"
    for step in (5, 10, 30, 40):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / COMPLETE).write_text("{}")
    current = root / "step-00000015"
    current.mkdir()
    (current / COMPLETE).write_text("{}")
    _prune(root, current, keep_last=2)
    # Later steps belong to another timeline (a resume from an older checkpoint): neither counted nor deleted.
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010", "step-00000015", "step-00000030",
                                                       "step-00000040"]


# ------------------------------------------------------------------------------------------------ safe loading


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_in_trainer_state_does_not_run(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 4})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache, "--stop-at-step", "2") == 0
    checkpoint = find_latest_checkpoint(out)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)  # our own file loads weights-only
    marker = tmp_path / "pwned"
    torch.save({**state, "payload": _Exploit(marker)}, checkpoint / "trainer_state.pt")

    assert train_cli(recipe, tmp_path / "other", cache, "--resume", str(checkpoint)) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "trainer_state.pt" in err and "refusing to unpickle" in err

    # The same for a rank file.
    torch.save(state, checkpoint / "trainer_state.pt")
    rank_state = torch.load(checkpoint / "rank0.pt", weights_only=True)
    torch.save({**rank_state, "payload": _Exploit(marker)}, checkpoint / "rank0.pt")
    assert train_cli(recipe, out, cache) == 2
    assert "rank0.pt" in capsys.readouterr().err and not marker.exists()


def test_deepspeed_engine_files_are_scanned_before_deepspeed_unpickles_them(tmp_path, corpus, cache, capsys,
                                                                             monkeypatch):
    import argparse

    from spikelm.train.checkpoint import TRUST_ENV

    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 3})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache, "--stop-at-step", "2") == 0
    (engine_file,) = (find_latest_checkpoint(out) / "engine").glob("*model_states.pt")
    real = torch.load(engine_file, weights_only=False)
    marker = tmp_path / "pwned"
    torch.save({**real, "payload": _Exploit(marker)}, engine_file)
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err
    assert "system" in err and "refusing to load" in err and "--trust-checkpoint" in err
    assert not marker.exists()

    # An object DeepSpeed never writes, but harmless: refused unless the user vouches for the checkpoint.
    torch.save({**real, "extra": argparse.Namespace(note="mine")}, engine_file)
    assert train_cli(recipe, out, cache) == 2
    assert "argparse.Namespace" in capsys.readouterr().err
    monkeypatch.setenv(TRUST_ENV, "0")  # restored after the test: --trust-checkpoint sets it for this process
    assert train_cli(recipe, out, cache, "--trust-checkpoint") == 0
    assert _steps(out) == [1, 2, 3]


def test_trainer_state_without_model_config_is_named(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 4})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache, "--stop-at-step", "2") == 0
    checkpoint = find_latest_checkpoint(out)
    state = read_trainer_state(checkpoint)
    del state["model_config"]
    torch.save(state, checkpoint / "trainer_state.pt")
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err
    assert "trainer_state.pt" in err and "'model_config'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ run lock


def test_a_second_run_in_the_same_directory_is_refused(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 2})
    out = tmp_path / "run"
    out.mkdir()
    # Another process holds the run directory (as a running `spikelm train` does).
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from spikelm.train.rundir import run_lock\n"
                               "with run_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train_cli(recipe, out, cache) == 2
        err = capsys.readouterr().err
        assert "in use by a running spikelm train" in err and f"pid {holder.pid}" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind with the dead holder's PID
        holder.wait()
    assert f"pid {holder.pid}" in (out / LOCK).read_text()
    # A stale lock of a dead process is taken over.
    assert train_cli(recipe, out, cache) == 0
    assert _steps(out) == [1, 2]
    assert (out / LOCK).read_text() == ""  # released on exit


def test_run_lock_is_released_on_error(tmp_path):
    with pytest.raises(RuntimeError), run_lock(tmp_path):
        raise RuntimeError("boom")
    with run_lock(tmp_path), pytest.raises(SpikeLMError, match="in use"), run_lock(tmp_path):
        pass


# ------------------------------------------------------------------------------------------------ overrides


@pytest.mark.parametrize(("override", "typed"), [
    ("deepspeed.config.zero_optimization.stage=3", "deepspeed.zero_stage"),
    ("deepspeed.config.train_batch_size=999", "train.micro_batch_size"),
    ("deepspeed.config.bf16.enabled=true", "precision"),
])
def test_deepspeed_config_overrides_of_typed_fields_are_refused(tmp_path, corpus, cache, capsys, override, typed):
    recipe = write_tiny_recipe(tmp_path, corpus)
    assert train_cli(recipe, tmp_path / "run", cache, "--set", override) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert override.split("=")[0] in err and typed in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_name_that_is_not_a_folder_name_is_refused(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus)
    assert train_cli(recipe, tmp_path / "run", cache, "--set", "name=..") == 2
    assert "name:" in capsys.readouterr().err


def test_non_finite_learning_rate_is_refused(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus)
    assert train_cli(recipe, tmp_path / "run", cache, "--set", "optim.lr=inf") == 2
    assert "optim.lr" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ resume


def test_rerunning_a_finished_run_adds_nothing_and_a_changed_recipe_is_recorded(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 3})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache) == 0
    assert "held-out tokens)" in capsys.readouterr().out  # the eval line says how much it scored
    before = (out / "metrics.jsonl").read_text()
    assert train_cli(recipe, out, cache) == 0
    assert "finished at step 3 already" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before  # no second final eval row

    assert train_cli(recipe, out, cache, "--set", "train.max_steps=4", "--set", "optim.lr=0.005") == 0
    assert "optim.lr: 0.01 -> 0.005" in capsys.readouterr().out
    (change,) = read_metrics(out, "recipe_change")
    assert change["step"] == 3 and change["changes"]["optim.lr"] == [0.01, 0.005]
    assert change["changes"]["train.max_steps"] == [3, 4]
    assert _steps(out) == [1, 2, 3, 4]


def test_a_smaller_vocabulary_than_asked_is_reported(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 1}, tokenizer={"vocab_size": 8000,
                                                                                   "sample_chars": 2000})
    assert train_cli(recipe, tmp_path / "run", cache) == 0
    assert "fewer than tokenizer.vocab_size=8000" in capsys.readouterr().out


def test_divergence_before_any_checkpoint_says_so(tmp_path, corpus, cache, capsys, monkeypatch):
    import spikelm.train.loop as loop

    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 3})
    monkeypatch.setattr(loop, "lm_cross_entropy", lambda logits, targets: logits.sum() * float("inf"))
    assert train_cli(recipe, tmp_path / "run", cache) == 2
    err = capsys.readouterr().err
    assert "no checkpoint was written yet" in err and "last good checkpoint" not in err


# ------------------------------------------------------------------------------------------------ run directory


def test_a_file_named_checkpoints_is_refused_before_training(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    assert train_cli(recipe, out, cache) == 2
    assert "checkpoints" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, corpus, cache, capsys,
                                                                        monkeypatch):
    import spikelm.train.checkpoint as checkpoint_module

    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 6}, checkpoint={"every_steps": 2})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache, "--stop-at-step", "2") == 0
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "trainer_state" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "step-00000002" in err and "Traceback" not in err
    assert find_latest_checkpoint(out).name == "step-00000002"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # torch's zip writer reports a failed write as a RuntimeError: the same one-line error, the same cleanup.
    def failed_write(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint_module.torch, "save", failed_write)
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "PytorchStreamWriter" in err and "Traceback" not in err
    assert find_latest_checkpoint(out).name == "step-00000002"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    assert train_cli(recipe, out, cache) == 0
    assert _steps(out) == list(range(1, 7))


def test_a_damaged_engine_file_names_the_fix_and_resume_previous_falls_back(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 3})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache, "--stop-at-step", "4") == 0
    latest = find_latest_checkpoint(out)
    assert latest.name == "step-00000004"
    for file in (latest / "engine").rglob("*.pt"):
        file.write_bytes(file.read_bytes()[:100])  # truncated
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err
    assert "delete or move" in err and "--resume previous" in err and "world size 1, now 1" not in err
    assert train_cli(recipe, out, cache, "--resume", "previous") == 0
    output = capsys.readouterr().out
    assert "step-00000002" in output and "resumed from" in output
    assert _steps(out) == list(range(1, 7))
    assert (latest / "COMPLETE").is_file() or not latest.exists()  # step 4 was rewritten by the resumed run
    assert train_cli(recipe, tmp_path / "empty", cache, "--resume", "previous") == 2
    assert "no previous checkpoint" in capsys.readouterr().err


def test_a_non_utf8_data_file_is_named_with_the_byte_offset(tmp_path, cache, capsys):
    data = tmp_path / "latin1.txt"
    data.write_bytes(b"Hello world.\n\n" * 200 + "Caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    recipe = write_tiny_recipe(tmp_path, data)
    assert train_cli(recipe, tmp_path / "run", cache) == 2
    err = capsys.readouterr().err
    assert str(data) in err and f"offset {14 * 200 + 3}" in err and "Traceback" not in err


def test_a_non_utf8_file_in_a_stream_is_named_too(tmp_path, cache, capsys):
    data = tmp_path / "latin1.txt"
    data.write_bytes(b"Hello world.\n\n" * 2000 + "Caf\u00e9\n".encode("latin-1") + b"more text\n" * 100)
    recipe = write_tiny_recipe(tmp_path, data, data={"source": str(data), "streaming": True})
    assert train_cli(recipe, tmp_path / "run", cache) == 2
    err = capsys.readouterr().err
    assert str(data) in err and f"offset {14 * 2000 + 3}" in err


def test_first_invalid_utf8_counts_across_chunks(tmp_path):
    from spikelm.train.data_sources import first_invalid_utf8

    path = tmp_path / "t.txt"
    path.write_bytes("ab\u00e9".encode() + b"cd\xff")
    assert first_invalid_utf8(path, chunk=3) == 6  # the 2-byte "é" straddles the chunk boundary
    path.write_bytes("ab\u00e9".encode())
    assert first_invalid_utf8(path, chunk=3) is None
    path.write_bytes(b"ab\xc3")  # a truncated multi-byte character at the end
    assert first_invalid_utf8(path, chunk=2) == 2


# ------------------------------------------------------------------------------------------------ saved models


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path, cache: Path) -> Path:
    directory = tmp_path_factory.mktemp("export")
    recipe = write_tiny_recipe(directory, corpus, train={"max_steps": 1})
    assert train_cli(recipe, directory / "run", cache) == 0
    return directory / "run" / "export"


def _damaged_copy(export_dir: Path, tmp_path: Path, damage: str) -> Path:
    model_dir = tmp_path / "model"
    shutil.copytree(export_dir, model_dir)
    if damage == "config":
        (model_dir / "config.json").write_text('{"model_type": "spikelm", "hidden_')
    else:
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model_dir


@pytest.mark.parametrize("damage", ["config", "weights"])
@pytest.mark.parametrize("command", ["generate", "eval", "sparsity"])
def test_a_damaged_model_directory_is_one_line_naming_the_file(export_dir, corpus, tmp_path, capsys, damage, command):
    from spikelm.commands.main import main

    model_dir = _damaged_copy(export_dir, tmp_path, damage)
    argv = {"generate": ["generate", str(model_dir), "ROMEO:"],
            "eval": ["eval", str(model_dir), "--text", str(corpus)],
            "sparsity": ["sparsity", str(model_dir), "--text", str(corpus)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert ("config.json" if damage == "config" else "model.safetensors") in err
    assert "tokenizer" not in err


@pytest.mark.parametrize("value", ["-5", "0"])
def test_eval_block_size_must_be_positive(export_dir, corpus, capsys, value):
    from spikelm.commands.main import main

    assert main(["eval", str(export_dir), "--text", str(corpus), "--block-size", value]) == 2
    assert f"--block-size {value}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "sparsity"])
def test_a_non_utf8_text_file_is_named_by_eval_and_sparsity(export_dir, tmp_path, capsys, command):
    from spikelm.commands.main import main

    text = tmp_path / "latin1.txt"
    text.write_bytes(b"Hello world. " * 10 + "Caf\u00e9".encode("latin-1"))
    assert main([command, str(export_dir), "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert str(text) in err and "offset 133" in err


def test_eval_reports_the_tokens_it_scored(export_dir, corpus, tmp_path, capsys):
    from spikelm.commands.main import main

    assert main(["eval", str(export_dir), "--text", str(corpus), "--tokens", "100", "--block-size", "16",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["tokens"] == 100
    assert "tokens 100" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ signals


def _descendants(pid: int) -> set[int]:
    """PIDs of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _survivors(pids: set[int], seconds: float) -> list[int]:
    """The processes of ``pids`` still alive after waiting up to ``seconds`` for all of them to end."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _launch_two_ranks(recipe: Path, out: Path, cache: Path, *extra: str, hostfile: Path | None = None
                      ) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SPIKELM_LAUNCHED")}
    cmd = [sys.executable, "-m", "spikelm", "train", str(recipe), "--out", str(out), "--cache-dir", str(cache),
           "--no-progress", *(["--hostfile", str(hostfile)] if hostfile else ["--nproc-per-node", "2"]), *extra]
    # Output to a file: ranks that outlive the launcher keep a pipe open, and a test must never block on them.
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 (closed with the test's tmp_path)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _log(out: Path) -> str:
    path = out.parent / f"{out.name}.log"
    return path.read_text()[-6000:] if path.is_file() else ""


def _wait_for_step(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"no training step within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_signal_to_the_launcher_stops_every_rank_and_the_run_resumes_exactly(tmp_path, corpus, cache, how):
    steps = 100_000  # never reached: the run must stop because of the signal
    sections = {"train": {"max_steps": steps, "micro_batch_size": 2}, "eval": {"every_steps": 0, "sample_tokens": 0},
                "export": {"enabled": False}}
    recipe = write_tiny_recipe(tmp_path, corpus, **sections)
    out = tmp_path / "run"
    proc = _launch_two_ranks(recipe, out, cache)
    try:
        _wait_for_step(out, proc)
        ranks = _descendants(proc.pid)
        assert len(ranks) >= 3  # torchrun and its two ranks
        holder = int((out / LOCK).read_text().split()[1])
        assert holder in ranks  # rank 0 holds the run directory, so the lock outlives a killed launcher
        os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        assert not _survivors(ranks, 30), f"ranks outlived the launcher:\n{_log(out)}"
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "sigterm":
        assert proc.returncode == 130, _log(out)
    # The ranks checkpointed the step they were on; no step ran after it.
    stopped = find_latest_checkpoint(out)
    assert stopped is not None, _log(out)
    at = int(stopped.name.split("-")[1])
    assert 1 <= at < steps and max(_steps(out)) == at

    if how == "sigkill":
        return  # the kernel's signal reached torchrun, which stopped the ranks as above; resuming is the same
    # Resume in two processes for two more steps; the curve equals an uninterrupted two-process run's.
    stop = ["--stop-at-step", str(at + 2)]
    proc = _launch_two_ranks(recipe, out, cache, *stop)
    assert proc.wait(timeout=300) == 0, _log(out)
    straight = tmp_path / "straight"
    proc = _launch_two_ranks(recipe, straight, cache, *stop)
    assert proc.wait(timeout=300) == 0, _log(straight)
    resumed, expected = ({r["step"]: r["loss"] for r in read_metrics(run)} for run in (out, straight))
    assert sorted(resumed) == sorted(expected) == list(range(1, at + 3))
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([expected[s] for s in sorted(expected)],
                                                                  rel=1e-6, abs=1e-7)


def test_attention_mask_values_other_than_0_and_1_are_refused():
    from spikelm import SpikeLMConfig, SpikeLMForCausalLM

    model = SpikeLMForCausalLM(SpikeLMConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, head_size=16,
                                             decay_lora_rank=4, intermediate_size=64)).eval()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="0 \\(pad\\) or 1"):
        model(input_ids=ids, attention_mask=torch.tensor([[1, 2, 1]]))
    padded = model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1]])).logits
    assert torch.equal(model(input_ids=ids, attention_mask=torch.tensor([[True, True, True]])).logits,
                       model(input_ids=ids).logits)
    assert padded.shape == (1, 3, 300)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_deepspeed_launcher_ranks_stop_with_one_signal_and_never_outlive_the_launcher(tmp_path, corpus, cache, how):
    # A one-host hostfile goes through DeepSpeed's runner and launch: neither forwards a signal once, nor dies with us.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    sections = {"train": {"max_steps": 100_000, "micro_batch_size": 2},
                "eval": {"every_steps": 0, "sample_tokens": 0}, "export": {"enabled": False}}
    recipe = write_tiny_recipe(tmp_path, corpus, **sections)
    out = tmp_path / "run"
    proc = _launch_two_ranks(recipe, out, cache, hostfile=hostfile)
    try:
        _wait_for_step(out, proc)
        everything = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        # generous: a loaded 2-core machine; orphans would run for hours
        assert not _survivors(everything, 90), f"processes outlived the launcher:\n{_log(out)}"
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = find_latest_checkpoint(out)
    assert stopped is not None, _log(out)  # one signal per rank: each checkpointed instead of giving up
    at = int(stopped.name.split("-")[1])
    assert at < 100_000 and max(_steps(out)) == at


def test_torchrun_gives_the_ranks_time_to_checkpoint(tmp_path, corpus, cache, monkeypatch):
    import spikelm.commands.train as train_command

    calls = []
    monkeypatch.setattr(train_command, "_run_forwarding_signals",
                        lambda cmd, env, to_ranks: calls.append((cmd, env, to_ranks)) or (0, None))
    monkeypatch.delenv("SPIKELM_LAUNCHED", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.setenv("RANK", "0")
    recipe = write_tiny_recipe(tmp_path, corpus)
    assert train_cli(recipe, tmp_path / "run", cache, "--nproc-per-node", "2") == 0
    ((cmd, env, to_ranks),) = calls
    assert "torch.distributed.run" in cmd and not to_ranks
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300"  # torchrun's own 30 s could cut a big checkpoint short
