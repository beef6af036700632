"""Triton epilogue shared by the rwkv6 forward kernels: what they write for each output element.

The launchers take ``output=`` one of these (plain Python ints, turned into the kernels' ``STORE_ABS_SUM`` /
``STORE_SPIKES`` constexpr flags: Triton kernels may not read non-constexpr globals):

- ``OUTPUT_DENSE``: the scan output ``o`` itself.
- ``OUTPUT_ABS_SUM``: pass 1 of the fused adaptive neuron: ``sum |o|`` of this program's value block per
  (token, head), into a partial buffer ``[NV, B, T, H]`` that torch reduces (no atomics, so deterministic).
- ``OUTPUT_SPIKES``: pass 2: spike counts ``clamp(round(o / V_th), -max_spikes, max_spikes)`` with the per-token
  threshold ``V_th [B, T]`` from pass 1, so the dense output is never written.
"""

from __future__ import annotations

import triton
import triton.language as tl

OUTPUT_DENSE = 0
OUTPUT_ABS_SUM = 1
OUTPUT_SPIKES = 2


@triton.jit
def round_half_to_even(x):
    """torch.round's rule (ties to even), so kernel counts match ``torch.round`` count for count."""
    rounded = tl.floor(x + 0.5)
    tie = (rounded - x) == 0.5
    odd = (rounded - 2.0 * tl.floor(rounded * 0.5)) != 0.0
    return tl.where(tie & odd, rounded - 1.0, rounded)


@triton.jit
def spike_counts(b_o, b_threshold, MAX_SPIKES: tl.constexpr):
    """Adaptive-neuron quantisation of fp32 ``b_o`` with a broadcastable fp32 threshold (IEEE division)."""
    b_q = round_half_to_even(tl.math.div_rn(b_o, b_threshold))
    return tl.minimum(tl.maximum(b_q, -1.0 * MAX_SPIKES), 1.0 * MAX_SPIKES)

