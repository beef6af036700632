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


def channel_launch_config(batch: int, channels: int) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` of the per-channel scans (lif, gated, rwkv4): only B*C runs in parallel, so the
    channel block shrinks (down to one warp's 32 channels) until there are enough programs to fill a GPU (~4 per SM
    on a 132-SM H100)."""
    block_c = min(1 << max(channels - 1, 0).bit_length(), 128)  # next power of two, at most 128
    while block_c > 32 and batch * -(-channels // block_c) < 512:
        block_c //= 2
    return block_c, max(1, block_c // 32)
