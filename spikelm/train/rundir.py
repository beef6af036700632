"""The run directory as a whole: one run at a time (a lock), its expected layout, and starting over without loss.

The lock is an ``flock`` on ``RUN_DIR/.lock``, taken by the ``spikelm train`` process that owns the run (the single
process, or the launcher of a multi-process run) and held until it exits. The kernel drops an ``flock`` when its
holder dies, however it dies, so a lock file left behind by a killed run is stale and simply taken over: the PID
written in it only serves the error message of a refused second run.
This lock uses ``fcntl.flock`` directly rather than ``filelock`` (as the caches do, ``dist.file_lock``): the holder
writes its PID through the locked descriptor and a refused run reads it back through its own, which ``filelock``'s
API does not expose. Training needs Linux (DeepSpeed's launchers) anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from spikelm.errors import SpikeLMError

LOCK = ".lock"
ARCHIVE = "archive"
# What one run writes into its directory (see spikelm.train.loop); ``--no-resume`` moves these aside together.
RUN_FILES = {"checkpoints": "dir", "metrics.jsonl": "file", "tb": "dir", "export": "dir", "recipe.yaml": "file"}


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block; raise ``SpikeLMError`` if another live run holds it."""
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's PID must survive our attempt
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise SpikeLMError(f"the run directory {str(run_dir)!r} is in use by a running spikelm train ({holder}); "
                               "wait for it to finish, stop it, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def check_layout(run_dir: Path) -> None:
    """Refuse a run directory whose entries have the wrong kind (e.g. a file named ``checkpoints``), before training."""
    for name, kind in RUN_FILES.items():
        path = run_dir / name
        if kind == "dir" and path.exists() and not path.is_dir():
            raise SpikeLMError(f"{str(path)!r} is a file, but spikelm train writes a folder there; move it away or "
                               "pass another --out")
        if kind == "file" and path.is_dir():
            raise SpikeLMError(f"{str(path)!r} is a folder, but spikelm train writes a file there; move it away or "
                               "pass another --out")


def archive_previous_run(run_dir: Path) -> Path | None:
    """Move a previous run's checkpoints, metrics, TensorBoard logs, export and recipe to ``run_dir/archive/<time>``.

    ``--no-resume`` starts from step 0 in a directory that may hold another run: nothing of it may be mixed with the
    new run (its higher-step checkpoints would win the next resume, its metrics would interleave) or deleted.
    Returns the archive folder, or ``None`` when there was nothing to move.
    """
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir / ARCHIVE / stamp
    n = 1
    while target.exists():
        n += 1
        target = run_dir / ARCHIVE / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for name in present:
        os.rename(run_dir / name, target / name)
    return target


__all__ = ["run_lock", "check_layout", "archive_previous_run", "LOCK", "ARCHIVE", "RUN_FILES"]
