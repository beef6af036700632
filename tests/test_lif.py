"""lif_scan: torch path and Triton kernel against the float32 naive oracle, the oracle against hand-computed values."""


import pytest
import torch
from kernel_testing import arg_types, assert_close, compile_for_hopper

from spikelm.kernels import lif_scan

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}



def make_inputs(batch, seq_len, channels, dtype, learned, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    # Currents around the threshold so that a good share of tokens spike and the surrogate sees both sides.
    x = (1.5 * torch.randn(batch, seq_len, channels, generator=generator) + 0.6).to(device, dtype)
    v0 = (0.5 * torch.randn(batch, channels, generator=generator)).to(device)
    if learned:
        tau = (1.5 + 2 * torch.rand(channels, generator=generator)).to(device)
        v_th = (0.5 + torch.rand(channels, generator=generator)).to(device)
    else:
        tau, v_th = 2.0, 1.0
    return x, v0, tau, v_th


def run(backend, x, v0, tau, v_th, reset, upstream_seed=1):
    """Outputs and every gradient (x, v0, and tau / v_th when they are tensors) under random upstream gradients."""
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in (x, v0, tau, v_th)]
    spikes, v_final = lif_scan(*leaves, reset=reset, alpha=2.0, backend=backend)
    generator = torch.Generator().manual_seed(upstream_seed)
    grad_spikes = torch.randn(spikes.shape, generator=generator).to(spikes)
    grad_v = torch.randn(v_final.shape, generator=generator).to(v_final)
    loss = (spikes.float() * grad_spikes.float()).sum() + (v_final * grad_v).sum()
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(loss, tensors)
    return spikes, v_final, grads


CASES = [
    pytest.param(2, 16, 8, torch.float32, "hard", True, id="B2-T16-C8-fp32-hard-learned"),
    pytest.param(2, 16, 8, torch.float32, "soft", True, id="B2-T16-C8-fp32-soft-learned"),
    pytest.param(3, 63, 60, torch.float32, "hard", False, id="B3-T63-C60-fp32-hard-scalar"),
    pytest.param(3, 63, 60, torch.float32, "soft", True, id="B3-T63-C60-fp32-soft-learned"),
    pytest.param(2, 1, 60, torch.float32, "hard", True, id="B2-T1-C60-fp32-hard-learned"),
    pytest.param(2, 63, 60, torch.bfloat16, "hard", True, id="B2-T63-C60-bf16-hard-learned"),
    pytest.param(2, 63, 60, torch.bfloat16, "soft", False, id="B2-T63-C60-bf16-soft-scalar"),
]


def compare_to_naive(backend, batch, seq_len, channels, dtype, reset, learned, device="cpu"):
    inputs = make_inputs(batch, seq_len, channels, dtype, learned, device=device)
    spikes, v_final, grads = run(backend, *inputs, reset)
    ref_inputs = [t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs]
    ref_spikes, ref_v, ref_grads = run("naive", *ref_inputs, reset)
    assert spikes.dtype == dtype and v_final.dtype == torch.float32
    assert 0.05 < ref_spikes.float().mean() < 0.95, "the case should spike on some tokens and not on others"
    tolerance = TOLERANCE[dtype]
    # Spikes are recomputed from the same fp32 expression in every path: they must agree exactly.
    assert torch.equal(spikes.cpu(), ref_spikes), "spikes differ"
    assert_close("v_final", v_final.cpu(), ref_v, tolerance)
    names = ["grad x", "grad v0", "grad tau", "grad v_th"][: len(grads)]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert_close(name, got.cpu(), want, tolerance)


@pytest.mark.parametrize(("batch", "seq_len", "channels", "dtype", "reset", "learned"), CASES)
def test_torch_matches_naive(batch, seq_len, channels, dtype, reset, learned):
    compare_to_naive("torch", batch, seq_len, channels, dtype, reset, learned)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_hand_computed_trajectory(backend):
    # tau = 2 halves the gap to the input each token; v_th = 1.
    x = torch.tensor([3.0, 0.0, 1.0, 4.0]).view(1, 4, 1)
    spikes, v_final = lif_scan(x, tau=2.0, v_th=1.0, reset="hard", backend=backend)
    # h: 1.5 (spike, v = 0), 0.0, 0.5, 0.25 + 1.75 = 2.25 (spike, v = 0)
    assert spikes.flatten().tolist() == [1.0, 0.0, 0.0, 1.0] and v_final.item() == 0.0
    spikes, v_final = lif_scan(x, tau=2.0, v_th=1.0, reset="soft", backend=backend)
    # h: 1.5 (spike, v = 0.5), 0.25, 0.625, 2.3125 (spike, v = 1.3125)
    assert spikes.flatten().tolist() == [1.0, 0.0, 0.0, 1.0] and v_final.item() == 1.3125


def test_surrogate_gradient_value():
    # One token, v0 = 0, tau = 1: h = x, so d spike / d x is the ATan surrogate at x - v_th.
    x = torch.tensor([[[0.7]]], requires_grad=True)
    spikes, _ = lif_scan(x, tau=1.0, v_th=1.0, alpha=2.0, backend="torch")
    spikes.sum().backward()
    expected = 2.0 / (2 * (1 + (torch.pi * 2.0 * (0.7 - 1.0) / 2) ** 2))
    assert abs(x.grad.item() - expected) < 1e-6


def test_chunked_calls_with_state_equal_one_call():
    x, v0, tau, v_th = make_inputs(2, 20, 6, torch.float32, learned=True)
    spikes, v_final = lif_scan(x, v0, tau, v_th, backend="torch")
    first, v_mid = lif_scan(x[:, :7], v0, tau, v_th, backend="torch")
    second, v_end = lif_scan(x[:, 7:], v_mid, tau, v_th, backend="torch")
    assert torch.equal(torch.cat([first, second], 1), spikes) and torch.equal(v_end, v_final)



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scalar_tensor_parameters_get_their_gradient(backend):
    """tau and v_th given as 0-d tensors get 0-d gradients: the sums of the per-channel ones."""
    x, v0, tau, v_th = make_inputs(1, 6, 5, torch.float32, learned=False)
    scalar = [torch.tensor(2.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)]
    per_channel = [torch.full((5,), 2.0, requires_grad=True), torch.full((5,), 1.0, requires_grad=True)]
    for params in (scalar, per_channel):
        spikes, v_final = lif_scan(x, v0, *params, backend=backend)
        (spikes.sum() + v_final.sum()).backward()
    for one, many in zip(scalar, per_channel, strict=True):
        assert one.grad.shape == () and torch.allclose(one.grad, many.grad.sum(), rtol=1e-5)


def test_non_contiguous_input():
    x, v0, tau, v_th = make_inputs(2, 7, 10, torch.float32, learned=True)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-minor strides
    for backend in ["torch", "triton"]:
        spikes, v_final = lif_scan(strided, v0, tau, v_th, backend=backend)
        ref_spikes, ref_v = lif_scan(x, v0, tau, v_th, backend="naive")
        assert torch.equal(spikes, ref_spikes) and torch.allclose(v_final, ref_v, atol=1e-6)

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"x": torch.zeros(2, 3)}, "shape \\[B, T, C\\]", id="x-2d"),
        pytest.param({"x": torch.zeros(1, 3, 4, dtype=torch.int64)}, "float32, bfloat16", id="x-int"),
        pytest.param({"x": torch.zeros(1, 0, 4)}, "T = 0", id="x-empty"),
        pytest.param({"v0": torch.zeros(1, 5)}, "v0 must be", id="v0-shape"),
        pytest.param({"tau": torch.ones(5)}, "tau must be", id="tau-shape"),
        pytest.param({"tau": 0.0}, "tau=0.0 must be > 0", id="tau-zero"),
        pytest.param({"v_th": "1"}, "v_th must be", id="v_th-type"),
        pytest.param({"reset": "zero"}, "reset='zero'", id="reset"),
        pytest.param({"alpha": -1.0}, "alpha=-1.0", id="alpha"),
        pytest.param({"backend": "cuda"}, "backend='cuda'", id="backend"),
    ],
)
def test_bad_input_raises(kwargs, message):
    arguments = {"x": torch.zeros(1, 3, 4)} | kwargs
    with pytest.raises(ValueError, match=message):
        lif_scan(**arguments)


TRITON_CASES = [
    pytest.param(1, 5, 40, torch.float32, "soft", True, id="B1-T5-C40-fp32-soft-two-channel-blocks"),
    pytest.param(2, 21, 8, torch.float32, "hard", True, id="B2-T21-C8-two-token-tiles-fp32-hard-learned"),
    pytest.param(1, 9, 5, torch.float32, "soft", True, id="B1-T9-C5-fp32-soft-learned"),
    pytest.param(2, 1, 6, torch.float32, "hard", False, id="B2-T1-C6-fp32-hard-scalar"),
    pytest.param(1, 10, 6, torch.bfloat16, "soft", True, id="B1-T10-C6-bf16-soft-learned"),
]


@pytest.mark.parametrize(("batch", "seq_len", "channels", "dtype", "reset", "learned"), TRITON_CASES)
def test_triton_matches_naive(batch, seq_len, channels, dtype, reset, learned):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs the Triton interpreter (conftest)
    compare_to_naive("triton", batch, seq_len, channels, dtype, reset, learned, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_real_shape_gpu(dtype, reset):
    """B*T*C = 16M against the naive loop on the same GPU."""
    inputs = make_inputs(8, 2048, 1024, dtype, learned=True, device="cuda")
    spikes, v_final, grads = run("triton", *inputs, reset)
    ref_spikes, ref_v, ref_grads = run("naive", *inputs, reset)
    # Both paths do the same IEEE fp32 operations; allow a stray flip in case a threshold is met to the last bit.
    assert (spikes != ref_spikes).float().mean() <= 1e-5
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    assert_close("v_final", v_final, ref_v, tolerance)
    for name, got, want in zip(["grad x", "grad v0", "grad tau", "grad v_th"], grads, ref_grads, strict=True):
        assert_close(name, got, want, tolerance)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels themselves run")
def test_triton_kernels_compile_for_hopper():
    from spikelm.kernels.lif.fused_recurrent import BWD_BLOCK_T, FWD_BLOCK_T

    forward, backward = {"BLOCK_T": FWD_BLOCK_T, "BLOCK_C": 128}, {"BLOCK_T": BWD_BLOCK_T, "BLOCK_C": 32}
    kernels = [
        ("_lif_fwd_kernel", {"HARD_RESET": True, "SAVE_H": True, **forward}, ()),  # one variant each: compiles are slow
        ("_lif_bwd_kernel", {"HARD_RESET": False, **backward}, ("alpha", "slope")),
    ]
    sequences = ("x_ptr", "spikes_ptr", "grad_spikes_ptr", "grad_x_ptr")
    compile_for_hopper([("spikelm.kernels.lif.fused_recurrent", name, constexprs,
                         arg_types(i32=("T", "C"), fp32=floats, bf16_pointers=sequences))
                        for name, constexprs, floats in kernels])
