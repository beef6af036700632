"""Evaluation figures equal a hand computation on a tiny model and text.

Hand computation: every target token's negative log-likelihood from the model's logits with an explicit
log-sum-exp in float64, loss = mean NLL, perplexity = exp(loss), bits per byte = total NLL / ln 2 / bytes, where
bytes are counted piece by piece from the sentencepiece model (a ``▁`` is one space, a byte-fallback piece one
byte), independently of ``tokenizer.decode``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import spikelm  # noqa: F401  (registers the model with the Auto classes)
from spikelm.measure.evaluation import blocks_from_text, evaluate_lm
from spikelm.model.config import SpikeLMConfig
from spikelm.model.modeling import SpikeLMForCausalLM

TEXT = (
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n"
    "Now are our brows bound with victorious wreaths;\nOur bruised arms hung up for monuments;\n"
    "Our stern alarums changed to merry meetings,\nOur dreadful marches to delightful measures.\n"
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a tiny random model and a sentencepiece tokenizer trained on ``TEXT``, as an export."""
    from spikelm.train.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("export")
    tokenizer = train_tokenizer([TEXT * 4], 300, directory)
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, head_size=16,
                           decay_lora_rank=8, intermediate_size=64, context_length=64, tie_word_embeddings=True)
    model = SpikeLMForCausalLM(config).eval()
    with torch.no_grad():  # spread the logits so the loss is far from log(vocab) and a wrong target would show
        model.lm_head.weight.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return directory


def _load(directory: Path) -> tuple[torch.nn.Module, object, object]:
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer, spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def _piece_bytes(sp: object, token_id: int) -> int:
    if sp.is_byte(token_id):
        return 1
    if sp.is_control(token_id) or sp.is_unknown(token_id):
        return 0
    return len(sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8"))


@torch.no_grad()
def _hand_nll(model: torch.nn.Module, block: list[int]) -> list[float]:
    """NLL in nats of each of ``block[1:]`` given the tokens before it, the block run alone from a fresh state."""
    logits = model(input_ids=torch.tensor([block[:-1]]), use_cache=False).logits[0].double()  # [T, V]
    nll = []
    for position, target in enumerate(block[1:]):
        row = logits[position]
        peak = float(row.max())
        log_sum_exp = peak + math.log(sum(math.exp(float(v) - peak) for v in row))
        nll.append(log_sum_exp - float(row[target]))
    return nll


def test_evaluate_lm_equals_hand_computation(saved):
    model, tokenizer, sp = _load(saved)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == sp.encode(TEXT)
    assert sum(_piece_bytes(sp, t) for t in ids) == len(TEXT.encode("utf-8"))  # the byte count is exact
    blocks = [ids[i : i + 13] for i in range(0, 4 * 12, 12)]  # four blocks of 12 targets, overlapping by one
    batches = [torch.tensor(blocks[:3]), torch.tensor(blocks[3:])]  # batches of 3 and 1 blocks

    result = evaluate_lm(model, batches, tokenizer)

    nll = [value for block in blocks for value in _hand_nll(model, block)]
    n_bytes = sum(_piece_bytes(sp, t) for block in blocks for t in block[1:])
    assert result.tokens == len(nll) == 48
    assert result.bytes == n_bytes
    assert result.loss == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(sum(nll) / math.log(2) / n_bytes, rel=1e-6)
    # the loss is informative (not the uniform log V of an untrained head), so a wrong target would show
    assert abs(result.loss - math.log(model.config.vocab_size)) > 0.1


def test_spikelm_eval_cli_equals_hand_computation(saved, tmp_path):
    """``spikelm eval DIR --text FILE``: consecutive blocks over the whole text, batched, the last one shorter."""
    from spikelm.commands.main import main

    model, tokenizer, sp = _load(saved)
    text_file = tmp_path / "heldout.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "eval.json"
    block_size, budget = 16, 70
    code = main(["eval", str(saved), "--text", str(text_file), "--tokens", str(budget), "--block-size",
                 str(block_size), "--batch-size", "3", "--json", str(out)])
    assert code == 0
    figures = json.loads(out.read_text())

    ids = sp.encode(TEXT)[: budget + 1]  # --tokens predicted tokens need one more token of context
    blocks = [ids[i : i + block_size + 1] for i in range(0, len(ids) - 1, block_size)]
    assert [len(b) - 1 for b in blocks] == [16, 16, 16, 16, 6]
    nll = [value for block in blocks for value in _hand_nll(model, block)]
    n_bytes = sum(_piece_bytes(sp, t) for t in ids[1:])
    assert figures["tokens"] == budget
    assert figures["bytes"] == n_bytes
    assert figures["loss"] == pytest.approx(sum(nll) / budget, rel=1e-6)
    assert figures["perplexity"] == pytest.approx(math.exp(sum(nll) / budget), rel=1e-6)
    assert figures["bits_per_byte"] == pytest.approx(sum(nll) / math.log(2) / n_bytes, rel=1e-6)
    assert blocks_from_text(TEXT, tokenizer, block_size, budget)[-1].tolist() == blocks[-1]


def test_without_a_tokenizer_there_is_no_bits_per_byte(saved):
    model, _, sp = _load(saved)
    block = sp.encode(TEXT)[:9]
    result = evaluate_lm(model, [torch.tensor([block])])
    nll = _hand_nll(model, block)
    assert result.bits_per_byte is None and result.bytes == 0
    assert result.loss == pytest.approx(sum(nll) / 8, rel=1e-6)


def test_bad_batches_raise_value_errors(saved):
    model, tokenizer, _ = _load(saved)
    with pytest.raises(ValueError, match=r"\[B, T \+ 1\]"):
        evaluate_lm(model, [torch.tensor([5])], tokenizer)  # 1-D
    with pytest.raises(ValueError, match=r"\[B, T \+ 1\]"):
        evaluate_lm(model, [torch.tensor([[5]])], tokenizer)  # no target
    with pytest.raises(ValueError, match="no tokens"):
        evaluate_lm(model, [], tokenizer)


def test_bytes_of_a_character_split_across_rows(saved):
    model, tokenizer, sp = _load(saved)
    ids = sp.encode("ab \u00e9 cd")  # é is not in the tiny vocabulary: two byte-fallback pieces 0xC3 0xA9
    first = next(i for i, t in enumerate(ids) if sp.is_byte(t))
    assert first >= 2 and sp.is_byte(ids[first + 1]) and first + 3 <= len(ids)
    rows = [ids[first - 2 : first + 1], ids[first : first + 3]]  # the é's two bytes are targets of two rows
    result = evaluate_lm(model, [torch.tensor(rows)], tokenizer)
    assert result.bytes == sum(_piece_bytes(sp, t) for row in rows for t in row[1:])
