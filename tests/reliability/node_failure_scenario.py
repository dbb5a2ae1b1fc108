"""A node holding an expert shard dies during streaming, on a simulated multi-node cluster.

Run as a script (it starts its own Ray cluster, so it cannot share the test session's Ray):

    python tests/reliability/node_failure_scenario.py RESULT.json

`ray.cluster_utils.Cluster` starts a head and three worker raylets on this machine, each with
its own resources; the head has no CPU, so the shards' placement group must use the workers.
Two shards are placed SPREAD; while a sharded engine streams greedy completions, the raylet of
the node under shard 1 is killed (no graceful exit, as when a machine is lost). The result file
records where the shards were before and after, the Router's health, and whether the streamed
tokens equal those of the engine with local experts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from moeray import LLM, SamplingParams  # noqa: E402
from moeray.actors.dispatch import start_expert_parallel  # noqa: E402
from moeray.engine import AsyncEngine  # noqa: E402
from support import write_hf_model_folder  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
# After the failure, shorter completions show the moved shard serving (greedy: a prefix of each stream).
AFTER = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
PROMPTS = [[5 + i, 17, 33, 2 + i, 40] for i in range(6)]
# A killed raylet refuses the GCS's health checks at once, so three missed checks a second apart
# declare its node dead in about 3 s (Ray's default: 15 s). A raylet that is only slow on these
# busy cores gets 5 s per check, so it is never declared dead by mistake.
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_timeout_ms": 5000, "health_check_failure_threshold": 3}


async def stream_all(engine: AsyncEngine, on_progress) -> list[list[int]]:
    async def one(i, prompt):
        tokens = []
        async for delta in await engine.generate(prompt, GREEDY, f"req-{i}"):
            tokens += delta.outputs[0].token_ids
            on_progress(len(tokens))
        return tokens
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))


def main(result_path: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="moeray-node-failure-"))
    write_hf_model_folder(folder, "v3", seed=11)
    expected = [r.outputs[0].token_ids for r in LLM(folder, max_model_len=256).generate(PROMPTS, GREEDY)]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_FAILURE_DETECTION})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"worker_nodes": [node.node_id for node in workers]}
    router, backend = start_expert_parallel(str(folder), 2, 0, name="node-failure", num_cpus=1, strategy="SPREAD")
    shards = ray.get(router.shard_handles.remote())
    result["shard_nodes_before"] = ray.get([shard.node_id.remote() for shard in shards])
    result["router_node"], result["head_node"] = ray.get(router.node_id.remote()), cluster.head_node.node_id
    victim = next(node for node in workers if node.node_id == result["shard_nodes_before"][1])

    llm = LLM(folder, max_model_len=256, experts=backend)
    engine = AsyncEngine(llm.engine)
    removed: list[float] = []

    def remove_once(progress: int) -> None:
        if progress >= 6 and not removed:
            cluster.remove_node(victim, allow_graceful=False)
            removed.append(time.monotonic())

    started = time.monotonic()
    outputs = asyncio.run(stream_all(engine, remove_once))
    result.update(removed=bool(removed), tokens_equal=outputs == expected, seconds=time.monotonic() - started)
    result["health"] = ray.get(router.health.remote())
    result["shard_nodes_after"] = ray.get([shard.node_id.remote() for shard in shards])
    result["alive_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.get(router.reset_loads.remote())
    again = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, AFTER)]
    counts = ray.get([shard.expert_counts.remote() for shard in shards])
    result["after_equal"] = again == [tokens[:AFTER.max_tokens] for tokens in expected]
    result["work_per_shard_after"] = [sum(sum(v) for v in c.values()) for c in counts]
    engine.shutdown()
    Path(result_path).write_text(json.dumps(result))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
