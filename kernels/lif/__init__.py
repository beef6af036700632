"""LIF scan: SpikeGPT's multi-step leaky integrate-and-fire neuron over the token axis."""

from .naive import lif_scan_naive
from .scan import lif_scan
from .torch_scan import lif_scan_torch

__all__ = ["lif_scan", "lif_scan_naive", "lif_scan_torch"]
