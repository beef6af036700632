"""Chunked parallel form of rwkv6 in pure torch: the fast CPU path (autograd provides the backward).

Inside a chunk of C tokens the output is a masked, decayed "attention" over the chunk plus the contribution of the
state carried in from the previous chunks; across chunks the state is passed by a short loop over T / C chunks.

Numerical safety. With ``A_t = sum_{m <= t} w_m`` (cumulative log-decay inside the chunk) the decay between a key at
``s`` and a query at ``t > s`` is ``exp(A_{t-1} - A_s) <= 1``. The usual factorisation ``(r_t e^{A_{t-1}}) (k_s
e^{-A_s})`` overflows as soon as ``-A_s > 88`` (a single token with ``w = -exp(5)`` does it), and ``0 * inf`` gives
NaN. So the intra-chunk decay is formed pairwise as ``exp(A_{t-1} - A_s)`` with the exponent masked to ``-inf``
above the diagonal *before* the exponential, which never overflows; the inter-chunk terms only use exponents
``A_{t-1} - 0 <= 0`` and ``A_{C-1} - A_s <= 0``, also safe. The pairwise tensor costs ``[C, C, K]`` per chunk,
i.e. C times the size of k, which is why C is small (16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 16


def chunk_rwkv6_torch(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked rwkv6 scan (matmuls inside chunks, recurrence across chunks), differentiable by autograd.

    Args:
        r, k, w: ``[B, T, H, K]`` receptance, key and log-decay (``w <= 0``).
        v: ``[B, T, H, V]`` value.
        u: ``[H, K]`` bonus of the current token.
        initial_state: ``[B, H, K, V]`` state before the first token, or ``None`` for zeros.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk C; the last chunk may be partial (it is zero-padded: k = 0 adds nothing to the
            state and w = 0 does not decay it, so padding never changes the result).

    Returns:
        ``o [B, T, H, V]`` in v's dtype (computed in float32) and the final state ``[B, H, K, V]`` float32 or ``None``.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T

    def chunked(x: torch.Tensor) -> torch.Tensor:
        # (B, T, H, D) -> (B, H, N, C, D), float32, zero-padded along T
        x = F.pad(x.float(), (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    rc, kc, vc, wc = chunked(r), chunked(k), chunked(v), chunked(w)
    u32 = u.float()[None, :, None, None, :]  # (1, H, 1, 1, K)

    # Cumulative log-decays in float64: with w = -exp(5) they reach -2000 within a chunk, where float32 keeps only
    # ~1e-4 absolute precision, and the differences A_{t-1} - A_s below would lose it.
    A64 = wc.double().cumsum(dim=3)  # (B, H, N, C, K) inclusive cumulative log-decay A_t
    A_prev64 = A64 - wc.double()  # A_{t-1}: exclusive cumsum (starts at 0)
    A_prev = A_prev64.float()
    A_last64 = A64[:, :, :, -1:, :]  # (B, H, N, 1, K) decay of the whole chunk
    A_last = A_last64.float()

    # Intra-chunk attention, strictly causal: att[t, s] = sum_i r_t[i] k_s[i] exp(A_{t-1}[i] - A_s[i]), s < t.
    causal = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)  # (C_t, C_s)
    log_decay = (A_prev64[..., :, None, :] - A64[..., None, :, :]).float()  # (B, H, N, C_t, C_s, K)
    log_decay = log_decay.masked_fill(~causal[:, :, None], float("-inf"))  # mask before exp: no inf * 0
    att = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", rc, kc, torch.exp(log_decay))
    # Diagonal (current token) uses the bonus u instead of a decay.
    bonus = (rc * u32 * kc).sum(-1, keepdim=True)  # (B, H, N, C, 1)
    o = att @ vc + bonus * vc  # (B, H, N, C, V)

    # Inter-chunk: each chunk's own contribution to the state it hands on, decayed to the chunk end (exponent <= 0).
    k_to_end = kc * torch.exp((A_last64 - A64).float())  # (B, H, N, C, K)
    chunk_kv = k_to_end.transpose(-1, -2) @ vc  # (B, H, N, K, V)
    chunk_decay = torch.exp(A_last).squeeze(3)[..., None]  # (B, H, N, K, 1)
    state = r.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    states_in = []  # state entering each chunk, (B, H, K, V) each
    for n in range(N):
        states_in.append(state)
        state = chunk_decay[:, :, n] * state + chunk_kv[:, :, n]
    S = torch.stack(states_in, dim=2)  # (B, H, N, K, V)
    o = o + (rc * torch.exp(A_prev)) @ S  # query sees the incoming state decayed by A_{t-1} (exponent <= 0)

    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]  # (B, T, H, V)
    return o.to(v.dtype), (state if output_final_state else None)
