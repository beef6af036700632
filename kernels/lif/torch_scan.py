"""The torch path of the LIF scan (the CPU default).

The spike rule makes the recurrence nonlinear, so time stays a loop; what this path saves over the naive oracle is
the autograd graph: the forward loop runs under one ``autograd.Function`` with a handful of ``[B, C]`` ops per
token, and the backward computes every surrogate term for all tokens at once, leaving only the two-op linear
adjoint recurrence ``gv_{t-1} = (gs_t sg_t + gv_t dv_t/dh_t)(1 - 1/tau)`` sequential.

Saved for backward: the pre-spike membrane ``h`` ``[B, T, C]`` fp32 and ``v0``; spikes and resets are recomputed
from ``h`` (the same fp32 comparison as the forward, so they match bit for bit).
"""

from __future__ import annotations

import torch

from .naive import atan_surrogate


def _reset(charged: torch.Tensor, spike: torch.Tensor, v_th: torch.Tensor, hard_reset: bool) -> torch.Tensor:
    return charged * (1.0 - spike) if hard_reset else charged - spike * v_th


class LIFScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v0, tau, v_th, hard_reset: bool, alpha: float):
        batch, seq_len, channels = x.shape
        x32 = x.float()
        charged_all = torch.empty(batch, seq_len, channels, dtype=torch.float32, device=x.device)
        membrane = v0
        for t in range(seq_len):
            # Same expression and order as the oracle, so threshold crossings agree bit for bit.
            charged = membrane + (x32[:, t] - membrane) / tau
            charged_all[:, t] = charged
            membrane = _reset(charged, (charged >= v_th).float(), v_th, hard_reset)
        spikes = (charged_all >= v_th).to(x.dtype)
        ctx.save_for_backward(charged_all, v0, tau, v_th)
        ctx.hard_reset, ctx.alpha, ctx.x_dtype = hard_reset, alpha, x.dtype
        return spikes, membrane

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_final):
        charged, v0, tau, v_th = ctx.saved_tensors  # [B, T, C], [B, C], [C], [C]
        seq_len = charged.shape[1]
        spike = (charged >= v_th).float()
        surrogate = atan_surrogate(charged - v_th, ctx.alpha)
        if ctx.hard_reset:  # v = h (1 - s(h)): the reset path is differentiated too (not detached)
            dv_dh = 1.0 - spike - charged * surrogate
            dv_dth = charged * surrogate
        else:  # v = h - s(h) v_th
            dv_dh = 1.0 - v_th * surrogate
            dv_dth = v_th * surrogate - spike
        grad_spikes = torch.zeros_like(charged) if grad_spikes is None else grad_spikes.float()
        grad_v_final = torch.zeros_like(v0) if grad_v_final is None else grad_v_final.float()
        grad_v = grad_v_final
        direct = grad_spikes * surrogate  # dL/dh through the spike output of the same token
        keep = 1.0 - 1.0 / tau  # dh_t / dv_{t-1}
        grad_charged = torch.empty_like(charged)
        for t in range(seq_len - 1, -1, -1):
            grad_h = direct[:, t] + grad_v * dv_dh[:, t]
            grad_charged[:, t] = grad_h
            grad_v = grad_h * keep
        # Adjoint of v_t for every t: from h_{t+1}, and the upstream gradient of v_final at t = T - 1.
        grad_membrane = torch.cat([grad_charged[:, 1:] * keep, grad_v_final[:, None]], 1)
        grad_x = (grad_charged / tau).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_tau = grad_th = None
        if ctx.needs_input_grad[2]:
            # h = v + (x - v) / tau  =>  dh/dtau = -(x - v) / tau^2 = -(h - v) / tau; v_{t-1} recomputed from h.
            previous = torch.cat([v0[:, None], _reset(charged[:, :-1], spike[:, :-1], v_th, ctx.hard_reset)], 1)
            grad_tau = -(grad_charged * (charged - previous)).sum((0, 1)) / tau
        if ctx.needs_input_grad[3]:
            grad_th = (grad_membrane * dv_dth - direct).sum((0, 1))
        return grad_x, grad_v, grad_tau, grad_th, None, None


def lif_scan_torch(
    x: torch.Tensor, v0: torch.Tensor, tau: torch.Tensor, v_th: torch.Tensor, hard_reset: bool, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch-path LIF scan; same arguments and returns as :func:`~.naive.lif_scan_naive`."""
    return LIFScanTorch.apply(x, v0, tau, v_th, hard_reset, alpha)
