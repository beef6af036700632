"""Training that starts from existing models: ``init.from`` (load an export's weights before training) and
``distill`` (a frozen teacher's logits in the loss). Both are recipe sections (see ``spikelm.train.recipe``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spikelm.errors import SpikeLMError

# Config fields that fix the shape of some tensor: an export that differs in one of them cannot be loaded.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "intermediate_size", "decay_lora_rank",
                "time_mix", "spike_lm_head")
# Parameters a model may have that an export of another neuron lacks; they keep their initial values.
NEURON_PARAMETERS = ("step_scale", "forget_logit")


def export_config(directory: Path, key: str) -> dict[str, Any]:
    """The config.json of a SpikeLM export; a directory that is none is a ``SpikeLMError`` naming ``key``."""
    path = directory / "config.json"
    if not path.is_file():
        raise SpikeLMError(f"{key}: {str(directory)!r} is not a SpikeLM export (no config.json); point it at a run's "
                           "export/ directory")
    config = json.loads(path.read_text())
    if config.get("model_type") != "spikelm":
        raise SpikeLMError(f"{key}: {path} describes a {config.get('model_type')!r} model, not a SpikeLM export")
    return config


def check_same_shape(directory: Path, config: Any, key: str) -> None:
    """Raise ``SpikeLMError`` naming ``key`` and the first field where the export at ``directory`` and ``config``
    (the recipe's model) differ in shape."""
    saved = export_config(directory, key)
    for name in SHAPE_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise SpikeLMError(f"{key}: {directory} has {name} = {saved[name]!r} but the recipe's model has "
                               f"{getattr(config, name)!r}; the weights cannot be loaded into it")


def load_initial_weights(model: nn.Module, directory: Path, config: Any) -> None:
    """Copy the export's weights into ``model`` (``init.from``); every tensor's name and shape must match."""
    from safetensors.torch import load_file

    check_same_shape(directory, config, "init.from")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SpikeLMError(f"init.from: no *.safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    target = model.state_dict()
    for name, tensor in state.items():
        if name not in target:
            raise SpikeLMError(f"init.from: tensor {name!r} of {directory} has no place in the recipe's model")
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise SpikeLMError(f"init.from: tensor {name!r} is {tuple(tensor.shape)} in {directory} but "
                               f"{tuple(target[name].shape)} in the recipe's model")
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [name for name in target if name not in state and name not in tied
               and name.rsplit(".", 1)[-1] not in NEURON_PARAMETERS]
    if missing:
        raise SpikeLMError(f"init.from: {directory} lacks tensor {missing[0]!r} of the recipe's model"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()


def load_teacher(directory: Path, config: Any, precision: str, device: torch.device) -> nn.Module:
    """The frozen teacher of ``distill.teacher``: eval mode, no gradients, in the recipe's precision."""
    from spikelm.model.modeling import SpikeLMForCausalLM

    saved = export_config(directory, "distill.teacher")
    if saved.get("vocab_size") != config.vocab_size:
        raise SpikeLMError(f"distill.teacher: {directory} has a vocabulary of {saved.get('vocab_size')} tokens but "
                           f"the student has {config.vocab_size}; the teacher must use the student's tokenizer")
    teacher = SpikeLMForCausalLM.from_pretrained(directory, dtype=torch.float32)
    teacher.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1 - alpha) * CE + alpha * T^2 * KL(teacher || student)`` over ``[B, T, V]`` logits (fp32, mean over
    tokens); returns ``(loss, ce, kl)``."""
    from spikelm.model.modeling import lm_cross_entropy

    vocab = logits.size(-1)
    student = logits.float().reshape(-1, vocab)
    ce = lm_cross_entropy(logits, targets)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl, ce, kl


__all__ = ["export_config", "load_initial_weights", "load_teacher", "distill_loss", "check_same_shape"]
