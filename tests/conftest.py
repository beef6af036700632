"""Test-wide setup. Triton kernels run on CPU only under the interpreter, which must be chosen before triton is
imported, so it is set here for machines without CUDA."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test shapes are tiny: one intra-op thread avoids thread start-up overhead and oversubscribing the 2 CI cores
# when a test runs 2-process training beside the main process.
torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
