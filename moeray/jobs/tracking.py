"""Experiment tracking of a training job: MLflow and TensorBoard, fed from the job's driver.

Contract: `JobTracking.start(spec)` opens what `spec.tracking` names (nothing when it names
nothing) and records the config: every spec field as a run parameter (dotted names) and the
spec itself as `job.yaml`. It is a sink of the progress feed (`show(step, total, metrics)`,
like `console.StepPrinter`): each step's numeric metrics go to every tracker under their
metrics.jsonl names, at that step. `finish(output)` records the exported model (MLflow: the
folder as the run's `model` artefact, or an s3:// output as the `output` tag) and ends the
runs as finished; `fail()` ends them as failed. A tracker that cannot be reached at the start
fails the job before training (the error names the tracker and its address); one that fails
later loses those records, never the training run.

Why the driver: it already receives every step (the console's feed), so workers need no
route to the tracking server and no tracking client, and a resumed worker cannot log twice.
MLflow is used through `MlflowClient`, not its fluent API, whose active run is process state.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from moeray.jobs.spec import JobSpec, MlflowSpec, TensorBoardSpec
from moeray.storage import is_remote

log = logging.getLogger(__name__)
PARAMS_PER_CALL = 100  # MLflow's log_batch limit
PARAM_VALUE_LIMIT = 6000


class TrackingError(RuntimeError):
    """A tracker named in the spec cannot be used."""


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """{"train.learning_rate": "0.003", ...}: a nested spec as one level of string parameters."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, inner in value.items():
            flat.update(flat_params(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): str(value)[:PARAM_VALUE_LIMIT]}


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class _Mlflow:
    def __init__(self, spec: JobSpec, options: MlflowSpec):
        from mlflow import MlflowClient

        self.options = options
        uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise TrackingError("tracking.mlflow: no tracking_uri, and MLFLOW_TRACKING_URI is not set")
        self.client = MlflowClient(tracking_uri=uri)
        try:
            experiment = self.client.get_experiment_by_name(options.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(options.experiment)
            run = self.client.create_run(experiment_id, run_name=options.run_name or spec.name,
                                         tags={"moeray.job": spec.name, "moeray.method": spec.method})
        except Exception as err:  # noqa: BLE001 - whatever MLflow raised, the job cannot track
            raise TrackingError(f"tracking.mlflow: the tracking server at {uri} cannot be used: "
                                f"{str(err).splitlines()[0][:300]}") from None
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flat_params(spec.model_dump(mode="json")).items()]
        for start in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start:start + PARAMS_PER_CALL])
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "job.yaml").write_text(spec.to_yaml())
            self.client.log_artifact(self.run_id, str(Path(folder) / "job.yaml"))

    def step(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def finish(self, output: str) -> None:
        if is_remote(output) or not self.options.log_model:
            self.client.set_tag(self.run_id, "output", output)
        else:
            self.client.log_artifacts(self.run_id, output, artifact_path="model")
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, status="FAILED")


class _TensorBoard:
    def __init__(self, spec: JobSpec, options: TensorBoardSpec):
        if is_remote(options.log_dir):
            raise TrackingError("tracking.tensorboard.log_dir: a local folder (or a mounted volume), not an s3:// URI")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingError("tracking.tensorboard: the tensorboard package is not installed") from None
        self.writer = SummaryWriter(log_dir=str(Path(options.log_dir) / spec.name))
        self.writer.add_text("job.yaml", f"```\n{spec.to_yaml()}\n```")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, output: str) -> None:
        self.writer.add_text("output", output)
        self.writer.close()

    def fail(self) -> None:
        self.writer.close()


class JobTracking:
    def __init__(self, trackers: list):
        self.trackers = trackers

    @classmethod
    def start(cls, spec: JobSpec) -> JobTracking:
        options = spec.tracking
        trackers = []
        if options.mlflow is not None:
            trackers.append(_Mlflow(spec, options.mlflow))
        if options.tensorboard is not None:
            trackers.append(_TensorBoard(spec, options.tensorboard))
        return cls(trackers)

    def _each(self, action: str, *args) -> None:
        for tracker in self.trackers:
            try:
                getattr(tracker, action)(*args)
            except Exception as err:  # noqa: BLE001 - tracking never fails the training run
                log.warning("%s: %s failed: %s", type(tracker).__name__.strip("_"), action, err)

    def show(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        self._each("step", step, numeric(metrics))

    def close(self) -> None:
        pass  # the runs end with finish() or fail(), once the job's outcome is known

    def finish(self, output: str) -> None:
        self._each("finish", str(output))

    def fail(self) -> None:
        self._each("fail")
