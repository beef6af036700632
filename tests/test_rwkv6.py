"""rwkv6_scan: every path against the float32 naive loop (output, final state and every gradient)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from kernel_testing import relative_rms

from spikelm.kernels import rwkv6_scan
from spikelm.kernels.rwkv6 import rwkv6_scan_naive, rwkv6_scan_torch

# Relative RMS error allowed against the fp32 oracle, per input dtype.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
GRAD_NAMES = ("r", "k", "v", "w", "u", "initial_state")


def make_inputs(
    B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, decay: str = "normal", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs with the model's ranges; ``decay="strong"`` mixes w = -exp(5) channels with mild ones."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    log_w = randn(B, T, H, K, scale=0.5) - 1.0  # w = -exp(...) in about [-1.2, -0.1]: typical RWKV-6 decays
    if decay == "strong":
        strong = torch.rand(B, T, H, K, generator=g) < 0.5
        log_w = torch.where(strong, torch.full_like(log_w, 5.0), log_w)
    return {
        "r": randn(B, T, H, K, scale=1 / math.sqrt(K)).to(dtype),
        "k": randn(B, T, H, K, scale=1 / math.sqrt(K)).to(dtype),
        "v": randn(B, T, H, V).to(dtype),
        "w": (-torch.exp(log_w)).to(dtype),
        "u": randn(H, K, scale=0.5).to(dtype),
        "initial_state": randn(B, H, K, V, scale=0.5),
    }


def run_with_grads(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]], inputs: dict[str, torch.Tensor], seed: int = 1
) -> dict[str, torch.Tensor]:
    """Output, final state and the gradient of every input under random upstream gradients."""
    leaves = {name: x.detach().clone().requires_grad_(True) for name, x in inputs.items()}
    o, final = fn(**leaves, output_final_state=True)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype)  # CPU generator: same on any device
    dfinal = torch.randn(final.shape, generator=g).to(final.device)
    loss = (o.float() * do.float()).sum() + (final * dfinal).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in GRAD_NAMES])
    result = {"o": o.detach(), "final_state": final.detach()}
    result.update({f"d{n}": gr for n, gr in zip(GRAD_NAMES, grads, strict=True)})
    return result


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float) -> None:
    errors = {name: relative_rms(actual[name], expected[name]) for name in expected}
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative RMS error above {tol}: {bad} (all: {errors})"


def oracle(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return run_with_grads(rwkv6_scan_naive, inputs)


CASES = [
    # B, T, H, K, V, dtype, decay
    pytest.param(2, 37, 2, 16, 16, torch.float32, "normal", id="B2-T37-H2-K16-fp32"),
    pytest.param(1, 63, 1, 48, 48, torch.float32, "normal", id="B1-T63-H1-K48-fp32"),
    pytest.param(1, 20, 2, 60, 60, torch.float32, "normal", id="B1-T20-H2-K60-fp32"),
    pytest.param(2, 1, 2, 16, 32, torch.float32, "normal", id="B2-T1-K16-V32-fp32"),
    pytest.param(1, 64, 2, 32, 32, torch.float32, "normal", id="B1-T64-K32-exact-chunks-fp32"),
    pytest.param(2, 45, 2, 16, 16, torch.float32, "strong", id="B2-T45-K16-strong-decay-fp32"),
    pytest.param(2, 37, 2, 16, 16, torch.bfloat16, "normal", id="B2-T37-H2-K16-bf16"),
    pytest.param(1, 63, 1, 48, 48, torch.bfloat16, "normal", id="B1-T63-H1-K48-bf16"),
    pytest.param(2, 33, 1, 32, 32, torch.bfloat16, "strong", id="B2-T33-K32-strong-decay-bf16"),
]


@pytest.mark.parametrize("B, T, H, K, V, dtype, decay", CASES)
def test_torch_chunked_matches_naive(B, T, H, K, V, dtype, decay):
    inputs = make_inputs(B, T, H, K, V, dtype, decay)
    expected = oracle(inputs)
    actual = run_with_grads(lambda **kw: rwkv6_scan(**kw, backend="torch"), inputs)
    assert actual["o"].dtype == dtype and actual["final_state"].dtype == torch.float32
    assert_close(actual, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 32, 64], ids=lambda c: f"C{c}")
def test_torch_chunk_size_does_not_change_result(chunk_size):
    inputs = make_inputs(1, 40, 2, 16, 16, torch.float32)
    expected = oracle(inputs)
    actual = run_with_grads(lambda **kw: rwkv6_scan_torch(**kw, chunk_size=chunk_size), inputs)
    assert_close(actual, expected, TOLERANCE[torch.float32])


def test_extreme_decay_has_no_overflow():
    # Every channel forgets everything at each step, so S_t = k_t^T v_t and o_t = r_t (k_{t-1}^T v_{t-1} + diag(u)
    # k_t^T v_t) exactly (S_{-1} = initial state). A factorised exp(-cumsum(w)) would overflow to inf here.
    inputs = make_inputs(2, 50, 2, 16, 16, torch.float32)
    inputs["w"] = torch.full_like(inputs["w"], -math.exp(5.0))
    actual = run_with_grads(lambda **kw: rwkv6_scan(**kw, backend="torch"), inputs)
    r, k, v, u = inputs["r"], inputs["k"], inputs["v"], inputs["u"]
    expected_o = (r * u * k).sum(-1, keepdim=True) * v
    expected_o[:, 0] += torch.einsum("bhk,bhkv->bhv", r[:, 0], inputs["initial_state"])
    expected_o[:, 1:] += (r[:, 1:] * k[:, :-1]).sum(-1, keepdim=True) * v[:, :-1]
    assert relative_rms(actual["o"], expected_o) < 1e-6
    assert relative_rms(actual["final_state"], k[:, -1, :, :, None] * v[:, -1, :, None, :]) < 1e-6
    for name in GRAD_NAMES:
        assert torch.isfinite(actual[f"d{name}"]).all(), f"d{name} has NaN/inf"
    assert_close(actual, oracle(inputs), TOLERANCE[torch.float32])


def test_state_carry_equals_one_pass():
    # Splitting the sequence and carrying the final state gives the same output as one pass.
    inputs = make_inputs(2, 30, 2, 16, 16, torch.float32)
    full_o, full_state = rwkv6_scan(**inputs, output_final_state=True, backend="torch")
    first = {n: (x[:, :17] if x.dim() == 4 and n != "initial_state" and n != "u" else x) for n, x in inputs.items()}
    second = {n: (x[:, 17:] if x.dim() == 4 and n != "initial_state" and n != "u" else x) for n, x in inputs.items()}
    o1, s1 = rwkv6_scan(**first, output_final_state=True, backend="torch")
    second["initial_state"] = s1
    o2, s2 = rwkv6_scan(**second, output_final_state=True, backend="torch")
    assert relative_rms(torch.cat([o1, o2], dim=1), full_o) < 1e-6
    assert relative_rms(s2, full_state) < 1e-6


def test_non_contiguous_inputs():
    inputs = make_inputs(2, 21, 2, 16, 16, torch.float32)
    # Same values, laid out [B, H, T, K] in memory and viewed back as [B, T, H, K].
    strided = {n: (x.transpose(1, 2).contiguous().transpose(1, 2) if x.dim() == 4 and n != "initial_state" else x)
               for n, x in inputs.items()}
    assert not strided["r"].is_contiguous()
    o, s = rwkv6_scan(**strided, output_final_state=True, backend="torch")
    o_ref, s_ref = rwkv6_scan_naive(**inputs, output_final_state=True)
    assert relative_rms(o, o_ref) < 1e-5 and relative_rms(s, s_ref) < 1e-5


def test_no_final_state_unless_asked():
    inputs = make_inputs(1, 5, 1, 8, 8, torch.float32)
    for backend in ("torch", "naive"):
        o, s = rwkv6_scan(**inputs, backend=backend)
        assert s is None and o.shape == (1, 5, 1, 8)


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(lambda d: d.update(r=d["r"][0]), "r must be", id="r-3d"),
        pytest.param(lambda d: d.update(k=d["k"][:, :3]), "k must have", id="k-shape"),
        pytest.param(lambda d: d.update(v=d["v"][:, :3]), "v must be", id="v-shape"),
        pytest.param(lambda d: d.update(u=d["u"][:, :3]), "u must be", id="u-shape"),
        pytest.param(lambda d: d.update(initial_state=d["initial_state"][:, :, :3]), "initial_state", id="state"),
        pytest.param(lambda d: d.update(r=d["r"].long()), "floating-point", id="int-dtype"),
        pytest.param(lambda d: d.update(r=d["r"][:, :0], k=d["k"][:, :0], v=d["v"][:, :0], w=d["w"][:, :0]),
                     "empty", id="T0"),
    ],
)
def test_bad_input_raises_clear_error(change, message):
    inputs = make_inputs(1, 4, 2, 8, 8, torch.float32)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        rwkv6_scan(**inputs)


def test_bad_options_raise_clear_error():
    inputs = make_inputs(1, 4, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        rwkv6_scan(**inputs, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        rwkv6_scan(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="mode"):
        rwkv6_scan(**inputs, mode="parallel")
