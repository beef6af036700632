"""Float32 reference loop for the RWKV-4 WKV scan (running-max form): the test oracle; autograd runs through it."""

from __future__ import annotations

import torch

# Initial running max: "minus infinity" that stays finite, so max_state + w and exp(max_state - m) never make NaN.
MAX_STATE_INIT = -1e38


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, and 0 where the denominator is 0 (no contribution at all yet).

    The denominator is replaced before dividing, not only the result afterwards: ``where`` alone would still send
    ``0 * inf = NaN`` into the backward of the discarded branch.
    """
    empty = denominator == 0
    return torch.where(empty, torch.zeros_like(numerator), numerator / torch.where(empty, 1.0, denominator))


def rwkv4_scan_naive(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Token-by-token RWKV-4 WKV in float32.

    Args:
        w: per-channel decay ``-exp(time_decay)`` ``[C]`` fp32 (negative).
        u: bonus ``time_first`` ``[C]`` fp32.
        k, v: ``[B, T, C]`` (any float dtype; upcast to fp32).
        state: ``(num, den, max_state)``, each ``[B, C]`` fp32; the true sums are ``num * exp(max_state)`` etc.
    Returns:
        ``(wkv [B, T, C] in v's dtype, (num, den, max_state) [B, C] fp32)``.
    """
    k32, v32 = k.float(), v.float()
    num, den, max_state = state
    outputs = []
    for t in range(k.shape[1]):
        kt, vt = k32[:, t], v32[:, t]
        # Output: the state plus the current token with the bonus u, both scaled by exp(-m_o).
        m_o = torch.maximum(max_state, u + kt)
        e1, e2 = torch.exp(max_state - m_o), torch.exp(u + kt - m_o)
        outputs.append(safe_divide(e1 * num + e2 * vt, e1 * den + e2))
        # State update: decay by exp(w), add the current token without the bonus.
        m_s = torch.maximum(max_state + w, kt)
        e1, e2 = torch.exp(max_state + w - m_s), torch.exp(kt - m_s)
        num, den, max_state = e1 * num + e2 * vt, e1 * den + e2, m_s
    return torch.stack(outputs, dim=1).to(v.dtype), (num, den, max_state)
