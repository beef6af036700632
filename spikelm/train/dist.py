"""Process-group and cache helpers shared by the data pipeline, the tokenizer cache and the training loop.

Kept apart so that ``packing`` and ``tokenizer_cache`` both use them without importing each other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from filelock import FileLock

from spikelm.errors import SpikeLMError

_T = TypeVar("_T")


def dist_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the initialised default process group, else ``None``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def rank_zero_first(build: Callable[[], _T]) -> _T:
    """Run ``build`` on rank 0, then on the other ranks (which find rank 0's cache entry, or build their own when the
    cache is node-local). Without an initialised process group, just run it.

    Rank 0 enters the barrier even when ``build`` raises, so the other ranks do not hang: they run ``build`` too and
    meet the same error.
    """
    world = dist_world()
    if world is None or world[1] == 1:
        return build()
    if world[0] == 0:
        try:
            return build()
        finally:
            torch.distributed.barrier()
    torch.distributed.barrier()
    return build()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``: processes on one machine (e.g. ranks before ``init_process_group``) that share
    a cache build each entry once; the others wait, then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


LOCAL_HOSTS = ("localhost", "127.0.0.1", socket.gethostname())


def read_hostfile(path: Path) -> dict[str, int]:
    """Hosts and their slots from a DeepSpeed hostfile (``HOST slots=N`` lines, ``#`` comments)."""
    if not path.is_file():
        raise SpikeLMError(f"--hostfile {str(path)!r} does not exist")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = parts[1][len("slots="):] if len(parts) == 2 and parts[1].startswith("slots=") else ""
        if not slots.isdigit() or int(slots) == 0 or parts[0] in hosts:
            raise SpikeLMError(f"--hostfile {str(path)!r} line {number}: expected 'HOST slots=N' with N >= 1 and "
                               f"each host once, got {line!r}")
        hosts[parts[0]] = int(slots)
    if not hosts:
        raise SpikeLMError(f"--hostfile {str(path)!r} lists no hosts")
    return hosts


def build_once(root: Path, key: str, build: Callable[[Path], None],
               ready: Callable[[Path], bool] = Path.is_dir) -> Path:
    """The cache entry ``root/key``, built once across processes and never seen half-written.

    Under a file lock, unless ``ready(root/key)``, ``build`` fills a fresh temporary directory beside the entry, which
    is then renamed into place (a leftover that is not ready is replaced). An interrupted build leaves only the
    temporary directory, which is removed, so an entry appears complete or not at all.
    """
    final = root / key
    with file_lock(root / f"{key}.lock"):
        if not ready(final):
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
            try:
                build(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the rendezvous port of a launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# No extension build (DeepSpeed's ~40 s CPU op) holds its lock this long; an older lock was left by a killed build.
STALE_BUILD_LOCK_SECONDS = 600


def clear_stale_build_locks(extensions_dir: Path, max_age: float = STALE_BUILD_LOCK_SECONDS) -> list[Path]:
    """Remove the ``lock`` files of interrupted extension builds under ``extensions_dir``; returns them.

    torch's JIT build takes ``<extension>/lock`` for its duration and waits for it forever otherwise, so one build
    killed midway (Ctrl-C, kill -9 while DeepSpeed compiles its op) would hang every later run without a word.
    """
    now = time.time()
    removed = []
    for lock in [*extensions_dir.glob("*/lock"), *extensions_dir.glob("*/*/lock")]:
        with contextlib.suppress(FileNotFoundError):
            if now - lock.stat().st_mtime > max_age:
                lock.unlink()
                removed.append(lock)
    return removed


def prepare_environment(master_port: int | None = None) -> None:
    """Single-process rendezvous defaults, CPU accelerator and extension cache; must run before importing deepspeed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "spikelm" / "torch_extensions"))
    for lock in clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"])):
        print(f"spikelm: removed {lock}, left by an interrupted extension build (it would block this run)",
              file=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(master_port or free_port())


__all__ = ["dist_world", "rank_zero_first", "file_lock", "build_once", "free_port", "prepare_environment",
           "read_hostfile", "LOCAL_HOSTS", "clear_stale_build_locks"]
