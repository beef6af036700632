"""Shared checks of the kernel tests: relative-RMS comparison and compiling Triton kernels for Hopper (sm_90)."""

import json
import os
import subprocess
import sys

import torch

# Compiles the kernels to Hopper machine code without a GPU (Triton ships ptxas), in a subprocess because this
# process runs Triton in the interpreter. Catches what the interpreter lets through (types, layouts, unsupported
# ops in the GPU code path); it runs nothing.
COMPILE_FOR_HOPPER = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module = importlib.import_module(sys.argv[1])
kernels, sequence_pointers = json.loads(sys.argv[2]), set(json.loads(sys.argv[3]))
for name, constexprs, floats in kernels:
    fn = getattr(module, name)
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*bf16" if arg in sequence_pointers else "*fp32"
        else:
            signature[arg] = "fp32" if arg in floats else "i32"
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], name
"""


def compile_for_hopper(module: str, kernels: list, sequence_pointers: list[str]) -> None:
    """Compile ``(kernel name, constexprs, float scalar args)`` of ``spikelm.kernels.<module>.fused_recurrent`` for
    sm_90, with bf16 sequences."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", COMPILE_FOR_HOPPER, f"spikelm.kernels.{module}.fused_recurrent",
               json.dumps(kernels), json.dumps(sequence_pointers)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS of the error relative to the RMS of the reference (fla's tolerance measure), in float64."""
    got, want = got.double(), want.double()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-6)).item()


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Same shape, no NaN on either side, relative RMS error within ``tolerance``."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the result under test"
    assert not torch.isnan(want).any(), f"{name}: NaN in the reference"
    error = relative_rms(got, want)
    assert error <= tolerance, f"{name}: relative RMS error {error:.3g} > {tolerance:.3g}"
