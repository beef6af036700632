"""Backend choice and input checks shared by every scan."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch", "naive")


def triton_available() -> bool:
    """True when Triton can run here: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Pick the implementation for these tensors.

    ``auto``/``None``: Triton for CUDA tensors (fused, memory-lean), the torch path otherwise (Triton on CPU only
    runs in the interpreter, which is 100-5000x slower than torch). ``triton``, ``torch`` and ``naive`` force one.
    """
    if backend is None or backend == "auto":
        on_cuda = any(t is not None and t.is_cuda for t in tensors)
        return "triton" if on_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs a CUDA GPU or TRITON_INTERPRET=1 set before triton is imported")
    return backend
