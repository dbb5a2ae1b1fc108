"""`moeray jobs` against a Jobs API that is not ready yet: a gateway on 127.0.0.1 in front of the
session Ray's real dashboard answers what a starting cluster answers (connection refused, 503,
"No available agent") a set number of times, then passes requests through."""

import http.server
import socket
import threading
import time
import urllib.request

import pytest

from moeray.platform import ray_jobs
from moeray.platform.cli import main

pytestmark = pytest.mark.slow
NO_AGENT = b"No available agent to submit job, please try again later."


class FlakyGateway(http.server.ThreadingHTTPServer):
    """Forwards to `upstream`; the first `failures` requests matching `path_prefix` get `answer`."""

    daemon_threads = True

    def __init__(self, listening: socket.socket, upstream: str):
        super().__init__(listening.getsockname(), _Forward, bind_and_activate=False)
        self.socket.close()
        self.socket = listening
        self.upstream, self.failures, self.answer, self.path_prefix, self.failed = upstream, 0, (503, b""), "/", 0

    def inject(self, failures: int, status: int, body: bytes = b"", path_prefix: str = "/") -> None:
        self.failures, self.answer, self.path_prefix, self.failed = failures, (status, body), path_prefix, 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    def _handle(self):
        gateway: FlakyGateway = self.server
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if gateway.failed < gateway.failures and self.path.startswith(gateway.path_prefix):
            gateway.failed += 1
            status, text = gateway.answer
            return self._reply(status, {"content-type": "text/plain"}, text)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        request = urllib.request.Request(gateway.upstream + self.path, data=body or None, headers=headers,
                                         method=self.command)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                self._reply(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as err:
            self._reply(err.code, dict(err.headers), err.read())

    def _reply(self, status: int, headers: dict, body: bytes):
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                self.send_header(key, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, *args):  # quiet
        pass


def _bound_socket() -> socket.socket:
    """A socket bound to a port but not listening yet: connections to it are refused."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    return listening


@pytest.fixture
def gateway(ray_dashboard):
    server = FlakyGateway(_bound_socket(), ray_dashboard)
    server.server_activate()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _retry_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "retrying in" in line]


def test_503s_are_retried_with_one_line_each(gateway, capsys):
    gateway.inject(3, 503)
    assert main(["jobs", "list", "--address", gateway.url]) == 0
    lines = _retry_lines(capsys.readouterr().err)
    assert len(lines) == 3 and all("HTTP 503" in line and gateway.url in line for line in lines)


def test_no_available_agent_is_retried_and_the_submit_goes_through_once(gateway, tmp_path, capsys):
    from test_ray_jobs_api import write_spec

    spec = write_spec(tmp_path, max_steps=1)
    gateway.inject(2, 500, NO_AGENT, path_prefix="/api/jobs/")
    assert main(["jobs", "submit", str(spec), "--address", gateway.url]) == 0
    captured = capsys.readouterr()
    assert len(_retry_lines(captured.err)) == 2 and "No available agent" in captured.err
    submission_id = captured.out.split("submitted ", 1)[1].split()[0]
    assert [j.submission_id for j in ray_jobs.list_jobs(gateway.url)].count(submission_id) == 1
    # Submitted once is what this test is about; a job running to the end is test_ray_jobs_api's.
    ray_jobs.stop(submission_id, gateway.url)
    assert ray_jobs.wait(submission_id, gateway.url, timeout_s=120).status in ("STOPPED", "SUCCEEDED")


def test_a_dashboard_still_starting_refuses_connections_then_answers(ray_dashboard, capsys):
    server = FlakyGateway(_bound_socket(), ray_dashboard)
    outcome = {}
    client = threading.Thread(target=lambda: outcome.setdefault(
        "rc", main(["jobs", "list", "--address", server.url, "--retry-timeout", "60"])))
    client.start()
    err, deadline = "", time.monotonic() + 30
    while not _retry_lines(err) and time.monotonic() < deadline:  # the CLI meets refused connections
        err += capsys.readouterr().err
        time.sleep(0.05)
    server.server_activate()  # the dashboard is up
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client.join(timeout=90)
        err += capsys.readouterr().err
        assert outcome.get("rc") == 0
        lines = _retry_lines(err)
        assert lines and all("connection refused" in line for line in lines)
    finally:
        server.shutdown()
        server.server_close()


def test_answers_that_are_not_transient_fail_at_once(gateway, capsys):
    gateway.inject(5, 400, b"bad request")
    started = time.monotonic()
    assert main(["jobs", "list", "--address", gateway.url]) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - started < 10 and not _retry_lines(err) and "400" in err
    assert gateway.failed == 1


def test_the_retry_deadline_is_kept(gateway, capsys):
    gateway.inject(1000, 503)
    started = time.monotonic()
    assert main(["jobs", "status", "moeray-x", "--address", gateway.url, "--retry-timeout", "3"]) == 1
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert 2.5 < elapsed < 15 and "was not ready before the retry deadline" in err.splitlines()[-1]
