"""Experiment tracking against a real `mlflow server` on 127.0.0.1 (a local SQLite backend and
artefact folder) and real TensorBoard event files: `moeray jobs run` of a spec with a
`tracking:` section records the config, every step's metrics and the exported model; an
unreachable server fails the job before training, naming the tracker and its address."""

import subprocess
import sys
import time

import httpx
import pytest
import yaml

from moeray.platform.cli import main
from support import sft_rows, unused_port, write_jsonl

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = unused_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


def write_tracked_spec(tmp_path, base, tracking: dict) -> str:
    write_jsonl(tmp_path / "train.jsonl", sft_rows(24))
    spec = {"name": "tracked-sft", "base_model": str(base), "method": "sft", "output": str(tmp_path / "out"),
            "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.25},
            "train": {"learning_rate": 3e-3, "max_steps": STEPS, "per_device_batch_size": 4, "max_length": 48},
            "checkpoint": {"storage": str(tmp_path / "ckpt"), "every_steps": STEPS},
            "eval": {"every_steps": 2}, "tracking": tracking}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "spec.yaml")


def test_a_job_logs_config_steps_and_model_to_mlflow_and_tensorboard(ray_session, mlflow_server, base, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = write_tracked_spec(tmp_path, base, {
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "moeray-tests"},
        "tensorboard": {"log_dir": str(tmp_path / "tb")}})
    assert main(["jobs", "run", spec]) == 0

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("moeray-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-sft"
    assert run.data.params["train.learning_rate"] == "0.003" and run.data.params["method"] == "sft"
    assert run.data.tags["moeray.job"] == "tracked-sft"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, STEPS + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [2, 4]
    assert {"lr", "tokens_per_s", "eta_s"} <= set(run.data.metrics)
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artefacts == {"job.yaml", "model"}
    assert "model/config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}

    events = EventAccumulator(str(tmp_path / "tb" / "tracked-sft"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, STEPS + 1))
    assert [round(e.value, 4) for e in events.Scalars("loss")] == \
        [round(m.value, 4) for m in client.get_metric_history(run.info.run_id, "loss")]


def test_an_unreachable_tracking_server_fails_the_job_before_training(ray_session, base, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    spec = write_tracked_spec(tmp_path, base, {"mlflow": {"tracking_uri": "http://127.0.0.1:9"}})
    assert main(["jobs", "run", spec]) == 1
    err = capsys.readouterr().err
    assert "tracking.mlflow: the tracking server at http://127.0.0.1:9 cannot be used" in err
    assert "Traceback" not in err
    # No training ran: no checkpoint, no step metrics, no model.
    assert not list(tmp_path.rglob("checkpoint_*")) and not list(tmp_path.rglob("metrics.jsonl"))
    assert not (tmp_path / "out" / "config.json").exists()
