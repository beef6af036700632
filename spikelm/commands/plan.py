"""``spikelm plan RECIPE``: what a recipe costs before launch — parameters, FLOPs per token, tokens, memory per GPU
and the expected wall time — computed on the meta device (no memory, no data, no GPU needed).

Exits with an error (rc 2) after printing the plan when the estimate does not fit in the chosen GPUs' memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spikelm.errors import SpikeLMError
from spikelm.train.dist import read_hostfile
from spikelm.train.plan import GPUS, HEADROOM, plan
from spikelm.train.recipe import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spikelm plan``."""
    parser.add_argument("recipe", type=Path, help="YAML recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field, as for spikelm train")
    parser.add_argument("--gpus", "--nproc-per-node", dest="gpus", type=int, default=1,
                        help="GPUs (processes) per node, as passed to spikelm train")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default 1, or the hostfile's hosts)")
    parser.add_argument("--hostfile", type=Path, default=None,
                        help="a DeepSpeed hostfile: nodes = its hosts, GPUs per node = its slots unless --gpus")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model (peak FLOP/s and memory)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the wall time")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan as JSON to this file")


def run(args: argparse.Namespace) -> int:
    """Print the plan; rc 2 if it does not fit in memory."""
    recipe = load_recipe(args.recipe, args.overrides)
    nodes, per_node = args.nodes or 1, args.gpus
    if args.hostfile is not None:
        slots = list(read_hostfile(args.hostfile).values())
        nodes = args.nodes or len(slots)
        per_node = args.gpus if args.gpus != 1 else min(slots)
    if nodes < 1 or per_node < 1:
        raise SpikeLMError(f"--nodes and --gpus must be >= 1, got {nodes} and {per_node}")
    vocab = None
    if recipe.tokenizer.path is not None:
        from spikelm.train.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(recipe.tokenizer.path))
    result = plan(recipe, gpus=nodes * per_node, gpu=args.gpu, mfu=args.mfu, vocab_size=vocab)
    print(result.format())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if not result.fits:
        gib = 2**30
        raise SpikeLMError(
            f"{recipe.name} does not fit: {result.memory_bytes / gib:.1f} GiB per GPU estimated, "
            f"{HEADROOM:.0%} of the {args.gpu}'s {result.gpu_memory_bytes / gib:.0f} GiB is "
            f"{HEADROOM * result.gpu_memory_bytes / gib:.1f}; raise deepspeed.zero_stage, turn on "
            "deepspeed.activation_checkpointing, lower train.micro_batch_size (raise train.grad_accum) "
            "or use more GPUs")
    return 0


__all__ = ["add_arguments", "run"]
