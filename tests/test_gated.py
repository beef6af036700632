"""gated_scan: torch path and Triton kernel against the naive oracle; the oracle against hand-computed values."""


import pytest
import torch
from kernel_testing import arg_types, assert_close, compile_for_hopper

from spikelm.kernels import gated_scan

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}



def make_inputs(batch, seq_len, channels, dtype, learned_threshold, scale=1.0, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(batch, seq_len, channels, generator=generator)).to(device, dtype)
    forget = torch.sigmoid(torch.randn(channels, generator=generator)).to(device)
    i0 = (0.5 * torch.randn(batch, channels, generator=generator)).to(device)
    acc0 = (0.1 * torch.randn(batch, channels, generator=generator)).to(device)
    threshold = (0.1 + 0.3 * torch.rand(channels, generator=generator)).to(device) if learned_threshold else 0.25
    return x, forget, i0, acc0, threshold


def run(backend, x, forget, i0, acc0, threshold, bits, upstream_seed=1):
    """Outputs and the gradients of x, f, i0, acc0 under random upstream gradients (None read as zeros)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, forget, i0, acc0)]
    counts, (i_final, acc_final) = gated_scan(*leaves, bits=bits, threshold=threshold, backend=backend)
    generator = torch.Generator().manual_seed(upstream_seed)
    grad_counts = torch.randn(counts.shape, generator=generator).to(counts)
    grad_i = torch.randn(i_final.shape, generator=generator).to(i_final)
    loss = (counts.float() * grad_counts.float()).sum() + (i_final * grad_i).sum() + acc_final.sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads, strict=True)]
    return counts, i_final, acc_final, grads


CASES = [
    pytest.param(2, 16, 8, torch.float32, 2, True, id="B2-T16-C8-fp32-bits2-learned"),
    pytest.param(3, 63, 60, torch.float32, 1, False, id="B3-T63-C60-fp32-bits1-scalar"),
    pytest.param(3, 63, 60, torch.float32, 3, True, id="B3-T63-C60-fp32-bits3-learned"),
    pytest.param(2, 1, 60, torch.float32, 2, True, id="B2-T1-C60-fp32-bits2-learned"),
    pytest.param(2, 63, 60, torch.bfloat16, 1, True, id="B2-T63-C60-bf16-bits1-learned"),
    pytest.param(2, 63, 60, torch.bfloat16, 3, False, id="B2-T63-C60-bf16-bits3-scalar"),
]


def compare_to_naive(backend, batch, seq_len, channels, dtype, bits, learned_threshold, device="cpu"):
    # Inputs scaled with the number of levels so that every case both clips at +-L and hits the dead zone.
    inputs = make_inputs(batch, seq_len, channels, dtype, learned_threshold, scale=2.0 ** (bits - 1), device=device)
    counts, i_final, acc_final, grads = run(backend, *inputs, bits)
    ref_inputs = [t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs]
    ref_counts, ref_i, ref_acc, ref_grads = run("naive", *ref_inputs, bits)
    levels = 2**bits - 1
    assert counts.dtype == dtype and i_final.dtype == acc_final.dtype == torch.float32
    assert ref_counts.abs().max() == levels and (ref_counts == 0).any(), "the case should clip and hit the dead zone"
    assert torch.equal(ref_counts, ref_counts.round()), "counts must be integers"
    tolerance = TOLERANCE[dtype]
    # Counts come from the same fp32 expressions in every path: they must agree exactly.
    assert torch.equal(counts.cpu(), ref_counts), "counts differ"
    assert_close("i_final", i_final.cpu(), ref_i, tolerance)
    assert_close("acc_final", acc_final.cpu(), ref_acc, tolerance)
    for name, got, want in zip(["grad x", "grad f", "grad i0", "grad acc0"], grads, ref_grads, strict=True):
        assert_close(name, got.cpu(), want, tolerance)
    assert not grads[3].any(), "acc0 gets no gradient under the straight-through rule"


@pytest.mark.parametrize(("batch", "seq_len", "channels", "dtype", "bits", "learned_threshold"), CASES)
def test_torch_matches_naive(batch, seq_len, channels, dtype, bits, learned_threshold):
    compare_to_naive("torch", batch, seq_len, channels, dtype, bits, learned_threshold)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_hand_computed_trajectory(backend):
    # f = 0.5, theta = 0.25, 2 bits (counts up to 3).
    x = torch.tensor([2.0, 0.0, -0.2, -3.0]).view(1, 4, 1)
    counts, (i_final, acc_final) = gated_scan(x, torch.tensor([0.5]), bits=2, threshold=0.25, backend=backend)
    # I: 1.0, 0.5, 0.15, -1.425; a: 1.0 (3, acc .25), .75 (3, acc 0), .15 (dead zone, acc .15), -1.275 (-3, -.525)
    assert counts.flatten().tolist() == [3.0, 3.0, 0.0, -3.0]
    assert abs(i_final.item() + 1.425) < 1e-6 and abs(acc_final.item() + 0.525) < 1e-6


def test_straight_through_gradient_value():
    # One token, i0 = 0: a = (1 - f) x, so d count / d x = (1 - f) / theta.
    x = torch.tensor([[[0.3]]], requires_grad=True)
    counts, _ = gated_scan(x, torch.tensor([0.2]), bits=2, threshold=0.5, backend="torch")
    counts.sum().backward()
    assert abs(x.grad.item() - 0.8 / 0.5) < 1e-6


def test_chunked_calls_with_state_equal_one_call():
    x, forget, i0, acc0, threshold = make_inputs(2, 20, 6, torch.float32, learned_threshold=True)
    counts, (i_final, acc_final) = gated_scan(x, forget, i0, acc0, 2, threshold, backend="torch")
    first, (i_mid, acc_mid) = gated_scan(x[:, :7], forget, i0, acc0, 2, threshold, backend="torch")
    second, (i_end, acc_end) = gated_scan(x[:, 7:], forget, i_mid, acc_mid, 2, threshold, backend="torch")
    assert torch.equal(torch.cat([first, second], 1), counts)
    assert torch.equal(i_end, i_final) and torch.equal(acc_end, acc_final)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"x": torch.zeros(3, 4)}, "shape \\[B, T, C\\]", id="x-2d"),
        pytest.param({"f": torch.full((3,), 0.5)}, "forget gate", id="f-shape"),
        pytest.param({"f": 0.5}, "forget gate", id="f-float"),
        pytest.param({"i0": torch.zeros(2, 4)}, "i0 must be", id="i0-shape"),
        pytest.param({"acc0": torch.zeros(1, 4, 1)}, "acc0 must be", id="acc0-shape"),
        pytest.param({"bits": 0}, "bits=0", id="bits-zero"),
        pytest.param({"bits": 2.0}, "bits=2.0", id="bits-float"),
        pytest.param({"threshold": -0.1}, "threshold=-0.1", id="threshold-negative"),
        pytest.param({"threshold": torch.ones(2)}, "threshold must be", id="threshold-shape"),
        pytest.param({"backend": "gpu"}, "backend='gpu'", id="backend"),
    ],
)
def test_bad_input_raises(kwargs, message):
    arguments = {"x": torch.zeros(1, 3, 4), "f": torch.full((4,), 0.5)} | kwargs
    with pytest.raises(ValueError, match=message):
        gated_scan(**arguments)


TRITON_CASES = [
    pytest.param(1, 5, 40, torch.float32, 2, True, id="B1-T5-C40-fp32-bits2-two-channel-blocks"),
    pytest.param(2, 21, 8, torch.float32, 2, True, id="B2-T21-C8-two-token-tiles-fp32-bits2-learned"),
    pytest.param(1, 9, 5, torch.float32, 1, False, id="B1-T9-C5-fp32-bits1-scalar"),
    pytest.param(2, 1, 6, torch.float32, 3, True, id="B2-T1-C6-fp32-bits3-learned"),
    pytest.param(1, 10, 6, torch.bfloat16, 3, True, id="B1-T10-C6-bf16-bits3-learned"),
]


@pytest.mark.parametrize(("batch", "seq_len", "channels", "dtype", "bits", "learned_threshold"), TRITON_CASES)
def test_triton_matches_naive(batch, seq_len, channels, dtype, bits, learned_threshold):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs the Triton interpreter (conftest)
    compare_to_naive("triton", batch, seq_len, channels, dtype, bits, learned_threshold, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_real_shape_gpu(dtype, bits):
    """B*T*C = 16M against the naive loop on the same GPU."""
    inputs = make_inputs(8, 2048, 1024, dtype, learned_threshold=True, scale=2.0 ** (bits - 1), device="cuda")
    counts, i_final, acc_final, grads = run("triton", *inputs, bits)
    ref_counts, ref_i, ref_acc, ref_grads = run("naive", *inputs, bits)
    # Both paths do the same IEEE fp32 operations; allow a stray count off by one at an exact quantisation boundary.
    assert (counts != ref_counts).float().mean() <= 1e-5
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    assert_close("i_final", i_final, ref_i, tolerance)
    assert_close("acc_final", acc_final, ref_acc, 1e-2)
    for name, got, want in zip(["grad x", "grad f", "grad i0"], grads, ref_grads, strict=False):
        assert_close(name, got, want, tolerance)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels themselves run")
def test_triton_kernels_compile_for_hopper():
    from spikelm.kernels.gated.fused_recurrent import BWD_BLOCK_T, FWD_BLOCK_T

    forward, backward = {"BLOCK_T": FWD_BLOCK_T, "BLOCK_C": 128}, {"BLOCK_T": BWD_BLOCK_T, "BLOCK_C": 32}
    types = arg_types(i32=("T", "C"), bf16_pointers=("x_ptr", "counts_ptr", "grad_counts_ptr", "grad_x_ptr"))
    module = "spikelm.kernels.gated.fused_recurrent"
    compile_for_hopper([(module, "_gated_fwd_kernel", {"LEVELS": 3, **forward}, types),
                        (module, "_gated_bwd_kernel", backward, types)])
