"""``spikelm convert SRC OUT``: a SpikeLM export from an RwkvForCausalLM directory or another SpikeLM export.

The weights are mapped by ``spikelm.model.convert``; the tokenizer is the source's. OUT must not exist (or be empty)
and is written in one rename, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from spikelm.errors import SpikeLMError
from spikelm.model.config import NEURONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spikelm convert``."""
    parser.add_argument("src", type=Path, help="a transformers RwkvForCausalLM directory or a SpikeLM export")
    parser.add_argument("out", type=Path, help="directory to write (must not exist, or be empty)")
    parser.add_argument("--neuron", choices=NEURONS, default=None,
                        help="neuron of the converted model (default: adaptive for RWKV, the source's for SpikeLM)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.FIELD=VALUE",
                        help="set a SpikeLMConfig field, e.g. --set model.adaptive_k=0.4 (repeatable)")


def parse_model_overrides(texts: list[str]) -> dict[str, Any]:
    """``["model.adaptive_k=0.4"]`` -> ``{"adaptive_k": 0.4}`` (values parsed as YAML)."""
    from spikelm.train.recipe import parse_override

    out: dict[str, Any] = {}
    for text in texts:
        path, value = parse_override(text)
        if len(path) != 2 or path[0] != "model":
            raise SpikeLMError(f"--set {text!r}: convert only sets model fields, e.g. --set model.adaptive_k=0.4")
        out[path[1]] = value
    return out


def run(args: argparse.Namespace) -> int:
    """Convert ``args.src`` and write the model plus the source's tokenizer to ``args.out``."""
    from transformers.utils import logging as hf_logging

    from spikelm.model.convert import check_output_dir, convert, save_converted
    from spikelm.train.tokenizer import load_tokenizer

    overrides = parse_model_overrides(args.overrides)
    check_output_dir(args.out)  # before the (possibly long) conversion
    hf_logging.disable_progress_bar()
    model = convert(args.src, neuron=args.neuron, overrides=overrides)
    tokenizer = load_tokenizer(args.src)
    save_converted(model, tokenizer, args.out)
    config = model.config
    print(f"wrote {args.out}: {config.time_mix} x {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, neuron {config.neuron}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters (tokenizer from {args.src})")
    return 0


__all__ = ["add_arguments", "run", "parse_model_overrides"]
