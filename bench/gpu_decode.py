"""`LLM` decode on a GPU in bfloat16 on the `small` preset: batch 1, and 64 sequences.

Measures, as the median of 3 rounds:
- batch-1 decode tokens/s (64 greedy tokens after a one-token prompt);
- decode tokens/s at 64 sequences of 128-token prompts and 64 new tokens (after prefill, as
  `bench/peer_llamacpp.py` counts it) and the prefill tokens/s of those prompts;
- offline throughput at 64 sequences: all output tokens over the whole `LLM.generate` call.
Without a CUDA device it measures nothing and exits with status 2 (part of bench/gpu_check.sh).

    python3 bench/gpu_decode.py
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch

from common import report, small_checkpoint
from moeray import LLM, SamplingParams
from peer_llamacpp import NEW, PROMPT, moeray_batch1, moeray_batched

UNAVAILABLE = 2
BATCH = 64


def offline_rate(llm: LLM, seed: int) -> float:
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, 2000) for _ in range(PROMPT)] for _ in range(BATCH)]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(r.outputs[0].token_ids) for r in results) / seconds


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/gpu_decode.py: no CUDA device here; nothing was measured.", file=sys.stderr)
        return UNAVAILABLE
    checkpoint = small_checkpoint()
    options = dict(dtype="bfloat16", device="cuda", enable_prefix_caching=False, num_cache_blocks=BATCH * 16 + 64)
    single = LLM(checkpoint, max_num_seqs=1, **options)
    batched = LLM(checkpoint, max_num_seqs=BATCH, max_num_batched_tokens=BATCH * PROMPT, **options)
    moeray_batch1(single)  # warm-up: Triton compiles its kernels on first use
    moeray_batched(batched, BATCH, seed=99)
    samples: dict[str, list[float]] = {"decode batch 1": [], f"decode {BATCH} seqs": [], f"prefill {BATCH}x{PROMPT}": [],
                                       f"offline {BATCH} seqs": []}
    for round_ in range(3):
        samples["decode batch 1"].append(moeray_batch1(single))
        prefill, decode = moeray_batched(batched, BATCH, round_)
        samples[f"decode {BATCH} seqs"].append(decode)
        samples[f"prefill {BATCH}x{PROMPT}"].append(prefill)
        samples[f"offline {BATCH} seqs"].append(offline_rate(batched, round_))
    results = {"gpu": torch.cuda.get_device_name(), "dtype": "bfloat16",
               "tok_s": {name: round(statistics.median(values), 1) for name, values in samples.items()}}
    report("gpu_decode", results, [(f"{name} (tok/s)", f"{value:.1f}", "", "") for name, value in results["tok_s"].items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
