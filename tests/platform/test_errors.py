"""The HTTP layer's errors, in process: Ray's wrapped exceptions unwrapped and mapped by type, a
request id in every body and header, 413 before a body is read whole, OpenAI shapes for routing
errors and for failures after a stream has started. The model side is a `ModelClient` that
raises what a real replica's handle raises (Ray's own exception classes)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from moeray.actors.dispatch import ExpertsUnavailableError
from moeray.engine import InvalidRequestError
from moeray.platform.errors import ReplicaStartupError, startup_error_in, to_openai_error, unwrap
from moeray.platform.openai_api import build_openai_app
from moeray.platform.service import ChunkOutput, GenerateChunk
from moeray.platform.settings import ServeSettings

INTERNAL = "Traceback (most recent call last):\n  File \"/srv/replica.py\", line 3\n\x1b[36mray::ServeReplica pid=42"


def wrapped(cause: BaseException, depth: int = 1) -> BaseException:
    """`cause` as a Ray actor call returns it: a RayTaskError that is also an instance of the cause's
    class, with the remote traceback in its text (twice nested for ingress -> model)."""
    err = cause
    for _ in range(depth):
        err = RayTaskError("handle_request", INTERNAL, err).as_instanceof_cause()
    return err


class RaisingClient:
    """A ModelClient whose streams fail with `error` before or after their first tokens."""

    def __init__(self, error: BaseException, after_tokens: bool = False):
        self.error, self.after_tokens = error, after_tokens

    async def generate(self, request):
        yield GenerateChunk(request.request_id, [], 3, 0, False)
        if self.after_tokens:
            yield GenerateChunk(request.request_id, [ChunkOutput(0, "hello", [5], None, None)], 3, 0, False)
        raise self.error

    async def stats(self):
        return None

    async def ready(self):
        return None


def app_for(client, **settings) -> TestClient:
    return TestClient(build_openai_app(client, ServeSettings(**settings)), raise_server_exceptions=False)


def post(client: TestClient, **body):
    return client.post("/v1/completions", json={"model": "moeray-default", "prompt": "x", "max_tokens": 4, **body})


def test_unwrap_follows_nested_ray_wrappers_to_the_cause():
    cause = InvalidRequestError("max_tokens is too large", "max_tokens")
    assert unwrap(wrapped(cause, depth=2)) is cause
    assert unwrap(cause) is cause


@pytest.mark.parametrize("error, status, code", [
    (InvalidRequestError("prompt[2] = 1000000000 is not a token id", "prompt"), 400, None),
    (BackPressureError(num_queued_requests=5, max_queued_requests=4), 503, "queue_full"),
    (ExpertsUnavailableError("3 routed experts have no live shard"), 503, "unavailable"),
    (ActorDiedError(), 503, "unavailable"),
    (RuntimeError("CUDA error: an illegal memory access"), 500, "internal_error"),
])
def test_wrapped_errors_map_by_type_and_carry_no_internals(error, status, code):
    response = post(app_for(RaisingClient(wrapped(error, depth=2))))
    body = response.json()["error"]
    assert response.status_code == status and body["code"] == code
    assert "Traceback" not in response.text and "ray::" not in response.text and "\x1b" not in response.text
    assert body["request_id"] == response.headers["x-request-id"]
    if status == 400:
        assert body["param"] == "prompt" and body["message"] == str(error)
    if status == 503:
        assert response.headers["Retry-After"] == "1"
    if status == 500:
        assert "CUDA" not in body["message"]  # the cause goes to the log, not to the client


def test_a_client_request_id_is_kept_and_logged_with_the_cause(caplog):
    client = app_for(RaisingClient(wrapped(RuntimeError("disk on fire"))))
    response = client.post("/v1/completions", json={"model": "moeray-default", "prompt": "x"},
                           headers={"x-request-id": "req-abc"})
    assert response.headers["x-request-id"] == "req-abc" and response.json()["error"]["request_id"] == "req-abc"
    logged = [r for r in caplog.records if "req-abc" in r.getMessage()]
    assert logged and "RuntimeError: disk on fire" in logged[0].getMessage() and logged[0].exc_info


def test_a_failure_after_the_stream_started_is_a_last_openai_event():
    response = post(app_for(RaisingClient(wrapped(ActorDiedError()), after_tokens=True)), stream=True)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "hello"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "unavailable" and error["request_id"] == response.headers["x-request-id"]


def test_an_oversize_body_is_413_from_its_declared_length_and_from_its_bytes():
    client = app_for(RaisingClient(RuntimeError()), max_request_body_bytes=1024)
    declared = client.post("/v1/completions", content=b"{}", headers={"content-length": "5000000",
                                                                       "content-type": "application/json"})
    assert declared.status_code == 413
    streamed = client.post("/v1/completions", content=iter([b"x" * 600, b"x" * 600]))  # no content-length
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"


def test_routing_errors_are_openai_shaped():
    client = app_for(RaisingClient(RuntimeError()))
    missing = client.post("/v1/embeddings", json={})
    assert missing.status_code == 404 and "/v1/embeddings" in missing.json()["error"]["message"]
    wrong = client.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["request_id"]


def test_a_replica_startup_error_is_found_in_serve_status_text():
    error = ReplicaStartupError("model '/m': no *.safetensors files in /m")
    status = f"A replica failed to start with exception. Retrying 2 more time(s). Error:\n{INTERNAL}\n" \
             f"moeray.platform.errors.ReplicaStartupError: {error}\n"
    assert startup_error_in(status) == "model '/m': no *.safetensors files in /m"
    assert startup_error_in("RuntimeError: something else") is None
    assert to_openai_error(wrapped(error)).status == 500


def test_while_draining_requests_and_health_get_503_each_with_its_own_id():
    from moeray.platform.asgi import Lifecycle

    lifecycle = Lifecycle(draining=True)
    client = TestClient(build_openai_app(RaisingClient(RuntimeError()), ServeSettings(), lifecycle=lifecycle))
    first, second = post(client), post(client)
    assert first.status_code == second.status_code == 503 and first.json()["error"]["code"] == "draining"
    assert first.json()["error"]["request_id"] != second.json()["error"]["request_id"]
    assert client.get("/health").status_code == 503
    assert lifecycle.open_requests == 0  # counted while open, none left
