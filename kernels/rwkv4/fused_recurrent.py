"""Triton kernels for the RWKV-4 WKV scan: one program per (batch, channel block), a loop over T (any length).

Programs walk the sequence in tiles of ``BLOCK_T`` tokens: one ``[BLOCK_T, BLOCK_C]`` load per tile and input,
then the running-max recurrence over the tile's rows in registers, so the loop is not bound by memory latency.

Forward: reads k, v once, writes wkv once and the final state; it saves only its inputs and the initial state.

Backward (recompute, then reverse): the forward kernel runs again with ``STORE_STATES`` and writes the state
``(num, den, max_state)`` *before* every token to three fp32 ``[B, T, C]`` scratch tensors (freed when the backward
returns, so no activation memory is held between forward and backward). The reverse kernel then walks the tiles
from the end carrying the adjoints of the (scaled) state ``(g_num, g_den, g_max)`` in registers. It is the exact
adjoint of the forward's arithmetic, maxima included (a tie sends half the gradient each way, as
``torch.maximum`` does), so it matches autograd through the naive loop, the initial state's gradients too. Adjoints
of the scaled state stay bounded (a token's weight relative to the running max is <= 1), whatever the decay.
Everything that does not depend on the carried adjoints (the output's softmax weights, wkv, dL/dwkv terms, the
branch of each max) is computed for the whole tile at once; the per-token chain is a few fused multiply-adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tiles import tile_row
from ..utils import channel_launch_config


@triton.jit
def _rwkv4_fwd_kernel(
    w_ptr,  # [C] fp32 decay -exp(time_decay)
    u_ptr,  # [C] fp32 bonus time_first
    k_ptr,  # [B, T, C] keys, any float dtype (upcast to fp32 on load)
    v_ptr,  # [B, T, C] values, same dtype
    num0_ptr,  # [B, C] fp32 initial state: numerator
    den0_ptr,  # [B, C] fp32 initial state: denominator
    max0_ptr,  # [B, C] fp32 initial state: running max
    wkv_ptr,  # [B, T, C] out: wkv in v's dtype, written only if STORE_OUTPUT
    num_t_ptr,  # [B, C] out: fp32 final numerator
    den_t_ptr,  # [B, C] out: fp32 final denominator
    max_t_ptr,  # [B, C] out: fp32 final running max
    num_seq_ptr,  # [B, T, C] out: fp32 numerator before each token, written only if STORE_STATES
    den_seq_ptr,  # [B, T, C] out: fp32 denominator before each token (STORE_STATES)
    max_seq_ptr,  # [B, T, C] out: fp32 running max before each token (STORE_STATES)
    T,  # tokens
    C,  # channels
    STORE_OUTPUT: tl.constexpr,
    STORE_STATES: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    cols = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    rows = tl.arange(0, BLOCK_T)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
    u = tl.load(u_ptr + cols, mask=col_mask, other=0.0)
    state_offsets = i_b * C + cols
    num = tl.load(num0_ptr + state_offsets, mask=col_mask, other=0.0)
    den = tl.load(den0_ptr + state_offsets, mask=col_mask, other=0.0)
    max_state = tl.load(max0_ptr + state_offsets, mask=col_mask, other=-1e38)
    seq_start = i_b.to(tl.int64) * T * C
    for t0 in range(0, T, BLOCK_T):
        tokens = t0 + rows
        offsets = seq_start + tokens[:, None].to(tl.int64) * C + cols[None, :]
        tile_mask = (tokens[:, None] < T) & col_mask[None, :]
        k_tile = tl.load(k_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        v_tile = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        wkv_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        num_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        den_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        max_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(BLOCK_T):
            row = rows[:, None] == i
            valid = (t0 + i + cols * 0) < T  # the last tile may run past T: keep the state there
            k, v = tile_row(k_tile, row), tile_row(v_tile, row)
            if STORE_STATES:
                num_tile = tl.where(row, num[None, :], num_tile)
                den_tile = tl.where(row, den[None, :], den_tile)
                max_tile = tl.where(row, max_state[None, :], max_tile)
            if STORE_OUTPUT:
                out_max = tl.maximum(max_state, u + k)
                e1, e2 = tl.exp(max_state - out_max), tl.exp(u + k - out_max)
                out_den = e1 * den + e2
                empty = out_den == 0  # no contribution at all yet (only k = -inf tokens): output 0, not NaN
                wkv = tl.where(empty, 0.0, (e1 * num + e2 * v) / tl.where(empty, 1.0, out_den))
                wkv_tile = tl.where(row, wkv[None, :], wkv_tile)
            new_max = tl.maximum(max_state + w, k)
            e1, e2 = tl.exp(max_state + w - new_max), tl.exp(k - new_max)
            num = tl.where(valid, e1 * num + e2 * v, num)
            den = tl.where(valid, e1 * den + e2, den)
            max_state = tl.where(valid, new_max, max_state)
        if STORE_OUTPUT:
            tl.store(wkv_ptr + offsets, wkv_tile.to(wkv_ptr.dtype.element_ty), mask=tile_mask)
        if STORE_STATES:
            tl.store(num_seq_ptr + offsets, num_tile, mask=tile_mask)
            tl.store(den_seq_ptr + offsets, den_tile, mask=tile_mask)
            tl.store(max_seq_ptr + offsets, max_tile, mask=tile_mask)
    tl.store(num_t_ptr + state_offsets, num, mask=col_mask)
    tl.store(den_t_ptr + state_offsets, den, mask=col_mask)
    tl.store(max_t_ptr + state_offsets, max_state, mask=col_mask)


@triton.jit
def _first_share(a, b):
    # d max(a, b) / da, as torch.maximum's backward: 1 if a wins, 0 if b wins, 1/2 on a tie.
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _rwkv4_bwd_kernel(
    w_ptr,  # [C] fp32 decay
    u_ptr,  # [C] fp32 bonus
    k_ptr,  # [B, T, C] keys, any float dtype
    v_ptr,  # [B, T, C] values
    num_seq_ptr,  # [B, T, C] fp32 numerator before each token (recomputed by the forward kernel)
    den_seq_ptr,  # [B, T, C] fp32 denominator before each token
    max_seq_ptr,  # [B, T, C] fp32 running max before each token
    grad_wkv_ptr,  # [B, T, C] upstream gradient of wkv (any float dtype)
    grad_num_t_ptr,  # [B, C] fp32 upstream gradient of the final numerator
    grad_den_t_ptr,  # [B, C] fp32 upstream gradient of the final denominator
    grad_max_t_ptr,  # [B, C] fp32 upstream gradient of the final running max
    grad_k_ptr,  # [B, T, C] out: gradient of k, k's dtype
    grad_v_ptr,  # [B, T, C] out: gradient of v, v's dtype
    grad_w_ptr,  # [B, C] out: fp32 gradient of w summed over T (torch sums over B)
    grad_u_ptr,  # [B, C] out: fp32 gradient of u summed over T
    grad_num0_ptr,  # [B, C] out: fp32 gradient of the initial numerator
    grad_den0_ptr,  # [B, C] out: fp32 gradient of the initial denominator
    grad_max0_ptr,  # [B, C] out: fp32 gradient of the initial running max
    T,  # tokens
    C,  # channels
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    cols = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    rows = tl.arange(0, BLOCK_T)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
    u = tl.load(u_ptr + cols, mask=col_mask, other=0.0)
    state_offsets = i_b * C + cols
    # Adjoints of the state after the current token, carried backwards.
    grad_num = tl.load(grad_num_t_ptr + state_offsets, mask=col_mask, other=0.0)
    grad_den = tl.load(grad_den_t_ptr + state_offsets, mask=col_mask, other=0.0)
    grad_max = tl.load(grad_max_t_ptr + state_offsets, mask=col_mask, other=0.0)
    grad_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    grad_u = tl.zeros([BLOCK_C], dtype=tl.float32)
    seq_start = i_b.to(tl.int64) * T * C
    n_tiles = tl.cdiv(T, BLOCK_T)
    for j in range(0, n_tiles):
        t0 = (n_tiles - 1 - j) * BLOCK_T
        tokens = t0 + rows
        offsets = seq_start + tokens[:, None].to(tl.int64) * C + cols[None, :]
        tile_mask = (tokens[:, None] < T) & col_mask[None, :]
        k = tl.load(k_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        grad_wkv = tl.load(grad_wkv_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        num = tl.load(num_seq_ptr + offsets, mask=tile_mask, other=0.0)
        den = tl.load(den_seq_ptr + offsets, mask=tile_mask, other=0.0)
        max_state = tl.load(max_seq_ptr + offsets, mask=tile_mask, other=0.0)
        w_row, u_row = w[None, :], u[None, :]

        # Output part, whole tile: wkv = (e1 num + e2 v) / (e1 den + e2), e1 = exp(max - m_o), e2 = exp(u + k - m_o).
        out_max = tl.maximum(max_state, u_row + k)
        e1, e2 = tl.exp(max_state - out_max), tl.exp(u_row + k - out_max)
        out_num, out_den = e1 * num + e2 * v, e1 * den + e2
        empty = out_den == 0
        safe_den = tl.where(empty, 1.0, out_den)
        wkv = tl.where(empty, 0.0, out_num / safe_den)
        grad_out_num = tl.where(empty, 0.0, grad_wkv / safe_den)
        grad_out_den = tl.where(empty, 0.0, -grad_wkv * wkv / safe_den)
        grad_e1 = (grad_out_num * num + grad_out_den * den) * e1  # dL/d(max - m_o)
        grad_e2 = (grad_out_num * v + grad_out_den) * e2  # dL/d(u + k - m_o)
        grad_out_max = -(grad_e1 + grad_e2)  # ~0: wkv does not depend on the stabiliser, kept for exactness
        state_first = _first_share(max_state, u_row + k)
        grad_max_direct = grad_e1 + grad_out_max * state_first  # into max_state, from the output
        grad_uk = tl.where(tile_mask, grad_e2 + grad_out_max * (1.0 - state_first), 0.0)  # into u + k
        grad_u += tl.sum(grad_uk, axis=0)

        # State update, whole tile: new = a num + b v (den: + b), a = exp(max + w - m_s), b = exp(k - m_s).
        new_max = tl.maximum(max_state + w_row, k)
        a, b = tl.exp(max_state + w_row - new_max), tl.exp(k - new_max)
        decayed_first = _first_share(max_state + w_row, k)

        # Per token, backwards: the carried adjoints meet this token's state update.
        grad_k_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        grad_v_tile = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for r in tl.static_range(BLOCK_T):
            i = BLOCK_T - 1 - r
            row = rows[:, None] == i
            valid = (t0 + i + cols * 0) < T
            a_i, b_i, v_i = tile_row(a, row), tile_row(b, row), tile_row(v, row)
            grad_a = (grad_num * tile_row(num, row) + grad_den * tile_row(den, row)) * a_i  # dL/d(max + w - m_s)
            grad_b = (grad_num * v_i + grad_den) * b_i  # dL/d(k - m_s)
            grad_new_max = grad_max - grad_a - grad_b
            share = tile_row(decayed_first, row)
            grad_decayed = grad_a + grad_new_max * share  # into max + w
            grad_k = grad_b + grad_new_max * (1.0 - share) + tile_row(grad_uk, row)
            grad_v = grad_num * b_i + tile_row(grad_out_num * e2, row)
            grad_k_tile = tl.where(row, grad_k[None, :], grad_k_tile)
            grad_v_tile = tl.where(row, grad_v[None, :], grad_v_tile)
            grad_w += tl.where(valid, grad_decayed, 0.0)
            next_num = grad_num * a_i + tile_row(grad_out_num * e1, row)
            next_den = grad_den * a_i + tile_row(grad_out_den * e1, row)
            grad_max = tl.where(valid, grad_decayed + tile_row(grad_max_direct, row), grad_max)
            grad_num = tl.where(valid, next_num, grad_num)
            grad_den = tl.where(valid, next_den, grad_den)
        tl.store(grad_k_ptr + offsets, grad_k_tile.to(grad_k_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(grad_v_ptr + offsets, grad_v_tile.to(grad_v_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(grad_w_ptr + state_offsets, grad_w, mask=col_mask)
    tl.store(grad_u_ptr + state_offsets, grad_u, mask=col_mask)
    tl.store(grad_num0_ptr + state_offsets, grad_num, mask=col_mask)
    tl.store(grad_den0_ptr + state_offsets, grad_den, mask=col_mask)
    tl.store(grad_max0_ptr + state_offsets, grad_max, mask=col_mask)


# Tokens per tile: more tokens keep more loads in flight per warp (only B*C sequences run in parallel, so latency,
# not bandwidth, limits short tiles), bounded by registers. sm_90 ptxas reports
# fwd 118 registers at 16 tokens; the backward uses 146 at 8 and spills at 16.
FWD_BLOCK_T = 16
BWD_BLOCK_T = 8


def rwkv4_fwd(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    store_output: bool = True,
    store_states: bool = False,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """Launch the forward: ``(wkv [B, T, C] or None, final (num, den, max) [B, C], per-token states or None)``.

    With ``store_states`` it also returns the state before every token, three fp32 ``[B, T, C]`` tensors.
    """
    batch, seq_len, channels = k.shape
    final = tuple(torch.empty_like(part) for part in state)
    wkv = torch.empty_like(v) if store_output else final[0]
    states = tuple(torch.empty(batch, seq_len, channels, dtype=torch.float32, device=k.device) for _ in range(3))
    if not store_states:
        states = final  # unused placeholders: the kernel writes nothing there
    block_c, num_warps = channel_launch_config(batch, channels)
    block_t = FWD_BLOCK_T
    grid = (batch, triton.cdiv(channels, block_c))
    _rwkv4_fwd_kernel[grid](
        w, u, k, v, *state, wkv, *final, *states, seq_len, channels,
        STORE_OUTPUT=store_output, STORE_STATES=store_states, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return (wkv if store_output else None), final, (states if store_states else None)


def rwkv4_bwd(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grad_wkv: torch.Tensor,
    grad_final: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """Recompute the per-token states, then run the reverse kernel.

    Returns the gradients of ``(w [C], u [C], k, v [B, T, C], num0, den0, max0 [B, C])``.
    """
    batch, seq_len, channels = k.shape
    _, _, states = rwkv4_fwd(w, u, k, v, state, store_output=False, store_states=True)
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    grad_w, grad_u, *grad_state = (torch.empty_like(state[0]) for _ in range(5))
    block_c, num_warps = channel_launch_config(batch, channels)
    block_t = BWD_BLOCK_T
    grid = (batch, triton.cdiv(channels, block_c))
    _rwkv4_bwd_kernel[grid](
        w, u, k, v, *states, grad_wkv, *grad_final, grad_k, grad_v, grad_w, grad_u, *grad_state, seq_len, channels,
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return grad_w.sum(0), grad_u.sum(0), grad_k, grad_v, *grad_state


class RWKV4ScanTriton(torch.autograd.Function):
    """Saves only its inputs (w, u, k, v, initial state); the backward recomputes the per-token states."""

    @staticmethod
    def forward(ctx, w, u, k, v, num0, den0, max0):
        w, u, k, v, num0, den0, max0 = (t.contiguous() for t in (w, u, k, v, num0, den0, max0))
        wkv, final, _ = rwkv4_fwd(w, u, k, v, (num0, den0, max0))
        ctx.save_for_backward(w, u, k, v, num0, den0, max0)
        return wkv, *final

    @staticmethod
    def backward(ctx, grad_wkv, grad_num, grad_den, grad_max):
        w, u, k, v, num0, den0, max0 = ctx.saved_tensors
        grad_wkv = torch.zeros_like(v) if grad_wkv is None else grad_wkv.contiguous()
        grad_final = tuple(
            torch.zeros_like(num0) if grad is None else grad.float().contiguous()
            for grad in (grad_num, grad_den, grad_max)
        )
        return rwkv4_bwd(w, u, k, v, (num0, den0, max0), grad_wkv, grad_final)


def rwkv4_scan_triton(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Triton RWKV-4 WKV; same arguments and returns as :func:`~.naive.rwkv4_scan_naive`."""
    wkv, num, den, max_state = RWKV4ScanTriton.apply(w, u, k, v, *state)
    return wkv, (num, den, max_state)
