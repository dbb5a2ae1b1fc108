"""The RayJob that `moeray jobs submit --k8s` sends equals the one the chart renders for the same spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import validate_core_object, validate_crd_object

from moeray.platform import kube

VALUES = Path(__file__).parent / "values"
SPEC = VALUES / "parity-job-spec.yaml"

# The same choices as values/parity-options.yaml, spelt as the client's options.
OPTIONS = kube.RayJobOptions(
    namespace="ml-team", image="registry.example.com/ml/moeray:9.9.9", image_pull_policy="Always",
    image_pull_secrets=("registry-login",), instance="trainer-release", service_account="trainer",
    secret_name="team-credentials", s3_region="eu-west-1", s3_endpoint_url="http://minio.storage:9000",
    extra_env=({"name": "HF_HUB_OFFLINE", "value": "1"},), ttl_seconds_after_finished=120, backoff_limit=2,
    active_deadline_seconds=7200, head_cpu="2", head_memory="6Gi", worker_memory="24Gi",
    node_selector={"pool": "gpu"}, tolerations=({"key": "nvidia.com/gpu", "operator": "Exists",
                                                 "effect": "NoSchedule"},))


def _chart_job(render, tmp_path: Path, *values_files: Path, release: str, namespace: str) -> tuple[dict, dict]:
    spec_values = tmp_path / "spec-values.yaml"
    spec_values.write_text(yaml.safe_dump({"fineTuning": {"enabled": True, "spec": yaml.safe_load(SPEC.read_text())}}))
    manifests = render(*values_files, spec_values, release=release, namespace=namespace,
                       set_values=("serving.enabled=false",))
    (rayjob,) = [m for m in manifests if m["kind"] == "RayJob"]
    (configmap,) = [m for m in manifests if m["kind"] == "ConfigMap"]
    return rayjob, configmap


@pytest.mark.parametrize("customised", [False, True], ids=["defaults", "every-option"])
def test_client_and_chart_build_the_same_rayjob(render, crd_validators, tmp_path, customised):
    if customised:
        options, values_files = OPTIONS, (VALUES / "parity-options.yaml",)
    else:
        # The chart's defaults with serviceAccount.create (named after the release) equal these.
        options, values_files = kube.RayJobOptions(namespace="default", instance="moeray",
                                                   service_account="moeray"), ()
    client_job, client_configmap = kube.build_rayjob(SPEC, options)
    chart_job, chart_configmap = _chart_job(render, tmp_path, *values_files, release=options.instance,
                                            namespace=options.namespace)

    assert kube.without_manager_labels(client_job) == kube.without_manager_labels(chart_job)
    assert client_job["metadata"]["name"] == "parity-sft-job"
    worker = client_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 3
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"] | {} == {
        "cpu": "2500m", "memory": options.worker_memory, "nvidia.com/gpu": 1}

    # The ConfigMaps carry the same name and the same spec (the chart re-serialises it).
    assert client_configmap["metadata"]["name"] == chart_configmap["metadata"]["name"] == "parity-sft-job-spec"
    assert yaml.safe_load(client_configmap["data"]["spec.yaml"]) == yaml.safe_load(chart_configmap["data"]["spec.yaml"])
    assert kube.without_manager_labels(client_configmap)["metadata"]["labels"] == \
        kube.without_manager_labels(chart_configmap)["metadata"]["labels"]

    validate_crd_object(client_job, crd_validators)
    validate_core_object(client_configmap)


def test_job_names_follow_the_charts_rule():
    assert kube.job_name("Parity_SFT job") == "parity-sft-job"
    assert kube.job_name("--x--") == "x"
    assert len(kube.job_name("a" * 100)) == kube.MAX_NAME_LENGTH
    with pytest.raises(ValueError, match="no letters or digits"):
        kube.job_name("___")


def test_cpu_quantities():
    assert [kube.cpu_quantity(c) for c in (1, 2.0, 0.5, 2.5, 0.125)] == ["1", "2", "500m", "2500m", "125m"]
