"""The model, the kernels and the engine import and generate without Ray, pydantic or the
serving stack: what the GPU check (bench/gpu_check.sh) needs on a device image that has torch
and triton but none of those."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = ("ray", "pydantic", "pydantic_core", "fastapi", "starlette", "uvicorn", "boto3", "botocore", "xgrammar",
          "cffi", "openai", "datasets", "peft", "moto")

SCRIPT = f"""
import sys

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
            raise ImportError("hidden for this test: " + name)

sys.meta_path.insert(0, Hide())
import moeray.engine, moeray.kernels, moeray.model
from moeray import LLM, SamplingParams

llm = LLM("moeray/assets/default-model", max_model_len=128)
print(repr(llm.generate("def fib(n):", SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].text))
print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in {HIDDEN!r}))
"""


def test_engine_runs_with_ray_pydantic_and_the_serving_stack_hidden():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stdout
