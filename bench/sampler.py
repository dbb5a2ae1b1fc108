"""The sampler's cost per step against the floor of a plain argmax, in one run.

`cd bench && ../.venv/bin/python sampler.py`: 64 greedy rows over a 32,000-token vocabulary
(the shape of a full decode batch on a Llama-sized vocabulary), moeray's `Sampler` against
`logits.argmax(-1)` on the same tensor; rounds alternate and medians are reported. (This was a
wall-clock assertion in tests/engine/test_sampler.py; a shared machine's timing belongs here.)
"""

from __future__ import annotations

import statistics
import time

import torch

from common import report
from moeray.engine.params import SamplingParams
from moeray.engine.sampler import Sampler, SamplingRow

ROWS, VOCAB, ROUNDS = 64, 32000, 21


def main() -> None:
    logits = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(0))
    rows = [SamplingRow(SamplingParams(temperature=0.0), [], [], None) for _ in range(ROWS)]
    sampler = Sampler()
    sides = {"moeray": lambda: sampler(logits, rows), "argmax": lambda: logits.argmax(-1).tolist()}
    for run in sides.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(ROUNDS):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ours, floor = (statistics.median(times[name]) * 1e3 for name in ("moeray", "argmax"))
    report("sampler", {"rows": ROWS, "vocab": VOCAB, "moeray_ms": ours, "argmax_ms": floor, "ratio": ours / floor},
           [(f"greedy step, {ROWS} x {VOCAB} (ms, median of {ROUNDS})", f"{ours:.2f}", f"{floor:.2f}",
             f"{ours / floor:.2f}x")])


if __name__ == "__main__":
    main()
