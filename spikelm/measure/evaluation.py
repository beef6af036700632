"""Held-out loss, perplexity and bits per byte.

:func:`evaluate_lm` is the one evaluation used both by the training loop's periodic eval and by ``spikelm eval``.
Bits per byte = total NLL in bits / total UTF-8 bytes the target tokens stand for, so models with different
tokenizers can be compared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from spikelm.errors import SpikeLMError
from spikelm.model.modeling import lm_cross_entropy


@dataclass
class EvalResult:
    """Summary of one evaluation over ``tokens`` predicted tokens."""

    loss: float
    """Mean next-token cross-entropy in nats."""
    perplexity: float
    """``exp(loss)``."""
    bits_per_byte: float | None
    """Total NLL in bits / UTF-8 bytes the targets stand for (None without a tokenizer)."""
    tokens: int
    """Predicted tokens evaluated (over all ranks)."""
    bytes: int
    """UTF-8 bytes the targets stand for (over all ranks; 0 without a tokenizer; see ``token_byte_lengths``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_batches(blocks: Any, micro_batch_size: int, max_batches: int, *, rank: int = 0,
                    world_size: int = 1) -> list[torch.Tensor]:
    """Deterministic evaluation batches ``[b, block_size + 1]`` of this rank: up to ``max_batches`` per rank.

    Every block is scored at most once: with fewer blocks than ``max_batches`` batches on every rank need, each rank
    gets fewer batches (the result's ``tokens`` says how many were scored). Every rank gets the same number of batches
    (ZeRO-3 gathers parameters collectively inside forward, so ranks must run the same number of forwards).
    """
    if len(blocks) == 0:
        raise SpikeLMError("the held-out split is empty; give the data more documents or raise data.heldout_fraction")
    if len(blocks) < world_size:
        raise SpikeLMError(f"the held-out split has {len(blocks)} block(s), fewer than the {world_size} ranks that "
                           "evaluate it; give the data more documents or raise data.heldout_fraction")
    per_batch = max(1, min(micro_batch_size, len(blocks) // world_size))
    per_rank = min(max_batches, len(blocks) // per_batch // world_size)
    batches = []
    for i in range(per_rank):
        start = (i * world_size + rank) * per_batch
        batches.append(torch.stack([blocks[j] for j in range(start, start + per_batch)]))
    return batches


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_byte_lengths(tokenizer: Any) -> torch.Tensor:
    """UTF-8 bytes of text each token id stands for, ``[len(tokenizer)]`` int64; special tokens count 0.

    Counting per token (not decoding rows) keeps bits per byte exact where a multi-byte character is split into
    byte-fallback pieces across two rows, and costs one table lookup per batch. Sentencepiece pieces: ``▁`` is one
    space and ``<0xNN>`` one byte; other tokenizers: the bytes of each token decoded on its own.
    """
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    sentencepiece = any(isinstance(p, str) and p.startswith("\u2581") for p in pieces)
    lengths = []
    for token_id, piece in zip(ids, pieces, strict=True):
        if token_id in special or piece is None:
            lengths.append(0)
        elif sentencepiece:
            lengths.append(1 if _BYTE_PIECE.fullmatch(piece) else len(piece.replace("\u2581", " ").encode("utf-8")))
        else:
            lengths.append(len(tokenizer.decode([token_id]).encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.int64)


@torch.no_grad()
def evaluate_lm(model: Callable[..., Any], batches: Iterable[torch.Tensor], tokenizer: Any | None = None,
                *, device: torch.device | str | None = None) -> EvalResult:
    """Evaluate a causal LM on token batches and reduce over ranks when ``torch.distributed`` is initialised.

    Args:
        model: a ``SpikeLMForCausalLM``, any HF causal LM, or a DeepSpeed engine wrapping one; called as
            ``model(input_ids=...)`` and must return ``.logits`` ``[B, T, V]``.
        batches: token blocks ``[B, T + 1]`` (inputs are ``[:, :-1]``, targets ``[:, 1:]``).
        tokenizer: decodes the targets for bits per byte; ``None`` skips it.
        device: where the batches go (default: the model's first parameter's device).
    """
    if device is None:
        first = next(iter(getattr(model, "parameters", lambda: iter([]))()), None)
        device = first.device if first is not None else torch.device("cpu")
    nll = torch.zeros((), dtype=torch.float64, device=device)
    byte_lengths = None
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # tokens, bytes
    for batch in batches:
        if batch.dim() != 2 or batch.size(1) < 2:
            raise ValueError(f"evaluate_lm: batches must be [B, T + 1] with T >= 1, got {tuple(batch.shape)}")
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=inputs).logits  # [B, T, V]
        nll += lm_cross_entropy(logits, targets, reduction="sum")
        counts[0] += targets.numel()
        if tokenizer is not None:
            if byte_lengths is None:
                byte_lengths = token_byte_lengths(tokenizer).to(device)
            counts[1] += byte_lengths[targets].sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(nll)
        torch.distributed.all_reduce(counts)
    tokens, n_bytes = int(counts[0].item()), int(counts[1].item())
    if tokens == 0:
        raise ValueError("evaluate_lm: no tokens to evaluate")
    loss = nll.item() / tokens
    bpb = nll.item() / math.log(2) / n_bytes if tokenizer is not None and n_bytes > 0 else None
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=bpb, tokens=tokens,
                      bytes=n_bytes)


def blocks_from_text(text: str, tokenizer: Any, block_size: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Tokenise ``text`` and cut it into consecutive blocks ``[block_size + 1]`` (the last block may be shorter)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise SpikeLMError("the evaluation text is empty (fewer than 2 tokens); pass a longer --text file")
    # Blocks overlap by one token so every token after the first is a target exactly once.
    return [torch.tensor(ids[i : i + block_size + 1]) for i in range(0, len(ids) - 1, block_size)]


__all__ = ["EvalResult", "evaluate_lm", "token_byte_lengths", "heldout_batches", "blocks_from_text"]
