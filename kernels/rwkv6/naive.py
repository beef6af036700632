"""Float32 token-by-token loop for rwkv6: the test oracle (slow, obviously correct, differentiable)."""

from __future__ import annotations

import torch


def rwkv6_scan_naive(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference recurrence, one token at a time in float32.

    Args:
        r, k, w: ``[B, T, H, K]`` receptance, key and log-decay (``w <= 0``).
        v: ``[B, T, H, V]`` value.
        u: ``[H, K]`` bonus of the current token.
        initial_state: ``[B, H, K, V]`` state before the first token, or ``None`` for zeros.
        output_final_state: also return the state after the last token.

    Returns:
        ``o [B, T, H, V]`` in v's dtype and the final state ``[B, H, K, V]`` float32 (or ``None``).
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    r32, k32, v32, w32, u32 = (x.float() for x in (r, k, v, w, u))
    state = r32.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        kv = k32[:, t, :, :, None] * v32[:, t, :, None, :]  # (B, H, K, V)
        # o_t = r_t (S_{t-1} + diag(u) k_t^T v_t)
        o_t = torch.einsum("bhk,bhkv->bhv", r32[:, t], state + u32[None, :, :, None] * kv)
        outputs.append(o_t)
        state = torch.exp(w32[:, t, :, :, None]) * state + kv
    o = torch.stack(outputs, dim=1) if outputs else v32.new_zeros(B, 0, H, V)  # (B, T, H, V)
    return o.to(v.dtype), (state if output_final_state else None)
