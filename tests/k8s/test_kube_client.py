"""moeray.platform.kube against a local HTTP server standing in for the Kubernetes API server.

The server (http.server in a thread on 127.0.0.1) holds a script of expected exchanges: each names
the verb, the path (with query) and a check of the request body, and gives the answer. A request
off the script is answered 599 and fails the test, so every call the client makes is pinned down.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from moeray.platform import kube

SPEC = Path(__file__).parent / "values" / "parity-job-spec.yaml"
NAMESPACE = "ml"
NAME = "parity-sft-job"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs"
CONFIGMAPS = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"
SELECTOR = quote("app.kubernetes.io/name=moeray,app.kubernetes.io/component=fine-tuning", safe="")


@dataclass
class Exchange:
    verb: str
    path: str
    status: int
    answer: Any = None  # dict: JSON; str: sent as text/plain
    check_body: Callable[[Any], None] | None = None


def status_body(status: int, reason: str, message: str, name: str | None = None) -> dict:
    """A Kubernetes `Status` answer, as the API server sends for failures."""
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": status, "details": {"group": "ray.io", "kind": "rayjobs"}}
    if name:
        body["details"]["name"] = name
    return body


def _parsed(path: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(path)
    return parts.path, parse_qs(parts.query)


class FakeApiServer:
    def __init__(self):
        self.script: list[Exchange] = []
        self.problems: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                if not server.script:
                    return self._fail(f"unexpected {self.command} {self.path}: script finished")
                expected = server.script.pop(0)
                # Compared as path plus decoded query: clients may escape ',' and '=' either way.
                if (self.command, _parsed(self.path)) != (expected.verb, _parsed(expected.path)):
                    return self._fail(f"expected {expected.verb} {expected.path}, got {self.command} {self.path}")
                if expected.check_body:
                    try:
                        expected.check_body(body)
                    except AssertionError as err:
                        return self._fail(f"{self.command} {self.path}: body check failed: {err}")
                if isinstance(expected.answer, str):
                    self._send(expected.status, expected.answer.encode(), "text/plain")
                else:
                    self._send(expected.status, json.dumps(expected.answer or {}).encode(), "application/json")

            def _fail(self, problem: str):
                server.problems.append(problem)
                self._send(599, problem.encode(), "text/plain")

            def _send(self, status: int, payload: bytes, content_type: str):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def expect(self, *exchanges: Exchange) -> None:
        self.script.extend(exchanges)

    def verify(self) -> None:
        assert not self.problems, self.problems
        assert not self.script, f"calls never made: {[(e.verb, e.path) for e in self.script]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api():
    server = FakeApiServer()
    client = kube.api_client_for(server.url)
    yield server, client
    client.close()
    server.close()


def expected_rayjob() -> dict:
    rayjob, _ = kube.build_rayjob(SPEC, kube.RayJobOptions(namespace=NAMESPACE))
    return rayjob


def rayjob_answer(status: dict | None = None) -> dict:
    answer = expected_rayjob()
    answer["metadata"]["uid"] = "0f1e2d3c-uid"
    if status:
        answer["status"] = status
    return answer


def test_submit_creates_the_rayjob_then_its_owned_configmap(api):
    server, client = api

    def is_the_rayjob(body):
        assert body == expected_rayjob()

    def is_the_owned_configmap(body):
        assert body["metadata"]["name"] == f"{NAME}-spec"
        assert body["data"]["spec.yaml"] == SPEC.read_text()
        assert body["metadata"]["ownerReferences"] == [
            {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": NAME, "uid": "0f1e2d3c-uid"}]

    server.expect(Exchange("POST", RAYJOBS, 201, rayjob_answer(), is_the_rayjob),
                  Exchange("POST", CONFIGMAPS, 201, {"kind": "ConfigMap"}, is_the_owned_configmap))
    assert kube.submit(SPEC, namespace=NAMESPACE, api_client=client) == NAME
    server.verify()


def test_status_and_list(api):
    server, client = api
    running = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "rayClusterName": f"{NAME}-abcde",
               "startTime": "2026-01-01T00:00:00Z"}
    server.expect(Exchange("GET", f"{RAYJOBS}/{NAME}", 200, rayjob_answer(running)),
                  Exchange("GET", f"{RAYJOBS}?labelSelector={SELECTOR}", 200,
                           {"kind": "RayJobList", "items": [rayjob_answer(running)]}))
    job = kube.status(NAME, NAMESPACE, api_client=client)
    assert (job.job_status, job.deployment_status, job.ray_cluster) == ("RUNNING", "Running", f"{NAME}-abcde")
    assert job.summary() == f"{NAMESPACE}/{NAME}: job RUNNING, deployment Running"
    assert kube.list_jobs(NAMESPACE, api_client=client) == [job]
    server.verify()


def test_stop_deletes_in_the_background(api):
    server, client = api

    def background_propagation(body):
        assert body["propagationPolicy"] == "Background"

    server.expect(Exchange("DELETE", f"{RAYJOBS}/{NAME}", 200, {"kind": "Status", "status": "Success"},
                           background_propagation))
    kube.stop(NAME, NAMESPACE, api_client=client)
    server.verify()


def test_logs_come_from_the_submitter_pod(api):
    server, client = api
    pods = {"kind": "PodList", "items": [
        {"metadata": {"name": f"{NAME}-old", "creationTimestamp": "2026-01-01T00:00:00Z"}},
        {"metadata": {"name": f"{NAME}-new", "creationTimestamp": "2026-01-01T01:00:00Z"}}]}
    server.expect(Exchange("GET", f"{PODS}?labelSelector={quote(f'job-name={NAME}', safe='')}", 200, pods),
                  Exchange("GET", f"{PODS}/{NAME}-new/log?follow=false", 200, "step 1 loss 2.0\nstep 2 loss 1.5"))
    assert list(kube.logs(NAME, NAMESPACE, api_client=client)) == ["step 1 loss 2.0\n", "step 2 loss 1.5"]
    server.verify()


def test_logs_before_the_submitter_pod_exists_show_the_status(api):
    server, client = api
    server.expect(Exchange("GET", f"{PODS}?labelSelector={quote(f'job-name={NAME}', safe='')}", 200,
                           {"kind": "PodList", "items": []}),
                  Exchange("GET", f"{RAYJOBS}/{NAME}", 200,
                           rayjob_answer({"jobDeploymentStatus": "Initializing", "message": "waiting for pods"})))
    (line,) = kube.logs(NAME, NAMESPACE, api_client=client)
    assert "Initializing: waiting for pods" in line and "no submitter pod yet" in line
    server.verify()


def test_forbidden_names_verb_object_and_namespace(api):
    server, client = api
    server.expect(Exchange("POST", RAYJOBS, 403, status_body(
        403, "Forbidden", 'rayjobs.ray.io is forbidden: User "dev" cannot create resource "rayjobs"')))
    with pytest.raises(kube.KubeError) as refused:
        kube.submit(SPEC, namespace=NAMESPACE, api_client=client)
    message = str(refused.value)
    assert message.startswith(f"cannot create RayJob {NAMESPACE}/{NAME}: forbidden (403)")
    assert 'User "dev" cannot create' in message and "\n" not in message
    server.verify()


def test_missing_job_is_not_found(api):
    server, client = api
    server.expect(Exchange("GET", f"{RAYJOBS}/nope", 404, status_body(
        404, "NotFound", 'rayjobs.ray.io "nope" not found', name="nope")),
                  Exchange("DELETE", f"{RAYJOBS}/nope", 404, status_body(
                      404, "NotFound", 'rayjobs.ray.io "nope" not found', name="nope")))
    with pytest.raises(kube.KubeError, match=f"^cannot get RayJob {NAMESPACE}/nope: not found \\(404\\)$"):
        kube.status("nope", NAMESPACE, api_client=client)
    with pytest.raises(kube.KubeError, match=f"^cannot delete RayJob {NAMESPACE}/nope: not found"):
        kube.stop("nope", NAMESPACE, api_client=client)
    server.verify()


def test_missing_crd_says_install_kuberay(api):
    server, client = api
    # Without the CRD the API server has no such path at all: a bare 404 page, no Status object.
    server.expect(Exchange("POST", RAYJOBS, 404, "404 page not found"),
                  Exchange("GET", f"{RAYJOBS}?labelSelector={SELECTOR}", 404, "404 page not found"))
    with pytest.raises(kube.KubeError, match="RayJob API is not served by this cluster .*install the KubeRay"):
        kube.submit(SPEC, namespace=NAMESPACE, api_client=client)
    with pytest.raises(kube.KubeError, match=f"^cannot list RayJobs in namespace {NAMESPACE}: the ray.io/v1"):
        kube.list_jobs(NAMESPACE, api_client=client)
    server.verify()


def test_already_exists(api):
    server, client = api
    server.expect(Exchange("POST", RAYJOBS, 409, status_body(409, "AlreadyExists", "already exists", name=NAME)))
    with pytest.raises(kube.KubeError, match="already exists \\(409\\); stop it first"):
        kube.submit(SPEC, namespace=NAMESPACE, api_client=client)
    server.verify()


def test_configmap_refused_takes_the_rayjob_back(api):
    server, client = api
    server.expect(Exchange("POST", RAYJOBS, 201, rayjob_answer()),
                  Exchange("POST", CONFIGMAPS, 403, status_body(403, "Forbidden", "cannot create configmaps")),
                  Exchange("DELETE", f"{RAYJOBS}/{NAME}", 200, {"kind": "Status", "status": "Success"}))
    with pytest.raises(kube.KubeError, match=f"^cannot create ConfigMap {NAMESPACE}/{NAME}-spec: forbidden"):
        kube.submit(SPEC, namespace=NAMESPACE, api_client=client)
    server.verify()


def test_unreachable_server():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = kube.api_client_for(f"http://127.0.0.1:{port}")
    client.configuration.retries = 0
    with pytest.raises(kube.KubeError, match=f"^cannot get RayJob {NAMESPACE}/{NAME}: Kubernetes API unreachable"):
        kube.status(NAME, NAMESPACE, api_client=client)


def test_invalid_spec_fails_before_any_call(api, tmp_path):
    from moeray.jobs.spec import JobSpecError

    server, client = api
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: sft\n")
    with pytest.raises(JobSpecError, match="bad.yaml"):
        kube.submit(bad, namespace=NAMESPACE, api_client=client)
    server.verify()  # nothing was sent


def test_no_kubeconfig_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent-kubeconfig"))
    with pytest.raises(kube.KubeError, match="^no Kubernetes configuration: .*set KUBECONFIG"):
        kube.status(NAME, NAMESPACE)


def test_cli_k8s_commands_use_the_kubeconfig_context(api, tmp_path, monkeypatch, capsys):
    from moeray.platform.cli import main

    server, _ = api
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "local",
                  "clusters": [{"name": "local", "cluster": {"server": server.url}}],
                  "users": [{"name": "dev", "user": {}}],
                  "contexts": [{"name": "local", "context": {"cluster": "local", "user": "dev"}}]}
    (tmp_path / "kubeconfig").write_text(json.dumps(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    running = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}
    server.expect(Exchange("POST", RAYJOBS, 201, rayjob_answer()),
                  Exchange("POST", CONFIGMAPS, 201, {"kind": "ConfigMap"}),
                  Exchange("GET", f"{RAYJOBS}/{NAME}", 200, rayjob_answer(running)),
                  Exchange("POST", RAYJOBS, 403, status_body(403, "Forbidden", "rayjobs.ray.io is forbidden")))
    assert main(["jobs", "submit", str(SPEC), "--k8s", "--namespace", NAMESPACE]) == 0
    assert f"created RayJob {NAMESPACE}/{NAME}" in capsys.readouterr().out
    assert main(["jobs", "status", NAME, "--k8s", "--namespace", NAMESPACE]) == 0
    assert "job RUNNING, deployment Running" in capsys.readouterr().out
    assert main(["jobs", "submit", str(SPEC), "--k8s", "--namespace", NAMESPACE]) == 1
    assert f"cannot create RayJob {NAMESPACE}/{NAME}: forbidden (403)" in capsys.readouterr().err
    server.verify()
