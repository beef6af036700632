"""The export of a finished run: ``RUN_DIR/export``, a Hugging Face model folder with fp32 weights and the tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def fp32_state_dict(engine: Any, *, rank: int) -> dict[str, torch.Tensor] | None:
    """The model's full fp32 weights on rank 0 (``None`` elsewhere); collective under ZeRO and bf16.

    Where DeepSpeed keeps fp32 master weights (bf16 training, ZeRO 1-3) these are the masters, gathered from their
    partitions, not the bf16 copies the forward pass uses: exporting those would round every weight to 8 bits of
    mantissa. Without a master copy (fp32, ZeRO 0) the parameter itself is the fp32 weight.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    masters: dict[int, torch.Tensor] = {}
    state_dict: dict[str, torch.Tensor] = {}
    # Every rank walks the same parameters in the same order: each gather is a collective. Tied names share one.
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        if id(param) not in masters:
            master = safe_get_full_fp32_param(param)
            masters[id(param)] = (param.detach() if master is None else master).float().cpu()
        state_dict[name] = masters[id(param)]
    for name, buffer in engine.module.named_buffers():
        state_dict[name] = buffer.detach().float().cpu()
    return state_dict if rank == 0 else None


def export(engine: Any, tokenizer: Any, run_dir: Path, *, rank: int) -> Path:
    """Write ``run_dir/export`` (fp32 master weights as safetensors + tokenizer) atomically; collective."""
    state_dict = fp32_state_dict(engine, rank=rank)
    final = run_dir / "export"
    if rank == 0:
        tmp = run_dir / ".export.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        module = engine.module
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The weights are saved in fp32 even after bf16 training; say so, or Auto classes would load them as bf16.
        config_path = tmp / "config.json"
        saved_config = json.loads(config_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in saved_config:
                saved_config[key] = "float32"
        config_path.write_text(json.dumps(saved_config, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return final


__all__ = ["export", "fp32_state_dict"]
