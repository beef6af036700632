"""The ``spikelm`` command. Each subcommand lives in its own module, imported only when used (start-up stays fast).

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spikelm.errors import SpikeLMError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("spikelm.commands.train", "pretrain a spiking LM from a YAML recipe (DeepSpeed)"),
    "generate": ("spikelm.commands.generate", "stream text from a saved model directory"),
    "sparsity": ("spikelm.commands.sparsity", "measure spike statistics, synaptic operations and energy"),
    "eval": ("spikelm.commands.eval", "held-out loss, perplexity and bits per byte"),
    "plan": ("spikelm.commands.plan", "parameters, FLOPs, memory per GPU and wall time of a recipe, before launch"),
    "convert": ("spikelm.commands.convert", "a SpikeLM export from an RwkvForCausalLM directory or another export"),
}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spikelm", description="SpikeLM: train, run and measure spiking LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_level_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"spikelm: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"spikelm {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (SpikeLMError, FileNotFoundError, ValueError) as err:
        if os.environ.get("SPIKELM_DEBUG"):
            raise
        print(f"spikelm {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spikelm {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
