"""Tokenizer helper: train a sentencepiece BPE model on text and save it as a transformers tokenizer.

The saved directory holds ``tokenizer.model`` (the sentencepiece model) and a ``tokenizer_config.json`` naming
``LlamaTokenizer``, so ``AutoTokenizer.from_pretrained(dir)`` loads it and encodes to exactly sentencepiece's ids.
Special tokens match ``SpikeLMConfig``'s defaults: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3. Byte fallback
means no text is ever unknown.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from spikelm.errors import SpikeLMError

SPECIAL_TOKENS = {"pad": ("<pad>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2), "unk": ("<unk>", 3)}
# 4 specials + 256 byte pieces must fit, plus at least a few merges.
MIN_VOCAB_SIZE = 4 + 256 + 8
# sentencepiece skips longer sentences; text is fed line by line and long lines are cut to this many characters.
MAX_SENTENCE_CHARS = 4000


def _lines(texts: Iterable[str] | Iterable[Path]) -> Iterator[str]:
    for item in texts:
        text = Path(item).read_text(encoding="utf-8") if isinstance(item, Path) else item
        if not isinstance(text, str):
            raise ValueError(f"texts must hold str or pathlib.Path items, got {type(item).__name__}")
        for line in text.splitlines():
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                if line[start:start + MAX_SENTENCE_CHARS].strip():
                    yield line[start:start + MAX_SENTENCE_CHARS]


def train_tokenizer(texts: Iterable[str] | list[Path], vocab_size: int, out_dir: Path, *,
                    model_prefix: str = "tokenizer", byte_fallback: bool = True) -> PreTrainedTokenizerBase:
    """Train a sentencepiece BPE tokenizer on ``texts`` and save it as a transformers tokenizer in ``out_dir``.

    Args:
        texts: strings, or paths of UTF-8 text files.
        vocab_size: pieces in the vocabulary, specials and the 256 byte-fallback pieces included (>= 268). On a
            small text sentencepiece may stop short of it; ``len(tokenizer)`` is the real size.
        out_dir: where ``{model_prefix}.model``, ``tokenizer.model`` and ``tokenizer_config.json`` are written.
        model_prefix: file name stem of the raw sentencepiece model.
        byte_fallback: spell characters outside the vocabulary as UTF-8 byte pieces (never ``<unk>``); this costs
            256 pieces of the vocabulary.

    Training is deterministic (one thread, fixed seed): the same text gives the same tokenizer.
    """
    import sentencepiece as spm

    smallest = MIN_VOCAB_SIZE if byte_fallback else 4 + 8
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= {smallest} "
                         "(4 special tokens + 256 byte-fallback pieces when byte_fallback=True + some merges)")
    lines = list(_lines(texts))
    if not lines:
        raise SpikeLMError("train_tokenizer: the training text is empty; give at least one non-blank line")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=byte_fallback,
        # Rare characters are spelled in bytes (byte fallback) rather than each taking a piece.
        character_coverage=0.9995 if byte_fallback else 1.0,
        # Keep text exactly as written (no NFKC, no whitespace squeezing) so transformers' converted tokenizer and
        # sentencepiece agree on every id, and decode(encode(text)) == text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        hard_vocab_limit=False,
        num_threads=1,
        max_sentence_length=4 * MAX_SENTENCE_CHARS,
        unk_id=SPECIAL_TOKENS["unk"][1], bos_id=SPECIAL_TOKENS["bos"][1], eos_id=SPECIAL_TOKENS["eos"][1],
        pad_id=SPECIAL_TOKENS["pad"][1],
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        minloglevel=2,
    )
    (out_dir / f"{model_prefix}.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        # Ids equal sentencepiece's: no BOS/EOS added implicitly (callers add them where they want them).
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        **{f"{role}_token": piece for role, (piece, _) in SPECIAL_TOKENS.items()},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_tokenizer(out_dir)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in ``directory`` (by ``train_tokenizer`` or any transformers tokenizer).

    Raises ``SpikeLMError`` when the directory or its tokenizer files are missing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SpikeLMError(f"tokenizer directory {directory} does not exist; train one with "
                           "spikelm.train.tokenizer.train_tokenizer or point at a saved model directory")
    known = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((directory / name).exists() for name in known):
        raise SpikeLMError(f"no tokenizer in {directory} (looked for {', '.join(known)}); save the tokenizer there "
                           "with tokenizer.save_pretrained(dir) or train one with "
                           "spikelm.train.tokenizer.train_tokenizer")
    return AutoTokenizer.from_pretrained(str(directory))


__all__ = ["train_tokenizer", "load_tokenizer", "SPECIAL_TOKENS"]
