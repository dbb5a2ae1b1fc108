"""Training checkpoints through Ray Train.

Contract: on checkpoint steps `report_step(...)` reports to Ray Train with a checkpoint
folder holding `state.pt` (trainable weights and buffers, optimizer state, step, the method's
own state, the metrics of every step so far), `metrics.jsonl` (those metrics, one line a step)
and `loss.png` (their curve; a reward curve for GRPO). The progress line of each step is the
driver's (moeray/jobs/console.py). Ray Train publishes a checkpoint only once it is complete and keeps the newest
`checkpoint.keep`. `load_latest()` returns the state of the checkpoint Ray Train hands a
(re)started worker, or None.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from moeray.jobs.curves import plot_loss_curve
from moeray.jobs.parallel import full_state

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss.png"


def load_latest() -> dict[str, Any] | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, weights_only=False)


def report_step(metrics: dict, history: list[dict], model, optimizer, step: int, save: bool, is_rank0: bool,
                strategy: str, method_state: dict[str, Any] | None = None) -> None:
    """On checkpoint steps, report to Ray Train with a checkpoint holding the training state,
    the metrics of every step so far (metrics.jsonl) and their loss curve (loss.png). Only checkpoint steps call `ray.train.report`: each call synchronises with the
    Train controller (about 2 s on a small machine), far longer than a small model's step."""
    import ray.train

    if not save:
        return
    weights, optimizer_state = full_state(model, optimizer, strategy)
    if not is_rank0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"model": weights, "optimizer": optimizer_state, "step": step, "history": history,
                    "method_state": method_state or {}},
                   Path(folder) / STATE_FILE)
        (Path(folder) / "metrics.json").write_text(json.dumps(metrics))
        (Path(folder) / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in history))
        plot_loss_curve(history, Path(folder) / LOSS_CURVE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


