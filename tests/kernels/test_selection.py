"""Which path a kernel call takes: Triton only for CUDA tensors, the torch reference otherwise,
switchable by MOERAY_KERNELS=torch; CPU-only processes never load the Triton kernels."""

import subprocess
import sys

import pytest
import torch

from moeray.kernels.policy import KernelPolicy, using
from moeray import kernels


def test_cpu_never_takes_triton(monkeypatch):
    monkeypatch.delenv("MOERAY_KERNELS", raising=False)
    assert not kernels.use_triton("cpu")
    assert not kernels.use_triton(torch.device("cpu"))


def test_cuda_takes_triton_unless_switched_off(monkeypatch):
    monkeypatch.delenv("MOERAY_KERNELS", raising=False)
    assert kernels.use_triton("cuda") == kernels.triton_importable()
    monkeypatch.setenv("MOERAY_KERNELS", "torch")
    assert not kernels.use_triton(torch.device("cuda", 0))
    monkeypatch.setenv("MOERAY_KERNELS", "auto")
    with using(KernelPolicy(triton=False)):
        assert not kernels.use_triton("cuda")


def test_unknown_setting_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MOERAY_KERNELS", "cutlass")
    with pytest.raises(ValueError, match=r"MOERAY_KERNELS='cutlass' is not one of auto, torch"):
        kernels.use_triton("cuda")


def test_cpu_model_and_engine_do_not_load_the_triton_kernels():
    # torch itself may import the triton package (torch._dynamo does), so the check is on ours.
    code = ("import sys, torch, moeray.model, moeray.engine.attention\n"
            "from moeray.model import ModelArgs\n"
            "model = moeray.model.build(ModelArgs(), seed=0)\n"
            "with torch.no_grad():\n"
            "    model(torch.tensor([[3, 4, 5]]))\n"
            "assert 'moeray.kernels.triton' not in sys.modules, 'Triton kernels loaded on a CPU-only path'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
