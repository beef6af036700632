"""The torch path of the RWKV-4 WKV scan (the CPU default): a two-level scan, no Python loop over tokens.

The sequence is cut into N chunks of L ~ sqrt(T) tokens (``[B, T, C] -> [B, N, L, C]``).

1. Within chunks, all chunks at once: the running-max recurrence of the oracle, started from an empty state, runs
   over the L positions with tensors ``[B, N, C]``. Each position records its output's unnormalised
   ``(max, num, den)`` (the bonus token included) and the loop ends with each chunk's own summary.
2. Across chunks: the chunk-start states, a loop over the N chunks (``[B, C]`` tensors): the previous state decayed
   by ``L w`` merged with the chunk's summary, max-stabilised.
3. Every output merges its within-chunk part with its chunk-start state decayed ``t`` times, then divides.

So a step costs ``L + N ~ 2 sqrt(T)`` Python iterations instead of T, and about three times the elementwise work
of the plain loop (no ``L x L`` tensors). All merges subtract the larger exponent before ``exp``, so any decay
strength is stable. Gradients come from autograd through these ops (it keeps about twenty fp32 ``[B, T, C]``
tensors); the maxima are differentiated like the oracle's, so even the final state's gradients agree with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .naive import MAX_STATE_INIT, safe_divide

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _merge(first: State, first_shift: torch.Tensor | float, second: State) -> State:
    """``first`` decayed by ``exp(first_shift)`` plus ``second``, each ``(num, den, max)`` scaled by ``exp(-max)``."""
    num_a, den_a, max_a = first
    num_b, den_b, max_b = second
    shifted = max_a + first_shift
    new_max = torch.maximum(shifted, max_b)
    scale_a, scale_b = torch.exp(shifted - new_max), torch.exp(max_b - new_max)
    return scale_a * num_a + scale_b * num_b, scale_a * den_a + scale_b * den_b, new_max


def default_chunk_size(seq_len: int) -> int:
    """~sqrt(T): balances the loop over positions in a chunk against the loop over chunks."""
    return max(1, min(seq_len, math.ceil(math.sqrt(seq_len))))


def rwkv4_scan_torch(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, State]:
    """Two-level RWKV-4 WKV; same arguments and returns as :func:`~.naive.rwkv4_scan_naive`, plus the chunk length."""
    batch, seq_len, channels = k.shape
    length = default_chunk_size(seq_len) if chunk_size is None else max(1, min(chunk_size, seq_len))
    n_chunks = -(-seq_len // length)
    last_length = seq_len - (n_chunks - 1) * length
    pad = n_chunks * length - seq_len
    # Padding tokens (k = -inf, weight exactly 0) come after the last real token: they only reach padded outputs
    # (dropped) and the last chunk's summary, which is therefore taken after its last real token.
    k32 = F.pad(k.float(), (0, 0, 0, pad), value=float("-inf")).view(batch, n_chunks, length, channels)
    v32 = F.pad(v.float(), (0, 0, 0, pad)).view(batch, n_chunks, length, channels)

    # 1. Within chunks, all chunks at once, from an empty state.
    zeros = k32.new_zeros(batch, n_chunks, channels)
    local: State = (zeros, zeros, torch.full_like(zeros, MAX_STATE_INIT))
    outputs = []
    last_summary = None
    for i in range(length):
        kt, vt = k32[:, :, i], v32[:, :, i]
        bonus = u + kt
        outputs.append(_merge(local, 0.0, (vt, torch.ones_like(vt), bonus)))  # (num, den, max) of the output
        local = _merge(local, w, (vt, torch.ones_like(vt), kt))
        if i == last_length - 1:
            last_summary = tuple(part[:, -1] for part in local)
    out_num, out_den, out_max = (torch.stack(parts, 2) for parts in zip(*outputs, strict=True))  # [B, N, L, C]

    # 2. Chunk-start states, a loop over chunks.
    starts = [state]
    for n in range(n_chunks - 1):
        starts.append(_merge(starts[-1], length * w, tuple(part[:, n] for part in local)))
    final_state = _merge(starts[-1], last_length * w, last_summary)
    start_num, start_den, start_max = (torch.stack(parts, 1)[:, :, None] for parts in zip(*starts, strict=True))

    # 3. Each output: its chunk-start state decayed t times (t = position in the chunk) plus the within-chunk part.
    position = torch.arange(length, device=k.device, dtype=torch.float32)[:, None]  # [L, 1]
    num, den, _ = _merge((start_num, start_den, start_max), position * w, (out_num, out_den, out_max))
    wkv = safe_divide(num, den).reshape(batch, n_chunks * length, channels)[:, :seq_len]
    return wkv.to(v.dtype), final_state
