"""`moeray jobs submit|status|logs|stop|list` against the session Ray's Jobs API (its dashboard
on 127.0.0.1): a real job runs to the end, another is stopped, and bad input never reaches the
cluster."""

import json
import re

import pytest
import yaml

from moeray.platform import ray_jobs
from moeray.platform.cli import main
from support import write_hf_model_folder

pytestmark = pytest.mark.slow


def write_spec(root, max_steps: int = 4):
    """A small SFT job of a tiny checkpoint, all under `root`; returns the spec's path."""
    write_hf_model_folder(root / "base", "v3", seed=5)
    rows = [{"messages": [{"role": "user", "content": f"count from {i % 7}"},
                          {"role": "assistant", "content": " ".join(str(i % 7 + k) for k in range(5))}]}
            for i in range(24)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = {"name": "api-sft", "base_model": str(root / "base"), "method": "sft", "output": str(root / "out"),
            "data": {"train": str(root / "train.jsonl")},
            "train": {"learning_rate": 3e-3, "max_steps": max_steps, "per_device_batch_size": 4, "max_length": 48},
            "checkpoint": {"storage": str(root / "ckpt"), "every_steps": 2}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    return write_spec(tmp_path_factory.mktemp("jobs-api"))


def _submit(capsys, spec_file, dashboard) -> str:
    assert main(["jobs", "submit", str(spec_file), "--address", dashboard]) == 0
    submission_id = capsys.readouterr().out.split("submitted ", 1)[1].split()[0]
    assert submission_id.startswith("moeray-api-sft-")
    return submission_id


def test_submit_follow_status_and_list(ray_dashboard, spec_file, capsys):
    submission_id = _submit(capsys, spec_file, ray_dashboard)

    assert main(["jobs", "logs", submission_id, "--follow", "--address", ray_dashboard]) == 0
    followed = capsys.readouterr().out
    assert "job api-sft finished at step 4" in followed
    # One progress line per step, printed by the job's driver, and none of Ray's own chatter:
    # the controller's state-API warnings, Ray Data's per-dataset lines, workers' prefixed output.
    progress = re.findall(r"^moeray: step (\d+)/4 loss [\d.]+ lr [\d.e+-]+ tokens/s \d+ .*eta \d+s$", followed, re.M)
    assert progress == ["1", "2", "3", "4"], followed
    for noise in ("Failed to query Ray Train Controller", "Starting execution of Dataset", "Progress bars",
                  "(RayTrainWorker pid=", "(TrainController pid="):
        assert noise not in followed, followed

    assert ray_jobs.wait(submission_id, ray_dashboard, timeout_s=60).status == "SUCCEEDED"
    assert main(["jobs", "status", submission_id, "--address", ray_dashboard]) == 0
    assert f"{submission_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", submission_id, "--address", ray_dashboard]) == 0
    assert "finished at step 4" in capsys.readouterr().out
    assert main(["jobs", "list", "--address", ray_dashboard]) == 0
    assert submission_id in capsys.readouterr().out
    assert (spec_file.parent / "out" / "config.json").exists()  # the job exported its model


def test_stop_a_running_job(ray_dashboard, spec_file, tmp_path, capsys):
    longer = yaml.safe_load(spec_file.read_text())
    longer["train"]["max_steps"] = 10_000
    longer["checkpoint"]["storage"] = str(tmp_path / "ckpt")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(longer))
    submission_id = _submit(capsys, tmp_path / "spec.yaml", ray_dashboard)

    assert main(["jobs", "stop", submission_id, "--address", ray_dashboard]) == 0
    assert "stopping" in capsys.readouterr().out
    assert ray_jobs.wait(submission_id, ray_dashboard, timeout_s=60).status == "STOPPED"


def test_unknown_job_and_unreachable_cluster_are_named(ray_dashboard, capsys):
    assert main(["jobs", "status", "moeray-no-such-job", "--address", ray_dashboard]) == 1
    assert "no job with submission id 'moeray-no-such-job'" in capsys.readouterr().err
    assert main(["jobs", "list", "--address", "http://127.0.0.1:9", "--retry-timeout", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "retrying in" in err and "http://127.0.0.1:9" in err.splitlines()[-1]


def test_bad_data_is_rejected_before_the_cluster_sees_the_job(ray_dashboard, spec_file, tmp_path, capsys):
    broken = yaml.safe_load(spec_file.read_text())
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n{"messages": [oops\n')
    broken["data"]["train"] = str(tmp_path / "train.jsonl")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(broken))
    before = len(ray_jobs.list_jobs(ray_dashboard))

    assert main(["jobs", "submit", str(tmp_path / "spec.yaml"), "--address", ray_dashboard]) == 2
    assert f"{tmp_path / 'train.jsonl'}:2" in capsys.readouterr().err
    assert len(ray_jobs.list_jobs(ray_dashboard)) == before


def test_an_eval_spec_runs_as_a_job(ray_dashboard, spec_file, tmp_path, capsys):
    """`jobs submit` of an eval spec (one with tasks): the job runs `moeray eval` and writes its report."""
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"question": f"{i} + 1", "answer": str(i + 1)}) + "\n"
                                                  for i in range(3)))
    spec = {"name": "api-eval", "model": str(spec_file.parent / "base"), "output": str(tmp_path / "report.json"),
            "tasks": [{"file": str(tmp_path / "items.jsonl"), "kind": "exact_match", "prompt_template": "{question} =",
                       "max_tokens": 2}]}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    assert main(["jobs", "submit", str(tmp_path / "eval.yaml"), "--address", ray_dashboard]) == 0
    submission_id = capsys.readouterr().out.split("submitted ", 1)[1].split()[0]
    status = ray_jobs.wait(submission_id, ray_dashboard, timeout_s=180).status
    assert status == "SUCCEEDED", "".join(ray_jobs.logs(submission_id, ray_dashboard))[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["name"] == "api-eval" and len(report["tasks"][0]["items"]) == 3
    (tmp_path / "items.jsonl").write_text('{"question": "1 + 1"}\n')  # no answer: refused before submitting
    assert main(["jobs", "submit", str(tmp_path / "eval.yaml"), "--address", ray_dashboard]) == 2
    assert "items.jsonl:1: missing 'answer'" in capsys.readouterr().err
