"""Float32 reference loop for the LIF scan: the test oracle. Autograd runs through the loop; the only custom
gradient is the ATan surrogate of the spike (the Heaviside step has zero gradient almost everywhere)."""

from __future__ import annotations

import math

import torch


def atan_surrogate(membrane_minus_threshold: torch.Tensor, alpha: float) -> torch.Tensor:
    """SpikeGPT's ATan surrogate ``ds/dh = alpha / (2 (1 + (pi alpha (h - v_th) / 2)^2))``, elementwise."""
    return alpha / (2.0 * (1.0 + (0.5 * math.pi * alpha * membrane_minus_threshold) ** 2))


class _ATanSpike(torch.autograd.Function):
    """Binary spike ``1[h >= v_th]`` whose backward is the ATan surrogate, for ``h`` and (negated) ``v_th``."""

    @staticmethod
    def forward(ctx, membrane: torch.Tensor, threshold: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(membrane, threshold)
        ctx.alpha = alpha
        return (membrane >= threshold).to(membrane.dtype)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor):
        membrane, threshold = ctx.saved_tensors
        grad_membrane = grad_spike * atan_surrogate(membrane - threshold, ctx.alpha)
        # threshold is [C] while membrane is [B, C]: reduce the broadcast batch axis.
        return grad_membrane, -grad_membrane.sum(0), None


def lif_scan_naive(
    x: torch.Tensor,
    v0: torch.Tensor,
    tau: torch.Tensor,
    v_th: torch.Tensor,
    hard_reset: bool,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token LIF in float32.

    Args:
        x: input current ``[B, T, C]`` (any float dtype; upcast to fp32).
        v0: initial membrane ``[B, C]`` fp32.
        tau, v_th: time constant and threshold ``[C]`` fp32.
        hard_reset: reset to 0 after a spike (True) or subtract ``v_th`` (False).
        alpha: ATan surrogate width.
    Returns:
        ``(spikes [B, T, C] in x's dtype, v_final [B, C] fp32)``.
    """
    x32 = x.float()
    membrane = v0
    spikes = []
    for t in range(x.shape[1]):
        charged = membrane + (x32[:, t] - membrane) / tau
        spike = _ATanSpike.apply(charged, v_th, alpha)
        membrane = charged * (1.0 - spike) if hard_reset else charged - spike * v_th
        spikes.append(spike)
    return torch.stack(spikes, dim=1).to(x.dtype), membrane
