"""Held-out loss, perplexity and bits per byte: exact values on models with known outputs, and ``spikelm eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import write_corpus, write_tiny_recipe

from spikelm.errors import SpikeLMError
from spikelm.measure.evaluation import blocks_from_text, evaluate_lm, heldout_batches


class UniformLM(torch.nn.Module):
    """Logits that are all equal: every token has probability 1/V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class OracleLM(UniformLM):
    """Knows the next token of the batch it is built for (the target gets a huge logit)."""

    def __init__(self, vocab: int, batch: torch.Tensor) -> None:
        super().__init__(vocab)
        self.targets = batch[:, 1:]

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.full((*input_ids.shape, self.vocab), -1e4)
        logits.scatter_(-1, self.targets[..., None], 0.0)
        return SimpleNamespace(logits=logits)


class ByteTokenizer:
    """A 50-token vocabulary whose token i decodes to i % 3 + 1 bytes ('a', 'ab', 'abc'); no special tokens."""

    all_special_ids: list[int] = []

    def __len__(self) -> int:
        return 50

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"tok{i}" for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("abc"[: i % 3 + 1] for i in ids)


def test_uniform_model_gives_log_vocab_and_exact_bits_per_byte():
    vocab = 50
    batches = [torch.randint(0, vocab, (3, 9)), torch.randint(0, vocab, (2, 9))]
    result = evaluate_lm(UniformLM(vocab), batches, ByteTokenizer())
    targets = torch.cat([b[:, 1:].reshape(-1) for b in batches])
    assert result.tokens == targets.numel() == 40
    assert result.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)
    n_bytes = int((targets % 3 + 1).sum())
    assert result.bytes == n_bytes
    assert result.bits_per_byte == pytest.approx(40 * math.log2(vocab) / n_bytes, rel=1e-6)
    assert evaluate_lm(UniformLM(vocab), batches).bits_per_byte is None


def test_a_model_that_knows_the_answer_has_zero_loss():
    batch = torch.randint(0, 20, (2, 7))
    result = evaluate_lm(OracleLM(20, batch), [batch], ByteTokenizer())
    assert result.loss == pytest.approx(0.0, abs=1e-6) and result.perplexity == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[B, T \+ 1\]"):
        evaluate_lm(OracleLM(20, batch), [batch[0]])


def test_heldout_batches_are_deterministic_equal_per_rank_and_disjoint():
    blocks = [torch.full((5,), i) for i in range(10)]
    one = heldout_batches(blocks, 2, 3)
    assert [b[:, 0].tolist() for b in one] == [[0, 1], [2, 3], [4, 5]]
    ranks = [heldout_batches(blocks, 2, 2, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    seen = [i for r in ranks for b in r for i in b[:, 0].tolist()]
    assert sorted(seen) == [0, 1, 2, 3, 4, 5, 6, 7]
    # Fewer blocks than a batch: a smaller batch rather than nothing.
    assert heldout_batches(blocks[:3], 8, 1)[0].shape == (3, 5)
    with pytest.raises(SpikeLMError, match="held-out split is empty"):
        heldout_batches([], 2, 1)


def test_heldout_batches_score_each_block_at_most_once():
    # 10 blocks, micro batch 1, 8 batches asked on 2 ranks: only 5 per rank exist; none may come twice.
    blocks = [torch.full((5,), i) for i in range(10)]
    ranks = [heldout_batches(blocks, 1, 8, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [5, 5]
    seen = [i for r in ranks for b in r for i in b[:, 0].tolist()]
    assert sorted(seen) == list(range(10))
    # One rank, 4 blocks per batch: two batches (blocks 0-7); the last two blocks do not fill a batch.
    one = heldout_batches(blocks, 4, 8)
    assert [b[:, 0].tolist() for b in one] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(SpikeLMError, match="fewer than the 4 ranks"):
        heldout_batches(blocks[:3], 1, 1, world_size=4)


def test_blocks_from_text_overlap_by_one_token():
    tokenizer = lambda text, add_special_tokens=False: {"input_ids": list(range(len(text)))}  # noqa: E731
    blocks = blocks_from_text("x" * 10, tokenizer, block_size=4)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert sum(b.numel() - 1 for b in blocks) == 9  # every token after the first is a target exactly once
    assert [b.tolist() for b in blocks_from_text("x" * 10, tokenizer, 4, max_tokens=5)] == [[0, 1, 2, 3, 4], [4, 5]]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny (untrained) SpikeLM with a real sentencepiece tokenizer, saved like a training export."""
    from spikelm.model.config import SpikeLMConfig
    from spikelm.model.modeling import SpikeLMForCausalLM
    from spikelm.train.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("eval")
    corpus = write_corpus(root / "corpus", chars=20_000)
    tokenizer = train_tokenizer([corpus.read_text()], 320, root / "model")
    torch.manual_seed(0)
    config = SpikeLMConfig.from_preset("tiny", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                       head_size=16, decay_lora_rank=8, tie_word_embeddings=True)
    SpikeLMForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model", corpus


def test_spikelm_eval_on_a_text_file_matches_evaluate_lm(saved_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spikelm.commands.main import main

    model_dir, corpus = saved_model
    text = tmp_path / "heldout.txt"
    text.write_text(corpus.read_text()[-3000:])
    out = tmp_path / "eval.json"
    assert main(["eval", str(model_dir), "--text", str(text), "--tokens", "300", "--block-size", "64",
                 "--json", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["tokens"] == 300

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = blocks_from_text(text.read_text(), tokenizer, 64, 300)
    direct = evaluate_lm(model, [b[None] for b in blocks], tokenizer)
    assert result["loss"] == pytest.approx(direct.loss, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-5)
    # An untrained model is near uniform over its vocabulary.
    assert abs(result["loss"] - math.log(len(tokenizer))) < 1.0


def test_spikelm_eval_and_generate_in_bf16(saved_model, tmp_path, monkeypatch):
    """``--dtype bf16``: the weights load in bf16 (the recurrence parameters stay fp32) and score within float noise
    of fp32."""
    from transformers import AutoModelForCausalLM

    from spikelm.commands.main import main

    model_dir, corpus = saved_model
    text = tmp_path / "heldout.txt"
    text.write_text(corpus.read_text()[-3000:])
    loaded = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    results = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", str(model_dir), "--text", str(text), "--tokens", "300", "--block-size", "64",
                     "--json", str(out), "--dtype", dtype]) == 0
        results[dtype] = json.loads(out.read_text())
    dtypes = {p.dtype for name, p in loaded[-1].named_parameters() if "bonus" not in name and "decay" not in name}
    assert loaded[0].dtype == torch.float32 and torch.bfloat16 in dtypes
    assert results["bf16"]["loss"] == pytest.approx(results["fp32"]["loss"], rel=0.02)
    assert main(["generate", str(model_dir), "To be", "--max-new-tokens", "4", "--greedy", "--dtype", "bf16"]) == 0
    with pytest.raises(SystemExit):
        main(["eval", str(model_dir), "--text", str(text), "--dtype", "int3"])


def test_spikelm_eval_on_a_recipes_heldout_split(saved_model, tmp_path, capsys):
    from spikelm.commands.main import main

    model_dir, corpus = saved_model
    recipe = write_tiny_recipe(tmp_path, corpus)
    assert main(["eval", str(model_dir), "--recipe", str(recipe), "--tokens", "200"]) == 0
    assert "tokens 200" in capsys.readouterr().out


def test_spikelm_eval_errors(saved_model, tmp_path, capsys):
    from spikelm.commands.main import main

    model_dir, _ = saved_model
    assert main(["eval", str(tmp_path / "nope"), "--text", str(tmp_path / "t.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", str(model_dir), "--text", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(model_dir)])  # neither --text nor --recipe
