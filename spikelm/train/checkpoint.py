"""Atomic training checkpoints: ``RUN_DIR/checkpoints/step-XXXXXXXX/`` plus a ``latest`` pointer.

A checkpoint is written into ``.tmp-step-XXXXXXXX/``, every file is fsynced, a ``COMPLETE`` marker is written last,
then the folder is renamed into place and ``latest`` is replaced atomically. A crash at any moment therefore leaves
either the previous checkpoint as ``latest`` or a ``.tmp-*`` folder that is never loaded. All ranks must share the
run directory's filesystem (one node, or a shared filesystem across nodes).

Contents: the DeepSpeed engine state (``engine/``: weights, optimizer, ZeRO partitions), ``trainer_state.pt`` (step,
tokens seen, the recipe, the model config) and one ``rank<R>.pt`` per rank (RNG states, data loader position).

Our own files hold only plain types and tensors and are read with ``torch.load(weights_only=True)``: a crafted file
cannot run code. DeepSpeed's ``engine/`` files are full pickles that DeepSpeed itself unpickles; load only checkpoints
you trust (see README.md, "Reliability and safety").

Why one file of ~450 lines: writing, finding, safely reading and resuming checkpoints (incl. DeepSpeed's
universal format and its two workarounds) form one protocol; splitting it would separate what must change together.
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from spikelm.errors import SpikeLMError

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
ENGINE_TAG = "engine"
UNIVERSAL_TAG = "universal"

# Config fields that fix parameter shapes: a checkpoint cannot be loaded into a model that differs in any of them.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "intermediate_size", "decay_lora_rank",
                "time_mix", "neuron", "spike_lm_head", "tie_word_embeddings")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """RNG states of Python, torch CPU and (if present) CUDA, for exact resume."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks leave a collective section together).

    The tensor lives on the engine's device: NCCL has no CPU tensors.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(value)
        return bool(value.item() > 0)
    return flag


def _write_error(err: OSError, tmp: Path, previous: Path | None) -> SpikeLMError:
    kept = f"the last good checkpoint {str(previous)!r} is kept" if previous else "no earlier checkpoint exists"
    full = err.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(tmp.parent).free < 2**20
    what = "no space left on device" if full else (err.strerror or str(err))
    return SpikeLMError(f"could not write checkpoint {str(tmp)!r}: {what}; {kept}. Free space (or fix the "
                        "filesystem) and run the same command again to resume")


def save_checkpoint(engine: Any, run_dir: Path, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any],
                    *, rank: int, keep_last: int) -> Path:
    """Write the checkpoint of ``step`` atomically; every rank calls this (collective).

    Args:
        engine: the DeepSpeed engine (its ``save_checkpoint`` is collective under ZeRO).
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        trainer_state: rank 0's loop state (step, tokens, recipe, model config...).
        rank_state: this rank's RNG state and data loader position.
        keep_last: how many complete checkpoints to keep (older ones are deleted after the new one is in place).
    Returns the final checkpoint folder. A failed write (full disk...) raises ``SpikeLMError`` on every rank, removes
    the partial folder and leaves ``latest`` on the previous checkpoint.
    """
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    previous = find_latest_checkpoint(run_dir)
    device = getattr(engine, "device", "cpu")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    failure: OSError | None = None
    try:
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
        torch.save(rank_state, tmp / f"rank{rank}.pt")
        if rank == 0:
            torch.save(trainer_state, tmp / "trainer_state.pt")
    except OSError as err:  # a full disk, a quota, an I/O error: every rank must learn of it, or the others hang
        failure = err
    except RuntimeError as err:  # torch.save's zip writer reports a failed write as a RuntimeError
        message = str(err)
        if shutil.disk_usage(tmp).free < 2**20:  # e.g. "[enforce fail at inline_container.cc] unexpected pos"
            failure = OSError(errno.ENOSPC, "No space left on device")
        elif "PytorchStreamWriter" in message or "inline_container" in message:
            failure = OSError(errno.EIO, message.splitlines()[0] if message else "write failed")
        else:
            raise
    failed = _any_rank(failure is not None, device)
    if rank == 0 and not failed:
        try:
            _fsync_tree(tmp)
            marker = {"step": step, "world_size": trainer_state.get("world_size"), "time": time.time()}
            atomic_write_text(tmp / COMPLETE, json.dumps(marker) + "\n")
            if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            atomic_write_text(root / LATEST, final.name + "\n")
        except OSError as err:
            failure = err
    failed = _any_rank(failure is not None, device)
    if failed:
        if rank == 0:  # `latest` is replaced last and atomically: it still names a complete checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(failure or OSError(errno.EIO, "the write failed on another rank"), tmp, previous)
    if rank == 0:
        _prune(root, final, keep_last)
    _barrier()
    return final


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest step first."""
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=_step_of)


def _prune(root: Path, current: Path, keep_last: int) -> None:
    """Delete all but ``current`` and the ``keep_last - 1`` newest checkpoints before it.

    Checkpoints with a later step than ``current`` (a run resumed from an older checkpoint) are another timeline:
    they are neither counted nor deleted; ``latest`` names ``current``.
    """
    older = [p for p in _complete_checkpoints(root) if _step_of(p) < _step_of(current)]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or ``None``. Incomplete (``.tmp-*``) folders are ignored."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    complete = _complete_checkpoints(root)
    return complete[-1] if complete else None


def find_previous_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint older than :func:`find_latest_checkpoint` (``--resume previous``)."""
    latest = find_latest_checkpoint(run_dir)
    if latest is None:
        return None
    older = [p for p in _complete_checkpoints(run_dir / CHECKPOINTS) if _step_of(p) < _step_of(latest)]
    return older[-1] if older else None


def _load(path: Path) -> Any:
    """``torch.load`` without unpickling arbitrary objects: our files hold only plain types and tensors."""
    if not path.is_file():
        raise SpikeLMError(f"checkpoint file {str(path)!r} is missing; the checkpoint is damaged, delete its folder "
                           "to resume from an older one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL (\S+)", str(err))
        if unsafe:  # the pickle imports a callable: what an exploit does, and what spikelm never writes
            raise SpikeLMError(f"checkpoint file {str(path)!r} refers to {unsafe.group(1)}, not only plain values "
                               "and tensors; refusing to unpickle it (it could run code). spikelm never writes such "
                               "files: it was crafted or written by another program") from None
        raise SpikeLMError(f"checkpoint file {str(path)!r} is corrupt (not a torch.save file); delete "
                           f"{str(path.parent)!r} to resume from an older checkpoint") from None
    except Exception as err:  # torch raises many types for a truncated/garbled file
        raise SpikeLMError(f"checkpoint file {str(path)!r} is corrupt ({type(err).__name__}: {err}); delete "
                           f"{str(path.parent)!r} to resume from an older checkpoint") from err


# Keys every trainer_state.pt has, and their types.
TRAINER_STATE_KEYS = {"step": int, "tokens_seen": int, "model_config": dict, "recipe": dict}


def read_trainer_state(path: Path) -> dict[str, Any]:
    """Rank 0's loop state of a checkpoint folder; raises ``SpikeLMError`` if it is incomplete or corrupt."""
    if not (path / COMPLETE).is_file():
        raise SpikeLMError(f"checkpoint {str(path)!r} has no {COMPLETE} marker: it was never finished and cannot be "
                           "loaded")
    state = _load(path / "trainer_state.pt")
    file = str(path / "trainer_state.pt")
    if not isinstance(state, dict):
        raise SpikeLMError(f"checkpoint file {file!r} holds a {type(state).__name__}, not spikelm's trainer state")
    for key, kind in TRAINER_STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise SpikeLMError(f"checkpoint file {file!r} has no valid {key!r} ({kind.__name__}): it was not "
                               "written by spikelm train, or is damaged")
    return state


# What DeepSpeed's own checkpoint pickles may refer to: tensors and their storages, dtypes, ordered dicts, and
# DeepSpeed's state classes. Anything else (os.system, builtins.eval, any function) is what an exploit needs.
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                 ("builtins", "slice"), ("torch", "Size"), ("torch", "Tensor"), ("torch", "device"),
                 ("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.parameter", "Parameter"),
                 ("torch.serialization", "_get_layout")}
TRUST_ENV = "SPIKELM_TRUST_CHECKPOINT"


def _safe_global(module: str, name: str) -> bool:
    if (module, name) in _SAFE_GLOBALS:
        return True
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
        return True
    if module == "deepspeed" or module.startswith("deepspeed."):  # DeepSpeed's state classes, never its functions
        try:
            value = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return False
        return isinstance(value, type)
    return False


class _Inert:
    """Stands in for every object while a pickle is scanned: calling, filling or setting its state does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Scanner(pickle.Unpickler):
    """Walks a pickle without building anything: records each global it refers to, resolves none."""

    def __init__(self, data: Any) -> None:
        super().__init__(data)
        self.globals: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.globals.add((module, name))
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return None  # tensor storages live in separate zip records; nothing to read


def unsafe_globals(path: Path) -> list[str]:
    """The globals a ``torch.save`` file refers to beyond tensors, dtypes and DeepSpeed's state classes."""
    with zipfile.ZipFile(path) as archive:
        found: set[tuple[str, str]] = set()
        for name in archive.namelist():
            if name.endswith(".pkl"):
                scanner = _Scanner(io.BytesIO(archive.read(name)))
                scanner.load()
                found |= scanner.globals
    return sorted(f"{module}.{name}" for module, name in found if not _safe_global(module, name))


def check_engine_files(path: Path) -> None:
    """Refuse a checkpoint whose DeepSpeed files refer to anything but tensors and DeepSpeed state (unless trusted).

    DeepSpeed loads its files with full unpickling; a scan with inert stand-ins first finds what they would call. A
    file the scan cannot finish is refused too (it cannot be vouched for). ``SPIKELM_TRUST_CHECKPOINT=1``
    (``spikelm train --trust-checkpoint``) skips the scan for a checkpoint you wrote yourself.
    """
    if os.environ.get(TRUST_ENV) == "1":
        return
    for file in sorted((path / ENGINE_TAG).rglob("*.pt")):
        try:
            bad = unsafe_globals(file)
        except Exception as err:  # truncated, not a zip, or built to trip the scan
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise SpikeLMError(f"the engine state of checkpoint {str(path)!r} is damaged ({file.name}: {reason}); "
                               "delete or move that folder, or pass --resume previous to continue from the "
                               "checkpoint before it") from None
        if bad:
            raise SpikeLMError(f"checkpoint file {str(file)!r} refers to {', '.join(bad)}, which DeepSpeed's state "
                               "never holds; refusing to load it (unpickling it could run code). If you wrote this "
                               "checkpoint yourself, pass --trust-checkpoint")


def check_model_shape(saved_config: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Raise ``SpikeLMError`` if the recipe's model differs in shape from the checkpoint's."""
    diffs = [f"{k}: checkpoint {saved_config.get(k)!r} vs recipe {config.get(k)!r}" for k in SHAPE_FIELDS
             if saved_config.get(k) != config.get(k)]
    if diffs:
        raise SpikeLMError(f"checkpoint {str(path)!r} was written for a different model ({'; '.join(diffs)}); "
                           "use the recipe it was trained with, or a new --out directory")


def needs_universal(trainer_state: dict[str, Any], world_size: int, zero_stage: int) -> bool:
    """True when a checkpoint's ZeRO partitioning differs from this run's (another world size or ZeRO stage).

    ZeRO >= 1 shards optimizer state per rank and DeepSpeed refuses such state at a new world size; it must go
    through DeepSpeed's universal checkpoint format. ZeRO 0 state is whole and loads anywhere.
    """
    saved_world, saved_stage = trainer_state.get("world_size", world_size), trainer_state.get("zero_stage", 0)
    return max(saved_stage, zero_stage) > 0 and (saved_world != world_size or saved_stage != zero_stage)


def _ensure_universal(path: Path, rank: int) -> None:
    """Convert ``path/engine`` to DeepSpeed's universal format in ``path/universal`` once (rank 0; atomic)."""
    final = path / UNIVERSAL_TAG
    if rank == 0 and not (final / COMPLETE).is_file():
        tmp = path / f".{UNIVERSAL_TAG}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / ENGINE_TAG),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SpikeLMError(f"could not convert checkpoint {str(path)!r} to DeepSpeed's universal format for a new "
                               f"world size / ZeRO stage:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        atomic_write_text(tmp / COMPLETE, "converted\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    _barrier()


def load_checkpoint(engine: Any, path: Path, *, rank: int, world_size: int,
                    universal: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into ``engine`` (collective); returns ``(trainer_state, rank_state)``.

    With ``universal`` (see :func:`needs_universal`; the engine must have been built with
    ``checkpoint.load_universal``) the engine state is first converted so DeepSpeed can re-partition it. With a
    different world size every rank takes rank 0's RNG and loader state (the loader position is global).
    """
    trainer_state = read_trainer_state(path)
    saved_world = trainer_state.get("world_size", world_size)
    rank_file = path / (f"rank{rank}.pt" if saved_world == world_size else "rank0.pt")
    rank_state = _load(rank_file)
    if not isinstance(rank_state, dict) or not {"rng", "loader"} <= rank_state.keys():
        raise SpikeLMError(f"checkpoint file {str(rank_file)!r} has no RNG and data loader state; it is damaged")
    if not (path / ENGINE_TAG).is_dir():
        raise SpikeLMError(f"checkpoint {str(path)!r} has no engine state folder {ENGINE_TAG!r}; it is damaged")
    check_engine_files(path)
    if universal:
        _ensure_universal(path, rank)
    tag = UNIVERSAL_TAG if universal else ENGINE_TAG
    # DeepSpeed's ZeRO-3 universal loader (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3) copies the
    # first param group's hyperparameters onto every group, so the no-decay group would get weight decay; the recipe
    # defines them anyway, so the groups keep the values this engine was built with. It also gives every group's
    # optimizer state the same "step" tensor, which torch's AdamW increments in place once per group: the step count
    # would advance by the number of groups per step and skew Adam's bias correction. Each state gets its own copy.
    hyperparameters = [{key: value for key, value in group.items() if key != "params"}
                       for group in engine.optimizer.param_groups]
    try:
        load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    except (RuntimeError, OSError, KeyError, ValueError, AssertionError, EOFError, pickle.UnpicklingError) as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if saved_world != world_size or universal:
            raise SpikeLMError(f"could not load the engine state of checkpoint {str(path)!r} ({reason}); it was "
                               f"written with world size {saved_world}, now {world_size}") from err
        raise SpikeLMError(f"the engine state of checkpoint {str(path)!r} is damaged ({reason}); delete or move that "
                           "folder, or pass --resume previous to continue from the checkpoint before it") from err
    if load_path is None:
        raise SpikeLMError(f"DeepSpeed found no engine state in {str(path / tag)!r}; the checkpoint is damaged")
    for group, values in zip(engine.optimizer.param_groups, hyperparameters, strict=True):
        group.update(values)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside a ZeRO wrapper
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    return trainer_state, rank_state


__all__ = ["save_checkpoint", "load_checkpoint", "needs_universal", "find_latest_checkpoint", "read_trainer_state",
           "find_previous_checkpoint",
           "check_model_shape", "atomic_write_text", "rng_state", "set_rng_state", "SHAPE_FIELDS"]
