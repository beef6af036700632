"""Chunked Triton kernels for rwkv6: ``tl.dot`` inside chunks of BT tokens, the state passed from chunk to chunk.

Forward, two kernels:

1. ``_chunk_fwd_h_kernel`` (grid: value blocks x B*H, a loop over chunks): the state entering every chunk,
   ``S_{n+1} = diag(exp(A_last)) S_n + (k * exp(A_last - A))^T v``, stored as ``h [B, H, NT, K, V]`` float32.
2. ``_chunk_fwd_o_kernel`` (grid: value blocks x chunks x B*H, fully parallel): ``o = (r * exp(A_prev)) S_n``
   (incoming state) ``+ att v`` (strictly causal decayed attention inside the chunk) ``+ (r . u k) v`` (bonus).

Numerical safety for strong decays (w = -exp(5) per token and beyond). Every exponential has a non-positive
exponent that is formed as a *sum of log-decays over the span it covers*, never as a difference of two large
cumulative sums: the intra-chunk pair (s, t) uses ``sum_{s < m < t} w_m`` (a cumulative sum of w masked to m > s,
one per key s), the decay to the chunk end uses a reverse cumulative sum. A factorised ``exp(A_t) exp(-A_s)`` would
overflow (inf * 0 = NaN) and a difference ``A_{t-1} - A_s`` of fp32 cumulative sums of size ~2000 loses ~1e-4.
The price: the intra-chunk attention is built one key column at a time (BT small steps of [BT, BK] work) instead
of one ``tl.dot``; the inter-chunk terms, which are most of the FLOPs for K = V = 64, use ``tl.dot``.

Backward: the state before each chunk is recomputed with kernel 1 (only inputs are saved), ``_chunk_bwd_dh_kernel``
walks the chunks in reverse carrying ``dL/dS`` (storing the gradient of every chunk's end state and the initial
state's), and ``_chunk_bwd_kernel`` (parallel over chunks) forms the state-path gradients of r, k and v. The bonus
terms and dw (from two reverse cumulative sums) are shared with the fused-recurrent path:
see ``fused_recurrent.combine_state_grads``.

Why one file of ~420 lines: the chunked forward and backward kernels, their launchers and the autograd Function
share the tiling constants and the chunk-state layout (fla keeps each chunked op in one file too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_recurrent import combine_state_grads
from .spike_epilogue import OUTPUT_ABS_SUM, OUTPUT_DENSE, OUTPUT_SPIKES, spike_counts


@triton.jit
def _chunk_fwd_h_kernel(
    k,  # [B, T, H, K] key
    v,  # [B, T, H, V] value
    w,  # [B, T, H, K] log-decay
    h0,  # [B, H, K, V] float32 initial state (read only if USE_INITIAL_STATE)
    h,  # [B, H, NT, K, V] float32 out: state entering each chunk
    ht,  # [B, H, K, V] float32 out: final state
    T,  # tokens
    NT,  # chunks
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,  # chunk size (power of two >= 16: a tl.dot operand dimension)
    BK: tl.constexpr,  # K padded to a power of two >= 16
    BV: tl.constexpr,  # value block per program
    USE_INITIAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would cost ~1e-3), "tf32" for bf16
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_bh.to(tl.int64) * K * V + p_state, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(0, NT):
        tl.store(h + (i_bh.to(tl.int64) * NT + i_t) * K * V + p_state, b_h, mask=m_kv)
        t = i_t * BT + o_t
        m_t = t < T  # the last chunk may be partial: padding k = 0, w = 0 leaves the state unchanged
        p_k = (i_b.to(tl.int64) * T + t[:, None]) * H * K + i_h * K + o_k[None, :]
        p_v = (i_b.to(tl.int64) * T + t[:, None]) * H * V + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_w = tl.load(w + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_to_end = tl.exp(tl.cumsum(b_w, 0, reverse=True) - b_w)  # (BT, BK) exp(sum_{m > s} w_m) <= 1
        b_chunk_decay = tl.exp(tl.sum(b_w, 0))  # (BK,)
        b_h = b_h * b_chunk_decay[:, None] + tl.dot(tl.trans(b_k * b_to_end), b_v, input_precision=DOT_PRECISION)
    tl.store(ht + i_bh.to(tl.int64) * K * V + p_state, b_h, mask=m_kv)


@triton.jit
def _chunk_fwd_o_kernel(
    r,  # [B, T, H, K] receptance
    k,  # [B, T, H, K] key
    v,  # [B, T, H, V] value
    w,  # [B, T, H, K] log-decay
    u,  # [H, K] bonus
    h,  # [B, H, NT, K, V] float32 state entering each chunk
    o,  # [B, T, H, V] out, v's dtype: o itself (OUTPUT_DENSE) or spike counts (OUTPUT_SPIKES)
    abs_sum,  # [NV, B, T, H] float32 out for OUTPUT_ABS_SUM: sum |o| over this value block
    threshold,  # [B, T] float32 per-token V_th, read for OUTPUT_SPIKES
    T,
    NT,
    B,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_ABS_SUM: tl.constexpr,  # pass 1 of the fused neuron: write sum |o| instead of o
    STORE_SPIKES: tl.constexpr,  # pass 2: write spike counts instead of o
    MAX_SPIKES: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    t = i_t * BT + o_t
    m_t = t < T
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    p_k = (i_b.to(tl.int64) * T + t[:, None]) * H * K + i_h * K + o_k[None, :]
    p_v = (i_b.to(tl.int64) * T + t[:, None]) * H * V + i_h * V + o_v[None, :]
    b_r = tl.load(r + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_w = tl.load(w + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_h = tl.load(h + (i_bh.to(tl.int64) * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)

    # incoming state, seen by query t through the decays of the tokens before it in this chunk
    b_A_prev = tl.cumsum(b_w, 0) - b_w  # (BT, BK) sum_{m < t} w_m
    b_o = tl.dot(b_r * tl.exp(b_A_prev), b_h, input_precision=DOT_PRECISION)  # (BT, BV)

    # strictly causal intra-chunk attention, one key column s at a time (see the module docstring)
    b_att = tl.zeros([BT, BT], dtype=tl.float32)
    for s in range(0, BT):
        b_k_s = tl.sum(tl.where(o_t[:, None] == s, b_k, 0.0), 0)  # (BK,) row s of k
        after_s = o_t[:, None] > s
        b_w_after = tl.where(after_s, b_w, 0.0)
        b_span = tl.cumsum(b_w_after, 0) - b_w_after  # sum_{s < m < t} w_m for t > s
        b_decay = tl.exp(tl.where(after_s, b_span, float("-inf")))  # masked before exp: 0 for t <= s
        b_col = tl.sum(b_r * b_k_s[None, :] * b_decay, 1)  # (BT,) att[:, s]
        b_att += tl.where(o_t[None, :] == s, b_col[:, None], 0.0)
    b_o += tl.dot(b_att, b_v, input_precision=DOT_PRECISION)
    b_o += tl.sum(b_r * b_u[None, :] * b_k, 1)[:, None] * b_v  # current token: bonus u instead of a decay
    if STORE_ABS_SUM:
        p_abs = ((i_v * B + i_b).to(tl.int64) * T + t) * H + i_h
        tl.store(abs_sum + p_abs, tl.sum(tl.abs(b_o), 1), mask=m_t)  # masked lanes hold exact zeros
    elif STORE_SPIKES:
        b_threshold = tl.load(threshold + i_b.to(tl.int64) * T + t, mask=m_t, other=1.0)
        tl.store(o + p_v, spike_counts(b_o, b_threshold[:, None], MAX_SPIKES).to(o.dtype.element_ty), mask=m_tv)
    else:
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _chunk_bwd_dh_kernel(
    r,  # [B, T, H, K] receptance
    w,  # [B, T, H, K] log-decay
    do,  # [B, T, H, V] output gradient
    dht,  # [B, H, K, V] float32 final-state gradient (read only if USE_FINAL_GRAD)
    dh,  # [B, H, NT, K, V] float32 out: gradient of the state leaving each chunk
    dh0,  # [B, H, K, V] float32 out: gradient of the initial state
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]

    b_g = tl.zeros([BK, BV], dtype=tl.float32)  # dL/dS at the end of the current chunk
    if USE_FINAL_GRAD:
        b_g += tl.load(dht + i_bh.to(tl.int64) * K * V + p_state, mask=m_kv, other=0.0).to(tl.float32)
    for i_rev in range(0, NT):
        i_t = NT - 1 - i_rev
        tl.store(dh + (i_bh.to(tl.int64) * NT + i_t) * K * V + p_state, b_g, mask=m_kv)
        t = i_t * BT + o_t
        m_t = t < T
        p_k = (i_b.to(tl.int64) * T + t[:, None]) * H * K + i_h * K + o_k[None, :]
        p_v = (i_b.to(tl.int64) * T + t[:, None]) * H * V + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        b_r = tl.load(r + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_w = tl.load(w + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_r_decayed = b_r * tl.exp(tl.cumsum(b_w, 0) - b_w)  # (BT, BK)
        b_g = b_g * tl.exp(tl.sum(b_w, 0))[:, None] + tl.dot(tl.trans(b_r_decayed), b_do,
                                                              input_precision=DOT_PRECISION)
    tl.store(dh0 + i_bh.to(tl.int64) * K * V + p_state, b_g, mask=m_kv)


@triton.jit
def _chunk_bwd_kernel(
    r,  # [B, T, H, K] receptance
    k,  # [B, T, H, K] key
    v,  # [B, T, H, V] value
    w,  # [B, T, H, K] log-decay
    h,  # [B, H, NT, K, V] float32 state entering each chunk
    dh,  # [B, H, NT, K, V] float32 gradient of the state leaving each chunk
    do,  # [B, T, H, V] output gradient
    dr_state,  # [B, T, H, K] float32 out: gradient of r without the bonus term
    dk_state,  # [B, T, H, K] float32 out: gradient of k without the bonus term
    dv_state,  # [B, T, H, V] float32 out: gradient of v without the bonus term
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,  # the whole value axis: dr and dk reduce over it
    DOT_PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    t = i_t * BT + o_t
    m_t = t < T
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    p_k = (i_b.to(tl.int64) * T + t[:, None]) * H * K + i_h * K + o_k[None, :]
    p_v = (i_b.to(tl.int64) * T + t[:, None]) * H * V + i_h * V + o_v[None, :]
    p_state = (i_bh.to(tl.int64) * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    b_r = tl.load(r + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_w = tl.load(w + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
    b_h = tl.load(h + p_state, mask=m_kv, other=0.0)
    b_dh = tl.load(dh + p_state, mask=m_kv, other=0.0)

    # inter-chunk: o = (r exp(A_prev)) S_in  and  S_out = ... + (k exp(sum_{m > s} w_m))^T v
    b_from_start = tl.exp(tl.cumsum(b_w, 0) - b_w)  # (BT, BK)
    b_to_end = tl.exp(tl.cumsum(b_w, 0, reverse=True) - b_w)  # (BT, BK)
    b_dr = b_from_start * tl.dot(b_do, tl.trans(b_h), input_precision=DOT_PRECISION)  # (BT, BK)
    b_dk = b_to_end * tl.dot(b_v, tl.trans(b_dh), input_precision=DOT_PRECISION)  # (BT, BK)
    b_dv = tl.dot(b_k * b_to_end, b_dh, input_precision=DOT_PRECISION)  # (BT, BV)

    # intra-chunk: o += att v with att[t, s] = sum_i r_t[i] k_s[i] exp(sum_{s < m < t} w_m[i]), t > s
    b_datt = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # (BT_t, BT_s) before masking
    b_att = tl.zeros([BT, BT], dtype=tl.float32)
    for s in range(0, BT):
        is_s = o_t[:, None] == s
        b_k_s = tl.sum(tl.where(is_s, b_k, 0.0), 0)  # (BK,)
        after_s = o_t[:, None] > s
        b_w_after = tl.where(after_s, b_w, 0.0)
        b_span = tl.cumsum(b_w_after, 0) - b_w_after
        b_decay = tl.exp(tl.where(after_s, b_span, float("-inf")))  # (BT, BK), 0 for t <= s
        b_rd = b_r * b_decay
        b_att += tl.where(o_t[None, :] == s, tl.sum(b_rd * b_k_s[None, :], 1)[:, None], 0.0)
        b_datt_s = tl.sum(tl.where(o_t[None, :] == s, b_datt, 0.0), 1)  # (BT,) column s
        b_dr += b_datt_s[:, None] * b_k_s[None, :] * b_decay
        b_dk += tl.where(is_s, tl.sum(b_datt_s[:, None] * b_rd, 0)[None, :], 0.0)
    b_dv += tl.dot(tl.trans(b_att), b_do, input_precision=DOT_PRECISION)

    tl.store(dr_state + p_k, b_dr, mask=m_tk)
    tl.store(dk_state + p_k, b_dk, mask=m_tk)
    tl.store(dv_state + p_v, b_dv, mask=m_tv)


def _blocks(K: int, V: int, chunk_size: int) -> tuple[int, int, int]:
    """(BT, BK, BV): tl.dot needs every dimension >= 16."""
    return chunk_size, max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def chunk_rwkv6_fwd_h(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, h0: torch.Tensor | None, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering each chunk ``h [B, H, NT, K, V]`` and the final state ``[B, H, K, V]``, float32."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT, BK, BV_full = _blocks(K, V, chunk_size)
    BV = min(BV_full, 32)
    NT = triton.cdiv(T, BT)
    h = k.new_empty(B, H, NT, K, V, dtype=torch.float32)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32)
    _chunk_fwd_h_kernel[(triton.cdiv(V, BV), B * H)](
        k, v, w, h0 if h0 is not None else ht, h, ht, T, NT,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_INITIAL_STATE=h0 is not None, DOT_PRECISION=_precision(k),
    )
    return h, ht


def chunk_rwkv6_fwd_o(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    chunk_size: int,
    output: int = OUTPUT_DENSE,
    threshold: torch.Tensor | None = None,
    max_spikes: int = 0,
) -> torch.Tensor:
    """Outputs of every chunk given the chunk states ``h [B, H, NT, K, V]`` (from ``chunk_rwkv6_fwd_h``).

    Returns ``o [B, T, H, V]`` in v's dtype (``OUTPUT_DENSE``), spike counts ``[B, T, H, V]`` (``OUTPUT_SPIKES``,
    with ``threshold [B, T]`` fp32) or per-value-block ``sum |o|`` ``[NV, B, T, H]`` fp32 (``OUTPUT_ABS_SUM``).
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    BT, BK, BV_full = _blocks(K, V, chunk_size)
    BV = min(BV_full, 64)
    NT, NV = triton.cdiv(T, BT), triton.cdiv(V, BV)
    o = torch.empty_like(v) if output != OUTPUT_ABS_SUM else h
    abs_sum = r.new_empty(NV, B, T, H, dtype=torch.float32) if output == OUTPUT_ABS_SUM else h
    _chunk_fwd_o_kernel[(NV, NT, B * H)](
        r, k, v, w, u, h, o, abs_sum, threshold if threshold is not None else h, T, NT, B,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT_PRECISION=_precision(r), 
        STORE_ABS_SUM=output == OUTPUT_ABS_SUM, STORE_SPIKES=output == OUTPUT_SPIKES, MAX_SPIKES=max_spikes,
    )
    return abs_sum if output == OUTPUT_ABS_SUM else o


def chunk_rwkv6_fwd(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on contiguous inputs: ``o [B, T, H, V]`` in v's dtype and the final state, float32."""
    h, ht = chunk_rwkv6_fwd_h(k, v, w, h0, chunk_size)
    return chunk_rwkv6_fwd_o(r, k, v, w, u, h, chunk_size), ht


def chunk_rwkv6_bwd(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None,
    do: torch.Tensor, dht: torch.Tensor | None, chunk_size: int,
) -> tuple[torch.Tensor, ...]:
    """Float32 gradients of r, k, v, w, u and the initial state given ``do [B, T, H, V]`` and ``dht``."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    BT, BK, BV = _blocks(K, V, chunk_size)
    NT = triton.cdiv(T, BT)
    h, ht = chunk_rwkv6_fwd_h(k, v, w, h0, chunk_size)  # recomputed: only the inputs were saved
    dh = r.new_empty(B, H, NT, K, V, dtype=torch.float32)
    dh0 = r.new_empty(B, H, K, V, dtype=torch.float32)
    BV_dh = min(BV, 32)
    _chunk_bwd_dh_kernel[(triton.cdiv(V, BV_dh), B * H)](
        r, w, do, dht if dht is not None else dh0, dh, dh0, T, NT,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV_dh, USE_FINAL_GRAD=dht is not None, DOT_PRECISION=_precision(r),
    )
    dr_state = r.new_empty(B, T, H, K, dtype=torch.float32)
    dk_state = r.new_empty(B, T, H, K, dtype=torch.float32)
    dv_state = r.new_empty(B, T, H, V, dtype=torch.float32)
    _chunk_bwd_kernel[(NT, B * H)](
        r, k, v, w, h, dh, do, dr_state, dk_state, dv_state, T, NT,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT_PRECISION=_precision(r),
        # two [BK, BV] fp32 states per program: at K = V = 128, 4 warps spill ~630 B/thread on sm_90, 8 warps ~150 B
        num_warps=8 if BK * BV > 64 * 64 else 4,
    )
    # pairs that end in the final state: sum_j dS_T[i, j] S_{T-1}[i, j] (see combine_state_grads)
    x_final = (dht * ht).sum(-1) if dht is not None else ht.new_zeros(B, H, K)
    return combine_state_grads(r, k, v, u, do, dr_state, dk_state, dv_state, x_final, dh0)


class ChunkRWKV6Function(torch.autograd.Function):
    """Autograd wrapper: saves the (contiguous) inputs only; the backward recomputes the chunk states."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, h0, chunk_size):
        r, k, v, w, u = (x.contiguous() for x in (r, k, v, w, u))
        h0 = h0.float().contiguous() if h0 is not None else None
        o, ht = chunk_rwkv6_fwd(r, k, v, w, u, h0, chunk_size)
        ctx.save_for_backward(r, k, v, w, u, h0)
        ctx.has_h0 = h0 is not None
        ctx.chunk_size = chunk_size
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, k, v, w, u, h0 = ctx.saved_tensors
        dht = dht.float().contiguous() if dht is not None else None
        dr, dk, dv, dw, du, dh0 = chunk_rwkv6_bwd(r, k, v, w, u, h0, do.contiguous(), dht, ctx.chunk_size)
        return (dr.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(w.dtype), du.to(u.dtype),
                dh0 if ctx.has_h0 else None, None)


def chunk_rwkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked Triton rwkv6 scan (inputs already validated by ``rwkv6_scan``).

    Args:
        r, k, w: ``[B, T, H, K]``; v: ``[B, T, H, V]``; u: ``[H, K]``; initial_state: ``[B, H, K, V]`` or None.
        chunk_size: tokens per chunk, a power of two in [16, 64] (a ``tl.dot`` dimension; larger chunks cost
            registers in the column-by-column intra-chunk attention).

    Returns:
        ``o [B, T, H, V]`` in v's dtype and the final state ``[B, H, K, V]`` float32 (or ``None``).
    """
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"rwkv6_scan(backend='triton', mode='chunk'): chunk_size={chunk_size} must be 16, 32 or 64")
    if max(r.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"rwkv6_scan(backend='triton'): head sizes K={r.shape[-1]}, V={v.shape[-1]} above 256 do "
                         "not fit on chip; use backend='torch' or smaller heads")
    o, ht = ChunkRWKV6Function.apply(r, k, v, w, u, initial_state, chunk_size)
    return o, (ht if output_final_state else None)
