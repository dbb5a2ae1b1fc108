"""Training throughput: moeray's training step against the same step on transformers' model.

Both sides start from the same checkpoint (the `tiny` preset, i.e. the embedded default model,
by default; other presets with random weights), see the same batches in the same order,
compute the same loss and take an AdamW step. Steps alternate between the two so that noise on
this shared machine hits both alike; the first loss of each side is printed as a parity check.
- moeray: the training step its Ray Train workers run (the method's `loss`, `moeray.jobs.methods`):
  the rows concatenated without padding, the output head only on positions whose next token
  carries a label, DPO's chosen and rejected sides in one forward (and one no-grad forward of
  the frozen reference model).
- transformers: the usual loop on `DeepseekV3ForCausalLM`: right-padded batches with an
  attention mask, logits at every position, one forward per DPO side (policy and reference),
  the losses of moeray.jobs.losses on those logits.
Reported: training tokens/s (non-padding tokens through forward and backward) for SFT and DPO,
and the ratio (target >= 1.3x).

    cd bench && ../.venv/bin/python train.py [--preset tiny] [--steps 12] [--batch 8] [--max-length 256]
"""

from __future__ import annotations

import argparse
import time

import torch

import moeray.model
from common import report, small_checkpoint
from moeray.jobs.corpus import stdlib_sources
from moeray.jobs.data import pad_batch, tokenize_dpo, tokenize_sft
from moeray.jobs.losses import dpo_loss, sequence_logprobs, sft_loss
from moeray.jobs.spec import parse_spec
from moeray.jobs.methods import WorkerContext, method_for
from moeray.model.tokenizer import Tokenizer
from moeray.platform.default_model import DEFAULT_MODEL_DIR


def snippets(count: int, lines: int = 12) -> list[list[str]]:
    """`count` runs of `lines` source lines from the standard library (deterministic)."""
    out = []
    for source in stdlib_sources(2 << 20):
        text = source.splitlines()
        for start in range(0, len(text) - lines, lines):
            out.append(text[start:start + lines])
            if len(out) == count:
                return out
    return out


def sft_rows(tokenizer: Tokenizer, count: int, max_length: int) -> list[dict]:
    rows = []
    for lines in snippets(count):
        messages = [{"role": "user", "content": "\n".join(lines[:4])},
                    {"role": "assistant", "content": "\n".join(lines[4:])}]
        input_ids, labels = tokenize_sft(messages, tokenizer, max_length)
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


def dpo_rows(tokenizer: Tokenizer, count: int, max_length: int) -> list[dict]:
    rows = []
    pieces = snippets(2 * count)
    for chosen_lines, rejected_lines in zip(pieces[::2], pieces[1::2], strict=True):
        parts = tokenize_dpo({"prompt": "\n".join(chosen_lines[:4]), "chosen": "\n".join(chosen_lines[4:]),
                              "rejected": "\n".join(rejected_lines[4:])}, tokenizer, max_length)
        row = {}
        for side in ("chosen", "rejected"):
            row[f"{side}_ids"] = parts["prompt_ids"] + parts[f"{side}_ids"]
            row[f"{side}_mask"] = [0] * len(parts["prompt_ids"]) + [1] * len(parts[f"{side}_ids"])
        rows.append(row)
    return rows


def hf_batch_loss(model, reference, method: str, batch: list[dict], pad_id: int, beta: float) -> torch.Tensor:
    """The same loss as moeray's trainer computes, on transformers' model (padding masked)."""
    if method == "sft":
        tensors = pad_batch(batch, pad_id)
        logits = model(input_ids=tensors["input_ids"], attention_mask=(tensors["segment_ids"] > 0).long()).logits
        return sft_loss(logits, tensors["labels"])
    logps = {}
    for side in ("chosen", "rejected"):
        tensors = pad_batch([{"input_ids": r[f"{side}_ids"], "labels": r[f"{side}_mask"]} for r in batch], pad_id)
        mask = (tensors["segment_ids"] > 0).long()
        for name, which in (("policy", model), ("reference", reference)):
            with torch.set_grad_enabled(name == "policy"):
                logits = which(input_ids=tensors["input_ids"], attention_mask=mask).logits
                logps[name, side] = sequence_logprobs(logits, tensors["input_ids"], (tensors["labels"] > 0).long())
    loss, _ = dpo_loss(logps["policy", "chosen"], logps["policy", "rejected"], logps["reference", "chosen"],
                       logps["reference", "rejected"], beta)
    return loss


def batch_tokens(method: str, batch: list[dict]) -> int:
    if method == "sft":
        return sum(len(r["input_ids"]) for r in batch)
    return sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in batch)


def measure(method: str, folder, rows: list[dict], steps: int, batch_size: int, pad_id: int) -> dict:
    from transformers import DeepseekV3ForCausalLM

    spec = parse_spec({"name": "bench", "base_model": str(folder), "method": method,
                                   "output": "unused", "data": {"train": "unused.jsonl"},
                                   "checkpoint": {"storage": "unused"}})
    ours = moeray.model.load(folder).train()
    theirs = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    context = WorkerContext(spec, Tokenizer.from_pretrained(folder), ours, torch.device("cpu"),
                            reference=moeray.model.load(folder).eval().requires_grad_(False))
    their_reference = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    method_impl = method_for(spec)
    optimizers = {"moeray": torch.optim.AdamW(ours.parameters(), lr=1e-4),
                  "transformers": torch.optim.AdamW(theirs.parameters(), lr=1e-4)}
    beta = spec.dpo.beta if method == "dpo" else 0.0
    steps_of = {"moeray": lambda batch: method_impl.loss(ours, batch, context)[0],
                "transformers": lambda batch: hf_batch_loss(theirs, their_reference, method, batch, pad_id, beta)}
    seconds = {"moeray": 0.0, "transformers": 0.0}
    first_loss = {}
    tokens = 0
    warmup = 2
    for step in range(warmup + steps):
        start = (step * batch_size) % max(1, len(rows) - batch_size)
        batch = rows[start:start + batch_size]
        for name, loss_of in steps_of.items():
            began = time.perf_counter()
            loss = loss_of(batch)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= warmup:
                seconds[name] += time.perf_counter() - began
            first_loss.setdefault(name, float(loss))
        if step >= warmup:
            tokens += batch_tokens(method, batch)
    rates = {name: tokens / seconds[name] for name in seconds}
    return {"tokens": tokens, "tokens_per_s": rates, "ratio": rates["moeray"] / rates["transformers"],
            "first_loss": first_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    # The tiny preset is the embedded default model; larger presets get random weights. The data
    # is tokenized with the default model's tokenizer (its chat template; ids fit every preset).
    folder = DEFAULT_MODEL_DIR if opts.preset == "tiny" else small_checkpoint(opts.preset)
    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    count = opts.batch * (opts.steps + 2)
    results = {"preset": opts.preset, "batch": opts.batch, "max_length": opts.max_length, "steps": opts.steps}
    rows = []
    for method, build in (("sft", sft_rows), ("dpo", dpo_rows)):
        measured = measure(method, folder, build(tokenizer, count, opts.max_length), opts.steps, opts.batch, pad_id)
        results[method] = measured
        rates = measured["tokens_per_s"]
        rows.append((f"{method.upper()} training tokens/s", f"{rates['moeray']:.0f}", f"{rates['transformers']:.0f}",
                     f"{measured['ratio']:.2f}x"))
        rows.append((f"{method.upper()} first-step loss (parity)", f"{measured['first_loss']['moeray']:.5f}",
                     f"{measured['first_loss']['transformers']:.5f}", ""))
    report("train", results, rows)


if __name__ == "__main__":
    main()
