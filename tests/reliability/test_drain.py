"""Replicas that Serve stops under streaming load finish their streams: a downscale by the
autoscaler and a redeploy, on the session Ray. Streams go through the model deployment's handle,
so each one knows the replica that serves it.

A stream has to outlast a replica's start (the upscale, the redeploy) and the autoscaler's
reaction, which Serve gives no way to pace from the client: a stream's length in time is the
engine's. The embedded model streams 1000 tokens in about a second, so these tests serve a
checkpoint of their own, wide and deep enough that a stream of thousands of tokens lasts tens of
seconds."""

from __future__ import annotations

import threading

import pytest
from support import wait_for, write_hf_model_folder

from moeray.engine import SamplingParams
from moeray.platform.service import GenerateRequest

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 4096
LONG_TOKENS = 1500  # about 25 s for 2 requests of n=8 on this machine, idle
ENGINE = {"max_model_len": MAX_MODEL_LEN, "num_cache_blocks": 4200}  # 16 full-length sequences


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drain-model")
    write_hf_model_folder(folder, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                          num_hidden_layers=6, max_position_embeddings=MAX_MODEL_LEN, n_routed_experts=16,
                          num_experts_per_tok=4, q_lora_rank=256, kv_lora_rank=64, qk_rope_head_dim=16,
                          qk_nope_head_dim=32, v_head_dim=32)
    return str(folder)


class Stream(threading.Thread):
    """One long sampled generation of `n` completions through the handle: the replica it ran on,
    the tokens and finish reason of each completion, an error if it ended in one. (n > 1 makes
    the replica's steps longer, so the streams outlast the autoscaler's reaction by far.)"""

    def __init__(self, handle, name: str, n: int = 1, max_tokens: int = LONG_TOKENS):
        super().__init__(daemon=True)
        params = SamplingParams(n=n, temperature=0.8, seed=7, max_tokens=max_tokens, ignore_eos=True)
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


def test_a_downscale_during_streaming_finishes_the_streams_of_the_stopped_replica(deployed, slow_model):
    from ray import serve

    # 8 requests fill a replica (max_ongoing_requests), so the second streams can only go to the new one.
    settings = {"model": slow_model, "engine": ENGINE, "graceful_shutdown_timeout_s": 180,
                "max_ongoing_requests": 8, "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                                "upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 1}}
    deployed(settings, "/downscale", "downscale")
    handle = serve.get_deployment_handle("model", "downscale")
    # 8 open on one replica: target 4, so 2. They are cancelled once the second streams run.
    first = [Stream(handle, f"load-{i}", max_tokens=MAX_MODEL_LEN - 64) for i in range(8)]
    wait_for(lambda: running_replicas("downscale") == 2, 120, "the upscale to 2 replicas")
    wait_for(lambda: all(s.replica for s in first), 60, "the first streams to start")
    older = first[0].replica
    second = [Stream(handle, f"drained-{i}", n=8) for i in range(2)]
    wait_for(lambda: all(s.replica and sum(s.tokens) for s in second), 60, "the second streams to start")
    newer = {s.replica for s in second}
    assert newer and older not in newer, (older, newer)
    for stream in first:  # the load drops to 2 open requests: 1 replica is enough, and Serve stops the newer
        stream.response.cancel()
    wait_for(lambda: running_replicas("downscale") == 1, 120, "the downscale to 1 replica")
    assert all(s.is_alive() for s in second), "the streams ended before the downscale; nothing was drained"
    for stream in second:
        stream.join(timeout=300)
    assert [s.outcome() for s in second] == [(None, {LONG_TOKENS}, {"length"})] * 2
    survivor = handle.stats.remote().result(timeout_s=60)["replica_id"]
    assert survivor == older and survivor not in newer  # the streams' replica was the one stopped


def test_a_redeploy_during_streaming_finishes_the_old_replicas_streams(deployed, slow_model):
    from ray import serve

    from moeray.platform.serve_app import build_app

    settings = {"model": slow_model, "engine": ENGINE, "graceful_shutdown_timeout_s": 180}
    deployed(settings, "/redeploy", "redeploy")
    handle = serve.get_deployment_handle("model", "redeploy")
    # Longer: these must outlast the start of the new version's replica.
    streams = [Stream(handle, f"old-{i}", n=4, max_tokens=2 * LONG_TOKENS) for i in range(3)]
    wait_for(lambda: all(s.replica and sum(s.tokens) for s in streams), 60, "the streams to start")
    old = streams[0].replica
    # A new version: Serve starts a new replica and stops the old one (serve.run waits for the new).
    new_version = build_app({**settings, "engine": {**ENGINE, "seed": 1}})
    redeploy = threading.Thread(target=serve.run, args=(new_version,), daemon=True,
                                kwargs={"name": "redeploy", "route_prefix": "/redeploy"})
    redeploy.start()
    wait_for(lambda: replica_states("redeploy").get("STOPPING", 0) == 1, 120, "the old replica to be stopping")
    assert all(s.is_alive() for s in streams), "the streams ended before the old replica stopped"
    redeploy.join(timeout=180)
    for stream in streams:
        stream.join(timeout=300)
    assert [s.outcome() for s in streams] == [(None, {2 * LONG_TOKENS}, {"length"})] * 3
    assert handle.stats.remote().result(timeout_s=60)["replica_id"] != old
