"""A model replica SIGKILLed under streaming and non-streaming load (the real Serve app on the
session Ray, the embedded default model): every open stream ends with an OpenAI-shaped error
event and [DONE], every waiting request gets 503 with Retry-After, nothing hangs, /health says
503 while no replica can serve, and Serve's replacement then answers as the old one did."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from bad_inputs import INTERNALS

pytestmark = pytest.mark.slow
MODEL = "moeray-default"
LONG = {"model": MODEL, "prompt": "class Parser:", "max_tokens": 1800, "temperature": 0, "ignore_eos": True}
GREEDY = {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0, "ignore_eos": True}


def _stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("model", app).stats.remote().result(timeout_s=60)


def _replica_pid(app: str) -> int:
    return int(_stats(app)["replica_id"].removeprefix("pid-"))


def test_a_killed_replica_fails_its_requests_clearly_and_is_replaced(deployed):
    base = deployed({"engine": {"max_model_len": 2048}, "retry_after_s": 3}, "/killed", "killed")
    reference = httpx.post(f"{base}/v1/completions", json=GREEDY, timeout=60).json()["choices"][0]["text"]
    streams, whole, progress = {}, {}, {}

    def stream(index: int) -> None:
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    progress[index] = len(events)
        streams[index] = (r.status_code, events)

    def request(index: int) -> None:
        response = httpx.post(f"{base}/v1/completions", json=LONG, timeout=120)
        whole[index] = (response.status_code, response.headers.get("Retry-After"), response.text)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=request, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while min(progress.get(i, 0) for i in range(4)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    while _stats("killed")["num_running"] < len(threads) and time.monotonic() < deadline:
        time.sleep(0.1)  # every request is in the engine, none still queued for a replica
    pid = _replica_pid("killed")
    os.kill(pid, signal.SIGKILL)

    health, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline and not (503 in health and health[-1] == 200):
        health.append(httpx.get(f"{base}/health", timeout=30).status_code)
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a request hung"

    for status, events in streams.values():
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "unavailable" and error["type"] == "server_error" and error["request_id"]
        assert not INTERNALS.search(events[-2]), events[-2]
    for status, retry_after, text in whole.values():
        assert status == 503 and retry_after == "3", text
        assert json.loads(text)["error"]["code"] == "unavailable" and not INTERNALS.search(text)
    assert 503 in health and health[-1] == 200, f"/health answered {health}"
    assert _replica_pid("killed") != pid
    after = httpx.post(f"{base}/v1/completions", json=GREEDY, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == reference
