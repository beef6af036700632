"""``spikelm generate MODEL_DIR "prompt"``: stream text from a saved model with the tokenizer saved beside it.

Tokens are printed as they are produced (a transformers ``TextStreamer``); the recurrent cache makes each new token
cost the same however long the text grows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from spikelm.commands.model_dir import add_dtype_argument, check_model_dir, dtype_kwargs, load_model
from spikelm.errors import SpikeLMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spikelm generate``."""
    parser.add_argument("model_dir", type=Path, help="directory of a saved model (config.json, weights, tokenizer)")
    parser.add_argument("prompt", help="text to continue (must not be empty)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature > 0 (default 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token (no sampling)")
    parser.add_argument("--event-decoding", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                        help="read only the synapses of inputs that spiked: auto (default: on where a short "
                        "calibration finds it faster, on CPU for models larger than the cache), on, off")
    add_dtype_argument(parser)


def _check_arguments(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise SpikeLMError("the prompt is empty; give some text to continue, e.g. spikelm generate DIR \"ROMEO:\"")
    if args.max_new_tokens < 1:
        raise SpikeLMError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if not args.temperature > 0:
        raise SpikeLMError(f"--temperature={args.temperature} must be > 0 (use --greedy for deterministic output)")
    if not 0 < args.top_p <= 1:
        raise SpikeLMError(f"--top-p={args.top_p} must lie in (0, 1]")
    if args.top_k < 0:
        raise SpikeLMError(f"--top-k={args.top_k} must be >= 0 (0 disables top-k)")
    model_dir: Path = args.model_dir
    if not model_dir.is_dir():
        raise SpikeLMError(f"model directory {model_dir} does not exist; train one with spikelm train RECIPE "
                           "(it exports to <run>/export) or save a model with model.save_pretrained(dir)")
    if not (model_dir / "config.json").is_file():
        raise SpikeLMError(f"{model_dir} has no config.json: not a saved model directory "
                           "(save one with model.save_pretrained(dir))")
    check_model_dir(model_dir)  # a garbled config.json or truncated weights: one line naming the file


def run(args: argparse.Namespace) -> int:
    """Load the model and tokenizer from ``args.model_dir`` and stream a continuation of ``args.prompt``."""
    from transformers import TextStreamer, set_seed
    from transformers.utils import logging as hf_logging

    from spikelm.model.modeling import SpikeLMForCausalLM
    from spikelm.train.tokenizer import load_tokenizer

    _check_arguments(args)
    hf_logging.disable_progress_bar()  # the streamed text is the output; no "Loading weights" bar in it
    tokenizer = load_tokenizer(args.model_dir)
    model = load_model(args.model_dir, SpikeLMForCausalLM.from_pretrained, **dtype_kwargs(args.dtype))
    model.eval()
    model.set_event_decoding(args.event_decoding)
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise SpikeLMError(
            f"the tokenizer in {args.model_dir} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{vocab_size}; save the tokenizer the model was trained with into the model directory"
        )
    prompt_ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise SpikeLMError(f"the prompt {args.prompt!r} encodes to no tokens; give some text to continue")
    # Training streams are documents each closed by eos, so a new document starts right after an eos token.
    if tokenizer.eos_token_id is not None:
        prompt_ids = [tokenizer.eos_token_id, *prompt_ids]
    input_ids = torch.tensor([prompt_ids], device=model.device)

    if args.seed is not None:
        set_seed(args.seed)
    sampling = {} if args.greedy else {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=not args.greedy,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    return 0


__all__ = ["add_arguments", "run"]
