"""Float32 reference loop for the gated scan: the test oracle. Autograd runs through the loop; the quantiser is
straight-through (``d count / d a = 1 / theta``) and the error-keeping accumulator is a detached state."""

from __future__ import annotations

import torch


def quantise(accumulated: torch.Tensor, threshold: torch.Tensor, levels: int) -> torch.Tensor:
    """``sign(a) min(floor(|a| / theta), L)``, written as ``clamp(trunc(a / theta), -L, L)``.

    The two are equal bit for bit (IEEE division is sign-symmetric) and the second is three ops. Every path uses
    this exact expression so that counts agree bit for bit across backends.
    """
    return torch.clamp(torch.trunc(accumulated / threshold), -levels, levels)


class _StraightThroughCount(torch.autograd.Function):
    """Multi-bit count of the accumulator with the straight-through gradient ``1 / theta``."""

    @staticmethod
    def forward(ctx, accumulated: torch.Tensor, threshold: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward(threshold)
        return quantise(accumulated, threshold, levels)

    @staticmethod
    def backward(ctx, grad_count: torch.Tensor):
        (threshold,) = ctx.saved_tensors
        return grad_count / threshold, None, None


def gated_scan_naive(
    x: torch.Tensor,
    forget: torch.Tensor,
    i0: torch.Tensor,
    acc0: torch.Tensor,
    threshold: torch.Tensor,
    levels: int,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Token-by-token gated neuron in float32.

    Args:
        x: input ``[B, T, C]`` (any float dtype; upcast to fp32).
        forget: forget gate ``f`` ``[C]`` fp32 in (0, 1).
        i0, acc0: initial integrated current and accumulator ``[B, C]`` fp32.
        threshold: quantisation step ``theta`` ``[C]`` fp32 (no gradient).
        levels: largest count ``L = 2**bits - 1``.
    Returns:
        ``(counts [B, T, C] in x's dtype, (i_final, acc_final) [B, C] fp32)``.
    """
    x32 = x.float()
    current, accumulator = i0, acc0.detach()
    counts = []
    for t in range(x.shape[1]):
        current = forget * current + (1.0 - forget) * x32[:, t]
        accumulated = accumulator + current
        count = _StraightThroughCount.apply(accumulated, threshold, levels)
        # d acc / d a = 1 - theta / theta = 0 under the straight-through rule: the accumulator carries no gradient.
        accumulator = (accumulated - threshold * count).detach()
        counts.append(count)
    return torch.stack(counts, dim=1).to(x.dtype), (current, accumulator)
