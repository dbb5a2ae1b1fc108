"""Cache-aware routing: with `routing.policy: prefix_cache` and two model replicas, requests that
share a prompt go to the replica that cached it, so every one after the first is served from its
prefix cache (under power-of-two, each request would pick one of the two replicas at random, and
five in a row would stay on the first one's replica only 1 time in 32)."""

import httpx
import pytest

from support import API_KEY, wait_for

pytestmark = pytest.mark.slow
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def running_replicas(app_name: str) -> int:
    from ray import serve

    return serve.status().applications[app_name].deployments["model"].replica_states.get("RUNNING", 0)


def test_prefix_cache_routing_sends_a_shared_prompt_to_the_replica_that_cached_it(deployed, model_folder):
    settings = {"model": str(model_folder), "served_model_name": "tiny-moe", "api_keys": [API_KEY],
                "replica_cpus": 0.5, "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                "routing": {"policy": "prefix_cache"},
                "engine": {"max_model_len": 256, "block_size": 4, "num_cache_blocks": 512}}
    base = deployed(settings, "/routed", "routed")
    # /health answers once one replica runs; the test needs both, or every request has one choice.
    wait_for(lambda: running_replicas("routed") == 2, 120, "both model replicas to run")
    prompt = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 2
    cached = []
    for _ in range(6):
        response = httpx.post(f"{base}/v1/completions", headers=HEADERS, timeout=120,
                              json={"model": "tiny-moe", "prompt": prompt, "max_tokens": 2})
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        cached.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    assert cached[0] == 0 and all(count > 0 for count in cached[1:]), cached


def test_prefix_cache_routing_needs_the_separate_ingress():
    from moeray.platform.settings import ServeSettings, SettingsError

    with pytest.raises((SettingsError, ValueError), match="routing.policy"):
        ServeSettings.load(overrides={"ingress": "colocated", "routing": {"policy": "prefix_cache"}})
