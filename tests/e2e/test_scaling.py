"""Back-pressure (503 with Retry-After) and autoscaling of the model deployment, on local Ray."""

import threading
import time

import httpx
import pytest

from support import API_KEY

pytestmark = pytest.mark.slow
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def long_stream(base: str, stop: threading.Event, max_tokens: int = 240) -> None:
    body = {"model": "tiny-moe", "prompt": "while True:", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}
    while not stop.is_set():
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break
        except httpx.HTTPError:
            time.sleep(0.1)


def model_replicas(app_name: str) -> int:
    from ray import serve

    status = serve.status().applications[app_name].deployments["model"]
    return status.replica_states.get("RUNNING", 0)


def test_full_queue_answers_503_with_retry_after(deployed, model_folder):
    settings = {"model": str(model_folder), "served_model_name": "tiny-moe", "api_keys": [API_KEY],
                "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2,
                "engine": {"max_model_len": 256, "num_cache_blocks": 256}}
    base = deployed(settings, "/busy", "busy")
    stop = threading.Event()
    workers = [threading.Thread(target=long_stream, args=(base, stop), daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        deadline, rejected = time.monotonic() + 60, None
        while time.monotonic() < deadline and rejected is None:
            sent = time.monotonic()
            response = httpx.post(f"{base}/v1/completions", headers=HEADERS, timeout=60,
                                  json={"model": "tiny-moe", "prompt": "x", "max_tokens": 1})
            if response.status_code == 503:
                rejected, waited = response, time.monotonic() - sent
            time.sleep(0.05)
    finally:
        stop.set()
    assert rejected is not None, "a full queue never produced a 503"
    assert rejected.headers["Retry-After"] == "2"
    assert rejected.json()["error"]["code"] == "queue_full"
    assert waited < 10, f"the 503 came after {waited:.1f} s: it waited for a slot instead of refusing"


def test_model_deployment_scales_out_under_load_and_back(deployed, model_folder):
    settings = {"model": str(model_folder), "served_model_name": "tiny-moe", "api_keys": [API_KEY],
                "engine": {"max_model_len": 256, "num_cache_blocks": 256},
                "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                "upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 1}}
    base = deployed(settings, "/scale", "scale")
    assert model_replicas("scale") == 1
    stop = threading.Event()
    workers = [threading.Thread(target=long_stream, args=(base, stop), daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and model_replicas("scale") < 2:
            time.sleep(0.5)
        assert model_replicas("scale") == 2, "did not scale out to 2 replicas under load"
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and model_replicas("scale") > 1:
        time.sleep(1)
    assert model_replicas("scale") == 1, "did not scale back to 1 replica after the load stopped"
