"""Pre-training: next-token loss on every token of plain-text documents (`text` rows)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moeray.jobs.data import tokenize_text, validate_text_row
from moeray.jobs.losses import token_loss
from moeray.jobs.methods.base import Method, Row, mtp_objective
from moeray.jobs.spec import JobSpec, MtpSpec


class PretrainJob(JobSpec):
    method: Literal["pretrain"] = Field(description="Language modelling on plain text (`text` rows), every "
                                        "token a label; documents are joined and cut into rows of max_length.")
    mtp: MtpSpec | None = Field(None, description="Multi-token prediction as an extra objective; empty: none.")


class Pretrain(Method):
    name = "pretrain"
    spec_class = PretrainJob

    def validate_row(self, row: Row, uri: str, line: int) -> None:
        validate_text_row(row, uri, line)

    def encode(self, rows, tokenizer, training):
        return tokenize_text([row["text"] for row in rows], tokenizer, self.spec.train.max_length)

    def loss(self, model, rows, ctx):
        return token_loss(model, rows, ctx.device, mtp_objective(self.spec))
