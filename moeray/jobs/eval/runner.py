"""Run an evaluation job: check every task file, score each task, write the report.

Contract: `check(spec)` reads every task file (errors name `file:line`) and the target (a
checkpoint's config.json, or nothing for an endpoint) before any model runs, and returns the
items. `run_eval(spec)` returns the report, a JSON-ready dict: `{"name", "target", "tasks": [{
"name", "kind", "file", "metrics", "items"}]}`, writes it to `spec.output` when set (local or
s3://) and prints one table row per metric. `evaluate_engine(engine, tasks)` scores tasks on
an engine in this process: what training jobs run at each evaluation (`eval.tasks`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from moeray.jobs.eval.backends import EndpointBackend, LocalBackend
from moeray.jobs.eval.spec import EvalJobSpec, TaskSpec
from moeray.jobs.eval.tasks import Item, load_items, score_task
from moeray.storage import absolute_local, is_remote, local_copy, upload_dir


def check(spec: EvalJobSpec) -> list[list[Item]]:
    if spec.model is not None:
        folder = local_copy(spec.model, skip_suffixes=(".safetensors",))
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"model {spec.model!r}: no config.json there; expected a Hugging Face checkpoint")
    return [load_items(task) for task in spec.tasks]


def absolute_paths(spec: EvalJobSpec) -> EvalJobSpec:
    """Local paths made absolute, for a job that runs elsewhere than it was submitted."""
    fix = absolute_local
    return spec.model_copy(update={"model": fix(spec.model), "output": fix(spec.output),
                                   "tasks": [t.model_copy(update={"file": fix(t.file)}) for t in spec.tasks]})


def _backend(spec: EvalJobSpec):
    if spec.endpoint is not None:
        return EndpointBackend(spec.endpoint)
    return LocalBackend.from_checkpoint(spec.model, spec.max_model_len)


def table(report: dict[str, Any]) -> str:
    rows = [("task", "kind", "metric", "value", "stderr", "items")]
    for task in report["tasks"]:
        for metric, value in task["metrics"].items():
            if metric.endswith("_stderr"):
                continue
            rows.append((task["name"], task["kind"], metric, f"{value:.4f}",
                         f"{task['metrics'].get(metric + '_stderr', 0.0):.4f}", str(len(task["items"]))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def run_eval(spec: EvalJobSpec, print_table: bool = True) -> dict[str, Any]:
    items = check(spec)
    backend = _backend(spec)
    results = [score_task(task, task_items, backend, spec.seed) for task, task_items in zip(spec.tasks, items)]
    report = {"name": spec.name, "target": spec.model or spec.endpoint.url,
              "tasks": [{"name": r.name, "kind": r.kind, "file": t.file, "metrics": r.metrics, "items": r.items}
                        for r, t in zip(results, spec.tasks)]}
    if spec.output:
        _write(report, spec.output)
    if print_table:
        print(table(report), flush=True)
    return report


def _write(report: dict[str, Any], output: str) -> None:
    text = json.dumps(report, indent=2)
    if is_remote(output):
        with tempfile.TemporaryDirectory() as folder:
            name = output.rstrip("/").rsplit("/", 1)[-1]
            (Path(folder) / name).write_text(text)
            upload_dir(folder, output.rstrip("/").rsplit("/", 1)[0])
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text)


def evaluate_engine(engine, tasks: list[TaskSpec], seed: int = 0) -> dict[str, float]:
    """The tasks' metrics on an engine in this process (a training job's current weights), as
    `eval/<task>/<metric>`."""
    backend = LocalBackend(engine)
    metrics = {}
    for task in tasks:
        result = score_task(task, load_items(task), backend, seed)
        metrics.update({f"eval/{result.name}/{metric}": value for metric, value in result.metrics.items()})
    return metrics
