"""Structured outputs' cost: 32 concurrent requests under a JSON schema against the same without.

`cd bench && ../.venv/bin/python structured.py` (the `small` preset, random weights, float32, CPU):
1. output tokens/s of 32 requests decoding together, constrained by a JSON schema (xgrammar's
   mask filled and applied every step) against unconstrained, in alternating rounds, medians
   reported; both sides generate exactly `--tokens` tokens per request (the schema's string is
   an order of at least 1,000 items, so no constrained request ends early and the batch stays full);
2. the first-request compile time of a 20-property schema (a fresh compiler, so no cache).
The tokenizer is a 32,000-token byte-level BPE trained on the standard library's source (built
once into bench/.cache): the mask's cost grows with the vocabulary, and the small preset's own
bench tokenizer has only 2,048 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import CACHE, report, small_checkpoint
from moeray import LLM, SamplingParams
from moeray.engine.grammar import Grammars
from moeray.engine.params import GrammarSpec

# An order of many items: a typical shape (bounded strings, integers, enums, nested arrays) whose
# minItems no request reaches in --tokens tokens, so none ends early.
ORDER = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "qty": {"type": "integer", "minimum": 0},
                                     "tags": {"type": "array", "items": {"enum": ["new", "sale", "gift"]}, "maxItems": 3}},
    "required": ["name", "qty", "tags"], "additionalProperties": False}}}, "required": ["items"]}


def twenty_property_schema() -> dict:
    kinds = [{"type": "string", "maxLength": 32}, {"type": "integer", "minimum": 0}, {"type": "number"},
             {"type": "boolean"}, {"enum": ["low", "medium", "high"]}, {"type": "array", "items": {"type": "string"}}]
    properties = {f"field_{i}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def tokenizer_32k():
    """A folder with a 32,000-token tokenizer (trained once on the standard library's source)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moeray.jobs.corpus import stdlib_sources

    folder = CACHE / "tokenizer-32k"
    if (folder / "tokenizer.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(stdlib_sources(), trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()

    tokenizer_folder = tokenizer_32k()
    llm = LLM(small_checkpoint(), tokenizer=tokenizer_folder, max_model_len=512)
    prompts = [[2 + (7 * i + j) % 1500 for j in range(24)] for i in range(opts.requests)]
    sides = {"plain": SamplingParams(temperature=0.8, seed=1, max_tokens=opts.tokens, ignore_eos=True),
             "json_schema": SamplingParams(temperature=0.8, seed=1, max_tokens=opts.tokens,
                                           structured=GrammarSpec("json_schema", json.dumps(ORDER)))}
    for params in sides.values():  # warm-up (and the schema's compile, outside the timed rounds)
        llm.generate(prompts[:2], params)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(opts.rounds):
        for name, params in sides.items():
            start = time.perf_counter()
            results = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            tokens = sum(len(r.outputs[0].token_ids) for r in results)
            assert tokens == opts.requests * opts.tokens, f"{name}: {tokens} tokens"
            rates[name].append(tokens / elapsed)
    plain, constrained = (statistics.median(rates[name]) for name in ("plain", "json_schema"))

    compile_times = []
    schema = GrammarSpec("json_schema", json.dumps(twenty_property_schema()))
    for _ in range(3):  # a fresh compiler each time: no cache
        grammars = Grammars(llm.tokenizer, llm.engine.args.vocab_size)
        start = time.perf_counter()
        grammars.compile(schema)
        compile_times.append(time.perf_counter() - start)
    compile_ms = statistics.median(compile_times) * 1e3

    report("structured", {"requests": opts.requests, "tokens_per_request": opts.tokens, "rounds": opts.rounds,
                          "vocab": llm.tokenizer.vocab_size, "plain_tokens_per_s": plain,
                          "json_schema_tokens_per_s": constrained, "ratio": constrained / plain,
                          "rounds_plain": rates["plain"], "rounds_json_schema": rates["json_schema"],
                          "compile_20_properties_ms": compile_ms},
           [(f"{opts.requests} concurrent requests, output tok/s (median of {opts.rounds})", f"{constrained:.1f}",
             f"{plain:.1f} (no grammar)", f"{constrained / plain:.2f}x (target >= 0.9)"),
            ("first compile of a 20-property schema (ms)", f"{compile_ms:.1f}", "", "")])


if __name__ == "__main__":
    main()
