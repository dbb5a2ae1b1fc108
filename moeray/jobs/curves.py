"""The loss curve of a training run as a PNG (matplotlib, no display needed).

Contract: `plot_loss_curve(history, path)` draws training loss per step and, where present,
held-out loss (`eval_loss`) and DPO preference accuracy (`rewards/accuracy`, right axis) from
the per-step metrics rows the trainer reports (with multi-token prediction: the main loss,
`lm_loss`, and the MTP losses beside it); for a run that reports rewards (GRPO) it is a
reward curve instead: mean reward per step with its one-std band, and held-out reward
(`eval_reward`). It writes `path` and returns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # render to a file; training workers have no display
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [row["step"] for row in history]
    rewarded = bool(history) and all("reward" in row for row in history)
    measure, held_out = ("reward", "eval_reward") if rewarded else ("loss", "eval_loss")
    # With multi-token prediction `loss` is the weighted sum; the main loss is `lm_loss`, the one
    # `eval_loss` measures, so that is the training curve beside it, and the MTP losses go beside.
    mtp = not rewarded and bool(history) and all("lm_loss" in row for row in history)
    values = [row["lm_loss" if mtp else measure] for row in history]
    loss_axis.plot(steps, values, label=f"{'mean reward' if rewarded else 'training loss'}", linewidth=1.2)
    if rewarded:
        spread = [row.get("reward_std", 0.0) for row in history]
        loss_axis.fill_between(steps, [v - s for v, s in zip(values, spread)], [v + s for v, s in zip(values, spread)],
                               alpha=0.15, label="reward std")
    evaluated = [row for row in history if row.get(held_out) is not None]
    if evaluated:
        loss_axis.plot([r["step"] for r in evaluated], [r[held_out] for r in evaluated], "o-",
                       label=f"held-out {measure}", linewidth=1.2, markersize=3)
    if mtp:
        loss_axis.plot(steps, [row.get("mtp_loss") for row in history], label="training MTP loss", linewidth=0.8,
                       alpha=0.5)
        mtp_evaluated = [row for row in evaluated if row.get("eval_mtp_loss") is not None]
        if mtp_evaluated:
            loss_axis.plot([r["step"] for r in mtp_evaluated], [r["eval_mtp_loss"] for r in mtp_evaluated], "s--",
                           label="held-out MTP loss", linewidth=1.0, markersize=3)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel(measure)
    loss_axis.grid(alpha=0.3)
    handles, labels = loss_axis.get_legend_handles_labels()
    accuracy = [row for row in history if row.get("rewards/accuracy") is not None]
    if accuracy:
        accuracy_axis = loss_axis.twinx()
        accuracy_axis.plot([r["step"] for r in accuracy], [r["rewards/accuracy"] for r in accuracy],
                           color="tab:green", alpha=0.6, label="preference accuracy")
        accuracy_axis.set_ylabel("preference accuracy")
        accuracy_axis.set_ylim(0, 1)
        more_handles, more_labels = accuracy_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    loss_axis.legend(handles, labels, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return path
