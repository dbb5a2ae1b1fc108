"""Held-out loss of checkpoints on the default model's pre-training split, side by side; the first
model named is the reference.

The rows `examples/jobs/pretrain-default.yaml` holds out of `build/stdlib.jsonl` (its
`eval_fraction` 0.01 and seed 0, through the trainer's own `held_out_threshold`), the first
`--tokens` tokens of each, scored by each model with its own tokenizer: loss per token and bits
per byte (which compares models whose tokenizers differ).

    .venv/bin/python -m moeray.jobs.corpus build/stdlib.jsonl --limit-mb 12
    cd bench && ../.venv/bin/python heldout_loss.py MODEL [MODEL ...] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from common import report

import moeray.model
from moeray.jobs.trainer import held_out_threshold, row_hash
from moeray.model.tokenizer import Tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "build" / "stdlib.jsonl"


@torch.no_grad()
def score(model_dir: str, texts: list[str], tokens: int) -> dict:
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = moeray.model.load(model_dir).float().eval()
    nll = counted = text_bytes = 0.0
    for text in texts:
        ids = tokenizer.encode(text)[:tokens]
        batch = torch.tensor([ids])
        logprobs = torch.log_softmax(model(batch).float()[0, :-1], dim=-1)  # [n-1, V]
        nll -= logprobs.gather(1, batch[0, 1:, None]).sum().item()
        counted += len(ids) - 1
        text_bytes += len(tokenizer.decode(ids[1:]).encode())
    return {"model": model_dir, "rows": len(texts), "loss_per_token": round(nll / counted, 4),
            "bits_per_byte": round(nll / text_bytes / math.log(2), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", type=int, default=256, help="the pre-training's max_length")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    opts = parser.parse_args()
    rows = [json.loads(line) for line in opts.corpus.read_text().splitlines() if line.strip()]
    below = held_out_threshold(rows, 0.01, 0)
    texts = [row["text"] for row in rows if row_hash(row, 0) < below]
    results = [score(model, texts, opts.tokens) for model in opts.models]
    reference = results[0]  # the first model named: each row's ratio is against it
    report("heldout_loss", {"rows": len(texts), "results": results},
           [(f"{r['model']} (bits/byte)", f"{r['bits_per_byte']:.3f} ({r['loss_per_token']:.3f} nats/token)",
             f"{reference['bits_per_byte']:.3f}", f"{r['bits_per_byte'] / reference['bits_per_byte']:.3f}x")
            for r in results])


if __name__ == "__main__":
    main()
