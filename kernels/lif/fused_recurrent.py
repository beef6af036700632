"""Triton kernels for the LIF scan: elementwise over B*C, sequential over T, one program per (batch, channel block).

Each program walks the sequence in tiles of ``BLOCK_T`` tokens: it loads a ``[BLOCK_T, BLOCK_C]`` tile of the input
at once (all loads of the tile in flight together, instead of one dependent load per token) and runs the
recurrence over the tile's rows in registers, so the loop over T is not bound by memory latency.

Forward reads x once and writes the spikes once; when autograd needs it, it also writes the pre-spike membrane
``h`` ``[B, T, C]`` fp32, which is all the backward needs (spikes, resets and ``v_{t-1}`` are recomputed from it
with the same fp32 comparison). Backward walks the tiles in reverse, carrying ``dL/dv`` in registers; the surrogate
terms of a tile are computed for all its rows at once, only the two-op adjoint recurrence is sequential. The
per-channel gradients of tau and v_th are summed over T in registers and over B in torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..utils import channel_launch_config


@triton.jit
def _reset(charged, spike, threshold, HARD_RESET: tl.constexpr):
    if HARD_RESET:
        return charged * (1.0 - spike)
    else:
        return charged - spike * threshold


@triton.jit
def _lif_fwd_kernel(
    x_ptr,  # [B, T, C] input current, any float dtype (upcast to fp32 on load)
    v0_ptr,  # [B, C] fp32 initial membrane
    tau_ptr,  # [C] fp32 time constant
    th_ptr,  # [C] fp32 threshold
    spikes_ptr,  # [B, T, C] out: binary spikes in x's dtype
    h_ptr,  # [B, T, C] out: fp32 pre-spike membrane, written only if SAVE_H
    v_final_ptr,  # [B, C] out: fp32 final membrane
    T,  # tokens
    C,  # channels
    HARD_RESET: tl.constexpr,  # reset to 0 (True) or subtract v_th (False)
    SAVE_H: tl.constexpr,  # write h for the backward
    BLOCK_T: tl.constexpr,  # tokens per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    cols = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    rows = tl.arange(0, BLOCK_T)
    tau = tl.load(tau_ptr + cols, mask=col_mask, other=1.0)
    threshold = tl.load(th_ptr + cols, mask=col_mask, other=1.0)
    membrane = tl.load(v0_ptr + i_b * C + cols, mask=col_mask, other=0.0)
    seq_start = i_b.to(tl.int64) * T * C
    for t0 in range(0, T, BLOCK_T):
        tokens = t0 + rows
        offsets = seq_start + tokens[:, None].to(tl.int64) * C + cols[None, :]
        tile_mask = (tokens[:, None] < T) & col_mask[None, :]
        x_tile = tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        h_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(BLOCK_T):
            row = rows[:, None] == i
            x = tl.sum(tl.where(row, x_tile, 0.0), axis=0)  # row i of the tile, a register select after unrolling
            # Same expression and IEEE division as the torch paths, so threshold crossings agree bit for bit.
            charged = membrane + tl.math.div_rn(x - membrane, tau)
            spike = (charged >= threshold).to(tl.float32)
            valid = (t0 + i + cols * 0) < T  # the last tile may run past T: keep the state there
            membrane = tl.where(valid, _reset(charged, spike, threshold, HARD_RESET), membrane)
            h_tile = tl.where(row, charged[None, :], h_tile)
        # Through fp32: the interpreter cannot cast a boolean tile to bf16 directly.
        spikes = (h_tile >= threshold[None, :]).to(tl.float32).to(spikes_ptr.dtype.element_ty)
        tl.store(spikes_ptr + offsets, spikes, mask=tile_mask)
        if SAVE_H:
            tl.store(h_ptr + offsets, h_tile, mask=tile_mask)
    tl.store(v_final_ptr + i_b * C + cols, membrane, mask=col_mask)


@triton.jit
def _lif_bwd_kernel(
    h_ptr,  # [B, T, C] fp32 pre-spike membrane saved by the forward
    v0_ptr,  # [B, C] fp32 initial membrane
    tau_ptr,  # [C] fp32 time constant
    th_ptr,  # [C] fp32 threshold
    grad_spikes_ptr,  # [B, T, C] upstream gradient of the spikes (any float dtype)
    grad_v_final_ptr,  # [B, C] fp32 upstream gradient of the final membrane
    grad_x_ptr,  # [B, T, C] out: gradient of x, x's dtype
    grad_v0_ptr,  # [B, C] out: fp32 gradient of v0
    grad_tau_ptr,  # [B, C] out: fp32 gradient of tau, summed over T (torch sums over B)
    grad_th_ptr,  # [B, C] out: fp32 gradient of v_th, summed over T
    T,  # tokens
    C,  # channels
    alpha,  # ATan surrogate width
    slope,  # pi * alpha / 2, the surrogate's slope at the threshold
    HARD_RESET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    cols = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    rows = tl.arange(0, BLOCK_T)
    tau = tl.load(tau_ptr + cols, mask=col_mask, other=1.0)
    threshold = tl.load(th_ptr + cols, mask=col_mask, other=1.0)
    v0 = tl.load(v0_ptr + i_b * C + cols, mask=col_mask, other=0.0)
    grad_v = tl.load(grad_v_final_ptr + i_b * C + cols, mask=col_mask, other=0.0)  # dL/dv_t, carried backwards
    keep = 1.0 - 1.0 / tau  # dh_t / dv_{t-1}
    grad_tau = tl.zeros([BLOCK_C], dtype=tl.float32)
    grad_th = tl.zeros([BLOCK_C], dtype=tl.float32)
    seq_start = i_b.to(tl.int64) * T * C
    n_tiles = tl.cdiv(T, BLOCK_T)
    for j in range(0, n_tiles):
        t0 = (n_tiles - 1 - j) * BLOCK_T
        tokens = t0 + rows
        offsets = seq_start + tokens[:, None].to(tl.int64) * C + cols[None, :]
        valid = (tokens[:, None] < T) & col_mask[None, :]
        charged = tl.load(h_ptr + offsets, mask=valid, other=0.0)
        grad_spike = tl.load(grad_spikes_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        # v_{t-1}: the reset of h_{t-1} (the row above, or the previous tile's last row), v0 for t = 0.
        has_previous = valid & (tokens[:, None] >= 1)
        charged_prev = tl.load(h_ptr + offsets - C, mask=has_previous, other=0.0)
        spike_prev = (charged_prev >= threshold[None, :]).to(tl.float32)
        previous = tl.where(has_previous, _reset(charged_prev, spike_prev, threshold[None, :], HARD_RESET), v0[None, :])
        # Surrogate terms for all rows of the tile at once.
        spike = (charged >= threshold[None, :]).to(tl.float32)
        scaled = slope * (charged - threshold[None, :])
        surrogate = alpha / (2.0 * (1.0 + scaled * scaled))
        if HARD_RESET:  # v = h (1 - s(h)); the reset path is differentiated, not detached
            dv_dh = 1.0 - spike - charged * surrogate
            dv_dth = charged * surrogate
        else:  # v = h - s(h) v_th
            dv_dh = 1.0 - threshold[None, :] * surrogate
            dv_dth = threshold[None, :] * surrogate - spike
        direct = tl.where(valid, grad_spike * surrogate, 0.0)
        # Sequential part: dL/dh_t = direct_t + dL/dv_t dv_t/dh_t;  dL/dv_{t-1} = dL/dh_t (1 - 1/tau).
        grad_h_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        grad_v_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # dL/dv_t of each row
        for r in tl.static_range(BLOCK_T):
            i = BLOCK_T - 1 - r
            row = rows[:, None] == i
            in_range = (t0 + i + cols * 0) < T
            grad_h = tl.sum(tl.where(row, direct, 0.0), axis=0) + grad_v * tl.sum(tl.where(row, dv_dh, 0.0), axis=0)
            grad_h = tl.where(in_range, grad_h, 0.0)
            grad_v_tile = tl.where(row, tl.where(in_range, grad_v, 0.0)[None, :], grad_v_tile)
            grad_h_tile = tl.where(row, grad_h[None, :], grad_h_tile)
            grad_v = tl.where(in_range, grad_h * keep, grad_v)
        tl.store(grad_x_ptr + offsets, (grad_h_tile / tau[None, :]).to(grad_x_ptr.dtype.element_ty), mask=valid)
        # h = v + (x - v) / tau  =>  dh/dtau = -(x - v) / tau^2 = -(h - v) / tau
        grad_tau += tl.sum(tl.where(valid, -grad_h_tile * (charged - previous), 0.0), axis=0) / tau
        grad_th += tl.sum(tl.where(valid, grad_v_tile * dv_dth - direct, 0.0), axis=0)
    tl.store(grad_v0_ptr + i_b * C + cols, grad_v, mask=col_mask)
    tl.store(grad_tau_ptr + i_b * C + cols, grad_tau, mask=col_mask)
    tl.store(grad_th_ptr + i_b * C + cols, grad_th, mask=col_mask)


# Tokens per tile: more tokens keep more loads in flight per warp (only B*C sequences run in parallel, so latency,
# not bandwidth, limits short tiles), bounded by registers. sm_90 ptxas reports
# fwd 150 / bwd 186 registers at 16 tokens, 80 / 108 at 8; 32 spills in the backward.
FWD_BLOCK_T = 16
BWD_BLOCK_T = 16


def lif_fwd(
    x: torch.Tensor, v0: torch.Tensor, tau: torch.Tensor, v_th: torch.Tensor, hard_reset: bool, save_h: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward: ``(spikes [B, T, C] x.dtype, v_final [B, C] fp32, h [B, T, C] fp32 or None)``."""
    batch, seq_len, channels = x.shape
    spikes = torch.empty_like(x)
    v_final = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    charged = torch.empty(batch, seq_len, channels, dtype=torch.float32, device=x.device) if save_h else v_final
    block_c, num_warps = channel_launch_config(batch, channels)
    block_t = FWD_BLOCK_T
    grid = (batch, triton.cdiv(channels, block_c))
    # enable_fp_fusion=False: no fused multiply-adds, so the fp32 arithmetic (and every spike) matches torch.
    _lif_fwd_kernel[grid](
        x, v0, tau, v_th, spikes, charged, v_final, seq_len, channels,
        HARD_RESET=hard_reset, SAVE_H=save_h, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return spikes, v_final, charged if save_h else None


def lif_bwd(
    charged: torch.Tensor,
    v0: torch.Tensor,
    tau: torch.Tensor,
    v_th: torch.Tensor,
    grad_spikes: torch.Tensor,
    grad_v_final: torch.Tensor,
    hard_reset: bool,
    alpha: float,
    x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: gradients of ``(x [B, T, C], v0 [B, C], tau [C], v_th [C])``."""
    batch, seq_len, channels = charged.shape
    grad_x = torch.empty(batch, seq_len, channels, dtype=x_dtype, device=charged.device)
    grad_v0, grad_tau, grad_th = (torch.empty_like(v0) for _ in range(3))
    block_c, num_warps = channel_launch_config(batch, channels)
    block_t = BWD_BLOCK_T
    grid = (batch, triton.cdiv(channels, block_c))
    _lif_bwd_kernel[grid](
        charged, v0, tau, v_th, grad_spikes, grad_v_final, grad_x, grad_v0, grad_tau, grad_th,
        seq_len, channels, alpha, 0.5 * math.pi * alpha,
        HARD_RESET=hard_reset, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return grad_x, grad_v0, grad_tau.sum(0), grad_th.sum(0)


class LIFScanTriton(torch.autograd.Function):
    """Saves the fp32 pre-spike membrane ``h`` ``[B, T, C]`` (written by the forward kernel), v0, tau and v_th."""

    @staticmethod
    def forward(ctx, x, v0, tau, v_th, hard_reset: bool, alpha: float):
        x, v0, tau, v_th = (t.contiguous() for t in (x, v0, tau, v_th))
        save_h = any(ctx.needs_input_grad[:4])
        spikes, v_final, charged = lif_fwd(x, v0, tau, v_th, hard_reset, save_h)
        if save_h:
            ctx.save_for_backward(charged, v0, tau, v_th)
        ctx.hard_reset, ctx.alpha, ctx.x_dtype = hard_reset, alpha, x.dtype
        return spikes, v_final

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_final):
        charged, v0, tau, v_th = ctx.saved_tensors
        grad_spikes = torch.zeros_like(charged) if grad_spikes is None else grad_spikes.contiguous()
        grad_v_final = torch.zeros_like(v0) if grad_v_final is None else grad_v_final.float().contiguous()
        grads = lif_bwd(charged, v0, tau, v_th, grad_spikes, grad_v_final, ctx.hard_reset, ctx.alpha, ctx.x_dtype)
        return (*grads, None, None)


def lif_scan_triton(
    x: torch.Tensor, v0: torch.Tensor, tau: torch.Tensor, v_th: torch.Tensor, hard_reset: bool, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton LIF scan; same arguments and returns as :func:`~.naive.lif_scan_naive`."""
    return LIFScanTriton.apply(x, v0, tau, v_th, hard_reset, alpha)
