"""Tokenizers for recipes: trained from the recipe's data and cached by content, or loaded from a directory.

The cache key is a hash of the exact training text and the training settings, so a second run with the same data
reuses ``cache_dir/tokenizers/<hash>/`` and a change of text, vocabulary size or byte fallback trains a new one.
Reading the sample to hash it costs minutes at scale (``sample_chars`` of 500M), on every start and every rank, so a
pointer file ``cache_dir/tokenizers/source-<key>.json`` maps the *source* (files' paths, sizes and mtimes or the hub
name, the split settings and the tokenizer settings: what the data cache keys on too) to the content hash; while it
holds, a start reads no text at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spikelm.errors import SpikeLMError
from spikelm.train.checkpoint import atomic_write_text
from spikelm.train.data_sources import (
    DataConfig,
    TokenizerConfig,
    resolve_source,
    selection_fingerprint,
    source_fingerprint,
    take_chars,
)
from spikelm.train.dist import build_once, rank_zero_first
from spikelm.train.stream import split_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Bump when the way a tokenizer is trained changes, so old cache entries are not reused.
TOKENIZER_CACHE_VERSION = 1
CACHE_META = "spikelm_tokenizer_cache.json"  # written last into an entry: a directory without it is not finished


def training_sample(data_cfg: DataConfig, max_chars: int, cache_dir: Path) -> list[str]:
    """The first ``max_chars`` characters of training-split documents, in source order (held-out text excluded).

    Returned as documents; the last one is cut so that the total is at most ``max_chars``.
    """
    sample = take_chars(split_texts(data_cfg, "train", cache_dir / "hf_datasets"), max_chars)
    if not any(t.strip() for t in sample):
        raise SpikeLMError(f"data.source {data_cfg.source!r} holds no text to train a tokenizer on; check the files")
    return sample


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides a tokenizer's ids: the full serialised fast tokenizer, else its model file."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = json.loads(backend.to_str())
        # Truncation / padding are call-time state that transformers leaves set after a call; they do not change ids.
        serialised.pop("truncation", None)
        serialised.pop("padding", None)
        payload = json.dumps(serialised, sort_keys=True).encode("utf-8")
    else:
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if vocab_file and os.path.isfile(vocab_file):
            payload = Path(vocab_file).read_bytes()
        else:
            payload = json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8")
    extra = json.dumps([type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id]).encode("utf-8")
    return hashlib.sha256(payload + extra).hexdigest()


def _settings(tok_cfg: TokenizerConfig) -> dict[str, Any]:
    return {"version": TOKENIZER_CACHE_VERSION, "vocab_size": tok_cfg.vocab_size,
            "byte_fallback": tok_cfg.byte_fallback, "sample_chars": tok_cfg.sample_chars}


def _source_key(tok_cfg: TokenizerConfig, data_cfg: DataConfig) -> str:
    """A hash of what decides the training sample without reading it: the source, the split and the settings."""
    source = {"source": source_fingerprint(data_cfg, resolve_source(data_cfg)),
              "selection": selection_fingerprint(data_cfg), "streaming": data_cfg.streaming,
              "settings": _settings(tok_cfg)}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def _training_key(tok_cfg: TokenizerConfig, sample: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(_settings(tok_cfg), sort_keys=True).encode("utf-8"))
    for text in sample:
        # Length-prefixed so that moving a boundary between documents changes the hash.
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:20]


def _train_into(tok_cfg: TokenizerConfig, sample: list[str], out_dir: Path) -> None:
    from spikelm.train.tokenizer import train_tokenizer

    try:
        train_tokenizer(sample, tok_cfg.vocab_size, out_dir, byte_fallback=tok_cfg.byte_fallback)
    except RuntimeError as err:  # sentencepiece's own checks (vocabulary too small for the characters, ...)
        chars = sum(len(text) for text in sample)
        raise SpikeLMError(
            f"tokenizer: training a {tok_cfg.vocab_size}-token BPE on {chars} characters failed: {err}. Change "
            "tokenizer.vocab_size as sentencepiece says, or train on more text (tokenizer.sample_chars)"
        ) from err


def _load(path: Path) -> PreTrainedTokenizerBase:
    from spikelm.train.tokenizer import load_tokenizer

    return load_tokenizer(path)


def prepare_tokenizer(tok_cfg: TokenizerConfig, data_cfg: DataConfig, cache_dir: Path) -> PreTrainedTokenizerBase:
    """Load ``tok_cfg.path``, or train a sentencepiece BPE on the data, cached in ``cache_dir/tokenizers/<hash>/``.

    The hash covers the exact training text (``tok_cfg.sample_chars`` characters of training-split documents) and
    the settings. Training writes into a temporary directory renamed into place when complete, so an interrupted
    run never leaves a directory that looks like a finished tokenizer. With ``torch.distributed`` initialised, rank
    0 trains first and the other ranks then find it in the cache (or train their own on a node-local cache).
    """
    if tok_cfg.path is not None:
        path = Path(tok_cfg.path).expanduser()
        if not path.is_dir():
            raise SpikeLMError(f"tokenizer.path: {str(path)!r} is not a directory; train one by removing "
                               "tokenizer.path, or point it at a saved tokenizer")
        return _load(path)

    return rank_zero_first(lambda: _prepare_cached(tok_cfg, data_cfg, Path(cache_dir)))


def _cached_for_source(root: Path, pointer: Path) -> Path | None:
    """The tokenizer directory ``pointer`` names, if the pointer is readable and the directory is complete."""
    try:
        key = json.loads(pointer.read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, or left half-written by a crash: read the sample instead
    final = root / str(key)
    return final if (final / CACHE_META).is_file() else None


def _prepare_cached(tok_cfg: TokenizerConfig, data_cfg: DataConfig, cache_dir: Path) -> PreTrainedTokenizerBase:
    root = cache_dir / "tokenizers"
    pointer = root / f"source-{_source_key(tok_cfg, data_cfg)}.json"
    found = _cached_for_source(root, pointer)
    if found is not None:
        return _load(found)
    sample = training_sample(data_cfg, tok_cfg.sample_chars, cache_dir)
    key = _training_key(tok_cfg, sample)

    def build(tmp: Path) -> None:
        _train_into(tok_cfg, sample, tmp)
        meta: dict[str, Any] = {"key": key, "vocab_size": tok_cfg.vocab_size, "byte_fallback": tok_cfg.byte_fallback,
                                "sample_chars": tok_cfg.sample_chars, "sample_docs": len(sample),
                                "source": data_cfg.source}
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2))

    final = build_once(root, key, build, ready=lambda path: (path / CACHE_META).is_file())
    # The pointer is replaced atomically, so a reader sees the old one, the new one or none (then reads the sample).
    atomic_write_text(pointer, json.dumps({"key": key, "source": data_cfg.source}))
    return _load(final)


def check_vocab(tokenizer: PreTrainedTokenizerBase, model_config: Any) -> None:
    """Raise ``SpikeLMError`` unless the tokenizer fits the model: same vocabulary size and special ids.

    ``model_config`` is a ``SpikeLMConfig`` (anything with ``vocab_size`` and optional ``*_token_id`` fields).
    """
    tokens = len(tokenizer)
    if tokens != model_config.vocab_size:
        raise SpikeLMError(
            f"the tokenizer has {tokens} tokens but the model's vocab_size is {model_config.vocab_size}; set "
            f"model.vocab_size: {tokens} in the recipe (or tokenizer.vocab_size: {model_config.vocab_size} to "
            "train a matching tokenizer)"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        model_id = getattr(model_config, name, None)
        tok_id = getattr(tokenizer, name, None)
        if model_id is not None and tok_id is not None and model_id != tok_id:
            raise SpikeLMError(
                f"the tokenizer's {name} is {tok_id} but the model's is {model_id}; set model.{name}: {tok_id}"
            )
