"""Shared benchmark helpers: the `small` random checkpoint, a tokenizer, timing and reporting.

Checkpoints are built once (random weights, seed 0) and cached under bench/.cache/ (ignored by
git); every benchmark compares against its reference in the same process and run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import moeray.model
from moeray.model import ModelArgs, save_checkpoint

CACHE = Path(__file__).resolve().parent / ".cache"


def small_checkpoint(preset: str = "small") -> Path:
    """A Hugging Face folder with random weights of `preset` and a small byte-level tokenizer."""
    folder = CACHE / f"{preset}-seed0"
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    args = ModelArgs.preset(preset)
    print(f"building random {preset} checkpoint in {folder} ...", file=sys.stderr)
    model = moeray.model.build(args, seed=0)
    save_checkpoint(model, folder, args)
    del model
    write_bench_tokenizer(folder, min(2048, args.vocab_size))
    return folder


def write_bench_tokenizer(folder: Path, vocab_size: int = 2048) -> None:
    """Byte-level BPE trained on this repository's own Python files (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [p.read_text() for p in sorted(Path(moeray.__file__).parent.rglob("*.py"))]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                             "tokenizer_class": "PreTrainedTokenizerFast"}))


def decode_weight_bytes(args: ModelArgs, num_tokens: int = 1, dtype_bytes: int = 4) -> int:
    """Weight bytes one decode step must read at batch `num_tokens` (distinct experts assumed)."""
    active = args.num_experts_per_tok * num_tokens
    return args.num_parameters(active_experts=active, input_embedding=False) * dtype_bytes


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


async def sse_chunks(http, url: str, body: dict):
    """The JSON chunks of one streamed OpenAI response (POST `body` to `url`), up to [DONE]."""
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def report(name: str, results: dict, rows: list[tuple[str, str, str, str]]) -> None:
    """Print the JSON record and a readable table (metric, moeray, reference, ratio)."""
    print(json.dumps({"benchmark": name, **results}, indent=2))
    widths = [max(len(str(r[i])) for r in rows + [("metric", "moeray", "reference", "ratio")]) for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format("metric", "moeray", "reference", "ratio"))
    for row in rows:
        print(line.format(*row))
    torch.set_printoptions()
