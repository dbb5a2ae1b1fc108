"""Replicas that Serve stops under streaming load finish their streams: a downscale by the
autoscaler and a redeploy, on the session Ray with the embedded default model. Streams go
through the model deployment's handle, so each one knows the replica that serves it."""

from __future__ import annotations

import threading
import time

import pytest

from moeray.engine import SamplingParams
from moeray.platform.service import GenerateRequest
from support import deploy

pytestmark = pytest.mark.slow
LONG_TOKENS = 1000


class Stream(threading.Thread):
    """One long sampled generation of `n` completions through the handle: the replica it ran on,
    the tokens and finish reason of each completion, an error if it ended in one. (n > 1 makes
    the replica's steps longer, so the streams outlast the autoscaler's reaction by far.)"""

    def __init__(self, handle, name: str, n: int = 1):
        super().__init__(daemon=True)
        params = SamplingParams(n=n, temperature=0.8, seed=7, max_tokens=LONG_TOKENS, ignore_eos=True)
        self.response = handle.options(stream=True).generate.remote(GenerateRequest(name, params,
                                                                                   prompt="def parse(text):"))
        self.replica, self.error = None, None
        self.tokens, self.finish_reasons = [0] * n, [None] * n
        self.start()

    def run(self):
        try:
            for chunk in self.response:
                self.replica = chunk.replica_id
                for out in chunk.outputs:
                    self.tokens[out.index] += len(out.token_ids)
                    self.finish_reasons[out.index] = out.finish_reason or self.finish_reasons[out.index]
        except Exception as err:  # noqa: BLE001 - recorded, asserted on
            self.error = err

    def outcome(self) -> tuple:
        return self.error, set(self.tokens), set(self.finish_reasons)


def replica_states(app: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[app].deployments["model"].replica_states)


def running_replicas(app: str) -> int:
    return replica_states(app).get("RUNNING", 0)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_downscale_during_streaming_finishes_the_streams_of_the_stopped_replica(serve_port):
    from ray import serve

    settings = {"engine": {"max_model_len": 2048}, "graceful_shutdown_timeout_s": 120,
                "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                                "upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 1}}
    deploy(settings, "/downscale", serve_port, "downscale")
    handle = serve.get_deployment_handle("model", "downscale")
    first = [Stream(handle, f"load-{i}") for i in range(8)]  # 8 open on one replica: target 4, so 2
    wait_for(lambda: running_replicas("downscale") == 2, 120, "the upscale to 2 replicas")
    wait_for(lambda: all(s.replica for s in first), 60, "the first streams to start")
    older = first[0].replica
    # New streams go to the replica with fewer open requests: the new one.
    second = [Stream(handle, f"drained-{i}", n=8) for i in range(2)]
    wait_for(lambda: all(s.replica and sum(s.tokens) for s in second), 60, "the second streams to start")
    newer = {s.replica for s in second}
    assert newer and older not in newer, (older, newer)
    for stream in first:  # the load drops to 2 open requests: 1 replica is enough, and Serve stops the newer
        stream.response.cancel()
    wait_for(lambda: running_replicas("downscale") == 1, 120, "the downscale to 1 replica")
    assert all(s.is_alive() for s in second), "the streams ended before the downscale; nothing was drained"
    for stream in second:
        stream.join(timeout=180)
    assert [s.outcome() for s in second] == [(None, {LONG_TOKENS}, {"length"})] * 2
    survivor = handle.stats.remote().result(timeout_s=60)["replica_id"]
    assert survivor == older and survivor not in newer  # the streams' replica was the one stopped
    serve.delete("downscale")


def test_a_redeploy_during_streaming_finishes_the_old_replicas_streams(serve_port):
    from ray import serve

    from moeray.platform.serve_app import build_app

    settings = {"engine": {"max_model_len": 2048}, "graceful_shutdown_timeout_s": 120}
    deploy(settings, "/redeploy", serve_port, "redeploy")
    handle = serve.get_deployment_handle("model", "redeploy")
    streams = [Stream(handle, f"old-{i}", n=4) for i in range(3)]
    wait_for(lambda: all(s.replica and sum(s.tokens) for s in streams), 60, "the streams to start")
    old = streams[0].replica
    # A new version: Serve starts a new replica and stops the old one (serve.run waits for the new).
    redeploy = threading.Thread(target=serve.run, args=(build_app({**settings, "engine": {
        "max_model_len": 2048, "seed": 1}}),), kwargs=dict(name="redeploy", route_prefix="/redeploy"), daemon=True)
    redeploy.start()
    wait_for(lambda: replica_states("redeploy").get("STOPPING", 0) == 1, 120, "the old replica to be stopping")
    assert all(s.is_alive() for s in streams), "the streams ended before the old replica stopped"
    redeploy.join(timeout=180)
    for stream in streams:
        stream.join(timeout=180)
    assert [s.outcome() for s in streams] == [(None, {LONG_TOKENS}, {"length"})] * 3
    assert handle.stats.remote().result(timeout_s=60)["replica_id"] != old
    serve.delete("redeploy")
