"""Shared checks of the kernel tests: relative-RMS comparison and compiling Triton kernels for Hopper (sm_90)."""

import json
import os
import subprocess
import sys

import pytest
import torch

# Compiles kernels to Hopper machine code without a GPU (Triton ships ptxas), in a subprocess because this process
# runs Triton in the interpreter. Catches what the interpreter lets through (types, layouts, a kernel reading a
# non-constexpr global, unsupported ops in the GPU code path); it runs nothing.
COMPILE_FOR_HOPPER = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for module, name, constexprs, types in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(module), name)
    signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "*fp32") for arg in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], name
print("compiled")
"""


def arg_types(*, i32: tuple[str, ...] = (), fp32: tuple[str, ...] = (), bf16_pointers: tuple[str, ...] = ()) -> dict:
    """Triton types of a kernel's runtime arguments that are not fp32 pointers (the default)."""
    return {**dict.fromkeys(i32, "i32"), **dict.fromkeys(fp32, "fp32"), **dict.fromkeys(bf16_pointers, "*bf16")}


def compile_for_hopper(builds: list[tuple[str, str, dict, dict]]) -> None:
    """Compile each ``(module, kernel name, constexprs, arg_types(...))`` for sm_90; skips without Triton's NVIDIA
    backend."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as error:
        pytest.skip(f"Triton's NVIDIA backend is not importable here: {error}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", COMPILE_FOR_HOPPER, json.dumps(builds)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS of the error relative to the RMS of the reference (fla's tolerance measure), in float64; a NaN on either
    side fails (an inf gives an inf or NaN error, which fails every tolerance)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert not torch.isnan(got).any(), "NaN in the result under test"
    assert not torch.isnan(want).any(), "NaN in the reference"
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-6)).item()


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Same shape, no NaN on either side, relative RMS error within ``tolerance``."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = relative_rms(got, want)
    assert error <= tolerance, f"{name}: relative RMS error {error:.3g} > {tolerance:.3g}"
