"""Public entry point of the rwkv6 scan: input checks and dispatch to the naive, torch or Triton path."""

from __future__ import annotations

import torch

from ..utils import resolve_backend
from .naive import rwkv6_scan_naive
from .torch_scan import DEFAULT_CHUNK_SIZE, rwkv6_scan_torch

# Up to this length the Triton dispatcher uses the fused-recurrent kernel (decoding steps, short prompts: one program
# per head walks a few tokens, no chunk-state buffer), beyond it the chunked kernel (parallel over chunks). The
# threshold is a design choice not yet measured on a GPU: check it with tools/bench_kernels.py --T ...
FUSED_RECURRENT_MAX_T = 64
MODES = ("chunk", "fused_recurrent")
# The Triton chunked kernel's default: 16 is the smallest tl.dot dimension; the torch path's is DEFAULT_CHUNK_SIZE.
TRITON_CHUNK_SIZE = 16


def check_inputs(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    for name, x in (("r", r), ("k", k), ("v", v), ("w", w), ("u", u)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"rwkv6_scan: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"rwkv6_scan: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if r.dim() != 4:
        raise ValueError(f"rwkv6_scan: r must be [B, T, H, K], got shape {tuple(r.shape)}")
    B, T, H, K = r.shape
    if T < 1:
        raise ValueError("rwkv6_scan: the sequence is empty (T = 0); pass at least one token")
    for name, x in (("k", k), ("w", w)):
        if x.shape != r.shape:
            raise ValueError(f"rwkv6_scan: {name} must have r's shape [B, T, H, K] = {tuple(r.shape)}, "
                             f"got {tuple(x.shape)}")
    if v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"rwkv6_scan: v must be [B, T, H, V] with B, T, H = {B}, {T}, {H} as in r, "
                         f"got {tuple(v.shape)}")
    if u.shape != (H, K):
        raise ValueError(f"rwkv6_scan: u must be [H, K] = {(H, K)}, got {tuple(u.shape)}")
    V = v.shape[-1]
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise ValueError("rwkv6_scan: initial_state must be a tensor [B, H, K, V] or None")
        if initial_state.shape != (B, H, K, V):
            raise ValueError(f"rwkv6_scan: initial_state must be [B, H, K, V] = {(B, H, K, V)}, "
                             f"got {tuple(initial_state.shape)}")
    tensors = [("r", r), ("k", k), ("v", v), ("w", w), ("u", u)]
    if initial_state is not None:
        tensors.append(("initial_state", initial_state))
    devices = {x.device for _, x in tensors}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {x.device}" for name, x in tensors)
        raise ValueError(f"rwkv6_scan: all inputs must be on one device, got {where}; move them with .to(device)")


def check_chunk_size(chunk_size: int | None, backend: str) -> int:
    if chunk_size is None:
        return TRITON_CHUNK_SIZE if backend == "triton" else DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"rwkv6_scan: chunk_size={chunk_size!r} must be a positive int (e.g. 16) or None")
    return chunk_size


def rwkv6_scan(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    backend: str | None = None,
    chunk_size: int | None = None,
    mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-6 WKV scan over the token axis.

    Args:
        r: ``[B, T, H, K]`` receptance.
        k: ``[B, T, H, K]`` key.
        v: ``[B, T, H, V]`` value.
        w: ``[B, T, H, K]`` log-decay, ``w <= 0`` (the state is multiplied by ``exp(w_t)``); any magnitude is
            numerically safe, e.g. ``w = -exp(5)``.
        u: ``[H, K]`` bonus applied to the current token instead of a decay.
        initial_state: ``[B, H, K, V]`` state before the first token (float32 recommended), or ``None`` for zeros.
        output_final_state: also return the state after the last token (to continue the scan later).
        backend: ``None``/``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"naive"`` or ``"triton"``.
        chunk_size: tokens per chunk of the chunked paths; ``None``: 8 for torch (fastest on CPU), 16 for Triton
            ``mode="chunk"`` (which accepts 16, 32 or 64).
        mode: Triton only: ``"chunk"`` (``tl.dot`` inside chunks; training and prefill) or ``"fused_recurrent"``
            (one pass over T, state on chip; decoding). ``None`` picks fused-recurrent for ``T <= 64``, chunked
            otherwise.

    Returns:
        ``(o, final_state)``: ``o [B, T, H, V]`` in v's dtype (accumulated in float32) and the final state
        ``[B, H, K, V]`` float32, or ``None`` unless ``output_final_state``.

    All paths are differentiable w.r.t. r, k, v, w, u and initial_state. Non-contiguous inputs are accepted.
    """
    check_inputs(r, k, v, w, u, initial_state)
    if mode is not None and mode not in MODES:
        raise ValueError(f"rwkv6_scan: mode={mode!r} is not one of {', '.join(map(repr, MODES))} or None")
    which = resolve_backend(backend, r, k, v, w, u)
    C = check_chunk_size(chunk_size, which)
    if which == "naive":
        return rwkv6_scan_naive(r, k, v, w, u, initial_state, output_final_state)
    if which == "torch":
        return rwkv6_scan_torch(r, k, v, w, u, initial_state, output_final_state, chunk_size=C)
    if mode is None:
        mode = "fused_recurrent" if r.shape[1] <= FUSED_RECURRENT_MAX_T else "chunk"
    if mode == "fused_recurrent":
        from .fused_recurrent import fused_recurrent_rwkv6

        return fused_recurrent_rwkv6(r, k, v, w, u, initial_state, output_final_state)
    from .chunk import chunk_rwkv6

    return chunk_rwkv6(r, k, v, w, u, initial_state, output_final_state, chunk_size=C)


__all__ = ["rwkv6_scan", "MODES", "FUSED_RECURRENT_MAX_T"]
