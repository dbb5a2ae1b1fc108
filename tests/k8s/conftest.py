"""Fixtures of the Kubernetes tests: the helm binary, chart rendering, and validators for rendered
objects (KubeRay CRD schemas from ../shared/kuberay-crds, core schemas from `kubernetes-validate`)."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "moeray"
CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay-crds"
KUBERNETES_VERSION = "1.30.0"  # validate core objects against the oldest API the chart is tested for
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}


def _install_helm() -> tuple[Path | None, str]:
    """The helm binary: installed by scripts/install_helm.py (run here too, so pytest alone works)."""
    script = REPO_ROOT / "scripts" / "install_helm.py"
    module_spec = importlib.util.spec_from_file_location("install_helm", script)
    install_helm = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(install_helm)
    try:
        return install_helm.install(), ""
    except Exception as err:  # noqa: BLE001 - any failure means the same: skip, saying why
        on_path = shutil.which("helm")
        if on_path:
            return Path(on_path), ""
        return None, f"helm unavailable: scripts/install_helm.py failed ({err})"


@pytest.fixture(scope="session")
def helm() -> Path:
    binary, reason = _install_helm()
    if binary is None:
        pytest.skip(reason)
    return binary


class RenderError(Exception):
    """helm refused to render; the message is helm's stderr."""


@pytest.fixture(scope="session")
def render(helm):
    """render(*values_files, release=..., namespace=..., set_values=[...]) -> list of manifests."""

    def _render(*values_files: Path, release: str = "test", namespace: str = "default",
                set_values: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        command = [str(helm), "template", release, str(CHART), "--namespace", namespace,
                   "--kube-version", KUBERNETES_VERSION]
        for values_file in values_files:
            command += ["--values", str(values_file)]
        for assignment in set_values:
            command += ["--set", assignment]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RenderError(result.stderr.strip())
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render


# ---- validation of rendered objects ----

def _strict_crd_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's openAPIV3Schema made checkable by plain JSON Schema.

    - `x-kubernetes-int-or-string` fields (resources, ports) accept both types.
    - Objects with declared properties and no `x-kubernetes-preserve-unknown-fields` forbid other
      keys: the API server would silently prune them, so a misspelt field must fail here.
    """
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    # metadata is checked by the API server's ObjectMeta, not by the CRD schema (which says only "object").
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@pytest.fixture(scope="session")
def crd_validators() -> dict[str, jsonschema.Validator]:
    if not CRD_DIR.is_dir():
        message = f"KubeRay CRDs not found at {CRD_DIR} (CI has ../shared/kuberay-crds)"
        if os.environ.get("CI"):  # in CI a missing schema is a broken setup, not a reason to check less
            pytest.fail(message)
        pytest.skip(message)
    validators = {}
    for kind, file_name in CRD_FILES.items():
        crd = yaml.safe_load((CRD_DIR / file_name).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[kind] = jsonschema.Draft4Validator(_strict_crd_schema(version["schema"]["openAPIV3Schema"]))
    return validators


def validate_crd_object(manifest: dict[str, Any], validators: dict[str, jsonschema.Validator]) -> None:
    errors = sorted(validators[manifest["kind"]].iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        where = manifest["kind"] + "/" + manifest["metadata"]["name"]
        lines = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message[:300]}" for e in errors[:10]]
        pytest.fail(f"{where} does not match the KubeRay CRD:\n" + "\n".join(lines))
    # The CRD holds serveConfigV2 as a string and submissionMode without an enum (see the CRDs' README).
    if manifest["kind"] == "RayJob":
        assert manifest["spec"].get("submissionMode", "K8sJobMode") in (
            "K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def validate_core_object(manifest: dict[str, Any]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {path}: {err.message}")


def validate_service_monitor(manifest: dict[str, Any]) -> None:
    """No schema for the Prometheus operator's CRD is at hand; check the fields it needs."""
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["spec"]["selector"]["matchLabels"]
    for endpoint in manifest["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "interval", "path", "scheme", "metricRelabelings"}, endpoint
        for relabel in endpoint.get("metricRelabelings", []):
            assert set(relabel) <= {"sourceLabels", "separator", "regex", "targetLabel", "replacement", "action"}
