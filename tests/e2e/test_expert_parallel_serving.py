"""`moeray serve --expert-shards`: the Serve app with routed experts in ExpertShard actors."""

import httpx
import openai
import pytest
import ray

from moeray import LLM, SamplingParams
from support import API_KEY

pytestmark = pytest.mark.slow


def test_sharded_serving_equals_local_and_fails_clearly_without_shards(deployed, model_folder):
    settings = {"model": str(model_folder), "served_model_name": "tiny-moe", "api_keys": [API_KEY],
                "app_name": "ep", "engine": {"max_model_len": 256, "num_cache_blocks": 256},
                "expert_parallel": {"shards": 2, "shard_cpus": 0.5, "timeout_s": 3}}
    base = deployed(settings, "/ep", "ep")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    reply = client.completions.create(model="tiny-moe", prompt="def f(x):", max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    local = LLM(model_folder, max_model_len=256).generate(
        ["def f(x):"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert reply.choices[0].text == local.text

    router = ray.get_actor("ep-router", namespace="moeray")
    assert ray.get(router.health.remote())["num_shards"] == 2
    shard = ray.get(router.shard_handles.remote())[1]
    ray.kill(shard, no_restart=True)  # a shard that cannot come back, and no redundant copies
    response = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                          json={"model": "tiny-moe", "prompt": "x", "max_tokens": 3})
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert "no live shard" in response.json()["error"]["message"]
    ray.get(router.shutdown.remote())
    ray.kill(router)
