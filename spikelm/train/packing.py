"""Packed training data: tokenise a source once into memory-mapped blocks, cached by content (docs/design.md,
"Data pipeline and caches").

Map-style (default): the source's documents are tokenised once with a batched ``datasets`` map (``num_proc``
processes), an eos token is appended to every document, and the two splits are written as flat memory-mapped token
files ``cache_dir/data/<hash>/{train,heldout}.bin`` with an ``index.json``. Block ``i`` is tokens
``[i * block_size, (i + 1) * block_size + 1)``: consecutive blocks share one token, so every token is a target once.
The hash covers the source files (paths, sizes, mtimes), the data settings, the tokenizer and the block size;
anything else changing means a new directory, and a directory only ever appears complete (``dist.build_once``).

Streaming (``data.streaming: true``): documents are read (``stream.DocumentStream``), tokenised and packed on the
fly by the loader (``StreamingBlocks``, read by ``loader.StreamLoader``); only the held-out blocks are written to the
cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spikelm.errors import SpikeLMError
from spikelm.train.data_sources import (
    DataConfig,
    load_documents,
    resolve_source,
    selection_fingerprint,
    source_fingerprint,
    split_documents,
)
from spikelm.train.dist import build_once, rank_zero_first
from spikelm.train.stream import split_texts
from spikelm.train.tokenizer_cache import tokenizer_fingerprint

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

# Bump when the packed format or the packing rule changes, so old cache directories are not reused.
DATA_CACHE_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a ``vocab_size`` vocabulary (uint16 up to 65,536 tokens)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenBlocks:
    """Fixed-length training blocks over a memory-mapped flat token file.

    ``blocks[i]`` is a ``torch.LongTensor [block_size + 1]`` (inputs ``[:-1]``, labels ``[1:]``); consecutive blocks
    overlap by one token. Picklable (the map is reopened lazily), so it can go to DataLoader workers.
    """

    def __init__(self, path: Path, block_size: int, dtype: str | np.dtype, num_tokens: int) -> None:
        self.path = Path(path)
        self.block_size = int(block_size)
        self.dtype = np.dtype(dtype)
        self.num_tokens = int(num_tokens)
        """Tokens stored in the file (exactly ``len(self) * block_size + 1``)."""
        expected = self.num_tokens * self.dtype.itemsize
        actual = self.path.stat().st_size
        if actual != expected:
            raise SpikeLMError(f"token file {self.path} has {actual} bytes, its index says {expected}; delete the "
                               f"directory {self.path.parent} to rebuild it")
        self._tokens: np.memmap | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The flat token ids ``[num_tokens]`` (memory-mapped, read-only)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.block_size

    def __getitem__(self, index: int) -> torch.Tensor:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"block {index} out of range for {n} blocks")
        start = (index % n) * self.block_size
        return torch.from_numpy(self.tokens[start:start + self.block_size + 1].astype(np.int64))

    def batch(self, indices: list[int] | torch.Tensor) -> torch.Tensor:
        """Blocks ``indices`` stacked: ``LongTensor [len(indices), block_size + 1]``."""
        blocks = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if blocks.size and (blocks.min() < 0 or blocks.max() >= n):
            raise IndexError(f"block indices must lie in [0, {n}), got {blocks.min()}..{blocks.max()}")
        # One gather from the memory map: rows of (start + 0 .. block_size) token offsets, [batch, block_size + 1].
        offsets = blocks[:, None] * self.block_size + np.arange(self.block_size + 1)
        return torch.from_numpy(self.tokens[offsets].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokens"] = None  # np.memmap would pickle its whole contents
        return state

    def __repr__(self) -> str:
        return f"TokenBlocks({len(self)} blocks of {self.block_size}+1 tokens, {self.path})"


class StreamingBlocks:
    """The training split of a streamed source, tokenised and packed on the fly by ``StreamLoader`` (no ``len``).

    The documents come from ``stream.DocumentStream`` (one per loader, i.e. per rank); this object holds what the
    packing needs: the recipe section, the tokenizer and its fingerprint (recorded in the loader's position).
    """

    def __init__(self, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int) -> None:
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.tokenizer_key = tokenizer_fingerprint(tokenizer)
        self._eos = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """A document's ids followed by eos."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each document's ids followed by eos (one batched call of the fast tokenizer)."""
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [ids + [self._eos] for ids in encoded]

    def __repr__(self) -> str:
        return f"StreamingBlocks({self.data_cfg.source!r}, block_size={self.block_size})"


def build_datasets(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int,
                   cache_dir: Path) -> tuple[TokenBlocks | StreamingBlocks, TokenBlocks]:
    """(train, held-out) blocks of ``block_size + 1`` tokens, built once in ``cache_dir/data/<hash>/`` and reused.

    Map-style: both are ``TokenBlocks``. Streaming (``data_cfg.streaming``): train is a ``StreamingBlocks`` read on
    the fly; held-out is ``TokenBlocks`` of up to ``data_cfg.streaming_heldout_tokens`` tokens. Rebuilt when the
    source files, data settings, tokenizer or block size change. Errors for people raise ``SpikeLMError``.
    With ``torch.distributed`` initialised, rank 0 builds first and the other ranks then find the entry.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive integer, got {block_size!r}")
    if tokenizer.eos_token_id is None:
        raise SpikeLMError("the tokenizer has no eos token; documents are separated by eos: use a tokenizer with one")
    cache_dir = Path(cache_dir)
    if data_cfg.streaming:
        heldout = rank_zero_first(lambda: _build_streaming_heldout(data_cfg, tokenizer, block_size, cache_dir))
        return StreamingBlocks(data_cfg, tokenizer, block_size), heldout
    return rank_zero_first(lambda: _build_map_style(data_cfg, tokenizer, block_size, cache_dir))


# ----------------------------------------------------------------------------------------------------------------
# The two cache builders


def _build_map_style(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int,
                     cache_dir: Path) -> tuple[TokenBlocks, TokenBlocks]:
    resolved = resolve_source(data_cfg)
    source = source_fingerprint(data_cfg, resolved)
    ds = None
    if resolved.builder == "hub":
        ds = load_documents(data_cfg, streaming=False)
        source["dataset_fingerprint"] = ds._fingerprint  # changes when the cached hub copy changes
    # Local files are identified by their stat alone, so a cache hit never reads the corpus.
    fingerprint, key = _fingerprint(data_cfg, tokenizer, block_size, source)

    def build(tmp: Path) -> None:
        documents = ds if ds is not None else load_documents(data_cfg, streaming=False,
                                                             cache_dir=cache_dir / "hf_datasets")
        splits = _pack_map_style(documents, data_cfg, tokenizer, block_size, key, tmp)
        _write_index(tmp, key, fingerprint, tokenizer, block_size, splits)

    directory = build_once(cache_dir / "data", key, build, ready=lambda path: _read_index(path, key) is not None)
    index = _read_index(directory, key)
    return _open_split(directory, index, "train"), _open_split(directory, index, "heldout")


def _pack_map_style(ds: Dataset, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int,
                    key: str, tmp: Path) -> dict[str, Any]:
    if len(ds) == 0:
        raise SpikeLMError(f"data.source {data_cfg.source!r} holds no documents; check the files")
    train_idx, heldout_idx = split_documents(ds, data_cfg)
    num_proc = data_cfg.num_proc if len(ds) >= 2 * data_cfg.num_proc else None
    tokenized = ds.map(
        _tokenize_fn(tokenizer), batched=True, num_proc=num_proc, remove_columns=["text"],
        # An explicit fingerprint: hashing the tokenizer inside the closure is slow and not always deterministic.
        new_fingerprint=f"{ds._fingerprint}-tok-{key}", desc="tokenising",
    )
    splits: dict[str, Any] = {}
    for split, indices in (("train", train_idx), ("heldout", heldout_idx)):
        part = tokenized.select(indices)
        batches = (batch["ids"] for batch in part.iter(batch_size=256))
        splits[split] = _write_split(batches, tmp, split, token_dtype(len(tokenizer)), block_size)
        if splits[split]["num_tokens"] == 0:
            raise _too_small(split, sum(len(b) for b in part["ids"]), block_size, data_cfg)
    return splits


def _build_streaming_heldout(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int,
                             cache_dir: Path) -> TokenBlocks:
    source = source_fingerprint(data_cfg, resolve_source(data_cfg))
    fingerprint, key = _fingerprint(data_cfg, tokenizer, block_size, source)

    def build(tmp: Path) -> None:
        encode = _tokenize_fn(tokenizer)
        batches = (encode({"text": [text]})["ids"] for text in split_texts(data_cfg, "heldout", cache_dir))
        split = _write_split(batches, tmp, "heldout", token_dtype(len(tokenizer)), block_size,
                             max_tokens=data_cfg.streaming_heldout_tokens)
        if split["num_tokens"] == 0:
            raise SpikeLMError(
                f"streaming data.source {data_cfg.source!r}: the held-out documents (text hash below "
                f"data.heldout_fraction={data_cfg.heldout_fraction}) hold less than one block of "
                f"{block_size + 1} tokens; raise data.heldout_fraction or lower the block size"
            )
        _write_index(tmp, key, fingerprint, tokenizer, block_size, {"heldout": split})

    directory = build_once(cache_dir / "data", key, build, ready=lambda path: _read_index(path, key) is not None)
    return _open_split(directory, _read_index(directory, key), "heldout")


# ----------------------------------------------------------------------------------------------------------------
# The packed format


def _write_tokens(batches: Iterator[list[list[int]]], path: Path, dtype: np.dtype, block_size: int,
                  max_tokens: int | None = None) -> tuple[int, int]:
    """Write documents' ids back to back into ``path``, cut to whole blocks; return (tokens kept, documents)."""
    written = docs = 0
    with open(path, "wb") as handle:
        for batch in batches:
            for ids in batch:
                if not ids:
                    continue
                handle.write(np.asarray(ids, dtype=dtype).tobytes())
                written += len(ids)
                docs += 1
            if max_tokens is not None and written >= max_tokens:
                break
        num_blocks = max(written - 1, 0) // block_size
        kept = num_blocks * block_size + 1 if num_blocks else 0
        handle.truncate(kept * dtype.itemsize)
        handle.flush()
        os.fsync(handle.fileno())
    return kept, docs


def _write_split(batches: Iterator[list[list[int]]], directory: Path, split: str, dtype: np.dtype, block_size: int,
                 max_tokens: int | None = None) -> dict[str, Any]:
    """``directory/<split>.bin`` and its entry in the index."""
    tokens, docs = _write_tokens(batches, directory / f"{split}.bin", dtype, block_size, max_tokens)
    return {"file": f"{split}.bin", "num_tokens": tokens, "num_blocks": max(tokens - 1, 0) // block_size,
            "num_documents": docs}


def _write_index(directory: Path, key: str, fingerprint: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                 block_size: int, splits: dict[str, Any]) -> None:
    index = {"key": key, "fingerprint": fingerprint, "dtype": token_dtype(len(tokenizer)).name,
             "block_size": block_size, "vocab_size": len(tokenizer), "splits": splits}
    (directory / "index.json").write_text(json.dumps(index, indent=2))


def _read_index(directory: Path, key: str) -> dict[str, Any] | None:
    index_path = directory / "index.json"
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise SpikeLMError(f"{index_path} is corrupt ({err}); delete {directory} to rebuild it") from err
    return index if index.get("key") == key else None


def _open_split(directory: Path, index: dict[str, Any], split: str) -> TokenBlocks:
    entry = index["splits"][split]
    return TokenBlocks(directory / entry["file"], index["block_size"], index["dtype"], entry["num_tokens"])


def _tokenize_fn(tokenizer: PreTrainedTokenizerBase) -> Callable[[dict[str, list]], dict[str, list]]:
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch["text"]]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        # eos closes every non-empty document, so the model learns where one ends and the next begins.
        return {"ids": [ids + [eos] if text else [] for ids, text in zip(encoded, texts, strict=True)]}

    return tokenize


def _fingerprint(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int,
                 source: dict[str, Any]) -> tuple[dict[str, Any], str]:
    fingerprint = {
        "version": DATA_CACHE_VERSION,
        "source": source,
        "selection": selection_fingerprint(data_cfg),
        "streaming": data_cfg.streaming,
        "streaming_heldout_tokens": data_cfg.streaming_heldout_tokens if data_cfg.streaming else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": block_size,
    }
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    return fingerprint, key


def _too_small(split: str, tokens: int, block_size: int, data_cfg: DataConfig) -> SpikeLMError:
    if tokens == 0 and split == "train":
        return SpikeLMError(f"data.source {data_cfg.source!r} holds no text (0 tokens); check the files and "
                            "data.text_field")
    return SpikeLMError(
        f"the {split} split of data.source {data_cfg.source!r} has {tokens} tokens, fewer than one block of "
        f"block_size + 1 = {block_size + 1}; lower the block size, add data, or raise data.max_docs / "
        "data.heldout_fraction"
    )


__all__ = ["TokenBlocks", "StreamingBlocks", "build_datasets", "token_dtype", "DATA_CACHE_VERSION"]
