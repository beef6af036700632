"""Triton helpers shared by the per-channel scans (gated, rwkv4) that walk [BLOCK_T, BLOCK_C] tiles of tokens."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_row(tile, row):
    # Row ``row`` of a [BLOCK_T, BLOCK_C] tile; a register select once the token loop is unrolled.
    return tl.sum(tl.where(row, tile, 0.0), axis=0)
