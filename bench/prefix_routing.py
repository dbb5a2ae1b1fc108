"""Cache-aware routing against Serve's default router, in one run: multi-turn chats over 2 replicas.

Two apps on one Serve instance, the same `small` checkpoint (random weights, float32, prefix
caching on), two model replicas each: one with `routing.policy: power_of_two` (Serve's
default), one with `prefix_cache` (Ray Serve's PrefixCacheAffinityRouter). Each round, C
conversations run at once, each T turns long; a turn's prompt is the whole conversation so far
plus a new user message, so a turn's prefix is cached only on the replica that served the turn
before it. Rounds alternate between the apps, each with conversations of its own (fresh text,
so no round reuses another's cache). Reports the prefix-cache hit rate (cached prompt tokens /
prompt tokens, from each response's usage) and TTFT p50 over turns 2..T, medians over rounds.

    cd bench && ../.venv/bin/python prefix_routing.py [--rounds 3] [--conversations 8] [--turns 6] [--cache-blocks 256]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import time

import httpx

from common import report, small_checkpoint, sse_chunks

WORDS = ("model replica cache prefix token stream expert shard router batch latency throughput decode "
         "prefill request answer question python function return value list dict graph").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def conversation(http: httpx.AsyncClient, url: str, seed: int, turns: int) -> list[dict]:
    rng = random.Random(seed)
    history = f"System: {sentence(rng, 120)}\n"  # a long system prompt of its own per conversation
    results = []
    for turn in range(turns):
        history += f"User: {sentence(rng, 40)}\nAssistant:"
        body = {"model": "small", "prompt": history, "max_tokens": 16, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        start, first, text, usage = time.perf_counter(), None, "", None
        async for chunk in sse_chunks(http, f"{url}/v1/completions", body):
            if chunk.get("choices"):
                first = first or time.perf_counter()
                text += chunk["choices"][0]["text"]
            if chunk.get("usage"):
                usage = chunk["usage"]
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0) if usage else 0
        results.append({"turn": turn, "ttft_s": first - start, "prompt_tokens": usage["prompt_tokens"],
                        "cached_tokens": cached})
        history += text + "\n"
    return results


async def run_round(url: str, seeds: list[int], turns: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        per_conversation = await asyncio.gather(*(conversation(http, url, seed, turns) for seed in seeds))
    later = [r for results in per_conversation for r in results if r["turn"] > 0]  # turn 1 has nothing to reuse
    return {"hit_rate": sum(r["cached_tokens"] for r in later) / sum(r["prompt_tokens"] for r in later),
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--cache-blocks", type=int, default=256,
                        help="latent-cache blocks per replica (16 tokens each): room for about half the chats, so "
                             "a replica that sees every chat evicts")
    opts = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise

    import ray
    from ray import serve

    from moeray.platform.serve_app import build_app

    folder = small_checkpoint()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
    base = {"model": str(folder), "served_model_name": "small", "replica_cpus": 0.5,
            "autoscaling": {"min_replicas": 2, "max_replicas": 2},
            "engine": {"max_model_len": 2048, "enable_prefix_caching": True, "num_cache_blocks": opts.cache_blocks}}
    policies = ("power_of_two", "prefix_cache")
    for policy in policies:
        serve.run(build_app({**base, "routing": {"policy": policy}}), name=policy, route_prefix=f"/{policy}")
    rounds: dict[str, list[dict]] = {policy: [] for policy in policies}
    seed = 0
    for _ in range(opts.rounds):
        for policy in policies:  # alternating rounds, each with conversations of its own
            seeds = list(range(seed, seed + opts.conversations))
            seed += opts.conversations
            rounds[policy].append(asyncio.run(run_round(f"http://127.0.0.1:{opts.port}/{policy}", seeds, opts.turns)))
    medians = {policy: {key: statistics.median(r[key] for r in rounds[policy]) for key in ("hit_rate", "ttft_p50_s")}
               for policy in policies}
    default, aware = medians["power_of_two"], medians["prefix_cache"]
    report("prefix_routing", {"conversations": opts.conversations, "turns": opts.turns, "replicas": 2,
                              "rounds": rounds, "medians": medians},
           [("prefix-cache hit rate, turns 2+", f"{aware['hit_rate']:.3f}", f"{default['hit_rate']:.3f}",
             f"{aware['hit_rate'] / max(default['hit_rate'], 1e-9):.2f}x"),
            ("TTFT p50, turns 2+ (s)", f"{aware['ttft_p50_s']:.3f}", f"{default['ttft_p50_s']:.3f}",
             f"{aware['ttft_p50_s'] / default['ttft_p50_s']:.2f}x")])
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
