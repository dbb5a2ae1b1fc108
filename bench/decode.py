"""Decode throughput of the moeray engine against transformers, on the `small` preset (float32, CPU).

Two measurements, both in one run against transformers' DeepseekV3ForCausalLM.generate on the
same random checkpoint:
1. batch-1 greedy decode tokens/s, and the fraction of this machine's memory-bandwidth roofline
   it reaches (weight bytes one decode step must read / step time, against a streaming-read
   bandwidth measured in the same run: the best of torch's sum and the C probes, over ordinary
   and huge-page memory). This shared machine's bandwidth moves between 25 and 60 GB/s from
   one probe to the next, so the rate is measured in rounds, each right after its own bandwidth
   probe, and the median round is reported;
2. a workload of N requests (prompt 16-512 tokens, output 32-256 tokens, submitted together):
   total output tokens/s of the engine against transformers' batched generate at batch 8.

    .venv/bin/python bench/decode.py            # full run (several minutes)
    .venv/bin/python bench/decode.py --quick    # smaller workload for a fast look

transformers' side of the workload runs its first 2 batches of 8 by default (--hf-batches 0 runs
all of them, about half an hour here): batches are independent, so that is its throughput.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import DeepseekV3ForCausalLM

from common import decode_weight_bytes, report, small_checkpoint, timed
from moeray import LLM, SamplingParams
from moeray.kernels import stream_read_bandwidth
from moeray.model import ModelArgs


def engine_decode_rate(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    def run(n):
        return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    run(4)  # warm-up
    _, first = timed(lambda: run(1))
    _, full = timed(lambda: run(new_tokens + 1))
    return new_tokens / (full - first)


def hf_decode_rate(model, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])

    def run(n):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    run(4)
    _, first = timed(lambda: run(1))
    _, full = timed(lambda: run(new_tokens + 1))
    return new_tokens / (full - first)


def workload(num_requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(2, 32000) for _ in range(rng.randint(16, 512))], rng.randint(32, 256))
            for _ in range(num_requests)]


def engine_workload_rate(llm: LLM, requests) -> float:
    prompts = [p for p, _ in requests]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    results, seconds = timed(lambda: llm.generate(prompts, params))
    assert [len(r.outputs[0].token_ids) for r in results] == [n for _, n in requests]
    return sum(n for _, n in requests) / seconds


def hf_workload_rate(model, requests, batch_size: int = 8, max_batches: int = 0) -> float:
    """transformers' batched generate: left-padded batches of 8 in submission order.

    Batches run one after another and independently, so the throughput of the first
    `max_batches` of them (0: all) estimates the whole workload's at a fraction of the time.
    """
    if max_batches:
        requests = requests[:batch_size * max_batches]

    def run():
        for i in range(0, len(requests), batch_size):
            batch = requests[i:i + batch_size]
            longest = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (longest - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p, _ in batch])
            n = max(m for _, m in batch)
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)
    _, seconds = timed(run)
    return sum(n for _, n in requests) / seconds  # only the tokens each request asked for count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 requests and 32 decode tokens")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9, help="batch-1 rounds, each after a bandwidth probe")
    parser.add_argument("--hf-batches", type=int, default=2,
                        help="transformers runs the first N batches of 8 of the workload (0: all of them)")
    opts = parser.parse_args()
    if opts.quick:
        opts.requests, opts.decode_tokens = 16, 32

    folder = small_checkpoint("small")
    args = ModelArgs.from_file(folder / "config.json")
    llm = LLM(folder, max_model_len=1024)
    hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    prompt = list(range(100, 228))
    step_bytes = decode_weight_bytes(args)
    rounds = []  # (fraction of the roofline, engine tok/s, bandwidth), each rate next to its probe
    for _ in range(opts.rounds):
        probe = stream_read_bandwidth(repeats=3)
        rate = engine_decode_rate(llm, prompt, opts.decode_tokens)
        rounds.append((rate / (probe / step_bytes), rate, probe))
    fraction, engine_rate, bandwidth = sorted(rounds)[len(rounds) // 2]  # the median round
    hf_rate = hf_decode_rate(hf, prompt, opts.decode_tokens)
    roofline_rate = bandwidth / step_bytes
    requests = workload(opts.requests)
    engine_wl = engine_workload_rate(llm, requests)
    hf_wl = hf_workload_rate(hf, requests, max_batches=opts.hf_batches)

    results = {
        "preset": "small", "dtype": "float32", "threads": torch.get_num_threads(),
        "stream_read_GBps": round(bandwidth / 1e9, 2), "decode_step_weight_MB": round(step_bytes / 1e6, 1),
        "batch1": {"moeray_tok_s": round(engine_rate, 2), "transformers_tok_s": round(hf_rate, 2),
                   "ratio": round(engine_rate / hf_rate, 2), "roofline_tok_s": round(roofline_rate, 2),
                   "roofline_fraction": round(fraction, 3),
                   "rounds": [{"roofline_fraction": round(f, 3), "tok_s": round(r, 2), "GBps": round(b / 1e9, 1)}
                              for f, r, b in rounds]},
        "workload": {"requests": opts.requests, "transformers_batches": opts.hf_batches or "all",
                     "moeray_tok_s": round(engine_wl, 1),
                     "transformers_bs8_tok_s": round(hf_wl, 1), "ratio": round(engine_wl / hf_wl, 2)},
    }
    report("decode", results, [
        ("batch-1 decode tok/s", f"{engine_rate:.1f}", f"{hf_rate:.1f}", f"{engine_rate / hf_rate:.2f}x"),
        ("batch-1 roofline fraction", f"{engine_rate / roofline_rate:.0%}", f"{hf_rate / roofline_rate:.0%}",
         f"(ceiling {roofline_rate:.1f} tok/s at {bandwidth / 1e9:.1f} GB/s)"),
        (f"{opts.requests}-request workload tok/s", f"{engine_wl:.1f}", f"{hf_wl:.1f} (bs 8)",
         f"{engine_wl / hf_wl:.2f}x"),
    ])


if __name__ == "__main__":
    main()
