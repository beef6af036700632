"""Gated scan: Ponghiran & Roy's gated neuron with a multi-bit, error-keeping accumulator."""

from .naive import gated_scan_naive
from .scan import gated_scan
from .torch_scan import gated_scan_torch

__all__ = ["gated_scan", "gated_scan_naive", "gated_scan_torch"]
