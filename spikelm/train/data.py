"""The data pipeline of recipe-driven pretraining: tokenise, pack, cache, shard and resume.

Map-style (default): the source's documents are tokenised once with a batched ``datasets`` map (``num_proc``
processes), an eos token is appended to every document, and the two splits are written as flat memory-mapped token
files ``cache_dir/data/<hash>/{train,heldout}.bin`` with an ``index.json``. Block ``i`` is tokens
``[i * block_size, (i + 1) * block_size + 1)``: consecutive blocks share one token, so every token is a target once.
The hash covers the source files (paths, sizes, mtimes), the data settings, the tokenizer and the block size;
anything else changing means a new directory, and a directory only ever appears complete (built under a temporary
name, renamed last).

Streaming (``data.streaming: true``): documents are read, tokenised and packed on the fly; only the held-out blocks
are written to the cache. The position (epoch, documents consumed, carry-over tokens) is the loader's state.

``BatchLoader`` walks a seeded permutation per epoch in global batches of ``micro_batch_size * world_size`` blocks;
rank ``r`` takes the ``r``-th slice of each, so the union over ranks of one step is the one-process batch of the
same global size and runs with different world sizes (same global batch) see the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spikelm.errors import SpikeLMError
from spikelm.train.data_sources import (
    DataConfig,
    TokenizerConfig,
    document_bucket,
    is_heldout_bucket,
    load_documents,
    resolve_source,
    selection_fingerprint,
    source_fingerprint,
    split_documents,
)
from spikelm.train.dist import file_lock, rank_zero_first
from spikelm.train.tokenizer_cache import check_vocab, prepare_tokenizer, tokenizer_fingerprint

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

# Bump when the packed format or the packing rule changes, so old cache directories are not reused.
DATA_CACHE_VERSION = 1
SPLITS = ("train", "heldout")


# ----------------------------------------------------------------------------------------------------------------
# Packed blocks


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


def _tokenize_fn(tokenizer: PreTrainedTokenizerBase) -> Callable[[dict[str, list]], dict[str, list]]:
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch["text"]]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        # eos closes every non-empty document, so the model learns where one ends and the next begins.
        return {"ids": [ids + [eos] if text else [] for ids, text in zip(encoded, texts, strict=True)]}

    return tokenize


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.eos_token_id is None:
        raise SpikeLMError("the tokenizer has no eos token; documents are separated by eos: use a tokenizer with one")


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


def _too_small(split: str, tokens: int, block_size: int, data_cfg: DataConfig) -> SpikeLMError:
    if tokens == 0 and split == "train":
        return SpikeLMError(f"data.source {data_cfg.source!r} holds no text (0 tokens); check the files and "
                            "data.text_field")
    return SpikeLMError(
        f"the {split} split of data.source {data_cfg.source!r} has {tokens} tokens, fewer than one block of "
        f"block_size + 1 = {block_size + 1}; lower the block size, add data, or raise data.max_docs / "
        "data.heldout_fraction"
    )


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
    root = cache_dir / "data"
    directory = root / key
    with file_lock(root / f"{key}.lock"):
        index = _read_index(directory, key)
        if index is None:
            if ds is None:
                ds = load_documents(data_cfg, streaming=False, cache_dir=cache_dir / "hf_datasets")
            _pack_map_style(ds, data_cfg, tokenizer, block_size, root, key, fingerprint)
            index = _read_index(directory, key)
    assert index is not None
    return _open_split(directory, index, "train"), _open_split(directory, index, "heldout")


def _pack_map_style(ds: Dataset, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int,
                    root: Path, key: str, fingerprint: dict[str, Any]) -> None:
    if len(ds) == 0:
        raise SpikeLMError(f"data.source {data_cfg.source!r} holds no documents; check the files")
    train_idx, heldout_idx = split_documents(ds, data_cfg)
    num_proc = data_cfg.num_proc if len(ds) >= 2 * data_cfg.num_proc else None
    tokenized = ds.map(
        _tokenize_fn(tokenizer), batched=True, num_proc=num_proc, remove_columns=["text"],
        # An explicit fingerprint: hashing the tokenizer inside the closure is slow and not always deterministic.
        new_fingerprint=f"{ds._fingerprint}-tok-{key}", desc="tokenising",
    )
    dtype = token_dtype(len(tokenizer))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        splits: dict[str, Any] = {}
        for split, indices in (("train", train_idx), ("heldout", heldout_idx)):
            part = tokenized.select(indices)
            batches = (batch["ids"] for batch in part.iter(batch_size=256))
            tokens, docs = _write_tokens(batches, tmp / f"{split}.bin", dtype, block_size)
            if tokens == 0:
                raise _too_small(split, sum(len(b) for b in part["ids"]), block_size, data_cfg)
            splits[split] = {"file": f"{split}.bin", "num_tokens": tokens, "num_blocks": (tokens - 1) // block_size,
                             "num_documents": docs}
        _finish(tmp, root / key, key, fingerprint, dtype, block_size, len(tokenizer), splits)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(tmp: Path, directory: Path, key: str, fingerprint: dict[str, Any], dtype: np.dtype, block_size: int,
            vocab_size: int, splits: dict[str, Any]) -> None:
    """Write the index last and rename the whole directory into place: it appears complete or not at all."""
    index = {"key": key, "fingerprint": fingerprint, "dtype": dtype.name, "block_size": block_size,
             "vocab_size": vocab_size, "splits": splits}
    (tmp / "index.json").write_text(json.dumps(index, indent=2))
    if directory.exists():  # an unreadable leftover of another version of this key: replace it
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def build_datasets(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int,
                   cache_dir: Path) -> tuple[TokenBlocks | StreamingBlocks, TokenBlocks]:
    """(train, held-out) blocks of ``block_size + 1`` tokens, built once in ``cache_dir/data/<hash>/`` and reused.

    Map-style: both are ``TokenBlocks``. Streaming (``data_cfg.streaming``): train is a ``StreamingBlocks`` read on
    the fly; held-out is ``TokenBlocks`` of up to ``data_cfg.streaming_heldout_tokens`` tokens. Rebuilt when the
    source files, data settings, tokenizer or block size change. Errors for people raise ``SpikeLMError``.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive integer, got {block_size!r}")
    _check_tokenizer(tokenizer)
    cache_dir = Path(cache_dir)
    if data_cfg.streaming:
        heldout = rank_zero_first(lambda: _build_streaming_heldout(data_cfg, tokenizer, block_size, cache_dir))
        return StreamingBlocks(data_cfg, tokenizer, block_size), heldout
    return rank_zero_first(lambda: _build_map_style(data_cfg, tokenizer, block_size, cache_dir))


# ----------------------------------------------------------------------------------------------------------------
# Streaming


class StreamingBlocks:
    """The training split of a streamed source, tokenised and packed on the fly (no ``len``).

    ``documents(epoch, skip)`` yields the training texts of one pass over the stream after skipping ``skip`` raw
    documents (held-out ones count), each paired with the raw index of the document that follows it; ``BatchLoader``
    turns them into blocks and keeps the position.
    """

    def __init__(self, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int) -> None:
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer
        self.block_size = block_size
        self._eos = tokenizer.eos_token_id

    def documents(self, *, epoch: int, skip: int, shuffle: bool, seed: int) -> Iterator[tuple[int, str]]:
        """(raw documents consumed after this one, text) for every training document from raw position ``skip``."""
        stream = load_documents(self.data_cfg, streaming=True)
        if shuffle:
            # A seeded buffer shuffle is a deterministic function of (seed, epoch), so skipping ``skip`` documents
            # of the same shuffled stream resumes exactly.
            stream = stream.shuffle(seed=seed + epoch, buffer_size=self.data_cfg.shuffle_buffer)
        for position, row in enumerate(stream.skip(skip) if skip else stream, start=skip + 1):
            text = row["text"]
            if text and not is_heldout_bucket(document_bucket(text), self.data_cfg):
                yield position, text

    def encode(self, text: str) -> list[int]:
        """A document's ids followed by eos."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self._eos]

    def __repr__(self) -> str:
        return f"StreamingBlocks({self.data_cfg.source!r}, block_size={self.block_size})"


def _build_streaming_heldout(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, block_size: int,
                             cache_dir: Path) -> TokenBlocks:
    resolved = resolve_source(data_cfg)
    fingerprint, key = _fingerprint(data_cfg, tokenizer, block_size, source_fingerprint(data_cfg, resolved))
    root = cache_dir / "data"
    directory = root / key
    with file_lock(root / f"{key}.lock"):
        index = _read_index(directory, key)
        if index is None:
            dtype = token_dtype(len(tokenizer))
            encode = _tokenize_fn(tokenizer)
            stream = load_documents(data_cfg, streaming=True)
            heldout = (row["text"] for row in stream
                       if row["text"] and is_heldout_bucket(document_bucket(row["text"]), data_cfg))
            batches = (encode({"text": [text]})["ids"] for text in heldout)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
            try:
                tokens, docs = _write_tokens(batches, tmp / "heldout.bin", dtype, block_size,
                                             max_tokens=data_cfg.streaming_heldout_tokens)
                if tokens == 0:
                    raise SpikeLMError(
                        f"streaming data.source {data_cfg.source!r}: the held-out documents (text hash below "
                        f"data.heldout_fraction={data_cfg.heldout_fraction}) hold less than one block of "
                        f"{block_size + 1} tokens; raise data.heldout_fraction or lower the block size"
                    )
                splits = {"heldout": {"file": "heldout.bin", "num_tokens": tokens,
                                      "num_blocks": (tokens - 1) // block_size, "num_documents": docs}}
                _finish(tmp, directory, key, fingerprint, dtype, block_size, len(tokenizer), splits)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            index = _read_index(directory, key)
    assert index is not None
    return _open_split(directory, index, "heldout")


# ----------------------------------------------------------------------------------------------------------------
# Loaders


class BatchLoader:
    """Infinite iterator of training batches ``LongTensor [micro_batch_size, block_size + 1]`` for one rank.

    Map-style blocks: each epoch walks a permutation of all blocks (seeded by ``seed + epoch``; identity when
    ``shuffle=False``) in global batches of ``micro_batch_size * world_size`` blocks; this rank takes slice
    ``[rank * micro_batch_size, (rank + 1) * micro_batch_size)`` of each; an incomplete last global batch is dropped.
    Streaming blocks: the same layout over the stream of packed blocks.

    ``state_dict()`` is the position in global blocks (not in this rank's batches), so a checkpoint resumes exactly,
    also under a different world size with the same global batch.
    """

    def __init__(self, blocks: TokenBlocks | StreamingBlocks, micro_batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        for name, value in (("micro_batch_size", micro_batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BatchLoader {name}: expected a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchLoader rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = micro_batch_size * world_size
        self.streaming = isinstance(blocks, StreamingBlocks)
        if not self.streaming and len(blocks) < self.global_batch:
            raise SpikeLMError(
                f"the training split has {len(blocks)} blocks, fewer than one global batch of {self.global_batch} "
                f"(micro_batch_size {micro_batch_size} x world_size {world_size}); add data or lower the batch"
            )
        self.epoch = 0
        self.offset = 0
        """Map-style: blocks of this epoch's permutation already consumed (all ranks together)."""
        self.docs_consumed = 0
        """Streaming: raw documents of this epoch read into ``self._carry``."""
        self._carry: list[int] = []
        self._docs: Iterator[tuple[int, str]] | None = None
        self._permutation: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int | None:
        """Global batches in one pass over the map-style blocks (``None`` when streaming: unknown in advance)."""
        return None if self.streaming else len(self.blocks) // self.global_batch

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.streaming:
            return self._next_streaming()
        if self.offset + self.global_batch > len(self.blocks):
            self.epoch += 1
            self.offset = 0
            self._permutation = None
        if self._permutation is None:
            self._permutation = self._epoch_permutation(self.epoch)
        start = self.offset + self.rank * self.micro_batch_size
        batch = self.blocks.batch(self._permutation[start:start + self.micro_batch_size])
        self.offset += self.global_batch
        return batch

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        n = len(self.blocks)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=generator)

    def _next_streaming(self) -> torch.Tensor:
        blocks = self.blocks
        assert isinstance(blocks, StreamingBlocks)
        block_size = blocks.block_size
        needed = self.global_batch * block_size + 1
        read_this_epoch = False
        while len(self._carry) < needed:
            if self._docs is None:
                self._docs = blocks.documents(epoch=self.epoch, skip=self.docs_consumed, shuffle=self.shuffle,
                                              seed=self.seed)
            item = next(self._docs, None)
            if item is None:  # end of the stream: the next epoch starts, the carry-over tokens continue
                if not read_this_epoch and self.docs_consumed == 0:
                    raise SpikeLMError(f"streaming data.source {blocks.data_cfg.source!r} yields no training text")
                self.epoch += 1
                self.docs_consumed = 0
                self._docs = None
                read_this_epoch = False
                continue
            self.docs_consumed, text = item
            self._carry.extend(blocks.encode(text))
            read_this_epoch = True
        start = self.rank * self.micro_batch_size * block_size
        rows = [self._carry[start + i * block_size:start + (i + 1) * block_size + 1]
                for i in range(self.micro_batch_size)]
        # Blocks overlap by one token: the next global batch starts on the last token of this one.
        del self._carry[:self.global_batch * block_size]
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        """The exact position: epoch and consumed global blocks (map-style) or documents + carry-over (streaming)."""
        state: dict[str, Any] = {"epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle,
                                 "streaming": self.streaming}
        if self.streaming:
            state.update(docs_consumed=self.docs_consumed, carry=list(self._carry))
        else:
            state.update(offset=self.offset, num_blocks=len(self.blocks))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a loader over the same data (any world size)."""
        if state.get("streaming") != self.streaming:
            kinds = ("map-style", "streaming")
            raise ValueError(f"BatchLoader.load_state_dict: the state is from a {kinds[bool(state.get('streaming'))]} "
                             f"loader, this one is {kinds[self.streaming]}; resume with the same data.streaming")
        for name in ("seed", "shuffle"):
            if state[name] != getattr(self, name):
                raise ValueError(f"BatchLoader.load_state_dict: saved {name}={state[name]!r} differs from this "
                                 f"loader's {getattr(self, name)!r}; the data order would not continue")
        if not self.streaming and state["num_blocks"] != len(self.blocks):
            raise SpikeLMError(f"the checkpoint's data position is for {state['num_blocks']} training blocks, the "
                               f"data now has {len(self.blocks)}: the source, tokenizer or block size changed")
        self.epoch = int(state["epoch"])
        self._permutation = None
        self._docs = None
        if self.streaming:
            self.docs_consumed = int(state["docs_consumed"])
            self._carry = [int(t) for t in state["carry"]]
        else:
            self.offset = int(state["offset"])


class HeldoutLoader:
    """Deterministic evaluation batches ``LongTensor [micro_batch_size, block_size + 1]`` for one rank, re-iterable.

    The first ``num_batches * micro_batch_size * world_size`` held-out blocks in order, sliced per rank like
    ``BatchLoader``. Every rank gets the same number of full batches (ZeRO-3 needs all ranks in every forward).
    """

    def __init__(self, blocks: TokenBlocks, micro_batch_size: int, *, max_batches: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size <= 0:
            raise ValueError(f"HeldoutLoader micro_batch_size: expected a positive integer, got {micro_batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"HeldoutLoader rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        if max_batches is not None and max_batches <= 0:
            raise ValueError(f"HeldoutLoader max_batches: expected a positive integer or None, got {max_batches!r}")
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.global_batch = micro_batch_size * world_size
        self.num_batches = len(blocks) // self.global_batch
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)
        if self.num_batches == 0:
            raise SpikeLMError(
                f"the held-out split has {len(blocks)} blocks, fewer than one evaluation batch of {self.global_batch} "
                "blocks; raise data.heldout_fraction or lower the eval batch"
            )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        for step in range(self.num_batches):
            start = step * self.global_batch + self.rank * self.micro_batch_size
            yield self.blocks.batch(list(range(start, start + self.micro_batch_size)))


def heldout_text(data_cfg: DataConfig, max_chars: int) -> str:
    """Up to ``max_chars`` characters of raw held-out text: the held-out documents in source order, blank-line joined.

    Uses the same split as ``build_datasets`` (map-style or streaming rule, per ``data_cfg.streaming``).
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"max_chars: expected a positive integer, got {max_chars!r}")
    if data_cfg.streaming:
        texts: Iterator[str] = (row["text"] for row in load_documents(data_cfg, streaming=True)
                                if row["text"] and is_heldout_bucket(document_bucket(row["text"]), data_cfg))
    else:
        # Map-style choice needs every document's hash; the Arrow copy goes to a temporary cache (no run dir here).
        with tempfile.TemporaryDirectory(prefix="spikelm-heldout-") as tmp:
            ds = load_documents(data_cfg, streaming=False, cache_dir=Path(tmp))
            _, heldout_idx = split_documents(ds, data_cfg)
            texts = iter([row["text"] for row in ds.select(heldout_idx) if row["text"]])
    pieces: list[str] = []
    remaining = max_chars
    for text in texts:
        piece = text[:remaining]
        pieces.append(piece)
        remaining -= len(piece) + 2
        if remaining <= 0:
            break
    result = "\n\n".join(pieces)[:max_chars]
    if not result.strip():
        raise SpikeLMError(f"data.source {data_cfg.source!r} has no held-out text; raise data.heldout_fraction")
    return result


__all__ = [
    "DataConfig",
    "TokenizerConfig",
    "prepare_tokenizer",
    "check_vocab",
    "build_datasets",
    "TokenBlocks",
    "StreamingBlocks",
    "BatchLoader",
    "HeldoutLoader",
    "heldout_text",
]
