"""``spikelm train RECIPE``: validate the recipe and the arguments, then train in this process or launch the ranks.

One process on CPU or one GPU needs no launcher (the rendezvous variables get single-process defaults).
``--nproc-per-node N`` re-launches this command under ``torchrun`` (gloo on CPU, NCCL on GPU) and ``--hostfile FILE``
under the ``deepspeed`` launcher; each rank then runs ``spikelm.train.loop.train``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from spikelm.errors import SpikeLMError
from spikelm.train.dist import LOCAL_HOSTS, free_port, prepare_environment, read_hostfile
from spikelm.train.recipe import load_recipe

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
                        help="resume from this checkpoint folder (default: the run directory's latest, if any)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from step 0 even if the run directory has checkpoints")
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


def _launch(args: argparse.Namespace) -> int:
    """Re-run this command under torchrun (one node) or the deepspeed launcher (hostfile) and wait for it."""
    port = str(args.master_port or free_port())
    child = _child_argv(args)
    env = {**os.environ, "SPIKELM_LAUNCHED": "1"}
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
    print("spikelm train: launching " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def run(args: argparse.Namespace) -> int:
    """``spikelm train``: validate everything, then train (or launch the processes that will)."""
    recipe = load_recipe(args.recipe, args.overrides)
    args.out = args.out or Path("runs") / recipe.name
    if args.nproc_per_node < 1:
        raise SpikeLMError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise SpikeLMError(f"--stop-at-step must be >= 1, got {args.stop_at_step}")
    if args.resume is not None and not args.resume.is_dir():
        raise SpikeLMError(f"--resume {str(args.resume)!r} is not a checkpoint folder")
    _check_writable(args.out)
    if (args.nproc_per_node > 1 or args.hostfile is not None) and not os.environ.get("SPIKELM_LAUNCHED"):
        return _launch(args)
    prepare_environment(args.master_port)
    from spikelm.train.loop import train

    return train(recipe, args.out, resume=args.resume, no_resume=args.no_resume, stop_at_step=args.stop_at_step,
                 cache_dir=args.cache_dir, progress=not args.no_progress)


__all__ = ["add_arguments", "run", "DEFAULT_RECIPE"]
