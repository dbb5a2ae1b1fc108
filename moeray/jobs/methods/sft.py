"""Supervised fine-tuning: next-token loss on what the assistant says.

Rows follow TRL's formats (`moeray.jobs.data`): conversational `messages` (loss on assistant
tokens, tool-call markup included) or `prompt`/`completion` message lists, and standard
`prompt`/`completion` strings (loss on the completion) or `text` (loss on every token).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moeray.jobs.data import pack, tokenize_sft_row, validate_sft_row
from moeray.jobs.losses import token_loss
from moeray.jobs.methods.base import Method, Row, mtp_objective
from moeray.jobs.spec import JobSpec, MtpSpec, _Strict


class SftOptions(_Strict):
    packing: bool = Field(False, description="Pack several short examples into one row (attention stays "
                          "within each example).")


class SftJob(JobSpec):
    method: Literal["sft"] = Field(description="Supervised fine-tuning on conversations or prompt-completion "
                                   "pairs.")
    sft: SftOptions = Field(default_factory=SftOptions, description="SFT options.")
    mtp: MtpSpec | None = Field(None, description="Multi-token prediction as an extra objective; empty: none.")


class Sft(Method):
    name = "sft"
    spec_class = SftJob

    def validate_row(self, row: Row, uri: str, line: int) -> None:
        validate_sft_row(row, uri, line)

    def encode(self, rows, tokenizer, training):
        examples = [tokenize_sft_row(row, tokenizer, self.spec.train.max_length) for row in rows]
        if training and self.spec.sft.packing:
            return pack(examples, self.spec.train.max_length)
        return [{"input_ids": ids, "labels": labels} for ids, labels in examples]

    def loss(self, model, rows, ctx):
        return token_loss(model, rows, ctx.device, mtp_objective(self.spec))
