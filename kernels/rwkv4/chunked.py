"""The torch path of the RWKV-4 WKV scan (the CPU default): chunked, so time is no Python loop over tokens.

Inside a chunk of L tokens every output is a softmax-like weighted mean over earlier tokens of the chunk, the
current token (with bonus ``u``) and the chunk's start state, with log-weights

    s < t:  k_s + (t - 1 - s) w          s = t:  u + k_t          start state:  max_state + t w

so a chunk is one ``[B, N, L, L, C]`` tensor computation with a per-row max subtracted before ``exp`` (stable for
any decay). Only the chunk-start states need a loop, over ``N = T / L`` chunks, each step combining the previous
state decayed by ``L w`` with the chunk's own summary ``(max, num, den)``. Gradients come from autograd through
these tensor ops (activation memory ~ ``3 B T L C`` fp32 floats); the running max is differentiated like the
oracle's, so the final state's gradients agree with it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import MAX_STATE_INIT, safe_divide

CHUNK_SIZE = 32


def _stable_max(log_weights: torch.Tensor, dim: int) -> torch.Tensor:
    # Clamped so an all -inf row (every token masked with k = -inf) gives exp(-inf - max) = 0, not NaN.
    return log_weights.amax(dim).clamp_min(MAX_STATE_INIT)


def _summarise(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a chunk adds to the state by its end: ``(max, num, den)`` ``[B, N, C]`` from ``k, v: [B, N, L, C]``."""
    length = k.shape[2]
    decays_to_end = torch.arange(length - 1, -1, -1, device=k.device, dtype=torch.float32)  # L - 1 - s
    log_weights = k + decays_to_end[:, None] * w  # [B, N, L, C]
    chunk_max = _stable_max(log_weights, 2)
    weights = torch.exp(log_weights - chunk_max[:, :, None])
    return chunk_max, (weights * v).sum(2), weights.sum(2)


def _advance(
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    summary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    length: int,
    w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state after a chunk of ``length`` tokens: the old state decayed ``length`` times plus the summary."""
    num, den, max_state = state
    chunk_max, chunk_num, chunk_den = summary
    decayed_max = max_state + length * w
    new_max = torch.maximum(decayed_max, chunk_max)
    old_scale, new_scale = torch.exp(decayed_max - new_max), torch.exp(chunk_max - new_max)
    return old_scale * num + new_scale * chunk_num, old_scale * den + new_scale * chunk_den, new_max


def rwkv4_scan_torch(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Chunked RWKV-4 WKV; same arguments and returns as :func:`~.naive.rwkv4_scan_naive`, plus the chunk length."""
    batch, seq_len, channels = k.shape
    length = min(chunk_size, seq_len)
    n_chunks = -(-seq_len // length)
    pad = n_chunks * length - seq_len
    # Padding tokens have k = -inf (weight exactly 0); they sit after the last real token, so they only touch
    # the padded outputs (dropped) and the last chunk's summary (recomputed below at its real length).
    k32 = F.pad(k.float(), (0, 0, 0, pad), value=float("-inf")).view(batch, n_chunks, length, channels)
    v32 = F.pad(v.float(), (0, 0, 0, pad)).view(batch, n_chunks, length, channels)

    # Within-chunk part of every output: log-weights [B, N, L(t), L(s), C].
    position = torch.arange(length, device=k.device)
    lag = (position[:, None] - 1 - position[None, :]).to(torch.float32)  # t - 1 - s
    log_weights = k32[:, :, None] + lag[:, :, None] * w
    is_current = torch.eye(length, dtype=torch.bool, device=k.device)[:, :, None]
    log_weights = torch.where(is_current, (u + k32)[:, :, :, None], log_weights)
    is_future = (position[None, :] > position[:, None])[:, :, None]
    log_weights = log_weights.masked_fill(is_future, float("-inf"))
    local_max = _stable_max(log_weights, 3)  # [B, N, L, C]
    weights = torch.exp(log_weights - local_max[:, :, :, None])
    local_num, local_den = (weights * v32[:, :, None]).sum(3), weights.sum(3)

    # Chunk-start states: a loop over chunks, not tokens.
    summaries = _summarise(k32, v32, w)
    starts = [state]
    for n in range(n_chunks - 1):
        starts.append(_advance(starts[-1], tuple(part[:, n] for part in summaries), length, w))
    last_length = seq_len - (n_chunks - 1) * length
    last = _summarise(k32[:, -1:, :last_length], v32[:, -1:, :last_length], w)
    final_state = _advance(starts[-1], tuple(part[:, 0] for part in last), last_length, w)
    start_num, start_den, start_max = (torch.stack(parts, 1) for parts in zip(*starts, strict=True))  # [B, N, C]

    # Combine each row's within-chunk part with its chunk-start state decayed t times.
    state_log_weight = start_max[:, :, None] + position[:, None].to(torch.float32) * w  # [B, N, L, C]
    row_max = torch.maximum(local_max, state_log_weight)
    local_scale, state_scale = torch.exp(local_max - row_max), torch.exp(state_log_weight - row_max)
    num = local_scale * local_num + state_scale * start_num[:, :, None]
    den = local_scale * local_den + state_scale * start_den[:, :, None]
    wkv = safe_divide(num, den).reshape(batch, n_chunks * length, channels)[:, :seq_len]
    return wkv.to(v.dtype), final_state
