"""moeray against llama.cpp on the same `small` checkpoint, in one run (CPU, 2 threads).

llama.cpp is built from the `llama-cpp-python` sdist on PyPI (it vendors llama.cpp): `llama-bench`
and `llama-batched-bench` with CMake and GGML_NATIVE, once, under bench/.cache/llamacpp (about
2.5 minutes here). The checkpoint is converted with llama.cpp's own `convert_hf_to_gguf.py`
(F32, and BF16 for the bf16 rows); the bench tokenizer's pre-tokenizer hash is unknown to the
converter, so it is mapped to `gpt-2`.

Measures, each as the median of rounds that alternate moeray and llama.cpp:
- batch-1 decode tokens/s: `llama-bench -p 0 -n 64` against 64 greedy tokens of `LLM.generate`;
- decode throughput at 8/32/64 sequences of 128-token prompts and 64 new tokens: the S_TG column
  of `llama-batched-bench -npp 128 -ntg 64` against the engine's decode steps after prefill;
- prefill tokens/s: the S_PP column at 8 sequences against the engine's prefill step of the same
  1024 tokens.
moeray runs with prefix caching off (repeated prompts would make prefill look free).

    .venv/bin/python bench/peer_llamacpp.py                 # F32 rows (a few minutes)
    .venv/bin/python bench/peer_llamacpp.py --bf16          # also the bf16 rows
    .venv/bin/python bench/peer_llamacpp.py --rounds 3 --batches 8,32
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

import moeray.model
from common import CACHE, report, small_checkpoint
from moeray import LLM, SamplingParams
from moeray.engine.cache import LatentCache
from moeray.kernels import cpu
from moeray.kernels.cpu import decoder

PEER = CACHE / "llamacpp"
THREADS = 2
PROMPT, NEW = 128, 64


def llama_cpp_root() -> Path:
    """The vendored llama.cpp of the newest llama-cpp-python sdist, built (once) with its two benches."""
    PEER.mkdir(parents=True, exist_ok=True)
    sdists = sorted(PEER.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", str(PEER)], check=True)
        sdists = sorted(PEER.glob("llama_cpp_python-*.tar.gz"))
    source = PEER / sdists[-1].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not source.exists():
        with tarfile.open(sdists[-1]) as archive:
            archive.extractall(PEER, filter="data")
    bins = source / "build" / "bin"
    if not (bins / "llama-batched-bench").exists():
        print("building llama.cpp (about 2.5 minutes) ...", file=sys.stderr)
        subprocess.run(["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"], cwd=source, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", "build", "-j2", "--target", "llama-bench", "llama-batched-bench"],
                       cwd=source, check=True, stdout=subprocess.DEVNULL)
    return source


# Run inside a child python: llama.cpp's converter with the bench tokenizer's pre-tokenizer named.
CONVERT = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py"]
import conversion.base
for name in dir(conversion.base):
    cls = getattr(conversion.base, name)
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", {checkpoint!r}, "--outtype", {outtype!r}, "--outfile", {out!r}]
import runpy
runpy.run_path({root!r} + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def gguf(root: Path, checkpoint: Path, outtype: str) -> Path:
    out = checkpoint / f"model-{outtype}.gguf"
    if not out.exists():
        code = CONVERT.format(root=str(root), checkpoint=str(checkpoint), outtype=outtype, out=str(out))
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return out


def llama_bench(root: Path, model: Path, *args: str) -> float:
    """tokens/s of one llama-bench test (its own mean over 3 repetitions)."""
    result = subprocess.run([str(root / "build/bin/llama-bench"), "-m", str(model), "-t", str(THREADS), "-r", "3",
                             "-o", "json", *args], check=True, capture_output=True, text=True)
    return json.loads(result.stdout)[0]["avg_ts"]


def llama_batched(root: Path, model: Path, batch: int) -> tuple[float, float]:
    """(S_PP, S_TG) of llama-batched-bench at `batch` sequences."""
    context = batch * (PROMPT + NEW) + 64
    result = subprocess.run([str(root / "build/bin/llama-batched-bench"), "-m", str(model), "-t", str(THREADS),
                             "-c", str(context), "-b", "2048", "-ub", "512", "-npp", str(PROMPT), "-ntg", str(NEW),
                             "-npl", str(batch), "--output-format", "jsonl"],
                            check=True, capture_output=True, text=True)
    row = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")][-1]
    return row["speed_pp"], row["speed_tg"]


def moeray_batch1(llm: LLM) -> float:
    params = SamplingParams(temperature=0, max_tokens=NEW + 1, ignore_eos=True)
    engine = llm.engine
    engine.add_request("b1", [5], params)
    engine.step()  # the prompt's one token and the first new one
    start = time.perf_counter()
    while engine.requests:
        engine.step()
    return NEW / (time.perf_counter() - start)


def moeray_batched(llm: LLM, batch: int, seed: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of `batch` sequences, as llama-batched-bench counts them."""
    rng = random.Random(seed)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"s{seed}-{i}", [rng.randrange(2, 2000) for _ in range(PROMPT)], params)
    start = time.perf_counter()
    while engine.scheduler.waiting or any(not seq.num_output_tokens for r in engine.requests.values()
                                          for seq in r.seqs.values()):
        engine.step()
    prefilled = time.perf_counter()
    while engine.requests:
        engine.step()
    done = time.perf_counter()
    return batch * PROMPT / (prefilled - start), batch * (NEW - 1) / (done - prefilled)


def engine(checkpoint: Path, dtype: str, batch: int) -> LLM:
    return LLM(checkpoint, dtype=dtype, enable_prefix_caching=False, max_num_seqs=max(batch, 1),
               max_num_batched_tokens=max(2048, batch * PROMPT), num_cache_blocks=batch * 16 + 64)


def bf16_against_fp32(checkpoint: Path, sequences: int = 8, length: int = 96) -> dict:
    """Greedy agreement and the largest logit difference of the native bf16 decoder against the
    native fp32 one, teacher-forced on the same random tokens (every position a decode step)."""
    rng = random.Random(0)
    tokens = [[rng.randrange(2, 2000) for _ in range(length)] for _ in range(sequences)]
    tables = [list(range(b * 16, b * 16 + 16)) for b in range(sequences)]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = moeray.model.load(checkpoint, dtype=dtype)
        cache = LatentCache(model.args, sequences * 16, 16, dtype)
        native = decoder.prepare(model, cache)
        if native is None:
            raise RuntimeError(f"the native decoder does not take the {dtype} model: {cpu.unavailable_reason()}")
        steps = [native.step([row[p] for row in tokens], [p] * sequences, list(range(sequences)), tables, 16)
                 for p in range(length)]
        logits[dtype] = torch.stack(steps)  # [length, sequences, V]
        del native, cache, model
        gc.collect()
    full, half = logits[torch.float32], logits[torch.bfloat16]
    return {"greedy_agreement": round((full.argmax(-1) == half.argmax(-1)).float().mean().item(), 4),
            "max_logit_diff": round((full - half).abs().max().item(), 4),
            "logit_scale": round(full.abs().max().item(), 3)}


def median_ratio(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    return statistics.median(ours), statistics.median(theirs), statistics.median(a / b for a, b in zip(ours, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="8,32,64")
    parser.add_argument("--bf16", action="store_true", help="also bf16 weights against llama.cpp's BF16 GGUF")
    options = parser.parse_args()
    torch.set_num_threads(THREADS)
    root, checkpoint = llama_cpp_root(), small_checkpoint()
    batches = [int(b) for b in options.batches.split(",")]
    dtypes = [("float32", "f32")] + ([("bfloat16", "bf16")] if options.bf16 else [])
    results, rows, rates = {}, [], {}
    for dtype, outtype in dtypes:
        model = gguf(root, checkpoint, outtype)
        samples: dict[str, tuple[list[float], list[float]]] = {}

        def add(name: str, ours: float, theirs: float) -> None:
            samples.setdefault(name, ([], []))
            samples[name][0].append(ours)
            samples[name][1].append(theirs)

        llms = {batch: engine(checkpoint, dtype, batch) for batch in [1, *batches]}
        for round_ in range(options.rounds):  # alternate: moeray, then llama.cpp, per measure
            ours = moeray_batch1(llms[1])
            rates.setdefault(dtype, []).append(ours)
            add("decode batch 1", ours, llama_bench(root, model, "-p", "0", "-n", str(NEW)))
            for batch in batches:
                prefill, decode = moeray_batched(llms[batch], batch, round_)
                their_prefill, their_decode = llama_batched(root, model, batch)
                add(f"decode {batch} seqs", decode, their_decode)
                if batch == batches[0]:
                    add(f"prefill {batch}x{PROMPT}", prefill, their_prefill)
        for name, (ours, theirs) in samples.items():
            mine, peer, ratio = median_ratio(ours, theirs)
            key = f"{dtype} {name}"
            results[key] = {"moeray_tok_s": round(mine, 1), "llamacpp_tok_s": round(peer, 1), "ratio": round(ratio, 3),
                            "ratios": [round(a / b, 3) for a, b in zip(ours, theirs)]}
            rows.append((key + " (tok/s)", f"{mine:.1f}", f"{peer:.1f}", f"{ratio:.2f}x"))
        del llms
        gc.collect()
    print(json.dumps({"partial": results}), file=sys.stderr, flush=True)
    if options.bf16:
        own = [a / b for a, b in zip(rates["bfloat16"], rates["float32"])]
        results["bf16 / fp32 batch-1 decode (moeray)"] = {"ratio": round(statistics.median(own), 3),
                                                          "ratios": [round(r, 3) for r in own]}
        rows.append(("moeray bf16 / fp32 decode batch 1", f"{statistics.median(own):.2f}x", "", ""))
        results["bf16 against fp32"] = agreement = bf16_against_fp32(checkpoint)
        rows.append(("bf16 greedy agreement with fp32", f"{agreement['greedy_agreement']:.1%}", "", ""))
        rows.append(("bf16 max logit difference", f"{agreement['max_logit_diff']} (logits up to "
                                                  f"{agreement['logit_scale']})", "", ""))
    report("peer_llamacpp", {"threads": THREADS, "rounds": options.rounds, "results": results}, rows)


if __name__ == "__main__":
    main()
