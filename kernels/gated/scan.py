"""Public entry point of the gated scan: input checks and backend dispatch."""

from __future__ import annotations

import torch

from ..utils import channel_parameter, check_sequence, check_state, resolve_backend
from .naive import gated_scan_naive
from .torch_scan import gated_scan_torch


def gated_scan(
    x: torch.Tensor,
    f: torch.Tensor,
    i0: torch.Tensor | None = None,
    acc0: torch.Tensor | None = None,
    bits: int = 2,
    threshold: float | torch.Tensor = 0.25,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Ponghiran & Roy's gated neuron with a multi-bit, error-keeping accumulator, over the token axis.

    Per token, with ``L = 2**bits - 1``::

        I_t = f I_{t-1} + (1 - f) x_t                    # gated leaky integration
        a_t = acc_{t-1} + I_t
        count_t = sign(a_t) min(floor(|a_t| / theta), L)  # dead zone |a_t| < theta emits nothing
        acc_t = a_t - theta count_t                       # keeps the quantisation error

    Backward is straight-through, ``d count_t / d a_t = 1 / theta``, so the accumulator carries no gradient
    (``1 - theta / theta = 0``) and acc0's gradient is zeros; gradients reach x, f and i0 through I. theta gets none.

    Args:
        x: input ``[B, T, C]``, float32 / bfloat16 / float16.
        f: forget gate ``[C]`` in (0, 1), fp32 (e.g. ``sigmoid(param)``); gets a gradient.
        i0: initial integrated current ``[B, C]`` (None: zeros); gets a gradient.
        acc0: initial accumulator ``[B, C]`` (None: zeros); its gradient is zeros.
        bits: output bits, >= 1 (counts lie in ``-L .. L``).
        threshold: quantisation step theta > 0, a number or an fp32 tensor ``[C]``.
        backend: ``None``/``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"naive"`` or ``"triton"``.
    Returns:
        ``(counts, (i_final, acc_final))``: integer-valued counts ``[B, T, C]`` in x's dtype (multiply by theta
        for the value) and the final ``I`` and accumulator ``[B, C]`` fp32.

    Saved for backward: ``naive`` keeps autograd's per-token graph; ``torch`` keeps x and the fp32 ``I``
    ``[B, T, C]``; ``triton`` keeps only x (its backward recomputes ``I`` on chip).
    """
    check_sequence("x", x)
    channels = x.shape[2]
    if not isinstance(f, torch.Tensor) or not f.is_floating_point() or f.shape != (channels,):
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"f (the forget gate) must be a float tensor of shape [C={channels}], got {shape}")
    if f.device != x.device:
        raise ValueError(f"f is on {f.device} but x is on {x.device}; move it to x's device")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits={bits!r} must be an integer >= 1 (counts range over -(2**bits - 1) .. 2**bits - 1)")
    if isinstance(threshold, int | float) and not isinstance(threshold, bool) and threshold <= 0:
        raise ValueError(f"threshold={threshold!r} must be > 0 (the quantisation step)")
    current = check_state("i0", i0, x)
    accumulator = check_state("acc0", acc0, x)
    theta = channel_parameter("threshold", threshold, channels, x).detach()
    forget, levels = f.float(), 2**bits - 1
    # Why this path: Triton fuses the time loop into one pass over x on CUDA; on CPU it only runs in the
    # interpreter, so the torch path (vectorised over B*C, looped over T) is the default there.
    chosen = resolve_backend(backend, x, forget)
    if chosen == "naive":
        return gated_scan_naive(x, forget, current, accumulator, theta, levels)
    if chosen == "torch":
        return gated_scan_torch(x, forget, current, accumulator, theta, levels)
    from .fused_recurrent import gated_scan_triton  # imported late: importing triton is slow and CUDA-only here

    return gated_scan_triton(x, forget, current, accumulator, theta, levels)
