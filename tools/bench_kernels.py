"""Benchmark the fused scans of ``spikelm.kernels``: time, achieved GB/s and TFLOP/s, fraction of peak bandwidth.

On CUDA (default): every kernel (rwkv6 fused-recurrent and chunked, rwkv4, lif, gated) forward and forward+backward,
and the forward of ``rwkv6_scan_spiking`` (scan fused with the adaptive neuron)
at realistic shapes (rwkv6: B=8, T=2048, H=16, K=V=64, bf16; neurons: B*T*C = 8*2048*1024 = 16M elements), timed
with ``triton.testing.do_bench``, against the torch path of the same kernel; flash-linear-attention's
``chunk_rwkv6`` / ``fused_recurrent_rwkv6`` are timed too when ``fla`` is importable.

On CPU (``--cpu``, or no CUDA): small shapes, the torch path against the naive loop, wall-clock medians. Triton
timings need a GPU (the CPU interpreter is 100-5000x slower than torch and says nothing about GPU speed).

Byte counts are the minimum traffic of an ideal fused kernel (each input read once, each output written once, in
the tensors' dtypes; states in fp32); FLOPs are the recurrent form's multiply-adds (rwkv6 forward
``4 B T H K V``: ``r S`` plus the decayed state update; backward counted as twice the forward).

    python tools/bench_kernels.py                     # CUDA, all kernels
    python tools/bench_kernels.py --cpu               # CPU smoke run: torch vs naive
    python tools/bench_kernels.py --kernels rwkv6 --peak-gbps 3350
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Peak HBM bandwidth in GB/s by device-name fragment; the longest matching fragment wins.
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "H100 PCIe": 2000.0, "A100": 2000.0}
KERNELS = ("rwkv6", "rwkv4", "lif", "gated")


@dataclass
class Case:
    """One benchmarked operator at one shape: how to build inputs and call it with a given backend."""

    name: str  # e.g. "rwkv6 chunk"
    make_inputs: Callable[[], dict[str, torch.Tensor]]  # fresh leaf tensors
    call: Callable[[dict[str, torch.Tensor], str], torch.Tensor]  # (inputs, backend) -> differentiable output
    fwd_bytes: float  # minimum bytes moved by the forward
    bwd_bytes: float  # minimum bytes moved by the backward alone
    fwd_flops: float  # forward FLOPs (backward counted as 2x)
    extra: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = field(default_factory=dict)  # e.g. fla
    forward_only: bool = False  # inference paths (no backward to time)


def peak_bandwidth(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    matches = [key for key in PEAK_GBPS if key.lower() in device_name.lower()]
    return PEAK_GBPS[max(matches, key=len)] if matches else None


def rwkv6_cases(B: int, T: int, H: int, K: int, dtype: torch.dtype, device: str, modes: tuple[str, ...]) -> list[Case]:
    from spikelm.kernels import rwkv6_scan
    from spikelm.kernels.rwkv6 import rwkv6_scan_spiking

    V = K
    size = torch.finfo(dtype).bits // 8
    tokens = B * T * H

    def make_inputs() -> dict[str, torch.Tensor]:
        def leaf(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
            return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_(True)

        return {
            "r": leaf(B, T, H, K, scale=K**-0.5), "k": leaf(B, T, H, K, scale=K**-0.5), "v": leaf(B, T, H, V),
            "w": (-torch.exp(torch.randn(B, T, H, K, device=device) * 0.5 - 1.0)).to(dtype).requires_grad_(True),
            "u": leaf(H, K, scale=0.5), "initial_state": leaf(B, H, K, V, scale=0.5, dt=torch.float32),
        }

    state_bytes = B * H * K * V * 4
    fwd_bytes = (3 * tokens * K + 2 * tokens * V) * size + 2 * state_bytes  # r, k, w, v in; o out; h0 in, hT out
    bwd_bytes = (3 * tokens * K + 2 * tokens * V) * size + (3 * tokens * K + tokens * V) * size + 2 * state_bytes
    flops = 4.0 * tokens * K * V
    cases = []
    for mode in modes:  # the Triton kernel's mode; the torch and naive paths ignore it
        def call(x: dict[str, torch.Tensor], backend: str, mode: str = mode) -> torch.Tensor:
            return rwkv6_scan(**x, output_final_state=True, backend=backend,
                              mode=mode if backend == "triton" else None)[0]

        label = f"rwkv6 {mode}" if len(modes) > 1 else "rwkv6"
        cases.append(Case(label, make_inputs, call, fwd_bytes, bwd_bytes, flops, fla_variants(mode)))

    # The scan fused with the adaptive neuron (counts out instead of o): against scan-then-neuron of each backend.
    def spiking_call(x: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
        return rwkv6_scan_spiking(**x, output_final_state=True, backend=backend)[0]

    cases.append(Case("rwkv6 spiking", make_inputs, spiking_call, fwd_bytes + B * T * 4, 0.0, flops,
                      forward_only=True))
    return cases


def fla_variants(mode: str) -> dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    """flash-linear-attention's kernel for the same mode, when installed (same layout; scale=1: no r scaling)."""
    try:
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    except ImportError:
        return {}
    fn = chunk_rwkv6 if mode == "chunk" else fused_recurrent_rwkv6

    def call(x: dict[str, torch.Tensor]) -> torch.Tensor:
        return fn(x["r"], x["k"], x["v"], x["w"], x["u"], scale=1.0, initial_state=x["initial_state"],
                  output_final_state=True)[0]

    return {"fla": call}


def neuron_cases(B: int, T: int, C: int, dtype: torch.dtype, device: str, which: list[str]) -> list[Case]:
    from spikelm.kernels import gated_scan, lif_scan, rwkv4_scan

    size = torch.finfo(dtype).bits // 8
    n = B * T * C
    state = B * C * 4
    cases = []
    if "rwkv4" in which:
        def rwkv4_inputs() -> dict[str, torch.Tensor]:
            return {
                "w": (-torch.exp(torch.randn(C, device=device) * 0.5)).requires_grad_(True),
                "u": (torch.randn(C, device=device) * 0.5).requires_grad_(True),
                "k": torch.randn(B, T, C, device=device).to(dtype).requires_grad_(True),
                "v": torch.randn(B, T, C, device=device).to(dtype).requires_grad_(True),
            }

        cases.append(Case("rwkv4", rwkv4_inputs, lambda x, b: rwkv4_scan(**x, backend=b)[0],
                          3 * n * size + 6 * state, 5 * n * size + 6 * state, 12.0 * n))
    if "lif" in which:
        def lif_inputs() -> dict[str, torch.Tensor]:
            return {"x": (torch.randn(B, T, C, device=device) * 2).to(dtype).requires_grad_(True)}

        cases.append(Case("lif", lif_inputs, lambda x, b: lif_scan(**x, backend=b)[0],
                          2 * n * size + state, 3 * n * size + 2 * state, 5.0 * n))
    if "gated" in which:
        def gated_inputs() -> dict[str, torch.Tensor]:
            return {
                "x": torch.randn(B, T, C, device=device).to(dtype).requires_grad_(True),
                "f": torch.sigmoid(torch.randn(C, device=device)).requires_grad_(True),
            }

        cases.append(Case("gated", gated_inputs, lambda x, b: gated_scan(**x, backend=b)[0],
                          2 * n * size + 2 * state, 3 * n * size + 2 * state, 8.0 * n))
    return cases


def make_step(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], inputs: dict[str, torch.Tensor],
              direction: str) -> Callable[[], object]:
    """A zero-argument callable running the forward (under no_grad) or forward + backward."""
    if direction == "fwd":
        def forward() -> object:
            with torch.no_grad():
                return fn(inputs)

        return forward
    leaves = [x for x in inputs.values() if x.requires_grad]
    grad_out = torch.randn_like(fn(inputs).detach())

    def forward_backward() -> object:
        return torch.autograd.grad(fn(inputs), leaves, grad_out)

    return forward_backward


def time_ms(step: Callable[[], object], device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=10, rep=max(reps, 20), return_mode="median"))
    step()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if cuda:
        name = torch.cuda.get_device_name()
        peak = peak_bandwidth(name, args.peak_gbps)
        backends, reference = ["triton", "torch"], "torch"
        B, T, H, K, C = args.B or 8, args.T or 2048, args.H or 16, args.K or 64, args.C or 1024
        print(f"device: {name}; peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbps)'}")
    else:
        name, peak = "cpu", args.peak_gbps
        backends, reference = ["torch", "naive"], "naive"
        B, T, H, K, C = args.B or 2, args.T or 64, args.H or 2, args.K or 32, args.C or 256
        print("device: CPU. Triton timings need a CUDA GPU; this run compares the torch path with the naive loop "
              "at small shapes (wall-clock medians).")
    print(f"shapes: rwkv6 B={B} T={T} H={H} K=V={K}; neurons B*T*C = {B}*{T}*{C} = {B * T * C}; dtype {args.dtype}")

    cases: list[Case] = []
    if "rwkv6" in args.kernels:
        cases += rwkv6_cases(B, T, H, K, dtype, device, ("fused_recurrent", "chunk") if cuda else ("chunk",))
    cases += neuron_cases(B, T, C, dtype, device, [k for k in args.kernels if k != "rwkv6"])

    rows = []
    header = f"{'kernel':<22}{'impl':<8}{'dir':<8}{'ms':>10}{'GB/s':>10}{'TFLOP/s':>10}{'%peak':>8}{'speed-up':>10}"
    print(header)
    print("-" * len(header))
    for case in cases:
        for direction in args.directions:
            if direction == "fwdbwd" and case.forward_only:
                continue
            moved = case.fwd_bytes + (case.bwd_bytes if direction == "fwdbwd" else 0.0)
            flops = case.fwd_flops * (3.0 if direction == "fwdbwd" else 1.0)
            impls = {b: (lambda x, b=b, case=case: case.call(x, b)) for b in backends}
            impls.update(case.extra)
            timings = {}
            for impl, fn in impls.items():
                try:
                    timings[impl] = time_ms(make_step(fn, case.make_inputs(), direction), device, args.reps)
                except Exception as error:  # one failing implementation should not hide the others' numbers
                    print(f"{case.name:<22}{impl:<8}{direction:<8}  failed: {type(error).__name__}: {error}")
            for impl, ms in timings.items():
                gbps = moved / ms / 1e6
                row = {"kernel": case.name, "impl": impl, "direction": direction, "ms": ms, "gbps": gbps,
                       "tflops": flops / ms / 1e9, "peak_fraction": gbps / peak if peak else None,
                       "speedup": timings[reference] / ms if reference in timings else None}
                rows.append(row)
                peak_text = f"{100 * row['peak_fraction']:.1f}" if peak else "n/a"
                speed_text = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "n/a"
                print(f"{case.name:<22}{impl:<8}{direction:<8}{ms:>10.3f}{gbps:>10.4g}{row['tflops']:>10.4g}"
                      f"{peak_text:>8}{speed_text:>10}")
            if "fla" in timings and "triton" in timings:
                print(f"{'':<22}ours/fla time ratio: {timings['triton'] / timings['fla']:.2f}")
    print(f"speed-up = time of the {reference} path / time of the row")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU at small shapes: torch path vs naive loop")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--directions", nargs="+", choices=("fwd", "fwdbwd"), default=["fwd", "fwdbwd"])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth of this GPU in GB/s")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (CPU) / minimum ms of timing (CUDA)")
    for dim in ("B", "T", "H", "K", "C"):
        parser.add_argument(f"--{dim}", type=int, default=None, help=f"override {dim} (defaults depend on device)")
    args = parser.parse_args(argv)
    for dim in ("B", "T", "H", "K", "C"):
        if getattr(args, dim) is not None and getattr(args, dim) < 1:
            parser.error(f"--{dim} must be >= 1")
    if args.peak_gbps is not None and args.peak_gbps <= 0:
        parser.error("--peak-gbps must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
