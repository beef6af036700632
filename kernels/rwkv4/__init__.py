"""RWKV-4 / SpikeGPT vector WKV scan (numerically stable running-max form)."""

from .chunked import rwkv4_scan_torch
from .naive import rwkv4_scan_naive
from .scan import rwkv4_scan

__all__ = ["rwkv4_scan", "rwkv4_scan_naive", "rwkv4_scan_torch"]
