"""rwkv6 scan fused with the adaptive spiking neuron that follows it (SpikingBrain's adaptive-threshold neuron).

Per token, over the scan output of all heads flattened (``[B, T, H*V]``)::

    V_th = clamp(mean(|o|), min=1e-6) / k_divisor,     counts = clamp(round(o / V_th), -max_spikes, max_spikes)

The threshold of a token needs every head's output, but the Triton programs own one (head, value block) each. Two
passes over the scan, none writing the dense ``o``:

1. the forward kernel writes ``sum |o|`` of its value block per (token, head) into a ``[NV, B, T, H]`` buffer
   (1/V of the size of o per value block; a plain per-program buffer rather than atomics, so the result is
   deterministic run to run), and torch reduces it to ``V_th [B, T]``;
2. the same kernel recomputes ``o`` on chip and writes only the spike counts.

For the chunked kernel the chunk states are computed once and shared by both passes, so pass 2 costs one more
parallel ``o`` kernel; for the fused-recurrent kernel (decoding) the whole recurrence runs twice.
Counts are computed from the float32 accumulator, never from a bf16-rounded ``o``.
"""

from __future__ import annotations

import torch

from ..utils import resolve_backend
from .scan import FUSED_RECURRENT_MAX_T, MODES, check_chunk_size, check_inputs, rwkv6_scan

THRESHOLD_FLOOR = 1e-6  # keeps V_th > 0 for an all-zero token (then every count is 0)


def adaptive_spike_counts(
    o: torch.Tensor, k_divisor: float = 3.0, max_spikes: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive neuron on a scan output ``o [B, T, H, V]`` (the reference for the fused kernels).

    Returns ``(counts [B, T, H, V]`` in o's dtype, ``v_th [B, T, 1]`` float32``)``; computed in float32.
    """
    B, T, H, V = o.shape
    o32 = o.float().reshape(B, T, H * V)  # the neuron sees one token's channels of all heads
    v_th = o32.abs().mean(-1, keepdim=True).clamp_min(THRESHOLD_FLOOR) / k_divisor  # (B, T, 1)
    counts = torch.round(o32 / v_th).clamp(-max_spikes, max_spikes)
    return counts.reshape(B, T, H, V).to(o.dtype), v_th


def _spiking_triton(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    initial_state: torch.Tensor | None, k_divisor: float, max_spikes: int, mode: str, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .chunk import chunk_rwkv6_fwd_h, chunk_rwkv6_fwd_o
    from .fused_recurrent import fused_recurrent_rwkv6_fwd
    from .spike_epilogue import OUTPUT_ABS_SUM, OUTPUT_SPIKES

    B, T, H, K = r.shape
    V = v.shape[-1]
    r, k, v, w, u = (x.contiguous() for x in (r, k, v, w, u))
    h0 = initial_state.float().contiguous() if initial_state is not None else None

    def threshold_from(abs_sum: torch.Tensor) -> torch.Tensor:
        # abs_sum: [NV, B, T, H] partial sums of |o| -> V_th [B, T]
        return (abs_sum.sum(dim=(0, 3)) / (H * V)).clamp_min(THRESHOLD_FLOOR) / k_divisor

    if mode == "chunk":
        h, final_state = chunk_rwkv6_fwd_h(k, v, w, h0, chunk_size)
        v_th = threshold_from(chunk_rwkv6_fwd_o(r, k, v, w, u, h, chunk_size, output=OUTPUT_ABS_SUM))
        counts = chunk_rwkv6_fwd_o(r, k, v, w, u, h, chunk_size, output=OUTPUT_SPIKES, threshold=v_th,
                                   max_spikes=max_spikes)
    else:
        abs_sum, final_state = fused_recurrent_rwkv6_fwd(r, k, v, w, u, h0, output=OUTPUT_ABS_SUM)
        v_th = threshold_from(abs_sum)
        counts, _ = fused_recurrent_rwkv6_fwd(r, k, v, w, u, h0, output=OUTPUT_SPIKES, threshold=v_th,
                                              max_spikes=max_spikes)
    return counts, v_th[..., None], final_state


@torch.no_grad()
def rwkv6_scan_spiking(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    k_divisor: float = 3.0,
    max_spikes: int = 8,
    backend: str | None = None,
    mode: str | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """rwkv6 scan followed by the adaptive neuron, returning spike counts without writing the dense output.

    Forward only (an inference path: generation and sparsity measurement); the results carry no autograd history.
    Training uses ``rwkv6_scan`` followed by the neuron module, whose straight-through gradient needs ``o``.

    Args:
        r, k, w: ``[B, T, H, K]``; v: ``[B, T, H, V]``; u: ``[H, K]``; initial_state: ``[B, H, K, V]`` or None
            (as in ``rwkv6_scan``).
        output_final_state: also return the final state ``[B, H, K, V]`` float32.
        k_divisor: threshold divisor k in ``V_th = mean(|o|) / k`` (> 0).
        max_spikes: largest spike count magnitude (a positive int).
        backend: ``None``/``"auto"``, ``"torch"``, ``"naive"`` (scan then neuron) or ``"triton"`` (fused, two passes).
        mode, chunk_size: Triton kernel choice as in ``rwkv6_scan``.

    Returns:
        ``(counts, v_th, final_state)``: ``counts [B, T, H, V]`` integer-valued in v's dtype (``o``'s dtype),
        ``v_th [B, T, 1]`` float32 (the projection sees ``v_th * counts``), and the final state or ``None``.
    """
    check_inputs(r, k, v, w, u, initial_state)
    if isinstance(k_divisor, bool) or not isinstance(k_divisor, int | float) or not k_divisor > 0:
        raise ValueError(f"rwkv6_scan_spiking: k_divisor={k_divisor!r} must be a number > 0 (default 3.0)")
    if isinstance(max_spikes, bool) or not isinstance(max_spikes, int) or max_spikes < 1:
        raise ValueError(f"rwkv6_scan_spiking: max_spikes={max_spikes!r} must be an int >= 1 (default 8)")
    if mode is not None and mode not in MODES:
        raise ValueError(f"rwkv6_scan_spiking: mode={mode!r} is not one of {', '.join(map(repr, MODES))} or None")
    which = resolve_backend(backend, r, k, v, w, u)
    C = check_chunk_size(chunk_size, which)
    if which in ("torch", "naive"):
        # Scan in float32 (what the fused kernel quantises), then the neuron.
        o, final_state = rwkv6_scan(r.float(), k.float(), v.float(), w.float(), u.float(), initial_state, True,
                                    backend=which, chunk_size=C)
        counts, v_th = adaptive_spike_counts(o, k_divisor, max_spikes)
        counts = counts.to(v.dtype)
    else:
        if mode is None:
            mode = "fused_recurrent" if r.shape[1] <= FUSED_RECURRENT_MAX_T else "chunk"
        if mode == "chunk" and C not in (16, 32, 64):
            raise ValueError(f"rwkv6_scan_spiking(backend='triton', mode='chunk'): chunk_size={C} must be 16, 32 "
                             "or 64")
        counts, v_th, final_state = _spiking_triton(r, k, v, w, u, initial_state, float(k_divisor), max_spikes,
                                                    mode, C)
    return counts, v_th, (final_state if output_final_state else None)


__all__ = ["rwkv6_scan_spiking", "adaptive_spike_counts"]
