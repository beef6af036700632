"""The torch path of the gated scan (the CPU default).

The quantiser makes the accumulator sequential, so the forward is a loop over T of a few ``[B, C]`` ops under one
``autograd.Function`` (no per-token graph). The backward needs no nonlinear state: with the straight-through
rule ``dL/da_t = g_t / theta`` and ``dL/dI_t = dL/da_t + f dL/dI_{t+1}``, a one-op reverse recurrence; the rest
is vectorised over all tokens.

Saved for backward: the integrated current ``I`` ``[B, T, C]`` fp32 (for the forget gate's gradient) and ``x``.
"""

from __future__ import annotations

import torch

from .naive import quantise


class GatedScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forget, i0, acc0, threshold, levels: int):
        batch, seq_len, channels = x.shape
        # (1 - f) x_t for every token at once: the same elementwise product the oracle computes per token.
        gated_input = (1.0 - forget) * x.float()
        current_all = torch.empty(batch, seq_len, channels, dtype=torch.float32, device=x.device)
        counts = torch.empty_like(current_all)
        current, accumulator = i0, acc0
        for t in range(seq_len):
            current = forget * current + gated_input[:, t]
            accumulated = accumulator + current
            count = quantise(accumulated, threshold, levels)
            accumulator = accumulated - threshold * count  # keep the quantisation error for the next token
            current_all[:, t] = current
            counts[:, t] = count
        ctx.save_for_backward(x, forget, i0, threshold, current_all)
        ctx.mark_non_differentiable(accumulator)
        return counts.to(x.dtype), current, accumulator

    @staticmethod
    def backward(ctx, grad_counts, grad_i_final, _grad_acc_final):
        x, forget, i0, threshold, current_all = ctx.saved_tensors
        seq_len = x.shape[1]
        grad_acc = torch.zeros_like(current_all) if grad_counts is None else grad_counts.float() / threshold
        carry = torch.zeros_like(i0) if grad_i_final is None else grad_i_final.float()  # dL/dI_t from I_{t+1}
        grad_current = torch.empty_like(current_all)
        for t in range(seq_len - 1, -1, -1):
            grad_i = grad_acc[:, t] + carry
            grad_current[:, t] = grad_i
            carry = forget * grad_i
        grad_x = ((1.0 - forget) * grad_current).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_forget = None
        if ctx.needs_input_grad[1]:
            previous = torch.cat([i0[:, None], current_all[:, :-1]], 1)  # I_{t-1}
            grad_forget = (grad_current * (previous - x.float())).sum((0, 1))  # dI_t/df = I_{t-1} - x_t
        grad_acc0 = torch.zeros_like(i0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_forget, carry, grad_acc0, None, None


def gated_scan_torch(
    x: torch.Tensor, forget: torch.Tensor, i0: torch.Tensor, acc0: torch.Tensor, threshold: torch.Tensor, levels: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Torch-path gated scan; same arguments and returns as :func:`~.naive.gated_scan_naive`."""
    counts, current, accumulator = GatedScanTorch.apply(x, forget, i0, acc0, threshold, levels)
    return counts, (current, accumulator)
