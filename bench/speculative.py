"""Speculative decoding against speculation off, in one run: alternating rounds, medians.

Two workloads, each at batch 1 and batch 32 (greedy, prefix caching off so that repeated
prompts do not make prefill free):
1. the embedded default model with its trained MTP head, MTP drafts (k = 1, 2, 3), on
   code-completion prompts (the first lines of standard-library functions);
2. the `small` preset (random weights, float32) with n-gram drafts on the same prompts.
For each: output tokens/s with speculation off and on, the speedup, the acceptance rate and the
tokens emitted per verification. Outputs are checked identical (speculation is lossless).

    .venv/bin/python bench/speculative.py [--model DIR] [--rounds 3] [--new-tokens 96] [--skip-small]

`--model` names a checkpoint with an MTP layer in place of the embedded default model (for
example `build/default-model-chat` while `make default-model` is being tuned).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import report, small_checkpoint
from moeray import LLM, SamplingParams
from moeray.jobs.corpus import stdlib_sources
from moeray.platform.default_model import resolve_model


def code_prompts(count: int, lines: int = 3) -> list[str]:
    """The first `lines` lines of `count` top-level functions of the standard library."""
    prompts = []
    for source in stdlib_sources():
        text = source.splitlines()
        for i, line in enumerate(text):
            if line.startswith("def ") and len(text) > i + lines:
                prompts.append("\n".join(text[i:i + lines]) + "\n")
                break
        if len(prompts) == count:
            break
    return prompts


def rate(llm: LLM, prompts: list[str], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = [r.outputs[0].token_ids for r in results]
    return sum(map(len, tokens)) / elapsed, tokens


def compare(name: str, model, speculative: dict, prompts: list[str], batch: int, rounds: int, new_tokens: int,
            engines: dict) -> dict:
    off = engines.setdefault(("off", str(model)), LLM(model, enable_prefix_caching=False))
    on = LLM(model, enable_prefix_caching=False, speculative=speculative)
    chosen = prompts[:batch]
    rate(off, chosen[:1], 8), rate(on, chosen[:1], 8)  # warm-up
    before = on.engine.stats().speculative
    off_rates, on_rates, identical = [], [], True
    for _ in range(rounds):
        r_off, expected = rate(off, chosen, new_tokens)
        r_on, got = rate(on, chosen, new_tokens)
        off_rates.append(r_off)
        on_rates.append(r_on)
        identical &= got == expected
    after = on.engine.stats().speculative
    drafts, accepted = after.draft_tokens - before.draft_tokens, after.accepted_tokens - before.accepted_tokens
    steps = after.verify_steps - before.verify_steps
    off_median, on_median = statistics.median(off_rates), statistics.median(on_rates)
    return {"workload": name, "batch": batch, "speculative": speculative, "off_tok_s": round(off_median, 1),
            "on_tok_s": round(on_median, 1), "speedup": round(on_median / off_median, 3),
            "acceptance_rate": round(accepted / drafts, 3) if drafts else 0.0,
            "tokens_per_verification": round((accepted + steps) / steps, 3) if steps else 0.0,
            "identical_outputs": identical, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--model", default=None, help="checkpoint with an MTP layer (default: the embedded model)")
    parser.add_argument("--skip-small", action="store_true", help="only the default model's rows")
    opts = parser.parse_args()
    torch.manual_seed(0)
    prompts = code_prompts(32)
    default_model = resolve_model(opts.model)
    rows, results, engines = [], [], {}
    cases = [("default model, MTP", default_model, {"method": "mtp", "num_speculative_tokens": k}, batch)
             for batch in (1, 32) for k in (1, 2, 3)]
    if not opts.skip_small:
        small = small_checkpoint()
        cases += [("small preset, n-gram", small, {"method": "ngram", "num_speculative_tokens": 3}, batch)
                  for batch in (1, 32)]
    for name, model, speculative, batch in cases:
        result = compare(name, model, speculative, prompts, batch, opts.rounds, opts.new_tokens, engines)
        results.append(result)
        label = f"{name} k={speculative['num_speculative_tokens']} batch {batch}"
        rows.append((label, f"{result['on_tok_s']} tok/s (acc {result['acceptance_rate']}, "
                            f"{result['tokens_per_verification']}/step)",
                     f"{result['off_tok_s']} tok/s (off)", f"{result['speedup']}x"))
    report("speculative", {"results": results}, rows)


if __name__ == "__main__":
    main()
