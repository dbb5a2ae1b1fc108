"""Adapters at runtime across a Serve app: two model replicas behind the ingress, an adapter
loaded from moto's S3 through the admin route, served by both replicas (each loads it on its
first request for it) with the adapted model's answer, gone from both after one unload; and
an adapter found under the configured S3 prefix by the first request that names it."""

from __future__ import annotations

import time

import boto3
import httpx
import pytest

from moeray.model.tokenizer import Tokenizer
from moeray.storage import upload_dir
from support import API_KEY, moeray_greedy, wait_for, write_random_adapter

pytestmark = pytest.mark.slow
ADMIN_KEY = "sk-test-admin"
USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = [5, 9, 17, 33, 2, 8, 8, 40, 41]
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
APP = "adapters"


def replica_adapters(handle, timeout_s: float = 60) -> dict[str, list[str]]:
    """replica id -> the adapters it holds, asking until both replicas have answered."""
    seen: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout_s
    for _ in range(200):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica_id"]] = stats["lora_adapters"]
        if len(seen) == 2 or time.monotonic() > deadline:
            break
    assert len(seen) == 2, f"only {sorted(seen)} answered"
    return seen


def test_adapters_loaded_at_runtime_reach_every_replica(deployed, s3_server, model_folder, tmp_path_factory):
    from ray import serve

    boto3.client("s3").create_bucket(Bucket="served-adapters")
    references = {}
    for seed, name in ((5, "sql"), (6, "chess")):
        folder = tmp_path_factory.mktemp(f"runtime-{name}")
        references[name] = write_random_adapter(model_folder, folder, seed=seed)
        upload_dir(folder, f"s3://served-adapters/{'uploads' if name == 'sql' else 'library'}/{name}")
    expected = {name: Tokenizer.from_pretrained(model_folder).decode(moeray_greedy(model, PROMPT, GREEDY["max_tokens"]))
                for name, model in references.items()}

    base = deployed({"model": str(model_folder), "served_model_name": "tiny-moe", "api_keys": [API_KEY],
                   "admin_api_keys": [ADMIN_KEY], "replica_cpus": 0.5, "max_loras": 2,
                   "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                   "lora_adapter_prefix": "s3://served-adapters/library",
                   "engine": {"max_model_len": 128, "block_size": 4, "num_cache_blocks": 256}}, f"/{APP}", APP)
    handle = serve.get_deployment_handle("model", APP)
    wait_for(lambda: serve.status().applications[APP].deployments["model"].replica_states.get("RUNNING", 0) == 2,
             120, "both model replicas to run")

    def complete(name: str) -> httpx.Response:
        return httpx.post(f"{base}/v1/completions", headers=USER, timeout=120,
                          json={"model": name, "prompt": PROMPT, **GREEDY})

    loaded = httpx.post(f"{base}/v1/load_lora_adapter", headers=ADMIN, timeout=120,
                        json={"lora_name": "sql", "lora_path": "s3://served-adapters/uploads/sql"})
    assert loaded.status_code == 200, loaded.text
    assert httpx.post(f"{base}/v1/load_lora_adapter", headers=USER, timeout=30,
                      json={"lora_name": "x", "lora_path": "s3://served-adapters/uploads/sql"}).status_code == 401
    models = httpx.get(f"{base}/v1/models", headers=USER, timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["tiny-moe", "sql"]

    for _ in range(40):  # power-of-two over two replicas: both see some of these
        answer = complete("sql")
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected["sql"]
        held = replica_adapters(handle)
        if all("sql" in names for names in held.values()):
            break
    assert all("sql" in names for names in held.values()), held

    on_demand = complete("chess")  # not loaded by anyone: found under lora_adapter_prefix
    assert on_demand.status_code == 200, on_demand.text
    assert on_demand.json()["choices"][0]["text"] == expected["chess"]

    assert httpx.post(f"{base}/v1/unload_lora_adapter", headers=ADMIN, timeout=30,
                      json={"lora_name": "sql"}).status_code == 200
    gone = complete("sql")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    # Each replica follows the catalog and lets the unloaded adapter go.
    wait_for(lambda: not any("sql" in names for names in replica_adapters(handle).values()), 60,
             "both replicas to drop the unloaded adapter")
