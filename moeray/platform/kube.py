"""Fine-tuning jobs on Kubernetes: a KubeRay `RayJob` client over the official `kubernetes` package.

Contract (plain functions; every one takes `api_client=` to talk to a given API server, otherwise it
loads the in-cluster config when run in a pod, else the kubeconfig, like kubectl):

    submit(spec_path, namespace="default", image=DEFAULT_IMAGE, *, api_client=None, **options) -> str
        Validate the job spec, create the RayJob, then a ConfigMap `<name>-spec` holding the spec
        file (owned by the RayJob, so it is deleted with it). Returns the RayJob name. `options` are
        the other `RayJobOptions` fields (name, service_account, secret_name, ttl_seconds_after_finished,
        backoff_limit, worker_memory, node_selector, tolerations, ...).
    status(name, namespace="default", *, api_client=None) -> JobStatus
    logs(name, namespace="default", follow=False, *, api_client=None) -> Iterator[str]
        Lines of the job's output, read from the submitter pod of the RayJob (KubeRay's K8sJobMode
        runs `ray job submit`, which tails the driver's output until the job ends). Before that pod
        exists, yields the RayJob's status message instead.
    stop(name, namespace="default", *, api_client=None) -> None
        Deletes the RayJob; Kubernetes garbage collection removes its RayCluster, submitter Job and
        spec ConfigMap.
    list_jobs(namespace="default", *, api_client=None) -> list[JobStatus]
        The moeray fine-tuning RayJobs of the namespace.

`build_rayjob(spec_path, RayJobOptions(...))` returns the (RayJob, ConfigMap) pair without calling
the API server. The RayJob is the same object that the Helm chart's `fineTuning` template renders for
the same spec and values (tests/k8s compares them); only the labels naming who manages it differ.

Every API failure raises `KubeError` with one line naming the verb, the object and the namespace:
403 (forbidden, with the RBAC hint), 404 of a named object (not found), 404 of the collection (the
ray.io/v1 API is not served: KubeRay's CRDs are missing), 409 (already exists), unreachable server.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moeray import __version__

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
DEFAULT_IMAGE = f"ghcr.io/moeray/moeray:{__version__}"
RAY_VERSION = "2.60.0"  # the Ray of the Dockerfile's base image
SPEC_MOUNT_DIR = "/etc/moeray/job"
SPEC_FILE_KEY = "spec.yaml"
TRAINER_GROUP = "trainers"
# The in-pod driver must join the RayJob's cluster (`ray job submit` sets RAY_ADDRESS); without
# --address, `moeray jobs run` starts a private local Ray instead.
ENTRYPOINT = f"moeray jobs run {SPEC_MOUNT_DIR}/{SPEC_FILE_KEY} --address auto"
# Labels that say who manages an object; the chart sets Helm's, this client its own.
MANAGER_LABELS = ("app.kubernetes.io/managed-by", "helm.sh/chart")
MAX_NAME_LENGTH = 40  # KubeRay appends a cluster suffix and pod hashes; names must stay under 63

# Pod and container security of every job pod; equal to the chart's default values.
POD_SECURITY_CONTEXT = {"fsGroup": 100, "runAsGroup": 100, "runAsNonRoot": True, "runAsUser": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                              "runAsNonRoot": True}
SUBMITTER_RESOURCES = {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "200m", "memory": "256Mi"}}


class KubeError(RuntimeError):
    """A Kubernetes API call failed; the message is one line naming verb, object and namespace."""


@dataclass(frozen=True)
class RayJobOptions:
    """How a job spec becomes a RayJob; each field mirrors a value of the chart (named in brackets)."""

    namespace: str = "default"  # [--namespace]
    image: str = DEFAULT_IMAGE  # [image.repository:image.tag]
    image_pull_policy: str = "IfNotPresent"  # [image.pullPolicy]
    image_pull_secrets: tuple[str, ...] = ()  # [imagePullSecrets[].name]
    name: str | None = None  # [fineTuning.jobName]; None: derived from the spec's name
    instance: str = "moeray"  # [release name]: the chart's NetworkPolicy admits pods of its instance
    service_account: str | None = None  # [serviceAccount.name]; None: the namespace's default
    secret_name: str | None = None  # [secrets.existingSecret]: S3 credentials as environment
    s3_region: str = "us-east-1"  # [s3.region]
    s3_endpoint_url: str = ""  # [s3.endpointUrl]
    extra_env: tuple[dict[str, Any], ...] = ()  # [extraEnv]
    ray_version: str = RAY_VERSION  # [rayVersion]
    shared_memory_size: str = "2Gi"  # [head.sharedMemorySize]
    ttl_seconds_after_finished: int = 3600  # [fineTuning.ttlSecondsAfterFinished]
    backoff_limit: int = 0  # [fineTuning.backoffLimit]
    active_deadline_seconds: int | None = None  # [fineTuning.activeDeadlineSeconds]
    head_cpu: str = "1"  # [fineTuning.head.cpu]
    head_memory: str = "4Gi"  # [fineTuning.head.memory]
    worker_memory: str = "8Gi"  # [fineTuning.worker.memory]
    gpu_resource_name: str = "nvidia.com/gpu"  # [gpuResourceName]
    node_selector: dict[str, str] = field(default_factory=dict)  # [fineTuning.worker.nodeSelector]
    tolerations: tuple[dict[str, Any], ...] = ()  # [fineTuning.worker.tolerations]


@dataclass(frozen=True)
class JobStatus:
    """What KubeRay reports about one RayJob (empty strings where it has not said yet)."""

    name: str
    namespace: str
    job_status: str  # Ray's job status: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    deployment_status: str  # KubeRay's: Initializing, Running, Complete, Failed, ...
    message: str
    ray_cluster: str
    start_time: str
    end_time: str

    @classmethod
    def from_rayjob(cls, rayjob: dict[str, Any]) -> JobStatus:
        status = rayjob.get("status") or {}
        return cls(name=rayjob["metadata"]["name"], namespace=rayjob["metadata"].get("namespace", ""),
                   job_status=status.get("jobStatus", ""), deployment_status=status.get("jobDeploymentStatus", ""),
                   message=status.get("message", ""), ray_cluster=status.get("rayClusterName", ""),
                   start_time=status.get("startTime", ""), end_time=status.get("endTime", ""))

    def summary(self) -> str:
        state = self.job_status or "-"
        line = f"{self.namespace}/{self.name}: job {state}, deployment {self.deployment_status or '-'}"
        return f"{line}: {self.message}" if self.message else line


# ---- building the objects (no API calls) ----

def job_name(spec_name: str) -> str:
    """A DNS-safe RayJob name from a spec name; the chart's template applies the same rule."""
    name = re.sub(r"[^a-z0-9-]+", "-", spec_name.lower()).strip("-")[:MAX_NAME_LENGTH].strip("-")
    if not name:
        raise ValueError(f"job name {spec_name!r} has no letters or digits to build a Kubernetes name from")
    return name


def cpu_quantity(cpus: float) -> str:
    """Ray CPUs as a Kubernetes quantity: whole numbers stay whole, fractions become millicores."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.floor(cpus * 1000)}m"


def build_rayjob(spec_path: str | Path, options: RayJobOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RayJob, ConfigMap) for a job spec file; raises `JobSpecError` for an invalid spec."""
    # Imported here: the jobs package is needed only when a job is built.
    from moeray.jobs.spec import load_spec

    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    name = options.name or job_name(spec.name)
    labels = {"app.kubernetes.io/name": "moeray", "app.kubernetes.io/instance": options.instance,
              "app.kubernetes.io/component": "fine-tuning", "moeray.io/job": name}
    object_labels = labels | {"app.kubernetes.io/version": __version__, "app.kubernetes.io/managed-by": "moeray"}
    configmap_name = f"{name}-spec"

    scaling = spec.scaling
    # One worker pod per Ray Train worker; `or` because a zero or absent amount means the default.
    worker_cpus = scaling.resources_per_worker.get("CPU") or 1
    worker_gpus = math.ceil(scaling.resources_per_worker.get("GPU") or (1 if scaling.use_gpu else 0))
    worker_resources: dict[str, Any] = {"cpu": cpu_quantity(worker_cpus), "memory": options.worker_memory}
    if worker_gpus:
        worker_resources[options.gpu_resource_name] = worker_gpus

    def pod_template(container: str, resources: dict[str, Any], on_workers: bool) -> dict[str, Any]:
        env: list[dict[str, Any]] = [{"name": "AWS_DEFAULT_REGION", "value": options.s3_region}]
        if options.s3_endpoint_url:
            env.append({"name": "AWS_ENDPOINT_URL", "value": options.s3_endpoint_url})
        env.extend(options.extra_env)
        spec_container: dict[str, Any] = {
            "name": container, "image": options.image, "imagePullPolicy": options.image_pull_policy,
            "securityContext": CONTAINER_SECURITY_CONTEXT, "env": env,
            "resources": {"limits": dict(resources), "requests": dict(resources)},
            "volumeMounts": [{"name": "job-spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True},
                             {"name": "shared-memory", "mountPath": "/dev/shm"}],
        }
        if options.secret_name:
            spec_container["envFrom"] = [{"secretRef": {"name": options.secret_name}}]
        pod_spec: dict[str, Any] = _common_pod_spec(options)
        if on_workers and options.node_selector:
            pod_spec["nodeSelector"] = dict(options.node_selector)
        if on_workers and options.tolerations:
            pod_spec["tolerations"] = list(options.tolerations)
        pod_spec["containers"] = [spec_container]
        pod_spec["volumes"] = [
            {"name": "job-spec", "configMap": {"name": configmap_name}},
            {"name": "shared-memory", "emptyDir": {"medium": "Memory", "sizeLimit": options.shared_memory_size}},
        ]
        return {"metadata": {"labels": dict(labels)}, "spec": pod_spec}

    submitter_spec = _common_pod_spec(options) | {"restartPolicy": "Never", "containers": [{
        "name": "ray-job-submitter", "image": options.image, "imagePullPolicy": options.image_pull_policy,
        "securityContext": CONTAINER_SECURITY_CONTEXT, "resources": SUBMITTER_RESOURCES}]}
    rayjob_spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
        "backoffLimit": options.backoff_limit,
    }
    if options.active_deadline_seconds is not None:
        rayjob_spec["activeDeadlineSeconds"] = options.active_deadline_seconds
    rayjob_spec["submitterPodTemplate"] = {"metadata": {"labels": dict(labels)}, "spec": submitter_spec}
    rayjob_spec["rayClusterSpec"] = {
        "rayVersion": options.ray_version,
        "headGroupSpec": {"rayStartParams": {}, "template": pod_template(
            "ray-head", {"cpu": options.head_cpu, "memory": options.head_memory}, on_workers=False)},
        "workerGroupSpecs": [{
            "groupName": TRAINER_GROUP, "replicas": scaling.num_workers, "minReplicas": scaling.num_workers,
            "maxReplicas": scaling.num_workers, "rayStartParams": {},
            "template": pod_template("ray-worker", worker_resources, on_workers=True)}],
    }
    rayjob = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
              "metadata": {"name": name, "namespace": options.namespace, "labels": dict(object_labels)},
              "spec": rayjob_spec}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": configmap_name, "namespace": options.namespace, "labels": dict(object_labels)},
                 "data": {SPEC_FILE_KEY: spec_path.read_text()}}
    return rayjob, configmap


def _common_pod_spec(options: RayJobOptions) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {}
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    # Job pods never call the API server (no autoscaler in a job's fixed-size cluster).
    pod_spec["automountServiceAccountToken"] = False
    pod_spec["securityContext"] = POD_SECURITY_CONTEXT
    if options.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in options.image_pull_secrets]
    return pod_spec


# ---- talking to the API server ----

def api_client_for(host: str, token: str | None = None, verify_ssl: bool = True):
    """An ApiClient for an explicit API server URL (tests, scripts); no kubeconfig is read."""
    from kubernetes import client

    configuration = client.Configuration(host=host)
    configuration.verify_ssl = verify_ssl
    if token:
        configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(configuration)


def default_api_client():
    """In a pod: the service account's in-cluster config; elsewhere: the current kubeconfig context."""
    import os

    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            # KUBECONFIG as it is now: the client library reads it only once, at import.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except (config.ConfigException, OSError) as err:
        raise KubeError(f"no Kubernetes configuration: {err} (set KUBECONFIG or run inside a pod)") from None
    return client.ApiClient()


def _explain(err: Exception, verb: str, what: str, namespace: str, name: str | None) -> KubeError:
    """One line for an API failure; `what` is the kind ('RayJob', 'ConfigMap', 'pod')."""
    from kubernetes.client.exceptions import ApiException

    target = f"{what} {namespace}/{name}" if name else f"{what}s in namespace {namespace}"
    if not isinstance(err, ApiException):
        return KubeError(f"cannot {verb} {target}: Kubernetes API unreachable ({type(err).__name__}: {err})")
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        body = None
    server_message = body.get("message", "") if isinstance(body, dict) else ""
    detail = f": {server_message}" if server_message else ""
    if err.status == 401:
        return KubeError(f"cannot {verb} {target}: unauthorized (401): the credentials were rejected{detail}")
    if err.status == 403:
        return KubeError(f"cannot {verb} {target}: forbidden (403): the account lacks RBAC permission "
                         f"to {verb} {what}s in {namespace}{detail}")
    if err.status == 404:
        # A missing object comes back as a Status naming it; a missing API (CRD not installed)
        # comes back as a bare "404 page not found".
        if isinstance(body, dict) and body.get("kind") == "Status" and body.get("details", {}).get("name"):
            return KubeError(f"cannot {verb} {target}: not found (404)")
        if what == KIND:
            return KubeError(f"cannot {verb} {target}: the {GROUP}/{VERSION} RayJob API is not served by this "
                             f"cluster (404): install the KubeRay operator and its CRDs")
        return KubeError(f"cannot {verb} {target}: not found (404){detail}")
    if err.status == 409:
        return KubeError(f"cannot {verb} {target}: already exists (409); stop it first or choose another name")
    if err.status == 422:
        return KubeError(f"cannot {verb} {target}: rejected as invalid (422){detail}")
    return KubeError(f"cannot {verb} {target}: HTTP {err.status} {err.reason}{detail}")


def _api_errors() -> tuple[type[Exception], ...]:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    return ApiException, HTTPError, OSError


def submit(spec_path: str | Path, namespace: str = "default", image: str = DEFAULT_IMAGE, *,
           api_client=None, **options: Any) -> str:
    """Create the RayJob and its spec ConfigMap; return the RayJob name."""
    from kubernetes import client

    rayjob, configmap = build_rayjob(spec_path, RayJobOptions(namespace=namespace, image=image, **options))
    name = rayjob["metadata"]["name"]
    api_client = api_client or default_api_client()
    try:
        created = client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, rayjob)
    except _api_errors() as err:
        raise _explain(err, "create", KIND, namespace, name) from None
    # The ConfigMap comes second so that it can be owned by the RayJob (deleted with it); the
    # pods that mount it wait for it to appear.
    configmap["metadata"]["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name,
                                                 "uid": created["metadata"]["uid"]}]
    try:
        client.CoreV1Api(api_client).create_namespaced_config_map(namespace, configmap)
    except _api_errors() as err:
        failure = _explain(err, "create", "ConfigMap", namespace, configmap["metadata"]["name"])
        try:  # a RayJob without its spec would never start: take it back
            _delete_rayjob(api_client, name, namespace)
        except KubeError as cleanup:
            raise KubeError(f"{failure}; and removing RayJob {namespace}/{name} failed: {cleanup}") from None
        raise failure from None
    return name


def status(name: str, namespace: str = "default", *, api_client=None) -> JobStatus:
    from kubernetes import client

    api_client = api_client or default_api_client()
    try:
        rayjob = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name)
    except _api_errors() as err:
        raise _explain(err, "get", KIND, namespace, name) from None
    return JobStatus.from_rayjob(rayjob)


def list_jobs(namespace: str = "default", *, api_client=None) -> list[JobStatus]:
    from kubernetes import client

    api_client = api_client or default_api_client()
    try:
        answer = client.CustomObjectsApi(api_client).list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL,
            label_selector="app.kubernetes.io/name=moeray,app.kubernetes.io/component=fine-tuning")
    except _api_errors() as err:
        raise _explain(err, "list", KIND, namespace, None) from None
    return sorted((JobStatus.from_rayjob(item) for item in answer.get("items", [])), key=lambda job: job.name)


def stop(name: str, namespace: str = "default", *, api_client=None) -> None:
    _delete_rayjob(api_client or default_api_client(), name, namespace)


def _delete_rayjob(api_client, name: str, namespace: str) -> None:
    from kubernetes import client

    try:
        client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body=client.V1DeleteOptions(propagation_policy="Background"))
    except _api_errors() as err:
        raise _explain(err, "delete", KIND, namespace, name) from None


def logs(name: str, namespace: str = "default", follow: bool = False, *, api_client=None) -> Iterator[str]:
    """Output lines of the job (see the module docstring for where they come from)."""
    from kubernetes import client

    api_client = api_client or default_api_client()
    core = client.CoreV1Api(api_client)
    try:
        # KubeRay names the submitter Job after the RayJob; the Job controller labels its pods so.
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
    except _api_errors() as err:
        raise _explain(err, "list", "pod", namespace, None) from None
    if not pods:
        job = status(name, namespace, api_client=api_client)
        yield f"{job.summary()} (no submitter pod yet; its logs appear once the Ray cluster is up)\n"
        return
    newest = max(pods, key=lambda pod: pod.metadata.creation_timestamp)
    pod_name = newest.metadata.name
    try:
        response = core.read_namespaced_pod_log(pod_name, namespace, follow=follow, _preload_content=False)
        pending = b""
        for chunk in response.stream(1 << 14):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace") + "\n"
        if pending:
            yield pending.decode("utf-8", "replace")
    except _api_errors() as err:
        raise _explain(err, "read logs of", "pod", namespace, pod_name) from None


def without_manager_labels(manifest: dict[str, Any]) -> dict[str, Any]:
    """A copy of a manifest minus the labels that name its manager (for comparing chart and client)."""
    copy = json.loads(json.dumps(manifest))
    labels = copy.get("metadata", {}).get("labels", {})
    for label in MANAGER_LABELS:
        labels.pop(label, None)
    return copy


def dump(manifest: dict[str, Any]) -> str:
    """YAML of a manifest, for `--dry-run` style output."""
    return yaml.safe_dump(manifest, sort_keys=False)
