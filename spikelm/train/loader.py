"""Training batches for one rank: a map-style loader over packed blocks and a streaming loader over a text stream
(docs/design.md, "Loaders").

``MapLoader`` walks global batches of ``micro_batch_size * world_size`` blocks; rank ``r`` takes the ``r``-th slice
of each, so the union over ranks of one step is the one-process batch of the same global size, and its
``state_dict()`` (a position in global blocks) resumes exactly also under another world size. ``StreamLoader``
packs this rank's own share of the stream (``stream.DocumentStream``: shards split by ``split_dataset_by_node``), so
no rank reads or tokenises another's documents; its position is per rank and resumes with the same world size.

Both can produce their batches ahead of the training step in a background thread (``prefetch`` batches,
``prefetch.Prefetcher``); ``state_dict()`` is then the position after the batches the training loop has taken,
never after those merely prefetched, so a checkpoint resumes exactly. ``close()`` stops the thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from spikelm.errors import SpikeLMError
from spikelm.train.packing import StreamingBlocks, TokenBlocks
from spikelm.train.prefetch import Prefetcher
from spikelm.train.stream import DocumentStream

ENCODE_BATCH = 32
"""Documents tokenised per call of the fast tokenizer by ``StreamLoader``."""


class _RankBatches:
    """What both loaders share: arguments, the rank's slice of a global batch, and the state's common keys."""

    streaming = False

    def __init__(self, micro_batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 prefetch: int = 0) -> None:
        for name, value in (("micro_batch_size", micro_batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"batch loader {name}: expected a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"batch loader rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"batch loader prefetch: expected a non-negative integer, got {prefetch!r}")
        self.global_batch = micro_batch_size * world_size
        self.epoch = 0
        self.prefetch = prefetch
        self._prefetcher: Prefetcher | None = None
        self._consumed: dict[str, Any] | None = None
        """With a running prefetch thread: the position after the last batch the caller took."""

    def __iter__(self) -> _RankBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if not self.prefetch:
            return self._produce()
        if self._prefetcher is None:
            self._consumed = self._position()
            self._prefetcher = Prefetcher(lambda: (self._produce(), self._position()), self.prefetch)
        try:
            batch, self._consumed = self._prefetcher.get()
        except BaseException:
            self.close()
            raise
        return batch

    def close(self) -> None:
        """Stop the prefetch thread, if any (the position stays that of the batches taken)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __enter__(self) -> _RankBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _produce(self) -> torch.Tensor:
        raise NotImplementedError

    def _position(self) -> dict[str, Any]:
        """The live position (after the last batch produced); a fresh object, safe to hand to another thread."""
        return {"epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle, "streaming": self.streaming}

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch taken by the caller (prefetched batches not counted)."""
        return dict(self._consumed) if self._prefetcher is not None and self._consumed is not None \
            else self._position()

    def _begin_load(self) -> None:
        self.close()
        self._consumed = None

    def _check_state(self, state: dict[str, Any]) -> None:
        """Refuse a state that would not continue this loader's data order."""
        if state.get("streaming") != self.streaming:
            kinds = ("map-style", "streaming")
            raise ValueError(f"batch loader state: the state is from a {kinds[bool(state.get('streaming'))]} "
                             f"loader, this one is {kinds[self.streaming]}; resume with the same data.streaming")
        for name in ("seed", "shuffle"):
            if state[name] != getattr(self, name):
                raise ValueError(f"batch loader state: saved {name}={state[name]!r} differs from this loader's "
                                 f"{getattr(self, name)!r}; the data order would not continue")


class MapLoader(_RankBatches):
    """Infinite training batches ``LongTensor [micro_batch_size, block_size + 1]`` of packed blocks for one rank.

    Each epoch walks a permutation of all blocks (seeded by ``seed`` and the epoch; identity when ``shuffle=False``)
    in global batches; an incomplete last global batch is dropped.
    """

    def __init__(self, blocks: TokenBlocks, micro_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, prefetch: int = 0) -> None:
        super().__init__(micro_batch_size, rank, world_size, seed, shuffle, prefetch)
        self.blocks = blocks
        if len(blocks) < self.global_batch:
            raise SpikeLMError(
                f"the training split has {len(blocks)} blocks, fewer than one global batch of {self.global_batch} "
                f"(micro_batch_size {micro_batch_size} x world_size {world_size}); add data or lower the batch"
            )
        self.offset = 0
        """Blocks of this epoch's permutation already consumed (all ranks together)."""
        self._permutation: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one pass over the blocks."""
        return len(self.blocks) // self.global_batch

    def _produce(self) -> torch.Tensor:
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

    def _position(self) -> dict[str, Any]:
        """The exact position: epoch and global blocks consumed in it."""
        return {**super()._position(), "offset": self.offset, "num_blocks": len(self.blocks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a loader over the same blocks (any world size)."""
        self._begin_load()
        self._check_state(state)
        if state["num_blocks"] != len(self.blocks):
            raise SpikeLMError(f"the checkpoint's data position is for {state['num_blocks']} training blocks, the "
                               f"data now has {len(self.blocks)}: the source, tokenizer or block size changed")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._permutation = None


class StreamLoader(_RankBatches):
    """Infinite training batches ``LongTensor [micro_batch_size, block_size + 1]`` packed on the fly from this rank's
    share of a stream.

    Documents are tokenised (``ENCODE_BATCH`` at a time) into a carry-over buffer until a micro batch of blocks is
    there; at the end of the rank's share the next epoch starts and the carried tokens continue into it.
    """

    streaming = True
    batches_per_epoch = None  # unknown before a pass over the stream

    def __init__(self, blocks: StreamingBlocks, micro_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, prefetch: int = 0) -> None:
        super().__init__(micro_batch_size, rank, world_size, seed, shuffle, prefetch)
        self.blocks = blocks
        self.stream = DocumentStream(blocks.data_cfg, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        self.position: dict[str, Any] | None = None
        """Where this epoch's documents continue (``DocumentStream``'s position after the last one tokenised)."""
        self._carry: list[int] = []
        self._docs: Iterator[tuple[str, dict[str, Any]]] | None = None

    def _produce(self) -> torch.Tensor:
        block_size = self.blocks.block_size
        self._fill(self.micro_batch_size * block_size + 1)
        rows = [self._carry[i * block_size:(i + 1) * block_size + 1] for i in range(self.micro_batch_size)]
        # Blocks overlap by one token: the next batch starts on the last token of this one.
        del self._carry[:self.micro_batch_size * block_size]
        return torch.tensor(rows, dtype=torch.long)

    def _fill(self, needed: int) -> None:
        """Read and tokenise documents into the carry-over buffer until it holds ``needed`` tokens."""
        read_this_pass = False
        while len(self._carry) < needed:
            if self._docs is None:
                self._docs = self.stream.documents(self.epoch, self.position)
            texts, position = [], self.position
            try:
                for text, after in self._docs:
                    texts.append(text)
                    position = after  # the position after the last document taken
                    if len(texts) == ENCODE_BATCH:
                        break
            except BaseException:
                self._docs = None  # a retry reopens the stream at self.position, after the last tokenised document
                raise
            if not texts:  # end of this rank's share: the next epoch starts, the carry-over tokens continue
                if not read_this_pass and self.position is None:
                    raise SpikeLMError(
                        f"streaming data.source {self.blocks.data_cfg.source!r} gives rank {self.rank} of "
                        f"{self.world_size} no training text: it has fewer shards (files, or "
                        "64 MiB pieces of JSON Lines / line files) than ranks, or no training documents")
                self.epoch += 1
                self.position = None
                self._docs = None
                read_this_pass = False
                continue
            for ids in self.blocks.encode_batch(texts):
                self._carry.extend(ids)
            self.position = position
            read_this_pass = True

    def _position(self) -> dict[str, Any]:
        """The exact position: epoch, where this rank's documents continue, the carry-over tokens, and what the
        position is valid for (rank, world size, source, tokenizer)."""
        return {**super()._position(), "position": self.position, "carry": list(self._carry), "rank": self.rank,
                "world_size": self.world_size, "source": self.stream.key, "source_name": self.stream.cfg.source,
                "tokenizer": self.blocks.tokenizer_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of this rank's loader over the same stream, tokenizer and world size."""
        self._begin_load()
        self._check_state(state)
        if "position" not in state:
            raise SpikeLMError("the checkpoint's streaming position is in an older format (documents consumed); "
                               "resume it with the SpikeLM that wrote it, or start afresh with --no-resume")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise SpikeLMError(f"the checkpoint's streaming position is rank {state['rank']} of "
                               f"{state['world_size']}, this process is rank {self.rank} of {self.world_size}: each "
                               f"rank streams its own shards, so resume with {state['world_size']} processes")
        if state["source"] != self.stream.key:
            raise SpikeLMError(f"the checkpoint's streaming position is for data.source {state['source_name']!r} "
                               f"(source key {state['source']}), this run streams {self.stream.cfg.source!r} (key "
                               f"{self.stream.key}): its files, their sizes or the data settings differ; resume with "
                               "the same data, or start afresh with --no-resume")
        if state["tokenizer"] != self.blocks.tokenizer_key:
            raise SpikeLMError(f"the checkpoint's streaming position was tokenised by tokenizer "
                               f"{state['tokenizer']}, this run's tokenizer is {self.blocks.tokenizer_key}: the "
                               "carried-over tokens would not continue; resume with the same tokenizer section, or "
                               "start afresh with --no-resume")
        self.epoch, self.position = int(state["epoch"]), state["position"]
        self._carry = [int(t) for t in state["carry"]]
        self._docs = None


def batch_loader(blocks: TokenBlocks | StreamingBlocks, micro_batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 prefetch: int = 0) -> MapLoader | StreamLoader:
    """The loader of ``build_datasets``'s training split: ``StreamLoader`` for a stream, ``MapLoader`` otherwise;
    ``prefetch`` batches produced ahead in a background thread (0: in the caller's thread)."""
    loader = StreamLoader if isinstance(blocks, StreamingBlocks) else MapLoader
    return loader(blocks, micro_batch_size, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                  prefetch=prefetch)


__all__ = ["MapLoader", "StreamLoader", "batch_loader"]
