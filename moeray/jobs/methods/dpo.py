"""Direct preference optimisation on chosen/rejected pairs, against a frozen reference model.

The reference log-probabilities are computed on the workers, a micro-batch at a time, by the
reference copy each worker holds (`WorkerContext.reference`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moeray.jobs.data import IGNORE_INDEX, flatten, tokenize_dpo, validate_dpo_row
from moeray.jobs.losses import dpo_loss, target_logprobs
from moeray.jobs.methods.base import Method, Row
from moeray.jobs.spec import JobSpec, _Strict


class DpoOptions(_Strict):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty against the reference model.")


class DpoJob(JobSpec):
    method: Literal["dpo"] = Field(description="Direct preference optimisation on prompt/chosen/rejected rows.")
    dpo: DpoOptions = Field(default_factory=DpoOptions, description="DPO options.")


def _side(row: Row, side: str) -> dict[str, list[int]]:
    """One side of a pair as a row whose labels are its response tokens (the prompt is ignored)."""
    ids = list(row[f"{side}_ids"])
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, row[f"{side}_mask"])]}


def pair_logprobs(model, rows: list[Row], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities [B] of the chosen and of the rejected sides: both sides
    of every pair in one padding-free forward."""
    sides = [_side(r, "chosen") for r in rows] + [_side(r, "rejected") for r in rows]
    logprobs, sequence = target_logprobs(model, flatten(sides).to(device))
    totals = torch.zeros(len(sides), device=device, dtype=logprobs.dtype).index_add(0, sequence, logprobs)
    return totals[:len(rows)], totals[len(rows):]


class Dpo(Method):
    name = "dpo"
    spec_class = DpoJob

    def validate_row(self, row: Row, uri: str, line: int) -> None:
        validate_dpo_row(row, uri, line)

    def needs_reference(self) -> bool:
        return True

    def encode(self, rows, tokenizer, training):
        examples = []
        for row in rows:
            parts = tokenize_dpo(row, tokenizer, self.spec.train.max_length)
            example = {}
            for side in ("chosen", "rejected"):
                example[f"{side}_ids"] = parts["prompt_ids"] + parts[f"{side}_ids"]
                example[f"{side}_mask"] = [0] * len(parts["prompt_ids"]) + [1] * len(parts[f"{side}_ids"])
            examples.append(example)
        return examples

    def loss(self, model, rows, ctx):
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logprobs(ctx.reference, rows, ctx.device)
        policy_chosen, policy_rejected = pair_logprobs(model, rows, ctx.device)
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.spec.dpo.beta)
        metrics["tokens"] = sum(sum(r["chosen_mask"]) + sum(r["rejected_mask"]) for r in rows)
        return loss, metrics
