"""rwkv6 scan: multi-head matrix-valued state with data-dependent decay (RWKV-6 "Finch" WKV).

Per head (K = V = head size, ``w <= 0`` the log-decay)::

    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),      S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t

Implementations, all with the same signature and return ``(o, final_state)``, behind ``rwkv6_scan`` (``scan.py``):

- ``naive``: float32 loop over tokens (``naive.py``), the test oracle.
- ``torch``: chunked parallel form (``torch_scan.py``), the CPU default; autograd gives the backward.
- ``triton``: fused-recurrent kernel (``fused_recurrent.py``, one pass over T with the state on chip; best for short
  T / decoding) or chunked kernel (``chunk.py``, ``tl.dot`` inside chunks; best for training and prefill).

``rwkv6_scan_spiking`` (``spiking.py``) fuses the adaptive spiking neuron into the scan's output (inference only).
"""

from .naive import rwkv6_scan_naive
from .scan import FUSED_RECURRENT_MAX_T, MODES, rwkv6_scan
from .spiking import adaptive_spike_counts, rwkv6_scan_spiking
from .torch_scan import rwkv6_scan_torch

__all__ = [
    "rwkv6_scan",
    "rwkv6_scan_spiking",
    "adaptive_spike_counts",
    "rwkv6_scan_naive",
    "rwkv6_scan_torch",
    "MODES",
    "FUSED_RECURRENT_MAX_T",
]
