"""Every Triton kernel checked on CPU through the Triton interpreter, one subprocess per module.

Why subprocesses: TRITON_INTERPRET=1 must be in the environment before triton is imported and
the kernels are decorated; inside one pytest run something else may have imported triton first
(torch itself does on some paths), and the variable must not leak into other tests. On a machine
with CUDA the same checks also run compiled, on the GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODULES = sorted(p.name for p in HERE.glob("interpreted_*.py"))


def _run_checks(module: str, interpret: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / module)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-8000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def test_modules_found():
    assert MODULES == ["interpreted_engine.py", "interpreted_fp8_gemm.py", "interpreted_fused_moe.py",
                       "interpreted_mla_decode.py"]


@pytest.mark.parametrize("module", MODULES)
def test_kernels_under_the_interpreter(module):
    _run_checks(module, interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA device")
@pytest.mark.parametrize("module", MODULES)
def test_kernels_compiled_on_gpu(module):
    _run_checks(module, interpret=False)
