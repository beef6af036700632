"""Backend choice, input checks and launch sizes shared by every scan."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch", "naive")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """True when Triton can run here: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
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


def channel_parameter(name: str, value: float | torch.Tensor, channels: int, like: torch.Tensor) -> torch.Tensor:
    """A per-channel fp32 parameter ``[C]`` from a Python number or a ``[]``/``[1]``/``[C]`` tensor.

    Tensors keep their autograd history (``expand`` and ``float`` are differentiable), so a learned parameter gets
    its gradient back in its own shape and dtype.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got dtype {value.dtype}")
        if value.shape not in (torch.Size([]), torch.Size([1]), torch.Size([channels])):
            shape = tuple(value.shape)
            raise ValueError(f"{name} must be a number or a tensor of shape [] or [C={channels}], got {shape}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but x is on {like.device}; move it to x's device")
        return value.float().reshape(-1).expand(channels)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a float or a tensor of shape [C], got {type(value).__name__}")
    return torch.full((channels,), float(value), dtype=torch.float32, device=like.device)


def check_sequence(name: str, x: torch.Tensor) -> None:
    """``x`` must be a ``[B, T, C]`` float tensor with T >= 1."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape [B, T, C], got {shape}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no tokens (T = 0); pass at least one token")


def check_state(name: str, state: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """An initial state ``[B, C]`` as fp32 (zeros when None)."""
    batch, _, channels = x.shape
    if state is None:
        return torch.zeros(batch, channels, dtype=torch.float32, device=x.device)
    if not isinstance(state, torch.Tensor) or state.shape != (batch, channels) or not state.is_floating_point():
        shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(f"{name} must be a float tensor of shape [B={batch}, C={channels}], got {shape}")
    if state.device != x.device:
        raise ValueError(f"{name} is on {state.device} but x is on {x.device}; move it to x's device")
    return state.float()


def channel_launch_config(batch: int, channels: int) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` of the per-channel scans (lif, gated, rwkv4): only B*C runs in parallel, so the
    channel block shrinks (down to one warp's 32 channels) until there are enough programs to fill a GPU (~4 per SM
    on a 132-SM H100)."""
    block_c = min(1 << max(channels - 1, 0).bit_length(), 128)  # next power of two, at most 128
    while block_c > 32 and batch * -(-channels // block_c) < 512:
        block_c //= 2
    return block_c, max(1, block_c // 32)
