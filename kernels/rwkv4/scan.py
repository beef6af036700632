"""Public entry point of the RWKV-4 WKV scan: input checks and backend dispatch."""

from __future__ import annotations

import torch

from ..utils import check_sequence, resolve_backend
from .naive import MAX_STATE_INIT, rwkv4_scan_naive
from .torch_scan import rwkv4_scan_torch

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_state(state: State | None, k: torch.Tensor) -> State:
    batch, _, channels = k.shape
    if state is None:
        zeros = torch.zeros(batch, channels, dtype=torch.float32, device=k.device)
        return zeros, zeros, torch.full_like(zeros, MAX_STATE_INIT)
    if not isinstance(state, tuple | list) or len(state) != 3:
        raise ValueError("state must be a tuple (num, den, max_state) of three [B, C] tensors, or None")
    for name, part in zip(("num", "den", "max_state"), state, strict=True):
        if not isinstance(part, torch.Tensor) or part.shape != (batch, channels) or not part.is_floating_point():
            shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise ValueError(f"state {name} must be a float tensor of shape [B={batch}, C={channels}], got {shape}")
        if part.device != k.device:
            raise ValueError(f"state {name} is on {part.device} but k is on {k.device}; move it to k's device")
    return tuple(part.float() for part in state)


def rwkv4_scan(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, State]:
    """RWKV-4 / SpikeGPT vector WKV in the numerically stable running-max form.

    Per token, with state ``(num, den, max_state)`` (true sums ``num * exp(max_state)``, ``den * exp(max_state)``)::

        m_o = max(max_state, u + k_t);  wkv_t = (e^(max_state-m_o) num + e^(u+k_t-m_o) v_t)
                                                / (e^(max_state-m_o) den + e^(u+k_t-m_o))
        m_s = max(max_state + w, k_t);  num = e^(max_state+w-m_s) num + e^(k_t-m_s) v_t;  den likewise with 1

    An output with no contribution at all (den == 0, e.g. only k = -inf tokens so far) is 0, not NaN, in every
    path and in the backward.

    Args:
        w: per-channel decay ``-exp(time_decay)`` ``[C]`` (kept fp32); gets a gradient.
        u: bonus ``time_first`` ``[C]`` (kept fp32); gets a gradient.
        k, v: keys and values ``[B, T, C]``, float32 / bfloat16 / float16, same dtype.
        state: ``(num, den, max_state)`` each ``[B, C]`` fp32, or None for ``(0, 0, -1e38)``; gets gradients.
        backend: ``None``/``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"naive"`` or ``"triton"``.
    Returns:
        ``(wkv, (num, den, max_state))``: ``wkv`` ``[B, T, C]`` in v's dtype and the final state, fp32 ``[B, C]``.

    Saved for backward: ``naive`` keeps autograd's per-token graph; ``torch`` (two-level scan, chunks of ~sqrt(T))
    keeps autograd's tensors, about twenty fp32 ``[B, T, C]``; ``triton`` keeps only its inputs and recomputes the
    per-token states into fp32 scratch (3 x ``[B, T, C]``) during the backward.
    """
    check_sequence("k", k)
    check_sequence("v", v)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"k and v must have the same shape and dtype, got {tuple(k.shape)} {k.dtype} and "
                         f"{tuple(v.shape)} {v.dtype}")
    channels = k.shape[2]
    for name, param in (("w", w), ("u", u)):
        if not isinstance(param, torch.Tensor) or not param.is_floating_point() or param.shape != (channels,):
            shape = tuple(param.shape) if isinstance(param, torch.Tensor) else type(param).__name__
            raise ValueError(f"{name} must be a float tensor of shape [C={channels}], got {shape}")
        if param.device != k.device:
            raise ValueError(f"{name} is on {param.device} but k is on {k.device}; move it to k's device")
    initial = _check_state(state, k)
    w32, u32 = w.float(), u.float()
    # Why this path: Triton runs the whole sequence in one kernel per channel block on CUDA; on CPU it only runs
    # in the interpreter, so the chunked torch path (no per-token Python loop) is the default there.
    chosen = resolve_backend(backend, k, v, w)
    if chosen == "naive":
        return rwkv4_scan_naive(w32, u32, k, v, initial)
    if chosen == "torch":
        return rwkv4_scan_torch(w32, u32, k, v, initial)
    from .fused_recurrent import rwkv4_scan_triton  # imported late: importing triton is slow and CUDA-only here

    return rwkv4_scan_triton(w32, u32, k, v, initial)
