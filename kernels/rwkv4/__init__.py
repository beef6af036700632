"""RWKV-4 / SpikeGPT vector WKV scan (numerically stable running-max form)."""

from .naive import rwkv4_scan_naive
from .scan import rwkv4_scan
from .torch_scan import rwkv4_scan_torch

__all__ = ["rwkv4_scan", "rwkv4_scan_naive", "rwkv4_scan_torch"]
