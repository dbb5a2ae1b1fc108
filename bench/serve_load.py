"""HTTP serving under load against the offline engine, on the `small` preset (float32, CPU).

N concurrent streaming clients send completions over HTTP to the real Ray Serve app on
127.0.0.1; the same prompts and lengths then run through `LLM.generate` in this process. Prints
TTFT and TPOT p50/p99, output tokens/s, and served/offline throughput (target >= 0.9), the
median of alternating rounds.

    cd bench && ../.venv/bin/python serve_load.py [--clients 16] [--rounds 3] [--proxy haproxy]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

import httpx

from common import report, small_checkpoint, sse_chunks, timed


def workload(n: int, seed: int = 1) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, 2000) for _ in range(rng.randint(64, 256))], rng.randint(64, 128)) for _ in range(n)]


async def one_client(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    # logprobs=0 tags every chunk with its tokens: the random model emits ids the small benchmark
    # tokenizer decodes to nothing, so text alone cannot time tokens.
    body = {"model": "small", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async for chunk in sse_chunks(http, url, body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and (chunk["choices"][0]["logprobs"] or {}).get("tokens"):
            now = time.perf_counter()
            first = first or now
            last = now
    assert tokens == max_tokens, (tokens, max_tokens)
    return {"ttft": first - start, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens}


async def drive(url: str, requests) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, url, p, n) for p, n in requests))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def serve_round(url: str, requests) -> tuple[float, list[dict]]:
    served, seconds = asyncio.run(drive(url, requests))
    return sum(n for _, n in requests) / seconds, served


def offline_round(llm, requests) -> float:
    from moeray import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    _, seconds = timed(lambda: llm.generate([p for p, _ in requests], params))
    return sum(n for _, n in requests) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--rounds", type=int, default=3, help="alternating served and offline rounds")
    parser.add_argument("--ingress", choices=["separate", "colocated"], default="colocated",
                        help="OpenAI app in its own deployment, or inside the model replica")
    parser.add_argument("--proxy", choices=["python", "haproxy"], default="python",
                        help="Serve's Python HTTP proxy, or HAProxy in front of replicas that serve HTTP themselves")
    opts = parser.parse_args()
    folder = small_checkpoint("small")
    requests = workload(opts.clients)
    threads = str(os.cpu_count() or 1)
    if opts.proxy == "haproxy":  # read by Serve's controller and replicas: set before the cluster starts
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"

    import ray
    from ray import serve

    from moeray import LLM, SamplingParams
    from moeray.platform.serve_app import build_app

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
    serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
    engine = {"max_model_len": 1024, "max_num_seqs": 64}
    serve.run(build_app({"model": str(folder), "served_model_name": "small", "engine": engine,
                         "replica_cpus": os.cpu_count() or 1, "ingress": opts.ingress}),
              name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{opts.port}/v1/completions"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{opts.port}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        raise SystemExit("the app did not become healthy in 10 minutes")
    asyncio.run(drive(url, requests[:2]))  # warm-up
    # The offline engine runs in this process beside the idle cluster; the replica's engine thread
    # sleeps while nothing is queued. Rounds alternate so the machine's drift hits both sides.
    llm = LLM(folder, **engine)
    llm.generate([requests[0][0]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    served_rates, offline_rates, ttft, tpot = [], [], [], []
    for _ in range(opts.rounds):
        rate, served = serve_round(url, requests)
        served_rates.append(rate)
        ttft += [r["ttft"] for r in served]
        tpot += [r["tpot"] for r in served]
        offline_rates.append(offline_round(llm, requests))
    serve.shutdown()
    ray.shutdown()

    ratios = [a / b for a, b in zip(served_rates, offline_rates)]
    served_rate, offline_rate = statistics.median(served_rates), statistics.median(offline_rates)
    results = {"preset": "small", "clients": opts.clients, "ingress": opts.ingress, "proxy": opts.proxy,
               "rounds": opts.rounds, "output_tokens": sum(n for _, n in requests),
               "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
               "tpot_p50_s": round(statistics.median(tpot), 4), "tpot_p99_s": round(percentile(tpot, 0.99), 4),
               "served_tok_s": round(served_rate, 1), "offline_tok_s": round(offline_rate, 1),
               "round_ratios": [round(r, 3) for r in ratios],
               "served_over_offline": round(statistics.median(ratios), 3)}
    report("serve_load", results, [
        ("output tok/s (median)", f"{served_rate:.1f} (HTTP)", f"{offline_rate:.1f} (LLM.generate)",
         f"{statistics.median(ratios):.2f}"),
        ("TTFT p50 / p99 (s)", f"{results['ttft_p50_s']} / {results['ttft_p99_s']}", "", ""),
        ("TPOT p50 / p99 (s)", f"{results['tpot_p50_s']} / {results['tpot_p99_s']}", "", ""),
    ])


if __name__ == "__main__":
    main()
