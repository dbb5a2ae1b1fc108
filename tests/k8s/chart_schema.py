"""Generates helm/moeray/values.schema.json; `test_values_schema_is_current` keeps the file in step.

Why generated: the serving and fine-tuning parts of the values mirror pydantic models
(`ServeSettings`, `JobSpec`), so their types, bounds, enums and descriptions are taken from those
models rather than copied by hand; the chart-only parts (image, pods, Service, ...) are spelled out
here. Every object forbids unknown keys (`additionalProperties: false`), which is what makes
`helm install/template/lint` reject a misspelt key, naming it.

Regenerate after changing the models or the values layout:

    .venv/bin/python tests/k8s/chart_schema.py
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "helm" / "moeray" / "values.schema.json"

# ServeSettings fields the chart sets itself: the bind address is fixed, and API keys come from the
# Secret only (MOERAY_API_KEYS, MOERAY_ADMIN_API_KEYS), never from values rendered into the RayService.
SERVE_FIELDS_SET_BY_CHART = {"host", "api_keys", "admin_api_keys"}
# RayService spec.upgradeStrategy.type values KubeRay knows (its CRD types the field as a string).
UPGRADE_STRATEGIES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")


def values_key(field_name: str) -> str:
    """The values key of a pydantic field: camelCase, with a trailing `_s` spelt out as Seconds."""
    name = re.sub(r"_s$", "_seconds", field_name)
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _inline(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Resolve local $refs and drop pydantic's `title`s (helm's messages name keys, not titles)."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        return _inline({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("title", "$defs"):
            continue
        if key == "properties":
            result[key] = {name: _inline(sub, defs) for name, sub in value.items()}
        elif isinstance(value, dict):
            result[key] = _inline(value, defs)
        elif isinstance(value, list):
            result[key] = [_inline(item, defs) if isinstance(item, dict) else item for item in value]
        else:
            result[key] = value
    return result


def _camel_cased(schema: dict[str, Any], skip: set[str] = frozenset()) -> dict[str, Any]:
    """Rename the properties of an object schema (recursively) to values keys."""
    schema = copy.deepcopy(schema)
    if "properties" in schema:
        schema["properties"] = {values_key(name): _camel_cased(sub) for name, sub in schema["properties"].items()
                                if name not in skip}
        schema.pop("required", None)  # the chart's values.yaml supplies every key
    return schema


def serving_schema() -> dict[str, Any]:
    from moeray.platform.settings import ServeSettings

    raw = ServeSettings.model_json_schema()
    settings = _camel_cased(_inline(raw, raw.get("$defs", {})), skip=SERVE_FIELDS_SET_BY_CHART)
    settings["description"] = ("The Serve application's settings (moeray.platform.settings.ServeSettings, "
                               "camelCase) plus the worker groups of the serving RayCluster.")
    settings["properties"] = {"enabled": boolean("Render the RayService and its Service.")} | settings["properties"]
    settings["properties"]["upgradeStrategy"] = obj("RayService upgradeStrategy (helm/moeray/rollout.md).", {
        "type": string("How a change rolls out.", enum=list(UPGRADE_STRATEGIES)),
        "incremental": obj("clusterUpgradeOptions of NewClusterWithIncrementalUpgrade.", {
            "gatewayClassName": string("The Gateway API class that splits traffic between the clusters."),
            "stepSizePercent": integer("Traffic moved to the new cluster per step.", minimum=1, maximum=100),
            "intervalSeconds": integer("Time between steps.", minimum=1),
            "maxSurgePercent": integer("Capacity the new cluster may add ahead of traffic.", minimum=1, maximum=100),
        }),
    })
    settings["properties"]["replicaWorkers"] = worker_group("Pods for model replicas.")
    settings["properties"]["shardWorkers"] = worker_group("Pods for ExpertShard actors (when expertParallel.shards > 0).")
    return settings


def job_spec_schema() -> dict[str, Any]:
    from moeray.jobs.spec import JobSpec

    raw = JobSpec.model_json_schema()
    spec = _inline(raw, raw.get("$defs", {}))
    # Required keys are enforced only when the job is enabled (see fine_tuning_schema), so that the
    # default `spec: {}` passes.
    spec.pop("required", None)
    return spec


def fine_tuning_schema() -> dict[str, Any]:
    from moeray.jobs.spec import JobSpec

    required = JobSpec.model_json_schema().get("required", [])
    return obj("A RayJob launched by helm install/upgrade.", {
        "enabled": boolean("Render the fine-tuning RayJob and its spec ConfigMap."),
        "jobName": string("RayJob name; empty: derived from spec.name.", pattern="^([a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?)?$"),
        "spec": job_spec_schema(),
        "ttlSecondsAfterFinished": integer("Seconds the finished job's Ray cluster is kept.", minimum=0),
        "backoffLimit": integer("Retries of a failed job, each on a new Ray cluster.", minimum=0),
        "activeDeadlineSeconds": {"type": ["integer", "null"], "minimum": 1,
                                  "description": "Fail the job after this long; null: no deadline."},
        "head": obj("The job cluster's head pod.", {"cpu": quantity("CPU of the head pod."),
                                                   "memory": quantity("Memory of the head pod.")}),
        "worker": obj("One pod per Ray Train worker.", {
            "memory": quantity("Memory of each worker pod."),
            "nodeSelector": string_map("Node labels the worker pods require."),
            "tolerations": array_of_objects("Tolerations of the worker pods.")}),
    }) | {"if": {"properties": {"enabled": {"const": True}}, "required": ["enabled"]},
          "then": {"properties": {"spec": {"required": required}}}}


# ---- small constructors for the chart-only parts ----

def obj(description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": False, "properties": properties}


def string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def boolean(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description}


def integer(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "description": description, **extra}


def quantity(description: str) -> dict[str, Any]:
    return {"type": ["string", "number"], "description": description, "pattern": r"^[0-9.]+([a-zA-Z]{0,2})$"}


def string_map(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": {"type": "string"}}


def free_map(description: str) -> dict[str, Any]:
    """Kubernetes structures passed through verbatim (validated by the API server's own schemas)."""
    return {"type": "object", "description": description}


def array_of_objects(description: str) -> dict[str, Any]:
    return {"type": "array", "description": description, "items": {"type": "object"}}


def resources(description: str) -> dict[str, Any]:
    amounts = {"type": "object", "additionalProperties": {"type": ["string", "number"]}}
    return obj(description, {"requests": amounts, "limits": amounts})


def worker_group(description: str) -> dict[str, Any]:
    return obj(description, {
        "minReplicas": integer("Fewest pods the autoscaler keeps.", minimum=0),
        "maxReplicas": integer("Most pods the autoscaler starts.", minimum=0),
        "replicas": integer("Pods at install time.", minimum=0),
        "gpus": integer("GPUs per pod.", minimum=0),
        "resources": resources("Container requests and limits."),
        "nodeSelector": string_map("Node labels the pods require."),
        "tolerations": array_of_objects("Tolerations of the pods."),
        "affinity": free_map("Affinity of the pods."),
        "rayStartParams": string_map("Extra `ray start` parameters."),
    })


def build_values_schema() -> dict[str, Any]:
    properties = {
        "nameOverride": string("Replaces the chart name in object names."),
        "fullnameOverride": string("Replaces the full object name prefix."),
        "image": obj("The moeray image (see the repository's Dockerfile).", {
            "repository": string("Image repository.", minLength=1),
            "tag": string("Image tag; empty: the chart's appVersion."),
            "pullPolicy": string("Pull policy.", enum=["Always", "IfNotPresent", "Never"]),
        }),
        "imagePullSecrets": {"type": "array", "description": "Secrets for pulling the image.",
                             "items": obj("A Secret name.", {"name": string("Secret name.", minLength=1)})},
        "rayVersion": string("Ray version in the image.", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+"),
        "secrets": obj("Credentials: a Secret created from these values, or an existing one.", {
            "existingSecret": string("Name of a Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                     "AWS_SESSION_TOKEN, MOERAY_API_KEYS and/or MOERAY_ADMIN_API_KEYS; "
                                     "wins over create."),
            "create": boolean("Create a Secret from the values below."),
            "s3": obj("S3 credentials.", {"accessKeyId": string("AWS access key id."),
                                          "secretAccessKey": string("AWS secret access key."),
                                          "sessionToken": string("AWS session token.")}),
            "apiKeys": {"type": "array", "items": {"type": "string", "minLength": 1},
                        "description": "Bearer keys clients must send; empty: no auth."},
            "adminApiKeys": {"type": "array", "items": {"type": "string", "minLength": 1},
                             "description": "Bearer keys of the admin routes (loading and unloading LoRA "
                                            "adapters); with apiKeys set and these empty, those routes are closed."},
        }),
        "s3": obj("Non-secret S3 settings.", {"endpointUrl": string("Custom S3 endpoint; empty: AWS."),
                                              "region": string("S3 region.", minLength=1)}),
        "extraEnv": array_of_objects("Extra environment variables of every Ray container."),
        "serviceAccount": obj("The pods' ServiceAccount.", {
            "create": boolean("Create it."), "name": string("Its name; empty: the release's full name."),
            "annotations": string_map("Annotations (e.g. cloud IAM roles for S3)."),
        }),
        "rbac": obj("Roles.", {"jobSubmitters": array_of_objects(
            "RBAC subjects allowed to submit, read and stop fine-tuning RayJobs in this namespace.")}),
        "podSecurityContext": free_map("Pod security context of every pod."),
        "containerSecurityContext": free_map("Container security context of every container."),
        "podAnnotations": string_map("Annotations of the serving pods."),
        "podLabels": string_map("Extra labels of the serving pods."),
        "head": obj("The serving cluster's Ray head pod.", {
            "resources": resources("Container requests and limits."),
            "nodeSelector": string_map("Node labels the head pod requires."),
            "tolerations": array_of_objects("Tolerations of the head pod."),
            "affinity": free_map("Affinity of the head pod."),
            "rayStartParams": string_map("Extra `ray start` parameters."),
            "sharedMemorySize": quantity("Size of /dev/shm for Ray's object store (every Ray pod)."),
        }),
        "serving": serving_schema(),
        "gpuResourceName": string("Extended resource name of GPUs.", minLength=1),
        "autoscaler": obj("Ray's in-tree autoscaler.", {
            "enabled": boolean("Run the autoscaler sidecar so worker pods follow Serve replicas."),
            "idleTimeoutSeconds": integer("Idle seconds before a worker pod is removed.", minimum=0),
            "upscalingMode": string("How fast to scale up.", enum=["Default", "Aggressive", "Conservative"]),
            "resources": resources("The sidecar's requests and limits."),
        }),
        "service": obj("Service of the OpenAI endpoint.", {
            "type": string("Service type.", enum=["ClusterIP", "NodePort", "LoadBalancer"]),
            "port": integer("Service port.", minimum=1, maximum=65535),
            "annotations": string_map("Service annotations."),
        }),
        "ingress": obj("Optional Ingress to the Service.", {
            "enabled": boolean("Render the Ingress."),
            "className": string("IngressClass name."),
            "annotations": string_map("Ingress annotations."),
            "host": string("Host name.", minLength=1),
            "path": string("Path.", pattern="^/"),
            "pathType": string("Path type.", enum=["Prefix", "Exact", "ImplementationSpecific"]),
            "tls": array_of_objects("TLS entries (hosts, secretName)."),
        }),
        "networkPolicy": obj("Ingress rules of the release's pods.", {
            "enabled": boolean("Render the NetworkPolicy."),
            "operatorNamespace": string("Namespace of the KubeRay operator.", minLength=1),
            "endpointFrom": array_of_objects("Peers allowed to call the endpoint; empty: any."),
            "metricsFrom": array_of_objects("Peers allowed to scrape metrics; empty: the namespace."),
        }),
        "podDisruptionBudget": obj("Voluntary disruption limits per worker group.", {
            "enabled": boolean("Render the PodDisruptionBudgets."),
            "maxUnavailable": {"type": ["integer", "string"], "description": "Pods (or a percentage) evicted at once."},
        }),
        "serviceMonitor": obj("Prometheus operator scraping.", {
            "enabled": boolean("Render a metrics Service and a ServiceMonitor."),
            "interval": string("Scrape interval.", pattern="^[0-9]+(ms|s|m|h)$"),
            "labels": string_map("Labels the Prometheus selects ServiceMonitors by."),
        }),
        "grafanaDashboard": obj("The Grafana dashboard ConfigMap (dashboards/moeray-serving.json).", {
            "enabled": boolean("Render the ConfigMap."),
            "labels": string_map("Labels Grafana's dashboard sidecar selects ConfigMaps by."),
            "annotations": string_map("Annotations of the ConfigMap (e.g. the sidecar's folder)."),
        }),
        "fineTuning": fine_tuning_schema(),
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "moeray chart values",
            "type": "object", "additionalProperties": False, "properties": properties}


def render() -> str:
    return json.dumps(build_values_schema(), indent=2) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}")
