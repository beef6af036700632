"""``spikelm train RECIPE``: validate the recipe and the arguments, then train in this process or launch the ranks.

One process on CPU or one GPU needs no launcher (the rendezvous variables get single-process defaults).
``--nproc-per-node N`` re-launches this command under ``torchrun`` (gloo on CPU, NCCL on GPU) and ``--hostfile FILE``
under the ``deepspeed`` launcher; each rank then runs ``spikelm.train.loop.train``.

Rank 0 owns the run: it holds the run directory's lock (``spikelm.train.rundir``) for the run's life, so the lock
outlives a killed launcher for as long as the ranks still write. A launcher forwards SIGINT/SIGTERM/SIGHUP to the
launched job (whose ranks checkpoint and stop) and waits for it; if the launcher dies anyway (SIGKILL), the kernel
signals the job (``PR_SET_PDEATHSIG``), so no rank outlives it and races the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from spikelm.errors import SpikeLMError
from spikelm.train.checkpoint import TRUST_ENV, find_latest_checkpoint, find_previous_checkpoint
from spikelm.train.dist import LOCAL_HOSTS, free_port, prepare_environment, read_hostfile
from spikelm.train.recipe import load_recipe
from spikelm.train.rundir import archive_previous_run, check_layout, run_lock

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "shakespeare-tiny.yaml"


# ------------------------------------------------------------------------------------------------ arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spikelm train``."""
    parser.add_argument("recipe", nargs="?", type=Path, default=DEFAULT_RECIPE,
                        help=f"YAML recipe (default: {DEFAULT_RECIPE.name}, the 5-minute CPU run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="resume from this checkpoint folder, or 'previous' for the one before the run directory's "
                        "latest (default: the latest, if any)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from step 0; a previous run's checkpoints, metrics and export in --out are moved "
                        "to --out/archive/<time>/ first")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="skip the check that DeepSpeed's pickled engine files refer only to tensors and DeepSpeed "
                        "state (only for checkpoints you wrote yourself: unpickling can run code)")
    parser.add_argument("--nproc-per-node", "--gpus", type=int, default=1,
                        help="processes on this node (one per GPU; on CPU, gloo processes); --gpus is the same")
    parser.add_argument("--hostfile", type=Path, default=None,
                        help="DeepSpeed hostfile ('host slots=N' lines) for multi-node runs via the deepspeed launcher")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="checkpoint and stop after this step, as on SIGTERM (split a run into sessions)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="tokenizer/data cache (default: $SPIKELM_CACHE or ~/.cache/spikelm)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SpikeLMError(f"the run directory {str(out)!r} is not writable ({err.strerror}); pass --out to a "
                           "directory you can write") from err


def _child_argv(args: argparse.Namespace) -> list[str]:
    """This command's arguments for the launched processes (without the launcher options)."""
    argv = ["train", str(args.recipe.resolve())]
    for text in args.overrides:
        argv += ["--set", text]
    argv += ["--out", str(args.out.resolve())]
    if args.resume is not None:
        argv += ["--resume", str(args.resume.resolve())]
    if args.no_resume:
        argv.append("--no-resume")
    if args.stop_at_step is not None:
        argv += ["--stop-at-step", str(args.stop_at_step)]
    if args.cache_dir is not None:
        argv += ["--cache-dir", str(args.cache_dir.resolve())]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; a no-op elsewhere).

    Runs in the launched child (``preexec_fn``) and at the start of every launched rank: a SIGKILLed launcher cannot
    forward anything, so the kernel does it.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os.kill(os.getpid(), sig)


def _launch(args: argparse.Namespace) -> int:
    """Re-run this command under torchrun (one node) or the deepspeed launcher (hostfile) and wait for it."""
    port = str(args.master_port or free_port())
    child = _child_argv(args)
    env = {**os.environ, "SPIKELM_LAUNCHED": "1"}
    # torchrun SIGKILLs ranks 30 s after passing on a signal; a big model's ranks may need longer to reach the next
    # logging step and write their checkpoint.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    if args.hostfile is not None:
        hosts = read_hostfile(args.hostfile)
        # --no_local_rank: each rank reads LOCAL_RANK from its environment; a leading --local_rank=N argument
        # would land before the subcommand name.
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(args.hostfile),
               "--master_port", port, "--no_local_rank"]
        if list(hosts) in ([host] for host in LOCAL_HOSTS):
            # One host, this machine: DeepSpeed launches locally, so neither its ssh check nor an ssh call to find
            # the master address is needed (a machine without sshd would fail both).
            cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1"]
        if args.nproc_per_node > 1:
            cmd += ["--num_gpus", str(args.nproc_per_node)]
        cmd += ["--module", "spikelm", *child]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc_per_node),
               "--master_port", port, "-m", "spikelm", *child]
    if args.hostfile is not None:
        # DeepSpeed's launcher neither forwards a signal once nor dies with us: the ranks on this host watch our PID
        # themselves, and a signal to us goes to them directly (see _run_forwarding_signals).
        env.update(SPIKELM_LAUNCHER_PID=str(os.getpid()), SPIKELM_LAUNCHER_HOST=socket.gethostname())
    print("spikelm train: launching " + " ".join(cmd), flush=True)
    rc, received = _run_forwarding_signals(cmd, env, to_ranks=args.hostfile is not None)
    if received is None:
        return rc
    latest = find_latest_checkpoint(args.out)
    print(f"spikelm train: stopped by {signal.Signals(received).name}; latest checkpoint: {latest}. Run the same "
          "command again to resume.", file=sys.stderr, flush=True)
    return 130


def _run_forwarding_signals(cmd: list[str], env: dict[str, str], *,
                            to_ranks: bool = False) -> tuple[int, int | None]:
    """Run ``cmd``, forwarding SIGINT/SIGTERM/SIGHUP to it; returns its exit code and the first signal forwarded.

    The child gets its own session, so a Ctrl-C in the terminal reaches the job once, through us, not twice. torchrun
    passes a signal on to each rank, which checkpoints at the next step boundary and exits. DeepSpeed's local launcher
    would send a second SIGTERM (a rank gives up its checkpoint on the second signal) and its runner dies on the
    first: with ``to_ranks`` the signal goes to this host's ranks directly instead.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for pid in _rank_pids(proc.pid) if to_ranks else [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # we are leaving on an exception: take the job down with us
            proc.kill()
    return rc, (received[0] if received else None)


def _rank_pids(root: int) -> list[int]:
    """PIDs below ``root`` that run ``python -m spikelm`` (the ranks, not the launchers between us and them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    ranks, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            with contextlib.suppress(OSError):
                argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
                if any(a == b"-m" and b == b"spikelm" for a, b in zip(argv, argv[1:], strict=False)):
                    ranks.append(pid)
    return ranks


def watch_launcher() -> None:
    """In a rank launched through DeepSpeed's launcher on the launcher's host: SIGTERM ourselves once when the
    ``spikelm train`` that launched us is gone (PR_SET_PDEATHSIG only sees the direct parent, DeepSpeed's launcher,
    which outlives a killed ``spikelm train``). The rank then checkpoints and stops as on any SIGTERM."""
    pid = int(os.environ.get("SPIKELM_LAUNCHER_PID", "0"))
    if not pid or os.environ.get("SPIKELM_LAUNCHER_HOST") != socket.gethostname():
        return

    def state() -> tuple[str, str] | None:
        """(state letter, start time) of the launcher, or None once it is gone."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return fields[0], fields[19]

    def watch() -> None:
        first = state()
        while True:
            now = state()
            # Gone, a zombie its parent has not reaped yet, or its PID reused by another process (new start time).
            if now is None or first is None or now[0] in "ZX" or now[1] != first[1]:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(1.0)

    threading.Thread(target=watch, name="spikelm-launcher-watch", daemon=True).start()


def _resolve_resume(args: argparse.Namespace) -> None:
    """``--resume previous`` -> the checkpoint before the run directory's latest; check a given folder exists."""
    if args.resume is None:
        return
    if str(args.resume) == "previous" and not args.resume.is_dir():
        previous = find_previous_checkpoint(args.out)
        if previous is None:
            latest = find_latest_checkpoint(args.out)
            have = f"only {latest.name}" if latest is not None else "no complete checkpoint"
            raise SpikeLMError(f"--resume previous: {str(args.out)!r} has {have}, so there is no previous checkpoint")
        print(f"spikelm train: --resume previous is {previous}", flush=True)
        args.resume = previous
    elif not args.resume.is_dir():
        raise SpikeLMError(f"--resume {str(args.resume)!r} is not a checkpoint folder")


def run(args: argparse.Namespace) -> int:
    """``spikelm train``: validate everything, then train (or launch the processes that will)."""
    recipe = load_recipe(args.recipe, args.overrides)
    args.out = args.out or Path("runs") / recipe.name
    if args.nproc_per_node < 1:
        raise SpikeLMError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise SpikeLMError(f"--stop-at-step must be >= 1, got {args.stop_at_step}")
    if args.trust_checkpoint:
        os.environ[TRUST_ENV] = "1"  # the launched ranks inherit it
    if args.no_resume and args.resume is not None:
        raise SpikeLMError("--no-resume and --resume contradict each other; pass one of them")
    launched = bool(os.environ.get("SPIKELM_LAUNCHED"))
    if launched:
        die_with_parent()  # a rank of a job we launched must not outlive its launcher
        watch_launcher()
    else:  # the user's command (or a rank of the user's own torchrun): check the run directory before any work
        _check_writable(args.out)
        check_layout(args.out)
        _resolve_resume(args)
        if args.nproc_per_node > 1 or args.hostfile is not None:
            with run_lock(args.out):
                pass  # fail fast when another run holds the directory; rank 0 holds the lock for the run's life
            return _launch(args)
    if os.environ.get("RANK", "0") != "0":
        return _train(args, recipe)
    # Rank 0 owns the run directory: it holds the lock until it exits, even if its launcher is killed first.
    with run_lock(args.out):
        if args.no_resume:
            archive = archive_previous_run(args.out)
            if archive is not None:
                print(f"spikelm train: --no-resume: moved the previous run's checkpoints, metrics and export to "
                      f"{archive}", flush=True)
        return _train(args, recipe)


def _train(args: argparse.Namespace, recipe: Any) -> int:
    prepare_environment(args.master_port)
    from spikelm.train.loop import train

    try:
        return train(recipe, args.out, resume=args.resume, no_resume=args.no_resume, stop_at_step=args.stop_at_step,
                     cache_dir=args.cache_dir, progress=not args.no_progress)
    except UnicodeDecodeError as err:  # a streamed data file met its first non-UTF-8 byte: name the file
        from spikelm.train.data_sources import undecodable_source

        raise (undecodable_source(recipe.data) or SpikeLMError(f"data.source {recipe.data.source!r}: {err}")) from err


__all__ = ["add_arguments", "run", "die_with_parent", "DEFAULT_RECIPE"]
