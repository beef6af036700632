"""Training batches for one rank: a map-style loader over packed blocks and a streaming loader over a text stream
(docs/design.md, "Data pipeline and caches").

Both walk global batches of ``micro_batch_size * world_size`` blocks; rank ``r`` takes the ``r``-th slice of each, so
the union over ranks of one step is the one-process batch of the same global size, and runs with different world
sizes (same global batch) see the same data. ``state_dict()`` is a position in global blocks, not in this rank's
batches, so a checkpoint resumes exactly, also under another world size with the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from spikelm.errors import SpikeLMError
from spikelm.train.packing import StreamingBlocks, TokenBlocks


class _RankBatches:
    """What both loaders share: arguments, the rank's slice of a global batch, and the state's common keys."""

    streaming = False

    def __init__(self, micro_batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool) -> None:
        for name, value in (("micro_batch_size", micro_batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"batch loader {name}: expected a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"batch loader rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch_size * world_size
        self.epoch = 0

    def __iter__(self) -> _RankBatches:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle, "streaming": self.streaming}

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
                 seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(micro_batch_size, rank, world_size, seed, shuffle)
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

    def __next__(self) -> torch.Tensor:
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

    def state_dict(self) -> dict[str, Any]:
        """The exact position: epoch and global blocks consumed in it."""
        return {**super().state_dict(), "offset": self.offset, "num_blocks": len(self.blocks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a loader over the same blocks (any world size)."""
        self._check_state(state)
        if state["num_blocks"] != len(self.blocks):
            raise SpikeLMError(f"the checkpoint's data position is for {state['num_blocks']} training blocks, the "
                               f"data now has {len(self.blocks)}: the source, tokenizer or block size changed")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._permutation = None


class StreamLoader(_RankBatches):
    """Infinite training batches ``LongTensor [micro_batch_size, block_size + 1]`` packed on the fly from a stream.

    Documents are tokenised into a carry-over buffer until a global batch of blocks is there; at the end of the
    stream the next epoch starts and the carried tokens continue into it.
    """

    streaming = True
    batches_per_epoch = None  # unknown before a pass over the stream

    def __init__(self, blocks: StreamingBlocks, micro_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(micro_batch_size, rank, world_size, seed, shuffle)
        self.blocks = blocks
        self.docs_consumed = 0
        """Raw documents of this epoch read into the carry-over buffer."""
        self._carry: list[int] = []
        self._docs: Iterator[tuple[int, str]] | None = None

    def __next__(self) -> torch.Tensor:
        block_size = self.blocks.block_size
        self._fill(self.global_batch * block_size + 1)
        start = self.rank * self.micro_batch_size * block_size
        rows = [self._carry[start + i * block_size:start + (i + 1) * block_size + 1]
                for i in range(self.micro_batch_size)]
        # Blocks overlap by one token: the next global batch starts on the last token of this one.
        del self._carry[:self.global_batch * block_size]
        return torch.tensor(rows, dtype=torch.long)

    def _fill(self, needed: int) -> None:
        """Read documents into the carry-over buffer until it holds ``needed`` tokens."""
        read_this_epoch = False
        while len(self._carry) < needed:
            if self._docs is None:
                self._docs = self.blocks.documents(epoch=self.epoch, skip=self.docs_consumed, shuffle=self.shuffle,
                                                   seed=self.seed)
            item = next(self._docs, None)
            if item is None:  # end of the stream: the next epoch starts, the carry-over tokens continue
                if not read_this_epoch and self.docs_consumed == 0:
                    raise SpikeLMError(f"streaming data.source {self.blocks.data_cfg.source!r} yields no training "
                                       "text")
                self.epoch += 1
                self.docs_consumed = 0
                self._docs = None
                read_this_epoch = False
                continue
            self.docs_consumed, text = item
            self._carry.extend(self.blocks.encode(text))
            read_this_epoch = True

    def state_dict(self) -> dict[str, Any]:
        """The exact position: epoch, raw documents read in it and the carry-over tokens."""
        return {**super().state_dict(), "docs_consumed": self.docs_consumed, "carry": list(self._carry)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a loader over the same stream (any world size)."""
        self._check_state(state)
        self.epoch, self.docs_consumed = int(state["epoch"]), int(state["docs_consumed"])
        self._carry = [int(t) for t in state["carry"]]
        self._docs = None


def batch_loader(blocks: TokenBlocks | StreamingBlocks, micro_batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True) -> MapLoader | StreamLoader:
    """The loader of ``build_datasets``'s training split: ``StreamLoader`` for a stream, ``MapLoader`` otherwise."""
    loader = StreamLoader if isinstance(blocks, StreamingBlocks) else MapLoader
    return loader(blocks, micro_batch_size, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)


__all__ = ["MapLoader", "StreamLoader", "batch_loader"]
