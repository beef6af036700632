"""``spikelm eval MODEL_DIR``: held-out loss, perplexity and bits per byte of a saved model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spikelm.commands.model_dir import add_dtype_argument, check_model_dir, dtype_kwargs, load_model
from spikelm.errors import SpikeLMError
from spikelm.measure.evaluation import blocks_from_text, evaluate_lm
from spikelm.train.data_sources import read_utf8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spikelm eval``."""
    parser.add_argument("model_dir", type=Path, help="a saved model directory (e.g. runs/<name>/export)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="a UTF-8 text file to evaluate on")
    source.add_argument("--recipe", type=Path, help="evaluate on this recipe's held-out split")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluate on at most this many tokens")
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per evaluated block (default: the recipe's train.block_size, else 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this file")
    add_dtype_argument(parser)


def run(args: argparse.Namespace) -> int:
    """``spikelm eval MODEL_DIR (--text FILE | --recipe RECIPE)``: print loss, perplexity and bits per byte."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import spikelm  # noqa: F401  (registers the model with the Auto classes)

    if not args.model_dir.is_dir():
        raise SpikeLMError(f"model directory {str(args.model_dir)!r} does not exist; pass e.g. runs/<name>/export")
    for name in ("tokens", "batch_size", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SpikeLMError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    check_model_dir(args.model_dir)
    block_size = args.block_size
    if args.recipe is not None:
        from spikelm.train.recipe import load_recipe
        from spikelm.train.stream import heldout_text

        recipe = load_recipe(args.recipe)
        block_size = recipe.train.block_size if block_size is None else block_size
        # ~4 characters per token is generous for BPE on English; --tokens cuts the exact amount afterwards.
        text = heldout_text(recipe.data, max_chars=args.tokens * 8)
    else:
        if not args.text.is_file():
            raise SpikeLMError(f"--text {str(args.text)!r} does not exist")
        text = read_utf8(args.text, "--text")
    block_size = 256 if block_size is None else block_size
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    except (OSError, ValueError) as err:
        raise SpikeLMError(f"no tokenizer in {str(args.model_dir)!r}: {err}") from err
    model = load_model(args.model_dir, AutoModelForCausalLM.from_pretrained, **dtype_kwargs(args.dtype)).eval()
    if len(tokenizer) > model.config.vocab_size:
        raise SpikeLMError(f"the tokenizer in {str(args.model_dir)!r} has {len(tokenizer)} tokens but the model's "
                           f"vocab_size is {model.config.vocab_size}; they must come from the same run")
    blocks = blocks_from_text(text, tokenizer, block_size, args.tokens)
    # Full blocks go in batches of --batch-size; a shorter last block goes alone.
    full = [b for b in blocks if b.numel() == block_size + 1]
    batches = [torch.stack(full[i : i + args.batch_size]) for i in range(0, len(full), args.batch_size)]
    if blocks[-1].numel() != block_size + 1 and blocks[-1].numel() >= 2:
        batches.append(blocks[-1][None])
    from tqdm.auto import tqdm

    # disable=None: a progress bar on a terminal, none in logs and pipes (as `spikelm sparsity`)
    result = evaluate_lm(model, tqdm(batches, unit="batch", desc="eval", disable=None), tokenizer)
    bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "n/a"
    print(f"tokens {result.tokens}  loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  bits/byte {bpb}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


__all__ = ["add_arguments", "run"]
