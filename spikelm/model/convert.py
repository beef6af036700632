"""Start from an existing model: transformers' ``RwkvForCausalLM`` (RWKV-4) or a SpikeLM export under another neuron
(docs/design.md, "Conversion").

``convert(src, neuron=..., overrides=...)`` returns a ``SpikeLMForCausalLM`` holding the source's weights;
``save_converted`` writes it with the source's tokenizer, atomically. Every tensor is mapped by name and its shape
checked; a tensor the mapping does not know, or a weight it needs and the source lacks, is an error naming it.

RWKV-4 -> SpikeLM ``time_mix: rwkv4`` is exact with ``neuron: none``. The differences this mapping absorbs:

- RWKV mixes ``x * mu + x_prev * (1 - mu)``; SpikeLM's ``shift_mix`` is the fraction of x_{t-1}: ``1 - mu``.
- RWKV's block 0 ``pre_ln`` is SpikeLM's ``ln_in``; its ``head`` is ``lm_head`` (untied unless the source ties).
- ``RwkvModel.ln_out`` ignores ``layer_norm_epsilon`` (always 1e-5): SpikeLM's ``ln_out_epsilon``.
- In eval mode (``generate``) ``RwkvForCausalLM`` halves the residual stream after every ``rescale_every`` blocks and
  divides the output weights to match. Halving is exact in floating point and a LayerNorm is scale-free except for
  its epsilon, so this equals the unrescaled model with LayerNorm epsilons x4 per halving:
  SpikeLM's ``layer_norm_eps_rescale_every`` (and ``ln_out_epsilon`` = 1e-5 x 4^(layers // rescale_every)). Training
  mode does not rescale; there the epsilons differ by those factors (a relative change of order eps / var(x)).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spikelm.errors import SpikeLMError
from spikelm.model.config import NEURONS, SpikeLMConfig
from spikelm.model.modeling import SpikeLMForCausalLM

# Weight files a transformers model directory may hold, most preferred first (a single file, then a sharded index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# transformers' RwkvModel builds ln_out without an eps argument: LayerNorm's default.
RWKV_LN_OUT_EPS = 1e-5


def read_config(src: Path) -> dict[str, Any]:
    """``src/config.json`` as a dict; an error naming the file if it is missing or not JSON."""
    path = src / "config.json"
    if not src.is_dir():
        raise SpikeLMError(f"{src} is not a directory; give a SpikeLM export or a transformers RwkvForCausalLM "
                           "directory (config.json plus weights)")
    if not path.is_file():
        if (src / "adapter_config.json").is_file():
            raise SpikeLMError(f"{src} holds a peft adapter, not a model; merge it first "
                               "(model.merge_and_unload().save_pretrained(dir)) and convert that directory")
        raise SpikeLMError(f"{path} does not exist: {src} is neither a SpikeLM export nor an RwkvForCausalLM directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpikeLMError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise SpikeLMError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def load_tensors(src: Path) -> tuple[dict[str, Tensor], Path]:
    """Every tensor of the weight file(s) in ``src`` by name, and the file (or index) they came from."""
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        path = src / name
        if not path.is_file():
            continue
        files = [path]
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise SpikeLMError(f"{path} is not a weight index (no 'weight_map': {err})") from err
            files = [src / shard for shard in sorted(set(weight_map.values()))]
        tensors: dict[str, Tensor] = {}
        for file in files:
            if not file.is_file():
                raise SpikeLMError(f"{path} names the shard {file.name}, which does not exist")
            try:
                part = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                        weights_only=True)
            except Exception as err:  # a truncated or foreign file: say which one
                raise SpikeLMError(f"cannot read weights from {file}: {err}") from err
            tensors.update(part)
        return tensors, path
    raise SpikeLMError(f"{src} has no weights (looked for {', '.join(WEIGHT_FILES)})")


def _int_field(config: dict[str, Any], key: str, path: Path, default: Any = None) -> Any:
    value = config.get(key)
    value = default if value is None else value
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise SpikeLMError(f"{path}: {key}={value!r} must be an integer")
    return value


def rwkv_config(config: dict[str, Any], path: Path) -> SpikeLMConfig:
    """The SpikeLM config (``time_mix: rwkv4``, dense) of a transformers ``RwkvConfig`` dict read from ``path``."""
    hidden = _int_field(config, "hidden_size", path, 4096)
    layers = _int_field(config, "num_hidden_layers", path, 32)
    attention = _int_field(config, "attention_hidden_size", path)
    if attention is not None and attention != hidden:
        raise SpikeLMError(f"{path}: attention_hidden_size={attention} differs from hidden_size={hidden}; SpikeLM's "
                           "rwkv4 time mix keeps the hidden width")
    eos = config.get("eos_token_id", 0)
    if isinstance(eos, list):  # generation stops at any of them; SpikeLMConfig holds one
        eos = eos[0] if eos else None
    rescale = _int_field(config, "rescale_every", path, 6)
    rescale = max(rescale, 0)  # RWKV: 0 or negative = no rescaling
    fields = {
        "vocab_size": _int_field(config, "vocab_size", path, 50277),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": _int_field(config, "intermediate_size", path) or 4 * hidden,
        "context_length": _int_field(config, "context_length", path, 1024),
        "head_size": math.gcd(hidden, 64),  # unused by rwkv4; any divisor of hidden_size
        "time_mix": "rwkv4",
        "neuron": "none",
        "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-5),
        "layer_norm_eps_rescale_every": rescale,
        "ln_out_epsilon": RWKV_LN_OUT_EPS * 4 ** (layers // rescale if rescale else 0),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "bos_token_id": config.get("bos_token_id", 0),
        "eos_token_id": eos,
        "pad_token_id": config.get("pad_token_id"),
    }
    try:
        return SpikeLMConfig(**fields)
    except (ValueError, TypeError) as err:
        raise SpikeLMError(f"{path}: {err}") from err


def _one_minus(tensor: Tensor) -> Tensor:
    return 1.0 - tensor.reshape(-1)


def rwkv_mapping(config: SpikeLMConfig) -> dict[str, tuple[list[str], Callable[..., Tensor]]]:
    """SpikeLM parameter name -> (the RwkvForCausalLM tensors it is made of, how)."""
    def same(tensor: Tensor) -> Tensor:
        return tensor

    def mixes(*tensors: Tensor) -> Tensor:  # RWKV's [1, 1, C] mu per projection -> rows of shift_mix
        return torch.stack([_one_minus(t) for t in tensors])

    plan: dict[str, tuple[list[str], Callable[..., Tensor]]] = {
        "model.embeddings.weight": (["rwkv.embeddings.weight"], same),
        "model.ln_in.weight": (["rwkv.blocks.0.pre_ln.weight"], same),
        "model.ln_in.bias": (["rwkv.blocks.0.pre_ln.bias"], same),
        "model.ln_out.weight": (["rwkv.ln_out.weight"], same),
        "model.ln_out.bias": (["rwkv.ln_out.bias"], same),
    }
    if not config.tie_word_embeddings:
        plan["lm_head.weight"] = (["head.weight"], same)
    for i in range(config.num_hidden_layers):
        src, dst = f"rwkv.blocks.{i}", f"model.layers.{i}"
        for norm in ("ln1", "ln2"):
            for part in ("weight", "bias"):
                plan[f"{dst}.{norm}.{part}"] = ([f"{src}.{norm}.{part}"], same)
        for name in ("time_decay", "time_first"):
            plan[f"{dst}.time_mix.{name}"] = ([f"{src}.attention.{name}"], same)
        plan[f"{dst}.time_mix.shift_mix"] = (
            [f"{src}.attention.time_mix_{m}" for m in ("key", "value", "receptance")], mixes)  # RWKV4TimeMix.MIXES
        for name in ("key", "value", "receptance", "output"):
            plan[f"{dst}.time_mix.{name}.linear.weight"] = ([f"{src}.attention.{name}.weight"], same)
        plan[f"{dst}.channel_mix.shift_mix"] = (
            [f"{src}.feed_forward.time_mix_{m}" for m in ("key", "receptance")], mixes)  # ChannelMix's order
        for name in ("key", "receptance", "value"):
            plan[f"{dst}.channel_mix.{name}.linear.weight"] = ([f"{src}.feed_forward.{name}.weight"], same)
    return plan


def _is_neuron_parameter(name: str) -> bool:
    """Parameters that belong to a spiking neuron (e.g. the gated neuron's forget gates), not to a projection."""
    return ".neuron." in name or name.startswith("head_neuron.")


def _check_plan_covers(model: SpikeLMForCausalLM, plan: dict[str, Any], where: str) -> dict[str, Tensor]:
    """The model's parameters by name; every one must be planned, except neuron parameters (they keep their init)."""
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    for name in params:
        if name not in plan and not _is_neuron_parameter(name):
            raise SpikeLMError(f"{where}: nothing maps to SpikeLM parameter {name}")
    for name in plan:
        if name not in params:
            raise SpikeLMError(f"{where}: the converted config has no parameter {name} (a --set changed the "
                               "architecture?)")
    return params


def _copy_into(params: dict[str, Tensor], name: str, value: Tensor, source: str, where: str) -> None:
    target = params[name]
    if tuple(value.shape) != tuple(target.shape):
        raise SpikeLMError(f"{where}: tensor {source} has shape {list(value.shape)} but the config implies "
                           f"{list(target.shape)} for {name}")
    with torch.no_grad():
        target.copy_(value)


def load_rwkv(model: SpikeLMForCausalLM, tensors: dict[str, Tensor], where: str) -> None:
    """Copy an ``RwkvForCausalLM`` state dict into ``model``; nothing may be missing or left over."""
    plan = rwkv_mapping(model.config)
    params = _check_plan_covers(model, plan, where)
    used: set[str] = set()
    for name, (sources, build) in plan.items():
        for source in sources:
            if source not in tensors:
                raise SpikeLMError(f"{where}: tensor {source} is missing (config.json says "
                                   f"num_hidden_layers={model.config.num_hidden_layers})")
        value = build(*(tensors[source].float() for source in sources))
        _copy_into(params, name, value, " + ".join(sources), where)
        used.update(sources)
    leftover = sorted(set(tensors) - used)
    if model.config.tie_word_embeddings and "head.weight" in leftover:
        if not torch.equal(tensors["head.weight"], tensors["rwkv.embeddings.weight"]):
            raise SpikeLMError(f"{where}: config.json ties the head to the embeddings but tensor head.weight differs")
        leftover.remove("head.weight")
    if leftover:
        raise SpikeLMError(f"{where}: tensor {leftover[0]} is not an RwkvForCausalLM weight of this config ("
                           f"{len(leftover)} unmapped; config.json num_hidden_layers={model.config.num_hidden_layers})")


def load_spikelm(model: SpikeLMForCausalLM, tensors: dict[str, Tensor], where: str) -> None:
    """Copy a SpikeLM state dict into ``model`` (same names). Neuron parameters of another neuron kind are dropped
    and the model's own neurons keep their init; a tied head is the embedding, an untied one must be present."""
    params = dict(model.named_parameters())  # a tied lm_head appears only as model.embeddings.weight
    plan = {name: name for name in params if not _is_neuron_parameter(name) or name in tensors}
    _check_plan_covers(model, plan, where)
    tensors = dict(tensors)
    head = tensors.pop("lm_head.weight", None)
    if "lm_head.weight" in plan:  # untied here: the source's head, or its embedding if the source tied them
        tensors["lm_head.weight"] = head if head is not None else tensors.get("model.embeddings.weight")
    elif head is not None and not torch.equal(head, tensors.get("model.embeddings.weight", head)):
        raise SpikeLMError(f"{where}: tensor lm_head.weight differs from the embedding but the converted config ties "
                           "them (tie_word_embeddings); convert with --set model.tie_word_embeddings=false")
    for name in plan:
        if tensors.get(name) is None:
            raise SpikeLMError(f"{where}: tensor {name} is missing")
        _copy_into(params, name, tensors[name].float(), name, where)
    leftover = sorted(name for name in set(tensors) - set(plan) if not _is_neuron_parameter(name))
    if leftover:
        raise SpikeLMError(f"{where}: tensor {leftover[0]} has no place in the converted model "
                           f"({len(leftover)} unmapped)")


def apply_overrides(config: SpikeLMConfig, neuron: str | None, overrides: dict[str, Any]) -> None:
    """Set ``neuron`` and ``model.FIELD`` overrides on ``config`` in place; errors name the field."""
    if neuron is not None and neuron not in NEURONS:
        raise SpikeLMError(f"--neuron {neuron!r} is not one of {', '.join(NEURONS)}")
    updates = {**({"neuron": neuron} if neuron is not None else {}), **overrides}
    fields = vars(SpikeLMConfig).get("__annotations__", {})
    for key, value in updates.items():
        if key not in fields or key.startswith("_") or key == "model_type":
            raise SpikeLMError(f"model.{key} is not a SpikeLMConfig field")
        setattr(config, key, value)
    try:
        config.validate_spikelm()
    except (ValueError, TypeError) as err:
        raise SpikeLMError(f"bad model setting: {err}") from err


def convert(src: str | os.PathLike, neuron: str | None = None,
            overrides: dict[str, Any] | None = None) -> SpikeLMForCausalLM:
    """A SpikeLM model with the weights of the ``RwkvForCausalLM`` directory or SpikeLM export ``src``.

    ``neuron`` (default: ``adaptive`` for RWKV, the source's own for SpikeLM) and ``overrides`` (SpikeLMConfig
    fields) set the converted model's config; shape-changing overrides fail the shape checks.
    """
    src = Path(src)
    raw = read_config(src)
    path = src / "config.json"
    kind = raw.get("model_type")
    if kind == "rwkv":
        config = rwkv_config(raw, path)
        neuron = "adaptive" if neuron is None else neuron
    elif kind == SpikeLMConfig.model_type:
        try:
            config = SpikeLMConfig.from_pretrained(str(src))
        except (ValueError, TypeError) as err:
            raise SpikeLMError(f"{path}: {err}") from err
    else:
        raise SpikeLMError(f"{path}: model_type={kind!r}; convert reads SpikeLM exports ('spikelm') and "
                           "transformers RwkvForCausalLM directories ('rwkv')")
    apply_overrides(config, neuron, overrides or {})
    tensors, weights = load_tensors(src)
    model = SpikeLMForCausalLM(config)
    (load_rwkv if kind == "rwkv" else load_spikelm)(model, tensors, str(weights))
    model.tie_weights()
    return model.eval()


def check_output_dir(out: Path) -> None:
    """``out`` must not exist, or be an empty directory: converting never overwrites anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpikeLMError(f"output {out} already exists and is not an empty directory; choose a new path")


def save_converted(model: SpikeLMForCausalLM, tokenizer: Any, out: str | os.PathLike) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out`` atomically: into a temporary sibling, then one rename."""
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export should look like any directory
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, out)  # replaces an empty directory too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


__all__ = ["convert", "save_converted", "check_output_dir", "rwkv_config", "rwkv_mapping", "load_tensors"]
