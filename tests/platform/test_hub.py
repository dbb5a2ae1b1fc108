"""Hugging Face model ids: huggingface_hub lays out its own cache from a Hub on 127.0.0.1
(tests/fake_hub.py), then, offline, the engine and a job spec read the model by its id from
that cache. Offline with nothing cached, `moeray serve` names the id and exits before Ray
starts. (`moeray serve org/name` end to end: tests/e2e/test_cli_flags.py.) Each case runs in
a subprocess, because huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import COMMIT, FakeHub
from moeray.hub import is_hub_id
from support import write_hf_model_folder

REPO_ID = "moeray-test/tiny-moe"


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(HF_HOME filled by huggingface_hub from the fake Hub, the source checkpoint folder)."""
    root = tmp_path_factory.mktemp("hub")
    write_hf_model_folder(root / "source", "v3", seed=5)
    with FakeHub(REPO_ID, root / "source") as hub:
        fetched = run_python(f"from moeray.hub import hub_snapshot; print(hub_snapshot({REPO_ID!r}))",
                             {"HF_HOME": str(root / "hf"), "HF_ENDPOINT": hub.url})
    assert fetched.returncode == 0, fetched.stderr
    snapshot = Path(fetched.stdout.strip())
    assert snapshot == root / "hf" / "hub" / "models--moeray-test--tiny-moe" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_symlink()  # a blob link: huggingface_hub's own layout
    return root / "hf", root / "source"


def test_a_hub_id_is_told_from_paths_and_uris(tmp_path, monkeypatch):
    assert is_hub_id("deepseek-ai/DeepSeek-V3") and is_hub_id("org/name@v1.0")
    assert not is_hub_id("s3://bucket/model") and not is_hub_id("/abs/path") and not is_hub_id("./org/name")
    assert not is_hub_id("name") and not is_hub_id("a/b/c")
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name")  # an existing folder wins


def test_offline_the_engine_and_a_job_spec_read_the_model_by_its_id(hub_cache, tmp_path):
    hf_home, source = hub_cache
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(n): return n"}) + "\n" for i in range(8)))
    spec = {"name": "hub", "base_model": REPO_ID, "method": "pretrain", "output": str(tmp_path / "out"),
            "data": {"train": str(tmp_path / "train.jsonl")}, "checkpoint": {"storage": str(tmp_path / "ckpt")}}
    code = f"""
import json
from moeray import LLM, SamplingParams
from moeray.jobs.spec import parse_spec
from moeray.jobs.trainer import absolute_paths, prepare
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
by_id = LLM({REPO_ID!r}, max_model_len=64).generate([[1, 5, 7]], params)[0].outputs[0].token_ids
by_path = LLM({str(source)!r}, max_model_len=64).generate([[1, 5, 7]], params)[0].outputs[0].token_ids
spec = absolute_paths(parse_spec(json.loads({json.dumps(json.dumps(spec))})))
prepared = prepare(spec)
print(json.dumps({{"same": by_id == by_path, "base_model": spec.base_model, "rows": prepared.num_train_rows}}))
"""
    result = run_python(code, {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"same": True, "base_model": REPO_ID, "rows": 8}


def test_offline_with_an_empty_cache_serve_names_the_id(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moeray.platform.cli", "serve", "moeray-test/not-cached"],
                            env={**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "model 'moeray-test/not-cached': not in the Hugging Face cache" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and "Traceback" not in result.stderr + result.stdout
