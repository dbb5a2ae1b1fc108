"""The console of a training job: one progress line per step, printed by the driver, and Ray's
own output kept out of it unless asked for.

Contract:
- `ProgressFeed()` is made on the driver around `trainer.fit()`. Its `queue` (a Ray queue,
  an actor that takes no CPU) travels to the workers in the train loop's config; rank 0 calls
  `publish(queue, step, total, metrics)` after each step. `with feed.following(*sinks):`
  drains it on a driver thread into each sink's `show(step, total, metrics)` (the printer
  below, experiment tracking) and, on exit, takes what is left, closes the sinks and removes
  the queue.
- `StepPrinter(stream)` shows each step: a tqdm bar when `stream` is a terminal, and
  otherwise a plain line, `moeray: step 3/20 loss 1.2345 lr 3.00e-03 tokens/s 612 eta 27s`
  (plus reward, kl, held-out metrics and task scores where a step has them).
- `quiet_ray_data(verbose)`: unless verbose, Ray Data's progress bars, its "Starting
  execution" lines and its console INFO/WARNING lines are off in this process (its log file
  under the session folder still has everything). Workers' output (Ray Train's controller,
  its repeated state-API warnings, Ray Data's per-dataset lines) is kept off the console by
  the `ray.init(log_to_driver=...)` of the command that starts the job.

Why the driver prints: a worker's stdout reaches the console through Ray's log forwarding with
a process prefix, and Ray Train's print patch writes it twice (to its logger and, since Ray
redirected stdout, to the stream). A queue carries the numbers instead, so the console owns
the format and a terminal can show a real bar.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

# (metrics key, label, format, unit): the fields of a progress line, in order, after the step.
_FIELDS = (("reward", "reward", ".3f", ""), ("loss", "loss", ".4f", ""), ("kl", "kl", ".4f", ""),
           ("lr", "lr", ".2e", ""), ("tokens_per_s", "tokens/s", ".0f", ""),
           ("rollout_tokens_per_s", "rollout tokens/s", ".0f", ""), ("weight_sync_s", "sync", ".3f", "s"),
           ("eval_loss", "eval_loss", ".4f", ""), ("eval_reward", "eval_reward", ".3f", ""))


def progress_fields(metrics: dict[str, Any]) -> str:
    """The step's numbers, `loss 1.2345 lr 3.00e-03 ...`, without the step and the eta."""
    parts = [f"{label} {metrics[key]:{form}}{unit}" for key, label, form, unit in _FIELDS
             if metrics.get(key) is not None]
    parts += [f"{key} {value:.4f}" for key, value in metrics.items()
              if key.startswith("eval/") and not key.endswith("_stderr")]
    return " ".join(parts)


def progress_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    eta = f" eta {metrics['eta_s']:.0f}s" if metrics.get("eta_s") is not None else ""
    return f"moeray: step {step}/{total} {progress_fields(metrics)}{eta}"


class StepPrinter:
    """Shows training steps on `stream`: a progress bar on a terminal, one line a step in a log."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._bar = None

    def show(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        if not self.stream.isatty():
            print(progress_line(step, total, metrics), file=self.stream, flush=True)
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=step - 1, unit="step", desc="moeray", file=self.stream,
                             dynamic_ncols=True)
        self._bar.total = total
        self._bar.set_postfix_str(progress_fields(metrics), refresh=False)
        self._bar.update(step - self._bar.n)  # a resumed run may step back: update takes negatives

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def publish(queue, step: int, total: int, metrics: dict[str, Any]) -> None:
    """A worker's side: hand one step's numbers to the driver. Never fails the training step:
    without a driver to read them (it went away), progress is simply not shown."""
    from ray.exceptions import RayError

    if queue is None:
        return
    try:
        queue.put_nowait((step, total, metrics))
    except RayError:
        pass


class ProgressFeed:
    """The driver's side of the steps' progress (see the module docstring)."""

    POLL_S = 0.25  # how long the drain thread waits on the queue before it checks for the end

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})

    @contextmanager
    def following(self, *sinks) -> Iterator[None]:
        finished = threading.Event()
        drain = threading.Thread(target=self._drain, args=(sinks, finished), name="moeray-progress", daemon=True)
        drain.start()
        try:
            yield
        finally:
            finished.set()
            drain.join()
            for sink in sinks:
                sink.close()
            self.queue.shutdown()

    def _drain(self, sinks, finished: threading.Event) -> None:
        from ray.exceptions import RayError
        from ray.util.queue import Empty

        while True:
            try:
                step = self.queue.get(timeout=self.POLL_S)
                for sink in sinks:
                    sink.show(*step)
            except Empty:
                if finished.is_set():
                    return
            except RayError:  # Ray itself is going away; the job's own outcome says what happened
                return


def quiet_ray_data(verbose: bool) -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    # Ray Data logs "execution finished" and "progress bars disabled" to its own console
    # handler; its file handler keeps them.
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.INFO if verbose else logging.ERROR)
