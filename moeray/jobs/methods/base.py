"""The `Method` protocol: what a training method tells the shared loop.

Contract: a method is one class with
- `name` and `spec_class` (its `JobSpec` subclass, `method: Literal[name]` plus its section);
  an instance is made for one spec, `method_class(spec)`;
- `validate_row(row, uri, line)`: raise `DataError` naming `uri:line` and the field (run on the
  driver over every row before any worker starts); `check(tokenizer)` for what a spec cannot
  say about itself;
- `encode(rows, tokenizer, training)`: the rows' training examples (plain dicts of lists and
  strings), run inside Ray Data tasks, never on the driver;
- `needs_reference()`: whether each worker gets a frozen copy of the base model
  (`WorkerContext.reference`); `make_rollouts(policy, tokenizer)`: the worker's rollout engine
  (`WorkerContext.rollouts`), or None;
- `rows_per_round()`: data rows one optimisation round consumes per worker, and
  `steps_per_round()` the optimiser steps `plan` makes of them;
- `plan(rows, ctx)`: those rows as optimiser steps, each a list of micro-batches, plus metrics
  (the default: one step, split into `gradient_accumulation_steps` micro-batches); GRPO samples
  and scores rollouts here and returns one step per optimisation pass;
- `loss(model, micro_batch, ctx)`: (loss, metrics with `tokens`);
- `after_step(ctx)`: metrics of work done after each optimiser step (GRPO's weight sync);
- `evaluate(rows, ctx)`: metrics over the eval rows (default: `eval_loss`, the main loss, and
  `eval_mtp_loss` where the job trains multi-token prediction; `mtp_objective(spec)`).
The loop adds what is common to all: the router aux loss, bias updates, clipping, schedules,
checkpoints and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from moeray.jobs.spec import JobSpec
from moeray.model.tokenizer import Tokenizer

Row = dict[str, Any]


@dataclass
class WorkerContext:
    """What a method may use on a training worker."""

    spec: JobSpec
    tokenizer: Tokenizer
    model: torch.nn.Module  # the policy itself (not its DDP wrapper)
    device: torch.device
    world_size: int = 1
    rank: int = 0
    reference: torch.nn.Module | None = None  # frozen base model, when the method needs one
    rollouts: Any = None  # moeray.jobs.rollouts.RolloutEngine, when the method needs one
    state: dict[str, Any] = field(default_factory=dict)  # the method's own, kept across steps


@dataclass
class Plan:
    steps: list[list[list[Row]]]  # optimiser steps -> micro-batches -> rows
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    name: ClassVar[str]
    spec_class: ClassVar[type[JobSpec]]

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def validate_row(self, row: Row, uri: str, line: int) -> None:
        raise NotImplementedError

    def check(self, tokenizer: Tokenizer) -> None:
        """Driver-side checks beyond the spec's own (default: none)."""

    def encode(self, rows: list[Row], tokenizer: Tokenizer, training: bool) -> list[Row]:
        raise NotImplementedError

    def needs_reference(self) -> bool:
        return False

    def make_rollouts(self, policy: torch.nn.Module, tokenizer: Tokenizer) -> Any:
        return None

    def rows_per_round(self) -> int:
        return self.spec.train.per_device_batch_size * self.spec.train.gradient_accumulation_steps

    def steps_per_round(self) -> int:
        """Optimiser steps `plan` makes of one round of rows."""
        return 1

    def plan(self, rows: list[Row], ctx: WorkerContext) -> Plan:
        size = self.spec.train.per_device_batch_size
        return Plan([[rows[i:i + size] for i in range(0, len(rows), size)]])

    def loss(self, model: torch.nn.Module, rows: list[Row], ctx: WorkerContext) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, ctx: WorkerContext) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, rows: list[Row], ctx: WorkerContext) -> dict[str, float]:
        if not rows:
            return {}
        results = [self.loss(ctx.model, rows[i:i + 8], ctx) for i in range(0, len(rows), 8)]
        out = {"eval_loss": _mean([metrics.get("lm_loss", float(loss)) for loss, metrics in results])}
        if all("mtp_loss" in metrics for _, metrics in results):
            out["eval_mtp_loss"] = _mean([metrics["mtp_loss"] for _, metrics in results])
        return out


def mtp_objective(spec: JobSpec) -> tuple[int, float] | None:
    """(depth, loss weight) of the spec's multi-token-prediction objective, or None."""
    mtp = getattr(spec, "mtp", None)
    return None if mtp is None else (mtp.depth, mtp.loss_weight)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
