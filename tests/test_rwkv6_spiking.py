"""rwkv6_scan_spiking (scan fused with the adaptive neuron) equals scan-then-neuron, count for count."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import relative_rms
from test_rwkv6 import make_inputs

from spikelm.kernels.rwkv6 import adaptive_spike_counts, rwkv6_scan_naive, rwkv6_scan_spiking
from spikelm.kernels.utils import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_adaptive_spike_counts_by_hand():
    # One token, two heads of two channels: mean |o| = (3 + 1 + 0.5 + 0.25) / 4 = 1.1875, V_th = 1.1875 / 2.5.
    o = torch.tensor([3.0, -1.0, 0.5, -0.25]).reshape(1, 1, 2, 2)
    counts, v_th = adaptive_spike_counts(o, k_divisor=2.5, max_spikes=4)
    assert v_th.shape == (1, 1, 1) and v_th.item() == pytest.approx(0.475)
    # o / V_th = 6.32 (clipped to 4), -2.11, 1.05, -0.53 -> 4, -2, 1, -1
    assert counts.flatten().tolist() == [4.0, -2.0, 1.0, -1.0]
    zeros, v_th0 = adaptive_spike_counts(torch.zeros(1, 1, 2, 2))
    assert zeros.abs().sum() == 0 and v_th0.item() == pytest.approx(1e-6 / 3)


def reference(inputs: dict[str, torch.Tensor], k_divisor: float, max_spikes: int):
    f32 = {n: x.float() for n, x in inputs.items()}
    o, final_state = rwkv6_scan_naive(**f32, output_final_state=True)
    counts, v_th = adaptive_spike_counts(o, k_divisor, max_spikes)
    return counts, v_th, final_state


SPIKE_CASES = [
    # B, T, H, K, V, dtype, k_divisor, max_spikes
    pytest.param(2, 13, 2, 16, 16, torch.float32, 3.0, 8, id="T13-H2-K16-fp32"),
    pytest.param(1, 21, 1, 48, 48, torch.float32, 2.0, 4, id="T21-K48-max4-fp32"),
    pytest.param(2, 21, 2, 16, 32, torch.bfloat16, 3.0, 8, id="T21-V32-bf16"),
]


def check(actual, expected, dtype) -> None:
    counts, v_th, final_state = actual
    ref_counts, ref_v_th, ref_final = expected
    assert counts.dtype == dtype and v_th.dtype == torch.float32 and v_th.shape == ref_v_th.shape
    assert relative_rms(v_th.cpu(), ref_v_th) < 1e-5
    assert relative_rms(final_state.cpu(), ref_final) < 1e-5
    mismatches = (counts.cpu().float() != ref_counts).sum().item()
    # count for count; on a GPU a value sitting within ~1e-7 of a rounding boundary may land either side
    allowed = 0 if DEVICE == "cpu" else max(1, counts.numel() // 10_000)
    assert mismatches <= allowed, f"{mismatches} of {counts.numel()} spike counts differ"
    assert counts.abs().sum() > 0


@pytest.mark.parametrize("B, T, H, K, V, dtype, k_divisor, max_spikes", SPIKE_CASES)
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_torch_spiking_equals_scan_then_neuron(backend, B, T, H, K, V, dtype, k_divisor, max_spikes):
    inputs = make_inputs(B, T, H, K, V, dtype)
    actual = rwkv6_scan_spiking(**inputs, output_final_state=True, k_divisor=k_divisor, max_spikes=max_spikes,
                                backend=backend)
    check(actual, reference(inputs, k_divisor, max_spikes), dtype)


@pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("B, T, H, K, V, dtype, k_divisor, max_spikes", SPIKE_CASES)
@pytest.mark.parametrize("mode", ["fused_recurrent", "chunk"])
def test_triton_spiking_equals_scan_then_neuron(mode, B, T, H, K, V, dtype, k_divisor, max_spikes):
    inputs = make_inputs(B, T, H, K, V, dtype)
    on_device = {n: x.to(DEVICE) for n, x in inputs.items()}
    actual = rwkv6_scan_spiking(**on_device, output_final_state=True, k_divisor=k_divisor, max_spikes=max_spikes,
                                backend="triton", mode=mode)
    check(actual, reference(inputs, k_divisor, max_spikes), dtype)


def test_spiking_is_forward_only_and_validates():
    inputs = make_inputs(1, 4, 1, 8, 8, torch.float32)
    leaves = {n: x.requires_grad_(True) for n, x in inputs.items()}
    counts, v_th, final_state = rwkv6_scan_spiking(**leaves)
    assert final_state is None and not counts.requires_grad and not v_th.requires_grad
    with pytest.raises(ValueError, match="k_divisor"):
        rwkv6_scan_spiking(**inputs, k_divisor=0.0)
    with pytest.raises(ValueError, match="max_spikes"):
        rwkv6_scan_spiking(**inputs, max_spikes=0)
    with pytest.raises(ValueError, match="u must be"):
        rwkv6_scan_spiking(**{**inputs, "u": inputs["u"][:, :2]})


@pytest.mark.parametrize("backend, mode", [("torch", None), ("triton", "fused_recurrent"), ("triton", "chunk")])
def test_ties_round_half_to_even(backend, mode):
    # r = e_0, k = 0: o = row 0 of the initial state exactly = [5, 1, 3, -3]; mean |o| = 3, V_th = 3 / 1.5 = 2, so
    # o / V_th = 2.5, 0.5, 1.5, -1.5 -> torch.round's ties-to-even: 2, 0, 2, -2.
    if backend == "triton" and not triton_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    B, T, H, K, V = 1, 1, 1, 16, 4
    r = torch.zeros(B, T, H, K)
    r[..., 0] = 1.0
    k = torch.zeros(B, T, H, K)
    state = torch.zeros(B, H, K, V)
    state[0, 0, 0] = torch.tensor([5.0, 1.0, 3.0, -3.0])
    inputs = {"r": r, "k": k, "v": torch.randn(B, T, H, V), "w": -torch.ones(B, T, H, K), "u": torch.ones(H, K),
              "initial_state": state}
    counts, v_th, _ = rwkv6_scan_spiking(**{n: x.to(DEVICE) for n, x in inputs.items()}, k_divisor=1.5,
                                         backend=backend, mode=mode)
    assert v_th.item() == 2.0
    assert counts.flatten().tolist() == [2.0, 0.0, 2.0, -2.0]
