"""The rwkv6 Triton kernels compile for a real GPU (sm_90) even on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and accepts code that the compiler rejects (for example a
kernel reading a non-constexpr global), so CI without a GPU also compiles every kernel variant ahead of time, down
to a cubin with Triton's bundled ptxas. This runs in a subprocess because the interpreter setting of this test
session replaces ``@triton.jit`` functions with interpreted ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

COMPILE_ALL = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spikelm.kernels.rwkv6 import chunk, fused_recurrent

    target = GPUTarget("cuda", 90, 32)

    def build(kernel, ints, consts, dtype):
        signature = {name: "constexpr" if name in consts else "i32" if name in ints
                     else f"*{dtype}" if name in ("r", "k", "v", "w", "u", "do", "o") else "*fp32"
                     for name in kernel.arg_names}
        triton.compile(ASTSource(kernel, signature, constexprs=consts), target=target)

    # bf16 everywhere (the training dtype), both spike epilogues, and the fp32 "ieee" tl.dot once: ~10 compiles.
    heads = dict(H=4, K=64, V=64, BK=64, BV=32)
    chunked = dict(heads, BT=16, DOT_PRECISION="tf32")
    for abs_sum, spikes in ((True, False), (False, True)):
        epilogue = dict(STORE_ABS_SUM=abs_sum, STORE_SPIKES=spikes, MAX_SPIKES=8)
        build(fused_recurrent._fused_recurrent_fwd_kernel, {"T", "B"},
              dict(heads, USE_INITIAL_STATE=True, **epilogue), "bf16")
        build(chunk._chunk_fwd_o_kernel, {"T", "NT", "B"}, dict(chunked, **epilogue), "bf16")
    build(fused_recurrent._fused_recurrent_bwd_dr_kernel, {"T", "B"},
          dict(heads, USE_INITIAL_STATE=True, USE_FINAL_GRAD=True), "bf16")
    build(fused_recurrent._fused_recurrent_bwd_dkv_kernel, {"T", "B"}, dict(heads, USE_FINAL_GRAD=True), "bf16")
    build(chunk._chunk_fwd_h_kernel, {"T", "NT"}, dict(chunked, USE_INITIAL_STATE=True), "bf16")
    build(chunk._chunk_bwd_dh_kernel, {"T", "NT"}, dict(chunked, USE_FINAL_GRAD=True), "bf16")
    build(chunk._chunk_bwd_kernel, {"T", "NT"}, dict(chunked, BV=64), "bf16")
    build(chunk._chunk_bwd_kernel, {"T", "NT"}, dict(chunked, BV=64, DOT_PRECISION="ieee"), "fp32")
    print("compiled")
''')


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as error:
        pytest.skip(f"Triton's NVIDIA backend is not importable here: {error}")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
