"""rwkv4_scan: chunked torch path and Triton kernel against the float32 naive oracle, the oracle against the
direct (unstabilised) float64 formula, masking and state carrying."""

import math

import pytest
import torch
from kernel_testing import arg_types, assert_close, compile_for_hopper

from spikelm.kernels import rwkv4_scan

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2}



def make_inputs(batch, seq_len, channels, dtype, log_decay_mean=0.0, with_state=True, seed=0, device="cpu"):
    """``w = -exp(time_decay)`` with time_decay ~ N(log_decay_mean, 1): mean 5 gives decays ~ e^-150 per token."""
    generator = torch.Generator().manual_seed(seed)
    w = -torch.exp(log_decay_mean + torch.randn(channels, generator=generator))
    u = torch.randn(channels, generator=generator)
    k = (2 * torch.randn(batch, seq_len, channels, generator=generator)).to(dtype)
    v = torch.randn(batch, seq_len, channels, generator=generator).to(dtype)
    state = None
    if with_state:
        state = (
            torch.randn(batch, channels, generator=generator),
            0.5 + torch.rand(batch, channels, generator=generator),
            torch.randn(batch, channels, generator=generator),
        )
    move = lambda t: t.to(device)  # noqa: E731
    return move(w), move(u), move(k), move(v), None if state is None else tuple(map(move, state))


def run(backend, w, u, k, v, state, upstream_seed=1):
    """Outputs and the gradients of w, u, k, v and the initial state under random upstream gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in (w, u, k, v)]
    state_leaves = None if state is None else tuple(t.detach().clone().requires_grad_() for t in state)
    wkv, final = rwkv4_scan(*leaves, state_leaves, backend=backend)
    generator = torch.Generator().manual_seed(upstream_seed)
    grad_wkv = torch.randn(wkv.shape, generator=generator).to(wkv)
    loss = (wkv.float() * grad_wkv.float()).sum()
    for part in final:  # every part of the final state gets an upstream gradient too
        loss = loss + (part * torch.randn(part.shape, generator=generator).to(part)).sum()
    tensors = leaves + ([] if state_leaves is None else list(state_leaves))
    return wkv, final, torch.autograd.grad(loss, tensors)


GRAD_NAMES = ["grad w", "grad u", "grad k", "grad v", "grad num0", "grad den0", "grad max0"]

CASES = [
    pytest.param(2, 16, 8, torch.float32, 0.0, True, id="B2-T16-C8-fp32-state"),
    pytest.param(3, 63, 60, torch.float32, 0.0, True, id="B3-T63-C60-fp32-state"),
    pytest.param(2, 63, 60, torch.float32, 0.0, False, id="B2-T63-C60-fp32-nostate"),
    pytest.param(2, 1, 60, torch.float32, 0.0, True, id="B2-T1-C60-fp32-state"),
    pytest.param(2, 70, 12, torch.float32, 5.0, True, id="B2-T70-C12-fp32-strong-decay"),
    pytest.param(2, 40, 12, torch.float32, -5.0, True, id="B2-T40-C12-fp32-weak-decay"),
    pytest.param(2, 63, 60, torch.bfloat16, 0.0, True, id="B2-T63-C60-bf16-state"),
]


def compare_to_naive(backend, batch, seq_len, channels, dtype, log_decay_mean, with_state, device="cpu"):
    inputs = make_inputs(batch, seq_len, channels, dtype, log_decay_mean, with_state, device=device)
    wkv, final, grads = run(backend, *inputs)
    ref_inputs = [t if t is None or isinstance(t, torch.Tensor) else tuple(p.cpu() for p in t) for t in inputs]
    ref_inputs = [t.cpu() if isinstance(t, torch.Tensor) else t for t in ref_inputs]
    ref_wkv, ref_final, ref_grads = run("naive", *ref_inputs)
    assert wkv.dtype == dtype and all(part.dtype == torch.float32 for part in final)
    tolerance = TOLERANCE[dtype]
    assert_close("wkv", wkv.cpu(), ref_wkv, tolerance)
    for name, got, want in zip(["num", "den", "max_state"], final, ref_final, strict=True):
        assert_close(name, got.cpu(), want, tolerance)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads, strict=False):
        assert_close(name, got.cpu(), want, tolerance)


@pytest.mark.parametrize(("batch", "seq_len", "channels", "dtype", "log_decay_mean", "with_state"), CASES)
def test_torch_matches_naive(batch, seq_len, channels, dtype, log_decay_mean, with_state):
    compare_to_naive("torch", batch, seq_len, channels, dtype, log_decay_mean, with_state)


def direct_wkv(w, u, k, v):
    """The unstabilised definition in float64: a weighted mean of past values and the current one (bonus u)."""
    w, u, k, v = (t.double() for t in (w, u, k, v))
    outputs = []
    for t in range(k.shape[1]):
        lags = torch.arange(t - 1, -1, -1, dtype=torch.float64)[:, None]  # t - 1 - s for s < t
        past = torch.exp(k[:, :t] + lags * w)
        current = torch.exp(u + k[:, t])
        outputs.append(((past * v[:, :t]).sum(1) + current * v[:, t]) / (past.sum(1) + current))
    return torch.stack(outputs, 1)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_matches_direct_formula(backend):
    w, u, k, v, _ = make_inputs(2, 20, 5, torch.float32, with_state=False)
    wkv, (num, den, max_state) = rwkv4_scan(w, u, k, v, backend=backend)
    assert_close("wkv", wkv, direct_wkv(w, u, k, v).float(), 1e-5)
    # The state holds the decayed sums scaled by exp(-max_state).
    lags = torch.arange(19, -1, -1, dtype=torch.float64)[:, None]
    weights = torch.exp(k.double() + lags * w.double())
    assert_close("num", num.double() * torch.exp(max_state.double()), (weights * v.double()).sum(1), 1e-5)
    assert_close("den", den.double() * torch.exp(max_state.double()), weights.sum(1), 1e-5)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("mask_value", [-1e30, -math.inf], ids=["k=-1e30", "k=-inf"])
def test_masked_prefix(backend, mask_value):
    """Left padding: tokens masked with a huge negative k before any real token leave no trace on later tokens."""
    w, u, k, v, _ = make_inputs(2, 24, 6, torch.float32, with_state=False)
    prefix = 9
    k_masked = k.clone()
    k_masked[:, :prefix] = mask_value
    leaves = [t.clone().requires_grad_() for t in (w, u, k_masked, v)]
    wkv, final = rwkv4_scan(*leaves, backend=backend)
    alone, alone_final = rwkv4_scan(w, u, k[:, prefix:], v[:, prefix:], backend=backend)
    assert_close("wkv after the prefix", wkv[:, prefix:], alone, 1e-5)
    for name, got, want in zip(["num", "den", "max_state"], final, alone_final, strict=True):
        assert_close(name, got, want, 1e-5)
    if mask_value == -math.inf:
        # No contribution at all (den == 0): the output is 0, not NaN.
        assert torch.equal(wkv[:, :prefix], torch.zeros_like(wkv[:, :prefix]))
    (wkv.sum() + sum(part.sum() for part in final)).backward()
    for name, leaf in zip(GRAD_NAMES, leaves, strict=False):
        assert torch.isfinite(leaf.grad).all(), f"{name} is not finite"
    if mask_value == -math.inf:
        assert not leaves[2].grad[:, :prefix].any(), "keys masked with -inf must get exactly zero gradient"


def test_all_masked_is_zero_and_finite():
    w, u, k, v, _ = make_inputs(1, 5, 4, torch.float32, with_state=False)
    k = torch.full_like(k, -math.inf).requires_grad_()
    for backend in ["naive", "torch"]:
        wkv, final = rwkv4_scan(w, u, k, v, backend=backend)
        assert torch.equal(wkv, torch.zeros_like(wkv)) and torch.isfinite(torch.stack(final)).all()
        (gk,) = torch.autograd.grad(wkv.sum() + final[0].sum() + final[1].sum(), [k])
        assert torch.isfinite(gk).all() and not gk.any()


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_chunked_calls_with_state_equal_one_call(backend):
    w, u, k, v, state = make_inputs(2, 45, 6, torch.float32)
    wkv, final = rwkv4_scan(w, u, k, v, state, backend=backend)
    first, middle = rwkv4_scan(w, u, k[:, :17], v[:, :17], state, backend=backend)
    second, end = rwkv4_scan(w, u, k[:, 17:], v[:, 17:], middle, backend=backend)
    assert_close("wkv", torch.cat([first, second], 1), wkv, 1e-6)
    for name, got, want in zip(["num", "den", "max_state"], end, final, strict=True):
        assert_close(name, got, want, 1e-6)



@pytest.mark.parametrize("chunk_size", [1, 4, 7, 200], ids=lambda n: f"chunk{n}")
def test_torch_chunk_sizes(chunk_size):
    """Any chunk length gives the same result (default is ~sqrt(T)); 7 leaves a short last chunk of 2 of T=23."""
    from spikelm.kernels.rwkv4 import rwkv4_scan_naive, rwkv4_scan_torch

    w, u, k, v, state = make_inputs(2, 23, 5, torch.float32)
    wkv, final = rwkv4_scan_torch(w, u, k, v, state, chunk_size=chunk_size)
    ref_wkv, ref_final = rwkv4_scan_naive(w, u, k, v, state)
    assert_close("wkv", wkv, ref_wkv, 1e-5)
    for name, got, want in zip(["num", "den", "max_state"], final, ref_final, strict=True):
        assert_close(name, got, want, 1e-5)


def test_default_backend_on_cpu_is_the_torch_path():
    w, u, k, v, state = make_inputs(1, 9, 4, torch.float32)
    wkv, final = rwkv4_scan(w, u, k, v, state)
    torch_wkv, torch_final = rwkv4_scan(w, u, k, v, state, backend="torch")
    assert torch.equal(wkv, torch_wkv) and all(map(torch.equal, final, torch_final))

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"k": torch.zeros(3, 4)}, "k must be a tensor of shape \\[B, T, C\\]", id="k-2d"),
        pytest.param({"v": torch.zeros(1, 3, 5)}, "same shape and dtype", id="v-shape"),
        pytest.param({"v": torch.zeros(1, 3, 4, dtype=torch.bfloat16)}, "same shape and dtype", id="v-dtype"),
        pytest.param({"w": torch.zeros(5)}, "w must be", id="w-shape"),
        pytest.param({"u": torch.zeros(4, dtype=torch.int32)}, "u must be", id="u-int"),
        pytest.param({"state": (torch.zeros(1, 4),) * 2}, "tuple \\(num, den, max_state\\)", id="state-len"),
        pytest.param({"state": (torch.zeros(1, 4),) * 2 + (torch.zeros(4),)}, "state max_state", id="state-shape"),
        pytest.param({"backend": "cuda"}, "backend='cuda'", id="backend"),
    ],
)
def test_bad_input_raises(kwargs, message):
    arguments = {"w": -torch.ones(4), "u": torch.zeros(4), "k": torch.zeros(1, 3, 4), "v": torch.zeros(1, 3, 4)}
    with pytest.raises(ValueError, match=message):
        rwkv4_scan(**(arguments | kwargs))


TRITON_CASES = [
    pytest.param(1, 5, 40, torch.float32, 0.0, True, id="B1-T5-C40-fp32-two-channel-blocks"),
    pytest.param(2, 21, 8, torch.float32, 0.0, True, id="B2-T21-C8-two-token-tiles-fp32-state"),
    pytest.param(1, 9, 5, torch.float32, 0.0, False, id="B1-T9-C5-fp32-nostate"),
    pytest.param(2, 1, 6, torch.float32, 0.0, True, id="B2-T1-C6-fp32-state"),
    pytest.param(1, 12, 6, torch.float32, 5.0, True, id="B1-T12-C6-fp32-strong-decay"),
    pytest.param(1, 10, 6, torch.bfloat16, 0.0, True, id="B1-T10-C6-bf16-state"),
]


@pytest.mark.parametrize(("batch", "seq_len", "channels", "dtype", "log_decay_mean", "with_state"), TRITON_CASES)
def test_triton_matches_naive(batch, seq_len, channels, dtype, log_decay_mean, with_state):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs the Triton interpreter (conftest)
    compare_to_naive("triton", batch, seq_len, channels, dtype, log_decay_mean, with_state, device=device)


@pytest.mark.parametrize("mask_value", [-1e30, -math.inf], ids=["k=-1e30", "k=-inf"])
def test_triton_masked_prefix(mask_value):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, u, k, v, _ = make_inputs(1, 10, 4, torch.float32, with_state=False, device=device)
    k[:, :4] = mask_value
    wkv, final, grads = run("triton", w, u, k, v, None)
    ref_wkv, ref_final, ref_grads = run("naive", w.cpu(), u.cpu(), k.cpu(), v.cpu(), None)
    assert_close("wkv", wkv.cpu(), ref_wkv, 1e-5)
    for name, got, want in zip(["num", "den", "max_state"], final, ref_final, strict=True):
        assert_close(name, got.cpu(), want, 1e-5)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads, strict=False):
        assert_close(name, got.cpu(), want, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_real_shape_gpu(dtype):
    """B=8, T=1024, C=1024: Triton and the chunked torch path against the naive loop on the same GPU."""
    inputs = make_inputs(8, 1024, 1024, dtype, device="cuda")
    ref_wkv, ref_final, ref_grads = run("naive", *inputs)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for backend in ["triton", "torch"]:
        wkv, final, grads = run(backend, *inputs)
        assert_close(f"{backend} wkv", wkv, ref_wkv, tolerance)
        for name, got, want in zip(["num", "den", "max_state"], final, ref_final, strict=True):
            assert_close(f"{backend} {name}", got, want, tolerance)
        for name, got, want in zip(GRAD_NAMES, grads, ref_grads, strict=False):
            assert_close(f"{backend} {name}", got, want, tolerance)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels themselves run")
def test_triton_kernels_compile_for_hopper():
    from spikelm.kernels.rwkv4.fused_recurrent import BWD_BLOCK_T, FWD_BLOCK_T

    forward, backward = {"BLOCK_T": FWD_BLOCK_T, "BLOCK_C": 128}, {"BLOCK_T": BWD_BLOCK_T, "BLOCK_C": 32}
    types = arg_types(i32=("T", "C"), bf16_pointers=("k_ptr", "v_ptr", "wkv_ptr", "grad_wkv_ptr", "grad_k_ptr",
                                                      "grad_v_ptr"))
    module = "spikelm.kernels.rwkv4.fused_recurrent"
    compile_for_hopper([
        (module, "_rwkv4_fwd_kernel", {"STORE_OUTPUT": True, "STORE_STATES": True, **forward}, types),  # both paths
        (module, "_rwkv4_bwd_kernel", backward, types),
    ])
