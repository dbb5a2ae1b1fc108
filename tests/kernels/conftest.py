"""Where the kernel checks run: CPU tensors under the Triton interpreter, or CUDA tensors on a GPU.

The `interpreted_*.py` modules are not collected by the ordinary run (their names do not match
test_*.py); `test_triton_interpreter.py` runs each in a subprocess with TRITON_INTERPRET=1, the
only robust way to set it before triton is imported. Run one by hand with
`TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/kernels/interpreted_fused_moe.py`, or on a
GPU without the variable to run the same checks compiled.
"""

import os

import pytest
import torch


def kernel_device() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


@pytest.fixture
def device() -> str:
    found = kernel_device()
    if found is None:
        pytest.skip("Triton kernel checks need TRITON_INTERPRET=1 (CPU) or a CUDA device")
    return found
