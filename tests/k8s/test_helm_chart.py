"""The Helm chart: lint, render every CI values file, validate every object, and check that the
Serve config the RayService carries loads as the project's own ServeSettings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import (
    CHART,
    KUBERNETES_VERSION,
    RenderError,
    validate_core_object,
    validate_crd_object,
    validate_service_monitor,
)

from moeray.platform import kube
from moeray.platform.settings import ServeSettings

CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
BAD_VALUES = Path(__file__).parent / "values"
KUBERAY_KINDS = {"RayService", "RayJob", "RayCluster"}


def test_ci_values_files_cover_the_documented_cases():
    assert {p.stem for p in CI_VALUES} >= {"cpu-values", "gpu-expert-shards-values", "finetune-values",
                                           "existing-secret-values"}


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.stem if p else "defaults")
def test_helm_lint(helm, values_file):
    command = [str(helm), "lint", str(CHART), "--strict", "--kube-version", KUBERNETES_VERSION]
    if values_file:
        command += ["--values", str(values_file)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.stem if p else "defaults")
def test_every_rendered_object_validates(render, crd_validators, values_file):
    manifests = render(*([values_file] if values_file else []))
    assert manifests
    for manifest in manifests:
        if manifest["kind"] in KUBERAY_KINDS:
            validate_crd_object(manifest, crd_validators)
        elif manifest["kind"] == "ServiceMonitor":
            validate_service_monitor(manifest)
        else:
            validate_core_object(manifest)
        if manifest["kind"] == "RayService":
            check_serve_config(manifest)
        check_pod_security(manifest)


def check_serve_config(rayservice: dict) -> None:
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["import_path"] == "moeray.platform.serve_app:build_app"
    settings = ServeSettings.model_validate(application["args"])  # strict: unknown keys would fail
    # The chart sets every ServeSettings field except the keys, which come from the Secret.
    assert set(application["args"]) == set(ServeSettings.model_fields) - {"api_keys", "admin_api_keys"}
    assert settings.api_keys == [] and settings.admin_api_keys == []
    assert serve_config["http_options"]["port"] == settings.port


def _pod_templates(manifest: dict) -> list[dict]:
    spec = manifest.get("spec", {})
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
    if not cluster:
        return []
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    return templates


def check_pod_security(manifest: dict) -> None:
    for template in _pod_templates(manifest):
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in template["spec"]["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def _by_kind(manifests: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for manifest in manifests:
        kinds.setdefault(manifest["kind"], []).append(manifest)
    return kinds


def test_default_render_has_the_serving_stack(render):
    kinds = _by_kind(render())
    assert set(kinds) == {"RayService", "Service", "ServiceAccount", "NetworkPolicy", "PodDisruptionBudget"}
    cluster = kinds["RayService"][0]["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["replicas"]
    # Only the head's autoscaler sidecar talks to the API server.
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["automountServiceAccountToken"] is False
    assert kinds["Service"][0]["spec"]["selector"]["ray.io/serve"] == "true"
    assert kinds["RayService"][0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "image"] == kube.DEFAULT_IMAGE  # the chart's default image is the client's default


def test_gpu_expert_shards(render):
    manifests = render(CHART / "ci" / "gpu-expert-shards-values.yaml")
    kinds = _by_kind(manifests)
    rayservice = kinds["RayService"][0]
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    settings = ServeSettings.model_validate(args)
    assert (settings.expert_parallel.shards, settings.expert_parallel.redundant_experts,
            settings.expert_parallel.transport) == (8, 32, "collective")
    assert (settings.autoscaling.min_replicas, settings.autoscaling.max_replicas,
            settings.autoscaling.target_ongoing_requests) == (1, 4, 16)
    assert settings.engine.device == "cuda" and settings.engine.max_model_len == 8192
    assert settings.lora_adapters == {"support-bot": "s3://adapters/support-bot"}
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"replicas", "expert-shards"}
    shard_pod = groups["expert-shards"]["template"]["spec"]
    assert shard_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert shard_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert groups["replicas"]["template"]["spec"]["nodeSelector"]
    assert (groups["expert-shards"]["minReplicas"], groups["expert-shards"]["maxReplicas"]) == (8, 8)
    assert {p["metadata"]["name"] for p in kinds["PodDisruptionBudget"]} == {"test-moeray-replica",
                                                                          "test-moeray-expert-shard"}
    assert "ServiceMonitor" in kinds


def test_secret_values_appear_only_in_the_secret(render):
    manifests = render(CHART / "ci" / "gpu-expert-shards-values.yaml")
    secrets = [m for m in manifests if m["kind"] == "Secret"]
    assert secrets and secrets[0]["stringData"]["MOERAY_API_KEYS"] == "sk-test-one,sk-test-two"
    assert secrets[0]["stringData"]["MOERAY_ADMIN_API_KEYS"] == "sk-test-admin"
    for manifest in manifests:
        if manifest["kind"] == "Secret":
            continue
        text = yaml.safe_dump(manifest)
        for secret_value in ("sk-test-one", "sk-test-two", "sk-test-admin", "example-secret-key", "AKIAEXAMPLE"):
            assert secret_value not in text, f"{secret_value} leaked into {manifest['kind']}"


def test_existing_secret_is_referenced_not_created(render):
    manifests = render(CHART / "ci" / "existing-secret-values.yaml")
    kinds = _by_kind(manifests)
    assert "Secret" not in kinds and "ServiceAccount" not in kinds and "NetworkPolicy" not in kinds
    cluster = kinds["RayService"][0]["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert template["spec"]["serviceAccountName"] == "moeray-runner"
        assert template["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "moeray-credentials"}}]


def test_fine_tuning_job(render):
    kinds = _by_kind(render(CHART / "ci" / "finetune-values.yaml"))
    assert "RayService" not in kinds  # serving disabled
    (rayjob,) = kinds["RayJob"]
    assert rayjob["spec"]["entrypoint"] == kube.ENTRYPOINT
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert (rayjob["spec"]["ttlSecondsAfterFinished"], rayjob["spec"]["backoffLimit"]) == (600, 1)
    (configmap,) = kinds["ConfigMap"]
    head_volumes = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "job-spec", "configMap": {"name": configmap["metadata"]["name"]}} in head_volumes
    from moeray.jobs.spec import parse_spec

    parse_spec(yaml.safe_load(configmap["data"]["spec.yaml"]))
    (role,) = kinds["Role"]
    assert {r["resources"][0] for r in role["rules"]} == {"rayjobs", "configmaps", "pods", "pods/log"}


@pytest.mark.parametrize(("values_file", "named_key"), [
    ("wrong-type.yaml", "/serving/autoscaling/maxReplicas"),
    ("unknown-key.yaml", "expertParalel"),
    ("job-spec-unknown-key.yaml", "learing_rate"),
])
def test_schema_rejects_bad_values_naming_the_key(render, helm, values_file, named_key):
    with pytest.raises(RenderError) as refused:
        render(BAD_VALUES / values_file)
    assert named_key in str(refused.value)
    lint = subprocess.run([str(helm), "lint", str(CHART), "--values", str(BAD_VALUES / values_file)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert lint.returncode != 0 and named_key in lint.stdout + lint.stderr


def test_enabled_job_needs_a_spec(render):
    with pytest.raises(RenderError, match="missing properties 'name'"):
        render(set_values=("fineTuning.enabled=true",))


def test_values_schema_is_current():
    import chart_schema

    assert (CHART / "values.schema.json").read_text() == chart_schema.render(), (
        "helm/moeray/values.schema.json is stale: run .venv/bin/python tests/k8s/chart_schema.py")


def test_values_yaml_mirrors_serve_settings_defaults(render):
    """The chart's defaults are ServeSettings' defaults, apart from the documented chart choices."""
    rayservice = next(m for m in render() if m["kind"] == "RayService")
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    rendered = ServeSettings.model_validate(args).model_dump()
    defaults = ServeSettings().model_dump()
    chart_choices = {"host": "0.0.0.0"}  # listen on the pod network
    rendered["autoscaling"]["max_replicas"] = defaults["autoscaling"]["max_replicas"]  # chart scales to 2
    assert rendered == defaults | chart_choices


def test_the_drain_timeout_reaches_serve_and_the_pods_outlast_it(render):
    manifests = render(set_values=("serving.gracefulShutdownTimeoutSeconds=600",))
    (rayservice,) = [m for m in manifests if m["kind"] == "RayService"]
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["graceful_shutdown_timeout_s"] == 600
    templates = _pod_templates(rayservice)
    assert templates and all(t["spec"]["terminationGracePeriodSeconds"] == 630 for t in templates)


@pytest.mark.parametrize("strategy", ["NewCluster", "None", "NewClusterWithIncrementalUpgrade"])
def test_each_upgrade_strategy_renders_a_rayservice_the_crd_accepts(render, crd_validators, strategy):
    manifests = render(set_values=(f"serving.upgradeStrategy.type={strategy}",
                                   "serving.upgradeStrategy.incremental.gatewayClassName=istio"))
    (rayservice,) = [m for m in manifests if m["kind"] == "RayService"]
    validate_crd_object(rayservice, crd_validators)
    upgrade = rayservice["spec"]["upgradeStrategy"]
    assert upgrade["type"] == strategy
    if strategy == "NewClusterWithIncrementalUpgrade":
        assert upgrade["clusterUpgradeOptions"] == {"gatewayClassName": "istio", "stepSizePercent": 25,
                                                    "intervalSeconds": 60, "maxSurgePercent": 25}
    else:
        assert "clusterUpgradeOptions" not in upgrade


def test_upgrade_strategy_mistakes_are_named(render):
    with pytest.raises(RenderError, match="upgradeStrategy.incremental.gatewayClassName"):
        render(set_values=("serving.upgradeStrategy.type=NewClusterWithIncrementalUpgrade",))
    with pytest.raises(RenderError, match="/serving/upgradeStrategy/type"):
        render(set_values=("serving.upgradeStrategy.type=BlueGreen",))
    with pytest.raises(RenderError, match="/serving/upgradeStrategy/incremental/stepSizePercent"):
        render(set_values=("serving.upgradeStrategy.incremental.stepSizePercent=0",))
