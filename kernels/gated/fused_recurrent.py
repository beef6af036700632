"""Triton kernels for the gated scan: elementwise over B*C, sequential over T, one program per (batch, channel block).

Programs walk the sequence in tiles of ``BLOCK_T`` tokens (one ``[BLOCK_T, BLOCK_C]`` load per tile, then the
recurrence over the tile's rows in registers), so the loop over T is not bound by memory latency.

Forward reads x once and writes the counts once; it saves nothing beyond its inputs. Backward, in one kernel:

1. forward sweep for the forget gate: ``dL/df = sum_t dL/da_t J_t + dL/dI_final J_{T-1}`` with the forward-mode
   tangent ``J_t = dI_t/df = f J_{t-1} + I_{t-1} - x_t`` (I is recomputed from x; nothing is stored, and the
   recurrence is a contraction since 0 < f < 1);
2. reverse sweep for x and i0: ``dL/dI_t = dL/da_t + f dL/dI_{t+1}`` with the straight-through
   ``dL/da_t = g_t / theta``; ``dL/dx_t = (1 - f) dL/dI_t``. It needs no forward state at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tiles import tile_row
from ..utils import channel_launch_config


@triton.jit
def _gated_fwd_kernel(
    x_ptr,  # [B, T, C] input, any float dtype (upcast to fp32 on load)
    f_ptr,  # [C] fp32 forget gate
    th_ptr,  # [C] fp32 quantisation step theta
    i0_ptr,  # [B, C] fp32 initial integrated current
    acc0_ptr,  # [B, C] fp32 initial accumulator
    counts_ptr,  # [B, T, C] out: integer-valued counts in x's dtype
    i_final_ptr,  # [B, C] out: fp32 final integrated current
    acc_final_ptr,  # [B, C] out: fp32 final accumulator
    T,  # tokens
    C,  # channels
    LEVELS: tl.constexpr,  # largest count 2**bits - 1
    BLOCK_T: tl.constexpr,  # tokens per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    cols = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    rows = tl.arange(0, BLOCK_T)
    forget = tl.load(f_ptr + cols, mask=col_mask, other=0.5)
    threshold = tl.load(th_ptr + cols, mask=col_mask, other=1.0)
    current = tl.load(i0_ptr + i_b * C + cols, mask=col_mask, other=0.0)
    accumulator = tl.load(acc0_ptr + i_b * C + cols, mask=col_mask, other=0.0)
    seq_start = i_b.to(tl.int64) * T * C
    for t0 in range(0, T, BLOCK_T):
        tokens = t0 + rows
        offsets = seq_start + tokens[:, None].to(tl.int64) * C + cols[None, :]
        tile_mask = (tokens[:, None] < T) & col_mask[None, :]
        gated_input = (1.0 - forget[None, :]) * tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        counts = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(BLOCK_T):
            row = rows[:, None] == i
            valid = (t0 + i + cols * 0) < T  # the last tile may run past T: keep the state there
            new_current = forget * current + tile_row(gated_input, row)
            accumulated = accumulator + new_current
            # clamp(trunc(a / theta), -L, L) == sign(a) min(floor(|a| / theta), L), with IEEE division as in torch.
            quotient = tl.math.div_rn(accumulated, threshold)
            count = tl.where(quotient >= 0, tl.floor(quotient), tl.ceil(quotient))
            count = tl.minimum(tl.maximum(count, -LEVELS), LEVELS)
            current = tl.where(valid, new_current, current)
            accumulator = tl.where(valid, accumulated - threshold * count, accumulator)  # keeps the quantisation error
            counts = tl.where(row, count[None, :], counts)
        tl.store(counts_ptr + offsets, counts.to(counts_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(i_final_ptr + i_b * C + cols, current, mask=col_mask)
    tl.store(acc_final_ptr + i_b * C + cols, accumulator, mask=col_mask)


@triton.jit
def _gated_bwd_kernel(
    x_ptr,  # [B, T, C] input, any float dtype
    f_ptr,  # [C] fp32 forget gate
    th_ptr,  # [C] fp32 quantisation step theta
    i0_ptr,  # [B, C] fp32 initial integrated current
    grad_counts_ptr,  # [B, T, C] upstream gradient of the counts (any float dtype)
    grad_i_final_ptr,  # [B, C] fp32 upstream gradient of the final integrated current
    grad_x_ptr,  # [B, T, C] out: gradient of x, x's dtype
    grad_f_ptr,  # [B, C] out: fp32 gradient of f summed over T (torch sums over B)
    grad_i0_ptr,  # [B, C] out: fp32 gradient of i0
    T,  # tokens
    C,  # channels
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    cols = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    rows = tl.arange(0, BLOCK_T)
    forget = tl.load(f_ptr + cols, mask=col_mask, other=0.5)
    threshold = tl.load(th_ptr + cols, mask=col_mask, other=1.0)
    grad_i_final = tl.load(grad_i_final_ptr + i_b * C + cols, mask=col_mask, other=0.0)
    seq_start = i_b.to(tl.int64) * T * C

    # 1. Forward sweep: dL/df through the tangent J_t = dI_t/df.
    current = tl.load(i0_ptr + i_b * C + cols, mask=col_mask, other=0.0)
    tangent = tl.zeros([BLOCK_C], dtype=tl.float32)
    grad_f = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tokens = t0 + rows
        offsets = seq_start + tokens[:, None].to(tl.int64) * C + cols[None, :]
        tile_mask = (tokens[:, None] < T) & col_mask[None, :]
        x_tile = tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        grad_acc = tl.load(grad_counts_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32) / threshold[None, :]
        gated_input = (1.0 - forget[None, :]) * x_tile
        for i in tl.static_range(BLOCK_T):
            row = rows[:, None] == i
            valid = (t0 + i + cols * 0) < T
            tangent = tl.where(valid, forget * tangent + current - tile_row(x_tile, row), tangent)
            current = tl.where(valid, forget * current + tile_row(gated_input, row), current)
            grad_f += tile_row(grad_acc, row) * tangent  # rows past T have grad_acc = 0
    grad_f += grad_i_final * tangent

    # 2. Reverse sweep: dL/dI_t = g_t / theta + f dL/dI_{t+1};  dL/dx_t = (1 - f) dL/dI_t.
    carry = grad_i_final  # f dL/dI_{t+1}, or the final state's gradient at t = T - 1
    n_tiles = tl.cdiv(T, BLOCK_T)
    for j in range(0, n_tiles):
        t0 = (n_tiles - 1 - j) * BLOCK_T
        tokens = t0 + rows
        offsets = seq_start + tokens[:, None].to(tl.int64) * C + cols[None, :]
        tile_mask = (tokens[:, None] < T) & col_mask[None, :]
        grad_acc = tl.load(grad_counts_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32) / threshold[None, :]
        grad_current = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for r in tl.static_range(BLOCK_T):
            i = BLOCK_T - 1 - r
            row = rows[:, None] == i
            valid = (t0 + i + cols * 0) < T
            grad_i = tile_row(grad_acc, row) + carry
            grad_current = tl.where(row, grad_i[None, :], grad_current)
            carry = tl.where(valid, forget * grad_i, carry)
        grad_x = (1.0 - forget[None, :]) * grad_current
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(grad_f_ptr + i_b * C + cols, grad_f, mask=col_mask)
    tl.store(grad_i0_ptr + i_b * C + cols, carry, mask=col_mask)


# Tokens per tile: more tokens keep more loads in flight per warp (only B*C sequences run in parallel, so latency,
# not bandwidth, limits short tiles), bounded by registers. sm_90 ptxas reports
# fwd 109 / bwd 114 registers at 16 tokens; 32 would still fit (130 / 168).
FWD_BLOCK_T = 16
BWD_BLOCK_T = 16


def gated_fwd(
    x: torch.Tensor, forget: torch.Tensor, threshold: torch.Tensor, i0: torch.Tensor, acc0: torch.Tensor, levels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward: ``(counts [B, T, C] x.dtype, i_final [B, C] fp32, acc_final [B, C] fp32)``."""
    batch, seq_len, channels = x.shape
    counts = torch.empty_like(x)
    i_final, acc_final = torch.empty_like(i0), torch.empty_like(acc0)
    block_c, num_warps = channel_launch_config(batch, channels)
    block_t = FWD_BLOCK_T
    grid = (batch, triton.cdiv(channels, block_c))
    # enable_fp_fusion=False: no fused multiply-adds, so the fp32 arithmetic (and every count) matches torch.
    _gated_fwd_kernel[grid](
        x, forget, threshold, i0, acc0, counts, i_final, acc_final, seq_len, channels,
        LEVELS=levels, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return counts, i_final, acc_final


def gated_bwd(
    x: torch.Tensor,
    forget: torch.Tensor,
    threshold: torch.Tensor,
    i0: torch.Tensor,
    grad_counts: torch.Tensor,
    grad_i_final: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: gradients of ``(x [B, T, C], f [C], i0 [B, C])``."""
    batch, seq_len, channels = x.shape
    grad_x = torch.empty_like(x)
    grad_f, grad_i0 = torch.empty_like(i0), torch.empty_like(i0)
    block_c, num_warps = channel_launch_config(batch, channels)
    block_t = BWD_BLOCK_T
    grid = (batch, triton.cdiv(channels, block_c))
    _gated_bwd_kernel[grid](
        x, forget, threshold, i0, grad_counts, grad_i_final, grad_x, grad_f, grad_i0, seq_len, channels,
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return grad_x, grad_f.sum(0), grad_i0


class GatedScanTriton(torch.autograd.Function):
    """Saves only its inputs (x, f, theta, i0): the backward recomputes I in its forward sweep."""

    @staticmethod
    def forward(ctx, x, forget, i0, acc0, threshold, levels: int):
        x, forget, i0, acc0, threshold = (t.contiguous() for t in (x, forget, i0, acc0, threshold))
        counts, i_final, acc_final = gated_fwd(x, forget, threshold, i0, acc0, levels)
        ctx.save_for_backward(x, forget, threshold, i0)
        ctx.mark_non_differentiable(acc_final)
        return counts, i_final, acc_final

    @staticmethod
    def backward(ctx, grad_counts, grad_i_final, _grad_acc_final):
        x, forget, threshold, i0 = ctx.saved_tensors
        grad_counts = torch.zeros_like(x) if grad_counts is None else grad_counts.contiguous()
        grad_i_final = torch.zeros_like(i0) if grad_i_final is None else grad_i_final.float().contiguous()
        grad_x, grad_f, grad_i0 = gated_bwd(x, forget, threshold, i0, grad_counts, grad_i_final)
        grad_acc0 = torch.zeros_like(i0) if ctx.needs_input_grad[3] else None  # straight-through: none reaches acc0
        return grad_x, grad_f, grad_i0, grad_acc0, None, None


def gated_scan_triton(
    x: torch.Tensor, forget: torch.Tensor, i0: torch.Tensor, acc0: torch.Tensor, threshold: torch.Tensor, levels: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Triton gated scan; same arguments and returns as :func:`~.naive.gated_scan_naive`."""
    counts, i_final, acc_final = GatedScanTriton.apply(x, forget, i0, acc0, threshold, levels)
    return counts, (i_final, acc_final)
