"""``spikelm sparsity MODEL_DIR [--text FILE | --recipe RECIPE] ...``: run held-out text through a saved model, print
the per-layer spike table, write the full report as JSON and draw a PNG (``spikelm/measure/sparsity.py`` says what is
counted).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from spikelm.commands.model_dir import check_model_dir, load_model
from spikelm.errors import SpikeLMError
from spikelm.measure.energy import DEFAULT_ENERGY_TABLE, ENERGY_TABLES, EnergyTable, get_energy_table
from spikelm.measure.report import SparsityReport
from spikelm.measure.sparsity import SparsityMonitor
from spikelm.model.neurons import ENCODINGS
from spikelm.train.checkpoint import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="a saved model directory (save_pretrained + tokenizer)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, metavar="FILE", help="a UTF-8 text file to run through the model")
    source.add_argument("--recipe", type=Path, metavar="RECIPE",
                        help="a training recipe: use the held-out text of its data section")
    parser.add_argument("--tokens", type=int, default=8192, metavar="N", help="tokens to measure (default 8192)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="sequences per forward pass (default 4)")
    parser.add_argument("--block-size", type=int, default=None, metavar="L",
                        help="tokens per sequence (default: the model's context_length, at most 512)")
    parser.add_argument("--energy", default=DEFAULT_ENERGY_TABLE, metavar="NAME",
                        help=f"energy table: {', '.join(ENERGY_TABLES)} or 'mac=<pJ>,ac=<pJ>' "
                        f"(default {DEFAULT_ENERGY_TABLE})")
    parser.add_argument("--encoding", choices=ENCODINGS, default="binary",
                        help="event train whose accumulates the headline energy counts (default binary)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON here")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="draw per-layer zero fraction and firing rate into this PNG")
    parser.add_argument("--per-site", action="store_true", help="also print one row per spike site")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        if not args.text.is_file():
            raise SpikeLMError(f"--text {args.text}: no such file; give a UTF-8 text file of held-out text")
        from spikelm.train.data_sources import read_utf8

        text = read_utf8(args.text, "--text")
        origin = f"--text {args.text}"
    elif args.recipe is not None:
        if not args.recipe.is_file():
            raise SpikeLMError(f"--recipe {args.recipe}: no such file; give a recipe YAML such as recipes/*.yaml")
        from spikelm.train.recipe import load_recipe
        from spikelm.train.stream import heldout_text

        # ~16 characters per token is generous for any subword vocabulary; the token budget trims the rest.
        text = heldout_text(load_recipe(args.recipe).data, max_chars=16 * args.tokens)
        origin = f"held-out text of --recipe {args.recipe}"
    else:
        raise SpikeLMError("give the text to measure with --text FILE or --recipe RECIPE")
    if not text.strip():
        raise SpikeLMError(f"{origin} is empty; give held-out text with at least a few words")
    return text


def _load_model_and_tokenizer(model_dir: Path, device: torch.device) -> tuple[nn.Module, object]:
    check_model_dir(model_dir)  # before the tokenizer, which reads config.json too and would take the blame
    from transformers import AutoModelForCausalLM

    import spikelm  # noqa: F401  (registers SpikeLM with the Auto classes)
    from spikelm.train.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as err:
        raise SpikeLMError(f"no tokenizer could be loaded from {model_dir} ({err}); save it beside the model") from err
    model = load_model(model_dir, AutoModelForCausalLM.from_pretrained).to(device).eval()
    return model, tokenizer


def _batches(ids: list[int], block_size: int, batch_size: int,
             pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` of shape ``[B, L]``; the last block is right-padded (padding after the real
    tokens cannot change them in a causal model, and the mask keeps the pads out of every count)."""
    blocks = [ids[start:start + block_size] for start in range(0, len(ids), block_size)]
    for start in range(0, len(blocks), batch_size):
        group = blocks[start:start + batch_size]
        width = max(len(block) for block in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, block in enumerate(group):
            input_ids[row, : len(block)] = torch.tensor(block)
            mask[row, : len(block)] = 1
        yield input_ids, mask


def measure_text(model: nn.Module, ids: list[int], *, block_size: int, batch_size: int,
                 energy: str | EnergyTable = DEFAULT_ENERGY_TABLE, encoding: str = "binary",
                 progress: bool = True) -> SparsityReport:
    """Run token ids through ``model`` in blocks of ``[batch_size, block_size]`` and report their spike statistics."""
    from tqdm.auto import tqdm

    if not ids:
        raise ValueError("ids is empty; give at least one token")
    device = next(model.parameters()).device
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    total = math.ceil(math.ceil(len(ids) / block_size) / batch_size)
    with torch.no_grad(), SparsityMonitor(model) as monitor:
        # disable=None: a bar on a terminal, none in logs and pipes
        bar = tqdm(_batches(ids, block_size, batch_size, pad_id), total=total, unit="batch", desc="sparsity",
                   disable=None if progress else True)
        for input_ids, mask in bar:
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return monitor.report(energy=energy, encoding=encoding)


def run(args: argparse.Namespace) -> int:
    for name in ("tokens", "batch_size", "block_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SpikeLMError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    try:
        table = get_energy_table(args.energy)
    except ValueError as err:
        raise SpikeLMError(f"--energy: {err}") from err
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    text = _read_text(args)
    model, tokenizer = _load_model_and_tokenizer(args.model_dir, device)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    if not ids:
        raise SpikeLMError("the text encodes to no tokens; give more held-out text")
    vocab_size = model.config.vocab_size
    if max(ids) >= vocab_size:
        raise SpikeLMError(f"the tokenizer in {args.model_dir} produced id {max(ids)} >= the model's vocab_size "
                           f"{vocab_size}; save the tokenizer the model was trained with beside it")
    block_size = args.block_size or min(getattr(model.config, "context_length", 512), 512)
    report = measure_text(model, ids, block_size=block_size, batch_size=args.batch_size, energy=table,
                          encoding=args.encoding, progress=True)
    print(report.format_table(per_site=args.per_site))
    if args.json is not None:
        data = {"model_dir": str(args.model_dir), "block_size": block_size, **report.to_dict()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(data, indent=2) + "\n")  # never a half-written JSON
        print(f"wrote {args.json}")
    if args.plot is not None:
        from spikelm.measure.plots import plot_report

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


__all__ = ["add_arguments", "run", "measure_text"]
