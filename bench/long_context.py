"""Long context: prefill and decode at 1K, 8K and 32K tokens of context, against llama.cpp.

The checkpoint is the `small` preset with YaRN (factor 8 over 4096 original positions, so 32768
in all), random weights, converted to a GGUF F32 for llama.cpp (see bench/peer_llamacpp.py).
At each depth D, in one run:
- prefill tokens/s: 512 new tokens after D cached ones. llama.cpp: `llama-bench -d D -p 512`;
  moeray: a D-token prompt first (kept by the prefix cache), then the same D tokens plus 512 more,
  timing the second request's prefill;
- decode tokens/s at depth D: `llama-bench -d D -n 32`, against 32 greedy tokens after a D-token
  prompt;
- peak resident memory: moeray's process so far (ru_maxrss, holding the float32 model, its packed
  copy and the cache) and llama-bench's, sampled while it runs;
- moeray's latent-cache bytes per token against what a per-head K/V cache of the same model
  would take.
Prefill attention runs in chunks over the cached context (chunk x context memory, not
context^2). The 32K row takes several minutes on 2 cores on each side.

    .venv/bin/python bench/long_context.py                       # 1K, 8K, 32K
    .venv/bin/python bench/long_context.py --depths 1024,8192    # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import subprocess
import time
from pathlib import Path

import torch

from common import CACHE, report, write_bench_tokenizer
from moeray import LLM, SamplingParams
from moeray.engine.cache import full_kv_bytes_per_token
from moeray.model import ModelArgs, build, save_checkpoint
from moeray.model.config import YarnScaling
from peer_llamacpp import THREADS, gguf, llama_cpp_root

NEW_PREFILL, NEW_DECODE = 512, 32


def yarn_checkpoint() -> Path:
    folder = CACHE / "small-yarn-seed0"
    if not (folder / "tokenizer.json").exists():
        args = ModelArgs.preset("small")
        args = dataclasses.replace(args, max_position_embeddings=32768,
                                   rope_yarn=YarnScaling(factor=8.0, original_max_position_embeddings=4096))
        save_checkpoint(build(args, seed=0), folder, args)
        write_bench_tokenizer(folder, 2048)
    return folder


def run_measured(cmd: list[str]) -> tuple[str, float]:
    """(stdout, peak resident MB) of a command, its memory sampled every 50 ms while it runs.
    (ru_maxrss of children would report this process's own size: a forked child starts with it.)"""
    import psutil

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as process:
        watched, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        out = process.stdout.read()
    if process.returncode:
        raise RuntimeError(f"{cmd[0]} failed with status {process.returncode}")
    return out, peak / 2**20


def llama_depth(root: Path, model: Path, depth: int) -> tuple[float, float, float]:
    """(prefill tok/s of 512 tokens, decode tok/s, peak MB) at `depth`, one repetition each."""
    rates, peak = [], 0.0
    for test in (["-p", str(NEW_PREFILL), "-n", "0"], ["-p", "0", "-n", str(NEW_DECODE)]):
        out, used = run_measured([str(root / "build/bin/llama-bench"), "-m", str(model), "-t", str(THREADS), "-r", "1",
                                  "-d", str(depth), "-o", "json", *test])
        rates.append(json.loads(out)[0]["avg_ts"])
        peak = max(peak, used)
    return rates[0], rates[1], peak


def moeray_depth(llm: LLM, depth: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    context = [rng.randrange(2, 2000) for _ in range(depth)]
    extra = [rng.randrange(2, 2000) for _ in range(NEW_PREFILL)]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([context], one)  # fills the prefix cache with the context
    start = time.perf_counter()
    llm.generate([context + extra], one)
    prefill = NEW_PREFILL / (time.perf_counter() - start)
    engine = llm.engine
    engine.add_request(f"decode-{depth}", context + extra[:1], SamplingParams(temperature=0,
                                                                             max_tokens=NEW_DECODE + 1,
                                                                             ignore_eos=True))
    while not any(seq.num_output_tokens for r in engine.requests.values() for seq in r.seqs.values()):
        engine.step()
    start = time.perf_counter()
    while engine.requests:
        engine.step()
    return prefill, NEW_DECODE / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="1024,8192,32768")
    options = parser.parse_args()
    torch.set_num_threads(THREADS)
    depths = [int(d) for d in options.depths.split(",")]
    root, checkpoint = llama_cpp_root(), yarn_checkpoint()
    model = gguf(root, checkpoint, "f32")
    top = max(depths) + NEW_PREFILL + NEW_DECODE + 16
    llm = LLM(checkpoint, max_model_len=min(32768, top), max_num_seqs=2, num_cache_blocks=2 * (top // 16 + 2))
    args = llm.engine.args
    results = {"cache_bytes_per_token": llm.engine.cache.bytes_per_token,
               "per_head_kv_bytes_per_token": full_kv_bytes_per_token(args, torch.float32), "depths": {}}
    rows = [("latent-cache bytes per token", str(results["cache_bytes_per_token"]),
             f"{results['per_head_kv_bytes_per_token']} (per-head K/V)", "")]
    for depth in depths:
        depth = min(depth, 32768 - NEW_PREFILL - NEW_DECODE - 16)  # room for the new tokens
        prefill, decode = moeray_depth(llm, depth, depth)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        their_prefill, their_decode, their_rss = llama_depth(root, model, depth)
        results["depths"][depth] = {"moeray_prefill_tok_s": round(prefill, 1), "llamacpp_prefill_tok_s": round(their_prefill, 1),
                                    "moeray_decode_tok_s": round(decode, 2), "llamacpp_decode_tok_s": round(their_decode, 2),
                                    "moeray_peak_rss_mb": round(rss), "llamacpp_peak_rss_mb": round(their_rss)}
        rows += [(f"prefill 512 @ {depth} (tok/s)", f"{prefill:.1f}", f"{their_prefill:.1f}", f"{prefill / their_prefill:.2f}x"),
                 (f"decode @ {depth} (tok/s)", f"{decode:.2f}", f"{their_decode:.2f}", f"{decode / their_decode:.2f}x"),
                 (f"peak RSS after {depth} (MB)", f"{rss:.0f}", f"{their_rss:.0f}", "")]
    report("long_context", results, rows)


if __name__ == "__main__":
    main()
