"""Expert parallelism: decode throughput with routed experts in ExpertShard actors vs local experts.

Small preset (random weights, float32, CPU). 32 concurrent sequences decode together; the same
workload runs with the experts in the replica (reference) and in 2 shards over each available
transport, in one run. Also times one MoE layer's dispatch round trip at that batch size.
The sharded configurations run in a child process started with `moeray.actors.SHARED_CPU_ENV`,
the environment moeray gives every process that shares its cores with expert shards (Serve
replicas and shards get it from Ray); the local reference keeps the default environment, its
fastest.

    .venv/bin/python bench/expert_parallel.py [--sequences 32] [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

from common import report, small_checkpoint, timed
from moeray import LLM, SamplingParams


def decode_rate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    def run(n):
        return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    run(2)
    _, first = timed(lambda: run(1))
    _, full = timed(lambda: run(new_tokens + 1))
    return len(prompts) * new_tokens / (full - first)


def layer_round_trip(llm: LLM, num_tokens: int, repeats: int = 20) -> float:
    """Median seconds for one MoE layer of `num_tokens` tokens through the engine's expert backend."""
    args = llm.engine.args
    layer = args.moe_layer_indices[0]
    x = torch.randn(num_tokens, args.hidden_size)
    ids = torch.stack([torch.randperm(args.n_routed_experts)[:args.num_experts_per_tok] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, args.num_experts_per_tok)
    backend = llm.engine.runner.experts
    moe = llm.engine.model.model.layers[layer].mlp
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            if backend is None:
                moe.experts(x, ids, weights)
            else:
                backend(layer, x, ids, weights)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def sharded_rates(folder, prompts: list[list[int]], opts) -> dict:
    """Every transport, with and without micro-batch overlap: {key: {tok_s, layer_round_trip_ms}}."""
    import ray

    from moeray.actors import TRANSPORTS
    from moeray.actors.dispatch import start_expert_parallel

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    measured = {}
    for transport in TRANSPORTS:
        router, backend = start_expert_parallel(str(folder), opts.shards, name=f"bench-{transport}", num_cpus=1,
                                                transport=transport)
        for overlap in (False, True):
            llm = LLM(folder, max_model_len=512, experts=backend, overlap_microbatches=overlap)
            key = f"{transport}{' + micro-batch overlap' if overlap else ''}"
            measured[key] = {"tok_s": decode_rate(llm, prompts, opts.decode_tokens)}
            if not overlap:
                measured[key]["layer_round_trip_ms"] = layer_round_trip(llm, opts.sequences) * 1e3
            del llm
        ray.get(router.shutdown.remote())
    ray.shutdown()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--sharded-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    opts = parser.parse_args()
    folder = small_checkpoint("small")
    rng = random.Random(3)
    prompts = [[rng.randrange(10, 2000) for _ in range(rng.randint(32, 96))] for _ in range(opts.sequences)]
    if opts.sharded_only:
        print(json.dumps(sharded_rates(folder, prompts, opts)))
        return

    local = LLM(folder, max_model_len=512)
    local_rate = decode_rate(local, prompts, opts.decode_tokens)
    local_trip = layer_round_trip(local, opts.sequences)
    del local

    from moeray.actors import SHARED_CPU_ENV

    child = subprocess.run([sys.executable, __file__, "--sharded-only", "--sequences", str(opts.sequences),
                            "--shards", str(opts.shards), "--decode-tokens", str(opts.decode_tokens)],
                           env={**os.environ, **SHARED_CPU_ENV}, capture_output=True, text=True, check=True)
    sharded = json.loads(child.stdout.strip().splitlines()[-1])
    results = {"preset": "small", "sequences": opts.sequences, "shards": opts.shards, "sharded_env": SHARED_CPU_ENV,
               "local_tok_s": round(local_rate, 2), "local_layer_ms": round(local_trip * 1e3, 2), "transports": {}}
    rows = [("local experts tok/s", f"{local_rate:.1f}", "", "1.00"),
            ("local MoE layer (ms)", f"{local_trip * 1e3:.1f}", "", "")]
    for key, measured in sharded.items():
        rate = measured["tok_s"]
        results["transports"][key] = {"tok_s": round(rate, 2), "ratio_to_local": round(rate / local_rate, 3)}
        rows.append((f"{opts.shards} shards, {key} tok/s", f"{rate:.1f}", f"{local_rate:.1f}",
                     f"{rate / local_rate:.2f}"))
        if "layer_round_trip_ms" in measured:
            trip = measured["layer_round_trip_ms"]
            results["transports"][key]["layer_round_trip_ms"] = round(trip, 2)
            rows.append(("  MoE layer dispatch round trip (ms)", f"{trip:.1f}", f"{local_trip * 1e3:.1f}", ""))
    report("expert_parallel", results, rows)


if __name__ == "__main__":
    main()
