"""Routed experts in ExpertShard actors: same outputs, failover, rebalancing, on local Ray."""

import asyncio
import os
import signal
import time

import pytest
import ray
import torch

from moeray import LLM, SamplingParams
from moeray.actors.dispatch import ExpertsUnavailableError, start_expert_parallel
from moeray.engine import AsyncEngine

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def local_outputs(hf_folder, prompts):
    results = LLM(hf_folder[0], max_model_len=256).generate(prompts, GREEDY)
    return [r.outputs[0].token_ids for r in results]


def shard_work(router) -> list[int]:
    """Tokens each shard computed (its own counters, summed over experts and layers)."""
    counts = ray.get([shard.expert_counts.remote() for shard in ray.get(router.shard_handles.remote())])
    return [sum(sum(per_expert) for per_expert in layers.values()) for layers in counts]


def measured_imbalance(router) -> float:
    work = shard_work(router)
    return max(work) / (sum(work) / len(work))


def sharded_llm(folder, shards, redundant=0, name=None, **kwargs):
    router, backend = start_expert_parallel(str(folder), shards, redundant, name=name, num_cpus=0.5, **kwargs)
    return router, LLM(folder, max_model_len=256, experts=backend)


@pytest.mark.parametrize("transport", ["ray", "collective"])
@pytest.mark.parametrize("shards", [2, 4])
def test_sharded_greedy_equals_local(ray_session, hf_folder, prompts, local_outputs, shards, transport):
    router, llm = sharded_llm(hf_folder[0], shards, name=f"eq-{shards}-{transport}", transport=transport)
    assert llm.engine.runner.experts.transport.name == transport
    if transport == "collective":  # CPU replica and shards: everything travels on the gloo group
        assert llm.engine.runner.experts.transport.data_plane == "gloo"
    try:
        assert [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)] == local_outputs
        # Every shard did work: the experts really ran remotely, on all of them.
        assert all(work > 0 for work in shard_work(router)), shard_work(router)
        assert llm.engine.model.model.layers[1].mlp.experts is None  # no local copy of routed experts
        assert not getattr(llm.engine.runner.experts.transport, "broken", False)  # no fallback happened
    finally:
        ray.get(router.shutdown.remote())


def test_data_plane_is_nccl_only_when_replica_and_every_shard_hold_gpus():
    import torch.distributed as dist

    from moeray.actors.transport import data_plane_for, open_groups, rendezvous_store

    nccl = "nccl" if dist.is_nccl_available() else "gloo"
    assert data_plane_for("cpu", ["cpu", "cpu"]) == "gloo"
    assert data_plane_for("cpu", ["cuda", "cuda"]) == "gloo"  # the replica has no GPU to receive on
    assert data_plane_for("cuda", ["cuda", "cpu"]) == "gloo"
    assert data_plane_for("cuda:0", ["cuda", "cuda"]) == nccl
    with pytest.raises(ValueError, match="unknown data plane 'mpi'"):
        open_groups(rendezvous_store("127.0.0.1", 0, 1, is_master=True), 0, 1, 5.0, "mpi")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_ranks_on_one_gpu_are_detected():
    from moeray.actors.transport import _shares_a_gpu

    mine = str(torch.cuda.get_device_properties(0).uuid)
    assert _shares_a_gpu("cuda:0", [mine]) and _shares_a_gpu("cuda:0", ["other", "other"])
    assert not _shares_a_gpu("cuda:0", ["a", "b"])


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2),
                    reason="the NCCL data plane needs two GPUs: one for the replica, one for the shard")
def test_collective_over_nccl_between_gpus_equals_local(ray_session, hf_folder, prompts):
    """Replica and one shard on different GPUs: payloads and replies travel over NCCL."""
    from moeray.actors.dispatch import ShardedExperts

    folder = hf_folder[0]
    router, _ = start_expert_parallel(str(folder), 1, name="nccl-eq", num_cpus=0.5, num_gpus=1)
    try:
        shard = ray.get(router.shard_handles.remote())[0]
        shard_gpu = int(ray.get(shard.gpu_ids.remote())[0])
        device = f"cuda:{1 if shard_gpu == 0 else 0}"  # NCCL needs a GPU per rank
        expected = [r.outputs[0].token_ids
                    for r in LLM(folder, max_model_len=256, device=device).generate(prompts, GREEDY)]
        backend = ShardedExperts(router, "collective", device=device)
        assert backend.transport.data_plane == "nccl"
        llm = LLM(folder, max_model_len=256, device=device, experts=backend)
        assert [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)] == expected
        assert not backend.transport.broken
    finally:
        ray.get(router.shutdown.remote())


async def stream_all(engine, prompts, params, on_progress=None):
    async def one(i, prompt):
        tokens = []
        async for delta in await engine.generate(prompt, params, f"req-{i}"):
            tokens += delta.outputs[0].token_ids
            if on_progress:
                on_progress(len(tokens))
        return tokens
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


@pytest.mark.parametrize("transport", ["ray", "collective"])
def test_sigkill_a_shard_mid_stream_restarts_it_and_changes_nothing(ray_session, hf_folder, prompts, local_outputs,
                                                                   transport):
    router, llm = sharded_llm(hf_folder[0], 2, name=f"failover-{transport}", transport=transport)
    engine = AsyncEngine(llm.engine)
    victim = ray.get(router.health.remote())["pids"][1]
    killed = []

    def kill_once(progress):
        if progress >= 4 and not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(time.monotonic())

    try:
        outputs = asyncio.run(stream_all(engine, prompts, GREEDY, kill_once))
        assert killed and outputs == local_outputs
        health = ray.get(router.health.remote())
        assert health["dead"] == [] and health["restarts"][1] == 1 and health["pids"][1] != victim
        if transport == "collective":  # a gloo group cannot lose a member: it handed over to Ray calls
            assert llm.engine.runner.experts.transport.broken
        # The restarted shard serves again.
        ray.get(router.reset_loads.remote())
        assert [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)] == local_outputs
        counts = ray.get(ray.get(router.shard_handles.remote())[1].expert_counts.remote())
        assert sum(sum(v) for v in counts.values()) > 0
    finally:
        engine.shutdown()
        ray.get(router.shutdown.remote())


def test_with_redundant_experts_a_dead_shard_needs_no_restart(ray_session, hf_folder, prompts, local_outputs):
    # Redundancy 8 of 8 experts per layer over 2 shards: every expert lives on both shards.
    router, llm = sharded_llm(hf_folder[0], 2, redundant=8, name="redundant")
    shard = ray.get(router.shard_handles.remote())[0]
    try:
        ray.kill(shard, no_restart=True)  # gone for good
        outputs = [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)]
        assert outputs == local_outputs
        assert ray.get(router.health.remote())["dead"] == [0]
    finally:
        ray.get(router.shutdown.remote())


def test_experts_without_a_live_shard_fail_clearly(ray_session, hf_folder, prompts):
    router, backend = start_expert_parallel(str(hf_folder[0]), 2, 0, name="doomed", num_cpus=0.5)
    backend.timeout_s = 2
    llm = LLM(hf_folder[0], max_model_len=256, experts=backend)
    try:
        ray.kill(ray.get(router.shard_handles.remote())[1], no_restart=True)
        with pytest.raises(ExpertsUnavailableError, match="no live shard"):
            llm.generate(prompts[:1], GREEDY)
        health = ray.get(router.health.remote())
        assert health["dead"] == [1] and health["missing_experts"] > 0
    finally:
        ray.get(router.shutdown.remote())


# A skewed workload: prompts of one repeated token. Every position then has the same hidden state
# in every layer, so all tokens route to the same 2 experts per layer.
SKEWED = [[7] * 40] * 4
ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def wait_for_layout(backend, layout: int, timeout_s: float = 30) -> None:
    """Until the replica's cached placement is `layout` or a later one (its non-blocking version
    probe): with periodic rebalancing the router may move on again before the replica looks."""
    deadline = time.monotonic() + timeout_s
    while backend.placement.layout < layout and time.monotonic() < deadline:
        backend._maybe_refresh()
        time.sleep(0.1)
    assert backend.placement.layout >= layout


def test_rebalance_under_traffic_lowers_the_measured_imbalance_and_changes_no_output(ray_session, hf_folder,
                                                                                    local_outputs, prompts):
    router, llm = sharded_llm(hf_folder[0], 4, redundant=2, name="rebalance")
    try:
        llm.generate(SKEWED, ONE_TOKEN)
        before = measured_imbalance(router)
        # Rebalance while requests stream: the new layout is loaded beside the old one and
        # published, and the streams' tokens do not change.
        engine, rebalanced = AsyncEngine(llm.engine), []

        def rebalance_once(progress):
            if progress >= 4 and not rebalanced:
                rebalanced.append(router.rebalance.remote())

        try:
            assert asyncio.run(stream_all(engine, prompts, GREEDY, rebalance_once)) == local_outputs
        finally:
            engine.shutdown()
        result = ray.get(rebalanced[0])
        wait_for_layout(llm.engine.runner.experts, result["layout"])
        # The same skewed load again, counted afresh on the new layout.
        ray.get(router.reset_loads.remote())
        llm.generate(SKEWED, ONE_TOKEN)
        after = measured_imbalance(router)
        assert before > 1.8 and after < 1.25, (before, after, shard_work(router))
        assert [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)] == local_outputs
    finally:
        ray.get(router.shutdown.remote())


def test_periodic_rebalancing_moves_hot_experts_by_itself(ray_session, hf_folder, local_outputs, prompts):
    router, llm = sharded_llm(hf_folder[0], 4, redundant=2, name="periodic", rebalance_interval_s=1.0)
    try:
        llm.generate(SKEWED, ONE_TOKEN)
        backend = llm.engine.runner.experts
        deadline = time.monotonic() + 60
        while ray.get(router.placement.remote()).layout == 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        layout = ray.get(router.placement.remote()).layout
        assert layout > 1, "no periodic rebalance happened"
        wait_for_layout(backend, ray.get(router.placement.remote()).layout)
        assert [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)] == local_outputs
    finally:
        ray.get(router.shutdown.remote())


def test_llm_over_an_expert_backend_of_shards_equals_local(ray_session, hf_folder, prompts, local_outputs):
    router, backend = start_expert_parallel(str(hf_folder[0]), 2)
    llm = LLM(hf_folder[0], max_model_len=256, experts=backend)
    try:
        assert [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)] == local_outputs
        assert ray.get(router.health.remote())["num_shards"] == 2 and all(shard_work(router))
    finally:
        ray.get(router.shutdown.remote())
        ray.kill(router)


def test_shards_read_only_their_own_experts_from_s3(ray_session, s3_server, hf_folder, prompts, local_outputs):
    import boto3

    from moeray.model.checkpoint import CheckpointReader, is_routed_expert
    from moeray.storage import upload_dir

    boto3.client("s3").create_bucket(Bucket="expert-parallel")
    uri = "s3://expert-parallel/models/tiny-v3"
    upload_dir(hf_folder[0], uri)
    router, backend = start_expert_parallel(uri, 2, name="from-s3", num_cpus=0.5)
    try:
        llm = LLM(uri, max_model_len=256, experts=backend)
        assert [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)] == local_outputs
        reader = CheckpointReader(hf_folder[0])
        expert_bytes = sum(reader.get(n).nbytes for n in reader.names() if is_routed_expert(n))
        per_shard = ray.get([shard.bytes_read.remote() for shard in ray.get(router.shard_handles.remote())])
        header_allowance = 64 * 1024
        # Each shard fetched its half of the routed experts (plus file headers), never whole files.
        assert sum(per_shard) >= expert_bytes
        assert all(read <= expert_bytes / 2 + header_allowance for read in per_shard), (per_shard, expert_bytes)
        # CPU shards share cores with the replica: their OpenMP workers do not spin-wait long.
        for pid in ray.get([shard.pid.remote() for shard in ray.get(router.shard_handles.remote())]):
            with open(f"/proc/{pid}/environ", "rb") as environ:
                assert b"GOMP_SPINCOUNT=20000" in environ.read().split(b"\0")
    finally:
        ray.get(router.shutdown.remote())


def test_fp8_checkpoint_shards_keep_float8_experts_and_match_local(ray_session, tmp_path, prompts):
    from moeray.model import ModelArgs, build
    from moeray.model.checkpoint import save_checkpoint
    from support import quantize_checkpoint, write_tiny_tokenizer

    args = ModelArgs.preset("tiny")
    save_checkpoint(build(args, seed=5), tmp_path, args)
    quantize_checkpoint(tmp_path, (16, 24))
    write_tiny_tokenizer(tmp_path)
    local = LLM(tmp_path, max_model_len=256, fp8="keep").generate(prompts, GREEDY)
    router, backend = start_expert_parallel(str(tmp_path), 2, name="fp8-shards", num_cpus=0.5, fp8="keep")
    try:
        shards = ray.get(router.shard_handles.remote())
        assert all(ray.get([shard.holds_fp8.remote() for shard in shards]))
        sharded = LLM(tmp_path, max_model_len=256, fp8="keep", experts=backend).generate(prompts, GREEDY)
        assert [r.outputs[0].token_ids for r in sharded] == [r.outputs[0].token_ids for r in local]
    finally:
        ray.get(router.shutdown.remote())
