"""Fused spike-recurrence scans (imported as ``spikelm.kernels``; docs/design.md, "Kernels").

Each operator has a Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), a fast torch path (the CPU default)
and a float32 naive loop (the test oracle), all behind one public function with a ``backend=`` argument.
"""

if __name__ == "kernels":
    # This folder was found as a top-level module because the repository root is on sys.path (``python -c`` or
    # ``python -m`` run from the checkout). Hugging Face ships a different package named ``kernels`` and
    # transformers probes for it on import; look like a bare namespace so that probe answers "not installed".
    __file__ = None
else:
    from .gated import gated_scan
    from .lif import lif_scan
    from .rwkv4 import rwkv4_scan
    from .rwkv6 import rwkv6_scan, rwkv6_scan_spiking
    from .utils import resolve_backend

    __all__ = ["rwkv6_scan", "rwkv6_scan_spiking", "rwkv4_scan", "lif_scan", "gated_scan", "resolve_backend"]
