"""tools/bench_kernels.py runs (CPU smoke run here; the real numbers need a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_bench_runs_on_cpu_at_tiny_shapes(capsys):
    bench = load_bench()
    rows = bench.run(bench.parse_args(["--cpu", "--B", "1", "--T", "8", "--H", "1", "--K", "16", "--C", "8",
                                       "--reps", "1", "--dtype", "fp32"]))
    out = capsys.readouterr().out
    assert "Triton timings need a CUDA GPU" in out
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"rwkv6", "rwkv6 spiking", "rwkv4", "lif", "gated"}
    assert {row["direction"] for row in rows if row["kernel"] == "rwkv6 spiking"} == {"fwd"}  # inference only
    assert {row["direction"] for row in rows if row["kernel"] == "rwkv6"} == {"fwd", "fwdbwd"}
    for row in rows:
        assert row["impl"] in ("torch", "naive") and row["ms"] > 0 and row["gbps"] > 0
        if row["impl"] == "naive":
            assert row["speedup"] == pytest.approx(1.0)


def test_bench_rejects_bad_arguments():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--T", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--peak-gbps", "-1"])
