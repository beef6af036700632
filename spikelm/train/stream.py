"""One rank's documents of a streamed source, resumable from a position without re-reading what was consumed
(docs/design.md, "Streaming").

Local text and JSON Lines files are read by our own reader in *shards*: byte ranges of the files (``SHARD_BYTES``
for line-delimited files, whole files for ``sample_by: paragraph`` / ``document``). The shard list goes through
``datasets.IterableDataset.from_generator`` and ``datasets.distributed.split_dataset_by_node``, so rank ``r`` of
``W`` reads shards ``r, r + W, ...`` (the list is padded with empty shards to a multiple of ``W``). Every document
comes with the byte offset just after it, so a position is ``(shard, offset)``: resuming rebuilds the shard list
with the finished shards emptied and the current one starting at the offset, and nothing before it is opened.

Other sources (parquet, JSON arrays, hub datasets, any ``data.max_docs``) are read by ``datasets`` itself
(``load_documents(streaming=True)``), split by ``split_dataset_by_node``, and their position is
``IterableDataset.state_dict()``; ``load_state_dict`` skips finished ``datasets`` shards without reading them but
scans the current one from its start.

Shuffling (``shuffle=True``) is ours, not ``IterableDataset.shuffle`` (whose buffer is not restored on resume): the
shard order is permuted per epoch by ``(seed, epoch)``, and documents are permuted inside consecutive windows of
``data.shuffle_buffer`` training documents by ``(seed, epoch, window)``. A position is then the window's start and
the documents of it already taken, so a resume re-reads at most the current window, never anything before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spikelm.errors import SpikeLMError
from spikelm.train.data_sources import (
    DataConfig,
    load_documents,
    resolve_source,
    selection_fingerprint,
    split_documents,
    streamed_heldout,
    take_chars,
)

SHARD_BYTES = 64 << 20
"""Size of the byte ranges a line-delimited file (JSON Lines, ``sample_by: line``) is cut into."""


def reader_kind(cfg: DataConfig) -> str | None:
    """How our own reader cuts ``cfg``'s local files into documents (``"jsonl"``, ``"line"``, ``"paragraph"``,
    ``"document"``), or ``None`` when ``datasets`` reads the source (parquet, JSON arrays, the hub, ``max_docs``)."""
    if cfg.max_docs is not None:
        return None
    resolved = resolve_source(cfg)
    if resolved.builder == "text":
        return cfg.sample_by
    if resolved.builder == "json":
        for path in resolved.files:
            with open(path, "rb") as handle:
                head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            if head.startswith(b"["):
                return None  # a JSON array: datasets reads the whole file
        return "jsonl"
    return None


def stream_identity(cfg: DataConfig) -> dict[str, Any]:
    """What a streaming position is valid for: the source (files' paths and sizes, or the hub name) and the settings
    that decide which documents the stream holds. Sizes, not mtimes: a byte offset stays valid across a ``touch``."""
    resolved = resolve_source(cfg)
    if resolved.builder == "hub":
        files: Any = {"hub": resolved.hub_name, "config": cfg.hf_config, "split": cfg.hf_split}
    else:
        files = [[str(p), p.stat().st_size] for p in resolved.files]
    return {"source": cfg.source, "files": files, "selection": selection_fingerprint(cfg)}


def identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------------
# Our reader: documents of a byte range, each with the offset after it


def _unreadable(path: str, err: OSError) -> SpikeLMError:
    return SpikeLMError(f"streaming data file {path!r} cannot be read ({err.strerror or err}); it was there when the "
                        "run started: restore it (the last checkpoint is intact) or point data.source elsewhere and "
                        "start afresh with --no-resume")


def _decode(raw: bytes, path: str, offset: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpikeLMError(f"data file {path!r} is not UTF-8 text: invalid byte at offset {offset + err.start}; "
                           "convert it (e.g. iconv -f latin1 -t utf-8) or remove it from data.source") from None
    # Universal newlines, as the datasets "text" builder reads files in text mode.
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def read_range(path: str, start: int, end: int, size: int, kind: str, text_field: str) -> Iterator[tuple[str, int]]:
    """(text, byte offset just after it) of every document whose first byte lies in ``[start, end)`` of ``path``.

    ``size`` is the file's size when the run started: a file that is gone or changed size raises ``SpikeLMError``
    naming it. A line-delimited range starting inside a line begins at the next line; an offset this function
    returned always starts a document, so ``read_range(path, offset, ...)`` continues exactly after it.
    """
    if start >= end:
        return
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; the open itself is what may fail)
    except OSError as err:
        raise _unreadable(path, err) from None
    with handle:
        now = os.fstat(handle.fileno()).st_size
        if now != size:
            raise SpikeLMError(f"streaming data file {path!r} changed size since the run started ({size} -> {now} "
                               "bytes); the saved positions no longer apply: restore it or start afresh with "
                               "--no-resume")
        try:
            if kind == "document":
                yield _decode(handle.read(), path, 0), size
                return
            if start > 0:
                handle.seek(start - 1)
                handle.readline()  # lands on ``start`` itself when byte start - 1 ends a line
            position = handle.tell()
            if kind == "paragraph":
                yield from _paragraphs(handle, position, path)
                return
            while position < end:
                line = handle.readline()
                if not line:
                    break
                offset, position = position, position + len(line)
                if kind == "line":
                    yield _decode(line, path, offset).rstrip("\n"), position
                elif line.strip():
                    yield _json_text(line, path, offset, text_field), position
        except OSError as err:
            raise _unreadable(path, err) from None


def _paragraphs(handle: Any, position: int, path: str) -> Iterator[tuple[str, int]]:
    """Documents separated by ``"\\n\\n"`` exactly as ``text.split("\\n\\n")`` (the datasets "text" builder's
    ``sample_by: paragraph``), read line by line so that every boundary has a byte offset."""
    buffer = ""
    for line in iter(handle.readline, b""):
        text = _decode(line, path, position)
        position += len(line)
        if text == "\n" and buffer.endswith("\n"):
            yield buffer[:-1], position  # may be "" (a run of blank lines); the caller drops empty documents
            buffer = ""
        else:
            buffer += text
    if buffer:
        yield buffer, position


def _json_text(line: bytes, path: str, offset: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise SpikeLMError(f"data file {path!r}: the line at byte {offset} is not JSON ({err})") from None
    if not isinstance(record, dict):
        raise SpikeLMError(f"data file {path!r}: the line at byte {offset} is not a JSON object")
    text = record.get(text_field)
    if text is not None and not isinstance(text, str):
        raise SpikeLMError(f"data file {path!r}: the line at byte {offset} has a {type(text).__name__} in "
                           f"data.text_field {text_field!r}, not text")
    return text or ""


def _shard_rows(shards: list[list[Any]], text_field: str) -> Iterator[dict[str, Any]]:
    """``datasets`` generator: the documents of ``shards`` (``[index, path, start, end, size, kind]`` each)."""
    for index, path, start, end, size, kind in shards:
        for text, after in read_range(path, start, end, size, kind, text_field):
            yield {"text": text, "shard": index, "after": after}


def local_shards(cfg: DataConfig, kind: str, world_size: int) -> list[list[Any]]:
    """The source cut into shards ``[index, path, start, end, size, kind]``, padded with empty shards to a multiple
    of ``world_size`` so that ``split_dataset_by_node`` hands every rank whole shards."""
    shards: list[list[Any]] = []
    splittable = kind in ("jsonl", "line")
    for path in resolve_source(cfg).files:
        size = path.stat().st_size
        step = SHARD_BYTES if splittable else max(size, 1)
        for start in range(0, max(size, 1), step):
            shards.append([len(shards), str(path), start, min(start + step, size), size, kind])
    while len(shards) % world_size:
        shards.append([len(shards), "", 0, 0, 0, kind])
    return shards


# ----------------------------------------------------------------------------------------------------------------
# One rank's documents, with positions


class DocumentStream:
    """The training documents of one rank of ``world_size``, epoch by epoch, each paired with the position after it.

    ``documents(epoch, position)`` yields ``(text, position)`` from ``position`` (``None``: the epoch's start); a
    position is a small JSON-able dict, the loader's checkpoint entry. Held-out documents are dropped here.
    """

    def __init__(self, cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.cfg, self.rank, self.world_size, self.seed, self.shuffle = cfg, rank, world_size, seed, shuffle
        self.kind = reader_kind(cfg)
        self.identity = stream_identity(cfg)
        self.key = identity_key(self.identity)
        # The files as they are now: one that vanishes later is an error naming it, not a silently smaller stream.
        self.shards = local_shards(cfg, self.kind, world_size) if self.kind is not None else []

    # -- the ordered stream of this rank: (text, cursor after it)

    def _ordered(self, epoch: int, cursor: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
        from datasets.distributed import split_dataset_by_node

        if self.kind is None:
            ds = load_documents(self.cfg, streaming=True)
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
            if cursor is not None:
                ds.load_state_dict(cursor["datasets"])
            for row in ds:
                yield row["text"] or "", {"datasets": ds.state_dict()}
            return
        import datasets

        shards = [list(shard) for shard in self.shards]
        if self.shuffle:  # the shard order of this epoch; documents are shuffled in windows on top
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(shards)
        if cursor is not None:  # finished shards emptied (never opened), the current one from its offset
            done = True
            for shard in shards[self.rank::self.world_size]:
                if shard[0] == cursor["shard"]:
                    shard[2], done = cursor["after"], False
                elif done:
                    shard[3] = shard[2]
        ds = datasets.IterableDataset.from_generator(
            _shard_rows, gen_kwargs={"shards": shards, "text_field": self.cfg.text_field})
        for row in split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size):
            yield row["text"], {"shard": row["shard"], "after": row["after"]}

    def _training(self, epoch: int, cursor: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
        for text, after in self._ordered(epoch, cursor):
            if text and not streamed_heldout(text, self.cfg):
                yield text, after

    # -- with the window shuffle

    def documents(self, epoch: int, position: dict[str, Any] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(text, position after it) of this rank's training documents in epoch ``epoch`` from ``position``."""
        position = position or {"cursor": None, "window": 0, "taken": 0}
        if not self.shuffle:
            for text, cursor in self._training(epoch, position["cursor"]):
                yield text, {"cursor": cursor, "window": 0, "taken": 0}
            return
        cursor, window, taken = position["cursor"], position["window"], position["taken"]
        documents = self._training(epoch, cursor)
        size = self.cfg.shuffle_buffer
        while True:
            texts, end = [], cursor
            for text, after in documents:
                texts.append(text)
                end = after  # the cursor after the window's last document
                if len(texts) == size:
                    break
            if not texts:
                return
            order = list(range(len(texts)))
            random.Random(f"window-{self.seed}-{epoch}-{window}").shuffle(order)
            for i in range(taken, len(order)):
                last = i + 1 == len(order)
                yield texts[order[i]], ({"cursor": end, "window": window + 1, "taken": 0} if last else
                                        {"cursor": cursor, "window": window, "taken": i + 1})
            cursor, window, taken = end, window + 1, 0


def stream_texts(cfg: DataConfig) -> Iterator[str]:
    """Every non-empty document text of a streamed source in source order (both splits), read as the training
    stream reads it, so the held-out build and the tokenizer sample see the same documents."""
    kind = reader_kind(cfg)
    if kind is None:
        yield from (row["text"] for row in load_documents(cfg, streaming=True) if row["text"])
        return
    for _, path, start, end, size, shard_kind in local_shards(cfg, kind, 1):
        yield from (text for text, _ in read_range(path, start, end, size, shard_kind, cfg.text_field) if text)


def split_texts(cfg: DataConfig, split: str, cache_dir: Path) -> Iterator[str]:
    """The non-empty texts of ``split`` (``"train"`` or ``"heldout"``) in source order: by ``streamed_heldout`` when
    ``data.streaming`` (documents as ``stream_texts`` reads them), else by ``split_documents`` (the Arrow copy of
    local files goes to ``cache_dir``)."""
    heldout = split == "heldout"
    if cfg.streaming:
        yield from (text for text in stream_texts(cfg) if streamed_heldout(text, cfg) == heldout)
        return
    ds = load_documents(cfg, streaming=False, cache_dir=cache_dir)
    train_idx, heldout_idx = split_documents(ds, cfg)
    yield from (row["text"] for row in ds.select(heldout_idx if heldout else train_idx) if row["text"])


def heldout_text(cfg: DataConfig, max_chars: int) -> str:
    """Up to ``max_chars`` characters of raw held-out text: the held-out documents in source order, blank-line joined.

    The same split as the packed data (``split_texts``), for ``spikelm eval`` / ``spikelm sparsity --recipe``.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"max_chars: expected a positive integer, got {max_chars!r}")
    # Map-style choice needs every document's hash; the Arrow copy goes to a temporary cache (no run dir here).
    with tempfile.TemporaryDirectory(prefix="spikelm-heldout-") as tmp:
        result = "\n\n".join(take_chars(split_texts(cfg, "heldout", Path(tmp)), max_chars))[:max_chars]
    if not result.strip():
        raise SpikeLMError(f"data.source {cfg.source!r} has no held-out text; raise data.heldout_fraction")
    return result


__all__ = ["DocumentStream", "SHARD_BYTES", "heldout_text", "identity_key", "local_shards", "read_range",
           "reader_kind", "split_texts", "stream_identity", "stream_texts"]
