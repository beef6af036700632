"""rwkv6_scan Triton kernels (fused-recurrent and chunked) against the float32 naive loop.

Without CUDA these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are tiny.
The ``gpu`` tests at the bottom use real shapes and run only on a CUDA machine.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import arg_types, compile_for_hopper, relative_rms
from test_rwkv6 import assert_close, make_inputs, oracle, run_with_grads

from spikelm.kernels import rwkv6_scan
from spikelm.kernels.rwkv6 import rwkv6_scan_naive
from spikelm.kernels.utils import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter stores bf16 by truncation and the GPU's fp32 tl.dot paths differ slightly from torch's.
TRITON_MODES = ["fused_recurrent", "chunk"]
TRITON_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}

CASES = [
    # B, T, H, K, V, dtype, decay
    pytest.param(2, 13, 2, 16, 16, torch.float32, "normal", id="B2-T13-H2-K16-fp32"),
    pytest.param(1, 21, 1, 48, 48, torch.float32, "normal", id="B1-T21-K48-fp32"),
    pytest.param(1, 9, 1, 16, 64, torch.float32, "normal", id="B1-T9-K16-V64-two-value-blocks-fp32"),
    pytest.param(2, 1, 1, 16, 16, torch.float32, "normal", id="B2-T1-fp32"),
    pytest.param(1, 19, 2, 16, 16, torch.float32, "strong", id="B1-T19-strong-decay-fp32"),
    pytest.param(2, 13, 2, 16, 16, torch.bfloat16, "normal", id="B2-T13-H2-K16-bf16"),
    pytest.param(1, 21, 1, 48, 48, torch.bfloat16, "normal", id="B1-T21-K48-bf16"),
]


def on_device(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: x.to(DEVICE) for name, x in inputs.items()}


def to_cpu(result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: x.cpu() for name, x in result.items()}


@pytest.mark.parametrize("mode", TRITON_MODES)
@pytest.mark.parametrize("B, T, H, K, V, dtype, decay", CASES)
def test_triton_matches_naive(mode, B, T, H, K, V, dtype, decay):
    inputs = make_inputs(B, T, H, K, V, dtype, decay)
    expected = oracle(inputs)
    actual = to_cpu(run_with_grads(lambda **kw: rwkv6_scan(**kw, backend="triton", mode=mode), on_device(inputs)))
    assert actual["o"].dtype == dtype and actual["final_state"].dtype == torch.float32
    assert_close(actual, expected, TRITON_TOLERANCE[dtype])


@pytest.mark.parametrize("mode", TRITON_MODES)
def test_triton_without_initial_or_final_state(mode):
    # No initial state (zeros, no gradient) and no final-state gradient: the kernels' optional paths.
    inputs = make_inputs(1, 11, 2, 16, 16, torch.float32)
    inputs.pop("initial_state")
    leaves = {n: x.to(DEVICE).requires_grad_(True) for n, x in inputs.items()}
    o, final = rwkv6_scan(**leaves, backend="triton", mode=mode)
    assert final is None
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    grads = [g.cpu() for g in torch.autograd.grad((o * do.to(DEVICE)).sum(), list(leaves.values()))]
    o = o.cpu()
    ref_leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    o_ref, _ = rwkv6_scan_naive(**ref_leaves)
    ref_grads = torch.autograd.grad((o_ref * do).sum(), list(ref_leaves.values()))
    assert relative_rms(o, o_ref) < TRITON_TOLERANCE[torch.float32]
    for name, g, g_ref in zip(inputs, grads, ref_grads, strict=True):
        assert relative_rms(g, g_ref) < TRITON_TOLERANCE[torch.float32], name


@pytest.mark.parametrize("mode", TRITON_MODES)
def test_triton_mixed_dtypes_and_strided_inputs(mode):
    # The model's call: r, k, v in bf16, log-decay and bonus kept in fp32; r, k, v, w given as strided views.
    inputs = make_inputs(1, 18, 2, 16, 16, torch.bfloat16)
    inputs["w"], inputs["u"] = inputs["w"].float(), inputs["u"].float()
    strided = {n: (x.transpose(1, 2).contiguous().transpose(1, 2) if n in "rkvw" else x) for n, x in inputs.items()}
    assert not strided["r"].is_contiguous()
    actual = to_cpu(run_with_grads(lambda **kw: rwkv6_scan(**kw, backend="triton", mode=mode), on_device(strided)))
    assert actual["dw"].dtype == torch.float32 and actual["dr"].dtype == torch.bfloat16
    assert_close(actual, oracle(inputs), TRITON_TOLERANCE[torch.bfloat16])


CHUNK_CASES = [
    # B, T, H, K, V, dtype, decay, chunk_size: several chunks, a partial last one, each chunk size
    pytest.param(1, 40, 1, 16, 16, torch.float32, "strong", 16, id="T40-C16-3-chunks-strong-decay-fp32"),
    pytest.param(1, 70, 1, 32, 32, torch.float32, "normal", 32, id="T70-C32-K32-fp32"),
    pytest.param(1, 65, 1, 16, 16, torch.float32, "normal", 64, id="T65-C64-fp32"),
    pytest.param(1, 40, 1, 16, 16, torch.bfloat16, "strong", 16, id="T40-C16-strong-decay-bf16"),
]


@pytest.mark.parametrize("B, T, H, K, V, dtype, decay, chunk_size", CHUNK_CASES)
def test_triton_chunk_sizes_match_naive(B, T, H, K, V, dtype, decay, chunk_size):
    inputs = make_inputs(B, T, H, K, V, dtype, decay)
    expected = oracle(inputs)
    actual = to_cpu(run_with_grads(
        lambda **kw: rwkv6_scan(**kw, backend="triton", mode="chunk", chunk_size=chunk_size), on_device(inputs)))
    assert_close(actual, expected, TRITON_TOLERANCE[dtype])


def test_auto_mode_and_bad_triton_options():
    for T in (3, 65):  # T <= 64: fused-recurrent, otherwise chunked
        inputs = make_inputs(1, T, 1, 16, 16, torch.float32)
        o, _ = rwkv6_scan(**on_device(inputs), backend="triton")
        assert relative_rms(o.cpu(), rwkv6_scan_naive(**inputs)[0]) < TRITON_TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="chunk_size"):
        rwkv6_scan(**inputs, backend="triton", mode="chunk", chunk_size=24)


GPU_CASES = [
    pytest.param(4, 1000, 8, 64, 64, torch.float32, id="B4-T1000-H8-K64-fp32"),
    pytest.param(4, 1000, 8, 64, 64, torch.bfloat16, id="B4-T1000-H8-K64-bf16"),
    pytest.param(2, 333, 4, 128, 128, torch.bfloat16, id="B2-T333-H4-K128-bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", TRITON_MODES)
@pytest.mark.parametrize("B, T, H, K, V, dtype", GPU_CASES)
def test_triton_real_shapes_on_gpu(mode, B, T, H, K, V, dtype):
    inputs = on_device(make_inputs(B, T, H, K, V, dtype))
    expected = run_with_grads(lambda **kw: rwkv6_scan(**kw, backend="torch"), {n: x.float() if n != "initial_state"
                                                                             else x for n, x in inputs.items()})
    actual = run_with_grads(lambda **kw: rwkv6_scan(**kw, backend="triton", mode=mode), inputs)
    # fp32: dw sums O(T) terms in two reverse cumulative sums, so long sequences lose a few more digits
    assert_close(actual, expected, 1e-4 if dtype == torch.float32 else 4e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels themselves run")
def test_triton_kernels_compile_for_hopper():
    # bf16 everywhere (the training dtype), both spike epilogues, and the fp32 "ieee" tl.dot once: ~10 compiles.
    def build(module: str, kernel: str, ints: tuple[str, ...], constexprs: dict, dtype: str = "bf16") -> tuple:
        sequences = ("r", "k", "v", "w", "u", "do", "o")
        types = {**arg_types(i32=ints), **dict.fromkeys(sequences, f"*{dtype}")}
        return f"spikelm.kernels.rwkv6.{module}", kernel, constexprs, types

    heads = dict(H=4, K=64, V=64, BK=64, BV=32)
    chunked = dict(heads, BT=16, DOT_PRECISION="tf32")
    builds = []
    for abs_sum, spikes in ((True, False), (False, True)):
        epilogue = dict(STORE_ABS_SUM=abs_sum, STORE_SPIKES=spikes, MAX_SPIKES=8)
        builds += [build("fused_recurrent", "_fused_recurrent_fwd_kernel", ("T", "B"),
                         dict(heads, USE_INITIAL_STATE=True, **epilogue)),
                   build("chunk", "_chunk_fwd_o_kernel", ("T", "NT", "B"), dict(chunked, **epilogue))]
    builds += [
        build("fused_recurrent", "_fused_recurrent_bwd_dr_kernel", ("T", "B"),
              dict(heads, USE_INITIAL_STATE=True, USE_FINAL_GRAD=True)),
        build("fused_recurrent", "_fused_recurrent_bwd_dkv_kernel", ("T", "B"), dict(heads, USE_FINAL_GRAD=True)),
        build("chunk", "_chunk_fwd_h_kernel", ("T", "NT"), dict(chunked, USE_INITIAL_STATE=True)),
        build("chunk", "_chunk_bwd_dh_kernel", ("T", "NT"), dict(chunked, USE_FINAL_GRAD=True)),
        build("chunk", "_chunk_bwd_kernel", ("T", "NT"), dict(chunked, BV=64)),
        build("chunk", "_chunk_bwd_kernel", ("T", "NT"), dict(chunked, BV=64, DOT_PRECISION="ieee"), "fp32"),
    ]
    compile_for_hopper(builds)
