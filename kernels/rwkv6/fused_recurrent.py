"""Fused-recurrent Triton kernels for rwkv6: one pass over T per (batch, head, value block), state kept on chip.

Best for decoding and short sequences. The forward holds a ``[BK, BV]`` block of the state in registers (all of K,
a slice of V) and walks the tokens once. The backward is two passes:

1. forward direction, recomputing the state: ``dr_state[t] = S_{t-1} do_t`` (the part of dr that flows through the
   state) and, for the final-state gradient, ``sum_j dS_T[i, j] S_{T-1}[i, j]``;
2. reverse direction, carrying ``G_t = dL/dS_t`` on chip: ``dk_state[t] = G_t v_t``, ``dv_state[t] = G_t^T k_t``,
   ``G_{t-1} = diag(exp(w_t)) G_t + r_t^T do_t``, and finally ``dS_{-1} = G_{-1}`` (the initial state's gradient).

The log-decay gradient needs ``S_{t-1}`` in the reverse pass, which cannot be recovered stably (dividing by
``exp(w)`` overflows for strong decays). Instead every term of the loss that depends on ``w_t[i]`` is a
(key s, query tau) pair with ``s < t < tau``; with ``X_tau = r_tau * dr_state_tau`` (all pairs ending at tau) and
``Y_s = k_s * dk_state_s`` (all pairs starting at s), ``dw_t = sum_{tau > t} X_tau - sum_{s >= t} Y_s``: two reverse
cumulative sums done in torch. The bonus (u) terms are elementwise and also done in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .spike_epilogue import OUTPUT_ABS_SUM, OUTPUT_DENSE, OUTPUT_SPIKES, spike_counts


@triton.jit
def _fused_recurrent_fwd_kernel(
    r,  # [B, T, H, K] receptance
    k,  # [B, T, H, K] key
    v,  # [B, T, H, V] value
    w,  # [B, T, H, K] log-decay (<= 0)
    u,  # [H, K] bonus
    h0,  # [B, H, K, V] float32 initial state (read only if USE_INITIAL_STATE)
    o,  # [B, T, H, V] output, v's dtype: o itself (OUTPUT_DENSE) or spike counts (OUTPUT_SPIKES)
    ht,  # [B, H, K, V] float32 final state
    abs_sum,  # [NV, B, T, H] float32 out for OUTPUT_ABS_SUM: sum |o| over this value block
    threshold,  # [B, T] float32 per-token V_th, read for OUTPUT_SPIKES
    T,  # tokens
    B,  # batch
    H: tl.constexpr,  # heads
    K: tl.constexpr,  # key size
    V: tl.constexpr,  # value size
    BK: tl.constexpr,  # K padded to a power of two: the whole key axis lives in one program
    BV: tl.constexpr,  # value block per program
    USE_INITIAL_STATE: tl.constexpr,
    STORE_ABS_SUM: tl.constexpr,  # pass 1 of the fused neuron: write sum |o| instead of o
    STORE_SPIKES: tl.constexpr,  # pass 2: write spike counts instead of o
    MAX_SPIKES: tl.constexpr,  # largest spike count (OUTPUT_SPIKES)
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    p_abs = (i_v * B + i_b).to(tl.int64) * T * H + i_h  # token 0 of this (value block, batch, head)
    p_th = i_b.to(tl.int64) * T

    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + p_state, mask=m_kv, other=0.0).to(tl.float32)

    # int64 base offsets: B * T * H * K exceeds 2^31 at long contexts
    p_k = i_b.to(tl.int64) * T * H * K + i_h * K + o_k
    p_v = i_b.to(tl.int64) * T * H * V + i_h * V + o_v
    for _ in range(0, T):
        # bf16 loads are converted at once: fp32 state and accumulation (and the interpreter miscomputes bf16)
        b_r = tl.load(r + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_w = tl.load(w + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_kv = b_k[:, None] * b_v[None, :]  # (BK, BV) k_t^T v_t
        b_o = tl.sum((b_h + b_u[:, None] * b_kv) * b_r[:, None], axis=0)  # (BV,)
        b_h = b_h * tl.exp(b_w)[:, None] + b_kv
        if STORE_ABS_SUM:
            tl.store(abs_sum + p_abs, tl.sum(tl.abs(b_o), 0))  # masked lanes hold exact zeros
        elif STORE_SPIKES:
            b_counts = spike_counts(b_o, tl.load(threshold + p_th), MAX_SPIKES)
            tl.store(o + p_v, b_counts.to(o.dtype.element_ty), mask=m_v)
        else:
            tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_v)
        p_k += H * K
        p_v += H * V
        p_abs += H
        p_th += 1
    tl.store(ht + p_state, b_h, mask=m_kv)


@triton.jit
def _fused_recurrent_bwd_dr_kernel(
    k,  # [B, T, H, K] key
    v,  # [B, T, H, V] value
    w,  # [B, T, H, K] log-decay
    h0,  # [B, H, K, V] float32 initial state
    do,  # [B, T, H, V] output gradient
    dht,  # [B, H, K, V] float32 final-state gradient (read only if USE_FINAL_GRAD)
    dr_state,  # [NV, B, T, H, K] float32 out: S_{t-1} do_t, partial over this value block
    x_final,  # [NV, B, H, K] float32 out: sum_j dS_T[i, j] S_{T-1}[i, j], partial over this value block
    T,
    B,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + p_state, mask=m_kv, other=0.0).to(tl.float32)
    p_k = i_b.to(tl.int64) * T * H * K + i_h * K + o_k
    p_v = i_b.to(tl.int64) * T * H * V + i_h * V + o_v
    p_dr = i_v.to(tl.int64) * B * T * H * K + p_k  # this value block's slice of the partial buffer
    for _ in range(0, T):
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_w = tl.load(w + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
        tl.store(dr_state + p_dr, tl.sum(b_h * b_do[None, :], axis=1), mask=m_k)
        b_h = b_h * tl.exp(b_w)[:, None] + b_k[:, None] * b_v[None, :]
        p_k += H * K
        p_v += H * V
        p_dr += H * K
    if USE_FINAL_GRAD:
        b_dht = tl.load(dht + p_state, mask=m_kv, other=0.0).to(tl.float32)
        tl.store(x_final + (i_v * B * H + i_bh).to(tl.int64) * K + o_k, tl.sum(b_dht * b_h, axis=1), mask=m_k)


@triton.jit
def _fused_recurrent_bwd_dkv_kernel(
    r,  # [B, T, H, K] receptance
    k,  # [B, T, H, K] key
    v,  # [B, T, H, V] value
    w,  # [B, T, H, K] log-decay
    do,  # [B, T, H, V] output gradient
    dht,  # [B, H, K, V] float32 final-state gradient (read only if USE_FINAL_GRAD)
    dk_state,  # [NV, B, T, H, K] float32 out: G_t v_t, partial over this value block
    dv_state,  # [B, T, H, V] float32 out: G_t^T k_t
    dh0,  # [B, H, K, V] float32 out: gradient of the initial state
    T,
    B,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    b_g = tl.zeros([BK, BV], dtype=tl.float32)  # G_t = dL/dS_t
    if USE_FINAL_GRAD:
        b_g += tl.load(dht + p_state, mask=m_kv, other=0.0).to(tl.float32)
    # start at the last token and walk back
    p_k = i_b.to(tl.int64) * T * H * K + (T - 1) * H * K + i_h * K + o_k
    p_v = i_b.to(tl.int64) * T * H * V + (T - 1) * H * V + i_h * V + o_v
    p_dk = i_v.to(tl.int64) * B * T * H * K + p_k
    for _ in range(0, T):
        b_r = tl.load(r + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_w = tl.load(w + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
        tl.store(dk_state + p_dk, tl.sum(b_g * b_v[None, :], axis=1), mask=m_k)
        tl.store(dv_state + p_v, tl.sum(b_g * b_k[:, None], axis=0), mask=m_v)
        b_g = b_g * tl.exp(b_w)[:, None] + b_r[:, None] * b_do[None, :]
        p_k -= H * K
        p_v -= H * V
        p_dk -= H * K
    tl.store(dh0 + p_state, b_g, mask=m_kv)


def _blocks(K: int, V: int) -> tuple[int, int, int]:
    """(BK, BV, NV): the whole key axis per program, value axis split so several programs share a head."""
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 32)
    return BK, BV, triton.cdiv(V, BV)


def fused_recurrent_rwkv6_fwd(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    h0: torch.Tensor | None,
    output: int = OUTPUT_DENSE,
    threshold: torch.Tensor | None = None,
    max_spikes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on contiguous inputs; returns ``(out, ht [B, H, K, V] fp32)``.

    ``out`` is ``o [B, T, H, V]`` in v's dtype for ``OUTPUT_DENSE``, spike counts ``[B, T, H, V]`` for
    ``OUTPUT_SPIKES`` (with ``threshold [B, T]`` fp32) and per-value-block ``sum |o|`` ``[NV, B, T, H]`` fp32 for
    ``OUTPUT_ABS_SUM``.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    BK, BV, NV = _blocks(K, V)
    ht = r.new_empty(B, H, K, V, dtype=torch.float32)
    o = torch.empty_like(v) if output != OUTPUT_ABS_SUM else ht
    abs_sum = r.new_empty(NV, B, T, H, dtype=torch.float32) if output == OUTPUT_ABS_SUM else ht
    _fused_recurrent_fwd_kernel[(NV, B * H)](
        r, k, v, w, u, h0 if h0 is not None else ht, o, ht, abs_sum, threshold if threshold is not None else ht, T, B,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_INITIAL_STATE=h0 is not None, 
        STORE_ABS_SUM=output == OUTPUT_ABS_SUM, STORE_SPIKES=output == OUTPUT_SPIKES, MAX_SPIKES=max_spikes,
    )
    return (abs_sum if output == OUTPUT_ABS_SUM else o), ht


def fused_recurrent_rwkv6_bwd(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    h0: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (float32) of r, k, v, w, u and the initial state, given ``do [B, T, H, V]`` and ``dht``."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    BK, BV, NV = _blocks(K, V)
    dr_state = r.new_empty(NV, B, T, H, K, dtype=torch.float32)
    x_final = r.new_zeros(NV, B, H, K, dtype=torch.float32)
    dk_state = r.new_empty(NV, B, T, H, K, dtype=torch.float32)
    dv_state = r.new_empty(B, T, H, V, dtype=torch.float32)
    dh0 = r.new_empty(B, H, K, V, dtype=torch.float32)
    grid = (NV, B * H)
    _fused_recurrent_bwd_dr_kernel[grid](
        k, v, w, h0 if h0 is not None else dh0, do, dht if dht is not None else dh0, dr_state, x_final, T, B,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_INITIAL_STATE=h0 is not None, USE_FINAL_GRAD=dht is not None,
    )
    _fused_recurrent_bwd_dkv_kernel[grid](
        r, k, v, w, do, dht if dht is not None else dh0, dk_state, dv_state, dh0, T, B,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_FINAL_GRAD=dht is not None,
    )
    return combine_state_grads(r, k, v, u, do, dr_state.sum(0), dk_state.sum(0), dv_state, x_final.sum(0), dh0)


def combine_state_grads(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    do: torch.Tensor,
    dr_state: torch.Tensor,
    dk_state: torch.Tensor,
    dv_state: torch.Tensor,
    x_final: torch.Tensor,
    dh0: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Add the bonus-term gradients and form dw from the state-path gradients (see the module docstring).

    ``dr_state, dk_state [B, T, H, K]``, ``dv_state [B, T, H, V]``, ``x_final [B, H, K]`` (zeros without a
    final-state gradient), ``dh0 [B, H, K, V]``; all float32. Returns float32 ``dr, dk, dv, dw, du, dh0``.
    """
    r, k, v, do = r.float(), k.float(), v.float(), do.float()
    u = u.float()[None, None]  # (1, 1, H, K)
    do_dot_v = (do * v).sum(-1, keepdim=True)  # (B, T, H, 1)  d o_t . v_t
    bonus = (r * u * k).sum(-1, keepdim=True)  # (B, T, H, 1)  r_t diag(u) k_t
    dr = dr_state + u * k * do_dot_v
    dk = dk_state + u * r * do_dot_v
    dv = dv_state + bonus * do
    du = (r * k * do_dot_v).sum((0, 1))  # (H, K)
    pairs_ending = r * dr_state  # X_tau: every (s, tau) pair read by query tau
    pairs_starting = k * dk_state  # Y_s: every (s, tau) pair written by key s
    ending_after = pairs_ending.flip(1).cumsum(1).flip(1) - pairs_ending + x_final[:, None]  # sum_{tau > t} X_tau
    starting_from = pairs_starting.flip(1).cumsum(1).flip(1)  # sum_{s >= t} Y_s
    dw = ending_after - starting_from
    return dr, dk, dv, dw, du, dh0


class FusedRecurrentRWKV6Function(torch.autograd.Function):
    """Autograd wrapper: saves the (contiguous) inputs only; the backward recomputes the states."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, h0):
        r, k, v, w, u = (x.contiguous() for x in (r, k, v, w, u))
        h0 = h0.float().contiguous() if h0 is not None else None
        o, ht = fused_recurrent_rwkv6_fwd(r, k, v, w, u, h0)
        ctx.save_for_backward(r, k, v, w, u, h0)
        ctx.has_h0 = h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, k, v, w, u, h0 = ctx.saved_tensors
        dht = dht.float().contiguous() if dht is not None else None
        dr, dk, dv, dw, du, dh0 = fused_recurrent_rwkv6_bwd(r, k, v, w, u, h0, do.contiguous(), dht)
        return (dr.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(w.dtype), du.to(u.dtype),
                dh0 if ctx.has_h0 else None)


def fused_recurrent_rwkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused-recurrent Triton rwkv6 scan (inputs already validated by ``rwkv6_scan``).

    Args:
        r, k, w: ``[B, T, H, K]``; v: ``[B, T, H, V]``; u: ``[H, K]``; initial_state: ``[B, H, K, V]`` or None.

    Returns:
        ``o [B, T, H, V]`` in v's dtype and the final state ``[B, H, K, V]`` float32 (or ``None``).
    """
    if r.shape[-1] > 256:
        raise ValueError(f"rwkv6_scan(backend='triton'): head size K={r.shape[-1]} > 256 does not fit on chip; "
                         "use backend='torch' or smaller heads")
    o, ht = FusedRecurrentRWKV6Function.apply(r, k, v, w, u, initial_state)
    return o, (ht if output_final_state else None)
