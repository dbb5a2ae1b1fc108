"""Where a speculative engine's time goes at a batch size, against speculation off, in one run.

Four engines on the same prompts, in alternating rounds, medians: speculation off; MTP with the
speed gate (`adaptive`); MTP drafting every step (`adaptive: false`); and MTP with the gate
forced off (what speculation costs when it never drafts: the MTP cache's memory, the speed
gate's bookkeeping). It also counts the gate's choices per number of decoding sequences.

    cd bench && ../.venv/bin/python speculative_gate.py [--model DIR] [--k 2] [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import statistics

from common import report
from speculative import code_prompts, rate

from moeray import LLM
from moeray.platform.default_model import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint with an MTP layer (default: the embedded model)")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=96)
    opts = parser.parse_args()
    model = opts.model or resolve_model(None)
    prompts = code_prompts(opts.batch)
    mtp = {"method": "mtp", "num_speculative_tokens": opts.k}
    engines = {"off": LLM(model, enable_prefix_caching=False),
               "gated": LLM(model, enable_prefix_caching=False, speculative=mtp),
               "always": LLM(model, enable_prefix_caching=False, speculative={**mtp, "adaptive": False}),
               "forced_off": LLM(model, enable_prefix_caching=False, speculative=mtp)}
    engines["forced_off"].engine.speculator.gate.choose = lambda num_decoding: False
    choices = collections.Counter()
    gate = engines["gated"].engine.speculator.gate
    choose = gate.choose

    def counted(num_decoding: int) -> bool:
        drafting = choose(num_decoding)
        choices[(num_decoding, drafting)] += 1
        return drafting

    gate.choose = counted
    for llm in engines.values():
        rate(llm, prompts[:1], 8)  # warm-up
    rates = collections.defaultdict(list)
    for _ in range(opts.rounds):
        for name, llm in engines.items():
            rates[name].append(rate(llm, prompts, opts.new_tokens)[0])
    medians = {name: statistics.median(values) for name, values in rates.items()}
    at_batch = {drafting: choices[(opts.batch, drafting)] for drafting in (True, False)}
    report("speculative_gate", {"k": opts.k, "batch": opts.batch, "tok_s": medians,
                                "gate_steps_at_batch": {"drafting": at_batch[True], "not": at_batch[False]},
                                "rounds": opts.rounds},
           [(f"MTP k={opts.k} batch {opts.batch}, {name}", f"{medians[name]:.1f} tok/s",
             f"{medians['off']:.1f} tok/s (off)", f"{medians[name] / medians['off']:.3f}x")
            for name in ("gated", "always", "forced_off")]
           + [("gate: drafting steps at that batch", str(at_batch[True]), str(sum(at_batch.values())), "")])


if __name__ == "__main__":
    main()
