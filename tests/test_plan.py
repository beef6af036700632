"""``spikelm plan``: the figures a user reads before renting GPUs, checked against what the model really does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spikelm.commands.main import main
from spikelm.model.config import SpikeLMConfig
from spikelm.model.modeling import SpikeLMForCausalLM
from spikelm.train.plan import (
    activation_bytes,
    count_parameters,
    linear_flops_per_token,
    meta_model,
    model_states_bytes,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("time_mix", ["rwkv6", "rwkv4"])
def test_matmul_flops_equal_what_torch_counts(time_mix):
    # The naive scan does its state update elementwise, so every aten.mm FlopCounterMode sees is a Linear.
    config = SpikeLMConfig.from_preset("tiny", vocab_size=320, time_mix=time_mix, kernel_backend="naive",
                                       tie_word_embeddings=True)
    model = SpikeLMForCausalLM(config).train()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 320, (2, 16)), use_cache=False)
    counted = counter.get_flop_counts()["Global"][torch.ops.aten.mm] / (2 * 16)
    assert linear_flops_per_token(meta_model(config)) == counted


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meta_activation_bytes_match_a_real_forward(checkpointing):
    config = SpikeLMConfig.from_preset("tiny", vocab_size=320, tie_word_embeddings=True)
    real = SpikeLMForCausalLM(config)
    assert count_parameters(meta_model(config)) == sum(p.numel() for p in real.parameters())
    on_meta = activation_bytes(meta_model(config), config, 2, 48, checkpointing)
    on_cpu = activation_bytes(real, config, 2, 48, checkpointing)
    assert on_meta == pytest.approx(on_cpu, rel=0.01)
    if checkpointing:  # only the blocks' inputs stay (plus the head): far less than without
        assert on_meta < 0.5 * activation_bytes(meta_model(config), config, 2, 48, False)


def test_zero_stages_shard_the_model_states():
    p = 1_000_000
    full = model_states_bytes(p, p, 0, "bf16", 8, False, False)
    assert full == 16 * p
    assert model_states_bytes(p, p, 1, "bf16", 8, False, False) == (2 + 2 + 12 / 8) * p
    # DeepSpeed's own estimator for ZeRO-2: 2 bytes of bf16 weights + 18 / N (grads, masters, Adam).
    assert model_states_bytes(p, p, 2, "bf16", 8, False, False) == 2 * p + int(18 * p / 8)
    zero2 = model_states_bytes(p, p, 2, "bf16", 8, False, False)
    assert model_states_bytes(p, p // 10, 3, "bf16", 8, False, False) < zero2


@pytest.mark.parametrize("recipe, extra", [
    ("shakespeare-tiny.yaml", []),
    ("spikegpt-216m.yaml", ["--gpus", "8"]),
    ("spikelm-1.3b.yaml", ["--gpus", "8", "--nodes", "4"]),
])
def test_every_shipped_recipe_plans(recipe, extra, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(RECIPES / recipe), *extra, "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["fits"]
    assert plan["total_tokens"] == plan["steps"] * plan["tokens_per_step"]
    assert plan["train_flops_per_token"] == 3 * plan["forward_flops_per_token"]
    hours = plan["total_flops"] / (plan["gpus"] * plan["peak_flops"] * plan["mfu"]) / 3600
    assert plan["hours"] == pytest.approx(hours)
    printed = capsys.readouterr().out.splitlines()[1:]
    if recipe != "shakespeare-tiny.yaml":  # the large recipes' headers quote the plan instead of hand arithmetic
        assert _quoted_plan(RECIPES / recipe) == [" ".join(line.split()) for line in printed]


def _quoted_plan(recipe: Path) -> list[str]:
    """The plan lines quoted in a recipe's header: the indented lines right after ``# Plan:``."""
    lines = recipe.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Plan:")) + 1
    quoted = []
    for line in lines[start:]:
        if not line.startswith("#" + " " * 13) or line[14:15] in (" ", "("):
            break
        quoted.append(" ".join(line[1:].split()))
    return quoted


def test_hostfile_sets_nodes_and_gpus(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode1 slots=8\nnode2 slots=8\n")
    out = tmp_path / "plan.json"
    assert main(["plan", str(RECIPES / "spikegpt-216m.yaml"), "--hostfile", str(hostfile), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["gpus"] == 16
    hostfile.write_text("node1 slots=eight\n")
    assert main(["plan", str(RECIPES / "spikegpt-216m.yaml"), "--hostfile", str(hostfile)]) == 2


def test_a_recipe_that_does_not_fit_is_refused_with_the_numbers(capsys):
    rc = main(["plan", str(RECIPES / "spikegpt-216m.yaml"), "--gpus", "8", "--gpu", "a100-40",
               "--set", "train.micro_batch_size=64"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "GiB per GPU" in err and "a100-40" in err
