"""Loading a saved model directory for ``generate``, ``eval`` and ``sparsity``: a damaged file is named, not traced.

``from_pretrained`` reports a garbled ``config.json`` or a truncated ``model.safetensors`` as a deep traceback, or
as a tokenizer problem (the tokenizer also reads ``config.json``). Checking both files first gives one line that
names the file and says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spikelm.errors import SpikeLMError


def check_model_dir(model_dir: Path) -> None:
    """Raise ``SpikeLMError`` naming the file if ``config.json`` or a ``*.safetensors`` file of ``model_dir`` is bad."""
    config = model_dir / "config.json"
    if not config.is_file():
        what = "does not exist" if not model_dir.exists() else "has no config.json"
        raise SpikeLMError(f"model directory {str(model_dir)!r} {what}; give a folder written by save_pretrained "
                           "(e.g. the export/ folder of `spikelm train`)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpikeLMError(f"{str(config)!r} is not valid JSON ({err}); the model directory is damaged, export or "
                           "copy it again") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise SpikeLMError(f"{str(config)!r} has no model_type; it is not a saved model's config")
    from safetensors import safe_open

    for weights in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict) the header's byte ranges must lie inside the file
                    f.get_slice(key)
        except Exception as err:  # safetensors raises its own SafetensorError (not exported under a stable name)
            raise SpikeLMError(f"{str(weights)!r} is damaged or truncated ({err}); the model directory is "
                               "incomplete, export or copy it again") from None


def load_model(model_dir: Path, loader: Any, **kwargs: Any) -> Any:
    """``loader(model_dir, **kwargs)`` (a ``from_pretrained``) after :func:`check_model_dir`; errors name the folder."""
    check_model_dir(model_dir)
    try:
        return loader(str(model_dir), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SpikeLMError(f"could not load the model in {str(model_dir)!r} ({first}); export or copy it "
                           "again") from err


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_dtype_argument(parser: Any) -> None:
    """``--dtype fp32|bf16``: the weights' dtype in memory (bf16 halves it; the recurrence parameters stay fp32)."""
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="weights in memory: fp32 (default) or bf16 (half the memory; recurrence parameters "
                             "stay fp32)")


def dtype_kwargs(name: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``--dtype``."""
    import torch

    return {"dtype": getattr(torch, DTYPES[name])}


__all__ = ["DTYPES", "add_dtype_argument", "check_model_dir", "dtype_kwargs", "load_model"]
