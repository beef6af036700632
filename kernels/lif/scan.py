"""Public entry point of the LIF scan: input checks and backend dispatch."""

from __future__ import annotations

import torch

from ..utils import channel_parameter, check_sequence, check_state, resolve_backend
from .naive import lif_scan_naive
from .torch_scan import lif_scan_torch

RESETS = ("hard", "soft")


def lif_scan(
    x: torch.Tensor,
    v0: torch.Tensor | None = None,
    tau: float | torch.Tensor = 2.0,
    v_th: float | torch.Tensor = 1.0,
    reset: str = "hard",
    alpha: float = 2.0,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpikeGPT's multi-step leaky integrate-and-fire neuron over the token axis.

    Per token: ``h_t = v_{t-1} + (x_t - v_{t-1}) / tau``; ``s_t = 1[h_t >= v_th]``; then ``v_t = h_t (1 - s_t)``
    (hard reset) or ``v_t = h_t - s_t v_th`` (soft). Backward: ATan surrogate
    ``ds/dh = alpha / (2 (1 + (pi alpha (h - v_th) / 2)^2))``; the reset path is differentiated, not detached.

    Args:
        x: input current ``[B, T, C]``, float32 / bfloat16 / float16.
        v0: initial membrane ``[B, C]`` (None: zeros); gets a gradient.
        tau: membrane time constant, a number or an fp32 tensor ``[C]`` (gets a gradient when it requires one).
        v_th: firing threshold, a number or an fp32 tensor ``[C]`` (likewise).
        reset: ``"hard"`` or ``"soft"``.
        alpha: width of the ATan surrogate, > 0.
        backend: ``None``/``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"naive"`` or ``"triton"``.
    Returns:
        ``(spikes, v_final)``: binary spikes ``[B, T, C]`` in x's dtype and the final membrane ``[B, C]`` fp32.

    Saved for backward: ``naive`` keeps autograd's per-token graph; ``torch`` and ``triton`` keep the fp32
    pre-spike membrane ``h`` ``[B, T, C]`` (Triton writes it only when a gradient is needed) plus v0, tau, v_th.
    """
    check_sequence("x", x)
    if reset not in RESETS:
        raise ValueError(f"reset={reset!r} is not one of 'hard', 'soft'")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r} must be a number > 0 (the ATan surrogate width)")
    if isinstance(tau, int | float) and not isinstance(tau, bool) and tau <= 0:
        raise ValueError(f"tau={tau!r} must be > 0 (the membrane time constant; SpikeGPT uses 2.0)")
    channels = x.shape[2]
    membrane = check_state("v0", v0, x)
    tau_c = channel_parameter("tau", tau, channels, x)
    threshold = channel_parameter("v_th", v_th, channels, x)
    hard_reset, alpha = reset == "hard", float(alpha)
    # Why this path: Triton fuses the whole time loop into one pass over x on CUDA; on CPU it only runs in the
    # interpreter, so the torch path (vectorised over B*C, looped over T) is the default there.
    chosen = resolve_backend(backend, x, membrane)
    if chosen == "naive":
        return lif_scan_naive(x, membrane, tau_c, threshold, hard_reset, alpha)
    if chosen == "torch":
        return lif_scan_torch(x, membrane, tau_c, threshold, hard_reset, alpha)
    from .fused_recurrent import lif_scan_triton  # imported late: importing triton is slow and CUDA-only here

    return lif_scan_triton(x, membrane, tau_c, threshold, hard_reset, alpha)
