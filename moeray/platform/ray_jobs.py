"""Fine-tuning jobs on a running Ray cluster, through the Ray Jobs API (the cluster's dashboard).

Contract:
- `submit(spec_path, address)` validates the spec exactly as `moeray jobs run` would (unknown
  fields, malformed data rows with file and line, a tokenizer that does not match the model,
  unreachable storage) *before* anything reaches the cluster, then submits the entrypoint
  `moeray jobs run spec.yaml` with the resolved spec shipped in the job's working directory.
  It returns the submission id, `moeray-<job name>-<time>`.
- `status`, `logs` (`follow=True` streams until the job ends), `stop` and `list_jobs` read and
  change jobs by submission id. A cluster that cannot be reached, or an id the cluster does
  not know, raises `JobsApiError` with the address or id named.
- Local paths in the spec are made absolute before submission: they must be visible to the
  cluster's nodes (a shared filesystem, or a development cluster on this machine). Use s3://
  URIs for remote clusters.
- Every call retries answers that mean "not yet" (a dashboard that refuses connections while it
  starts, 502/503/504 from a proxy in front of it, "No available agent" from a cluster whose
  node agents have not registered yet) with backoff until `retry_timeout_s`, reporting each
  retry in one line; any other answer (a 4xx, an unknown id) fails at once. A submit that is
  retried after its first try may already have gone through: the cluster then knows its id,
  which counts as success.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RETRY_TIMEOUT_S = 60.0
SPEC_FILE = "spec.yaml"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
TRANSIENT_STATUS = (502, 503, 504)
# What the Jobs API answers (with a 500) while no node's agent has registered yet.
NOT_READY_MARKERS = ("No available agent", "try again later")


class JobsApiError(RuntimeError):
    """The Ray Jobs API could not be reached or refused a request."""


@dataclass
class JobInfo:
    submission_id: str
    status: str
    message: str
    entrypoint: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None

    def line(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start_time)) if self.start_time else "-"
        return f"{self.submission_id:<40} {self.status:<10} {started}  {self.message}"


def resolve_address(address: str | None) -> str:
    """The dashboard URL: the flag, else RAY_ADDRESS when it is an http(s) URL, else the default."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        return DEFAULT_ADDRESS
    return address


def _print_retry(message: str) -> None:
    print(f"moeray: {message}", file=sys.stderr, flush=True)


def _not_ready(err: BaseException) -> str | None:
    """Why `err` means the cluster is not ready yet (worth retrying), or None."""
    import requests

    if isinstance(err, (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return "connection refused or timed out"
    if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code}" if err.response.status_code in TRANSIENT_STATUS else None
    if isinstance(err, RuntimeError):  # the SDK's "Request failed with status code N: <answer>"
        text = str(err)
        status = re.search(r"status code (\d+)", text)
        if status and int(status.group(1)) in TRANSIENT_STATUS:
            return f"HTTP {status.group(1)}"
        marker = next((m for m in NOT_READY_MARKERS if m in text), None)
        if marker:
            return text.split(": ", 1)[-1].strip().rstrip(".")[:120]
    return None


def _call(action: str, job: str | None, address: str | None, function: Callable[[Any], Any],
          retry_timeout_s: float = DEFAULT_RETRY_TIMEOUT_S,
          on_retry: Callable[[str], None] = _print_retry) -> Any:
    """function(client) with a fresh SDK client, retried while the cluster is not ready; every
    other failure becomes one `JobsApiError` line."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    deadline = time.monotonic() + retry_timeout_s
    delay = 0.5
    while True:
        try:
            return function(JobSubmissionClient(url))
        except Exception as err:  # noqa: BLE001 - classified below, then re-raised as JobsApiError
            reason = _not_ready(err)
            left = deadline - time.monotonic()
            if reason is None or left <= 0:
                raise _explain(action, job, url, err, retried=reason is not None) from None
            wait = min(delay, left)
            on_retry(f"{action}: the Ray Jobs API at {url} is not ready ({reason}); retrying in {wait:.1f} s "
                     f"(giving up in {left:.0f} s)")
            time.sleep(wait)
            delay = min(delay * 2, 8.0)


def _explain(action: str, job: str | None, url: str, err: BaseException, retried: bool) -> JobsApiError:
    text = str(err)
    if job and ("does not exist" in text or "404" in text):
        return JobsApiError(f"no job with submission id {job!r} on this cluster")
    if _not_ready(err) is not None:
        return JobsApiError(f"{action} failed: the Ray Jobs API at {url} was not ready"
                            f"{' before the retry deadline' if retried else ''} ({text.rstrip('.')})")
    return JobsApiError(f"{action} failed: {text}")


def submit(spec_path: str | Path, address: str | None = None, submission_id: str | None = None,
           retry_timeout_s: float = DEFAULT_RETRY_TIMEOUT_S, on_retry: Callable[[str], None] = _print_retry) -> str:
    from moeray.jobs.spec import JobSpec, load_spec

    spec = load_spec(spec_path)
    # Every data, model and storage error surfaces here, before the cluster sees it.
    if isinstance(spec, JobSpec):
        from moeray.jobs.trainer import absolute_paths, prepare

        spec = absolute_paths(spec)
        prepare(spec)
        method = spec.method
    else:
        from moeray.jobs.eval.runner import absolute_paths, check

        spec = absolute_paths(spec)
        check(spec)
        method = "eval"
    submission_id = submission_id or f"moeray-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tries = 0
    with tempfile.TemporaryDirectory(prefix="moeray-job-") as working_dir:
        (Path(working_dir) / SPEC_FILE).write_text(spec.to_yaml())

        def submit_job(client) -> str:
            nonlocal tries
            tries += 1
            try:
                return client.submit_job(entrypoint=f"moeray jobs run {SPEC_FILE}", submission_id=submission_id,
                                         runtime_env={"working_dir": working_dir},
                                         metadata={"moeray_job": spec.name, "method": method})
            except RuntimeError as err:
                if tries > 1 and "already exists" in str(err):  # an earlier try went through
                    return submission_id
                raise

        return _call("submit", None, address, submit_job, retry_timeout_s, on_retry)


def _info(details) -> JobInfo:
    seconds = lambda ms: ms / 1000 if ms else None  # noqa: E731 - the API reports milliseconds
    return JobInfo(details.submission_id, str(details.status.value if hasattr(details.status, "value")
                                               else details.status),
                   details.message or "", details.entrypoint, seconds(details.start_time), seconds(details.end_time))


def status(submission_id: str, address: str | None = None, retry_timeout_s: float = DEFAULT_RETRY_TIMEOUT_S) -> JobInfo:
    return _info(_call("status", submission_id, address, lambda c: c.get_job_info(submission_id), retry_timeout_s))


def logs(submission_id: str, address: str | None = None, follow: bool = False,
         retry_timeout_s: float = DEFAULT_RETRY_TIMEOUT_S) -> Iterator[str]:
    """The job's log text; with `follow`, chunks as they are written until the job ends."""
    if not follow:
        yield _call("logs", submission_id, address, lambda c: c.get_job_logs(submission_id), retry_timeout_s)
        return
    import asyncio

    def tail(client):
        client.get_job_info(submission_id)  # unknown ids fail before streaming
        return client

    client = _call("logs", submission_id, address, tail, retry_timeout_s)
    stream = client.tail_job_logs(submission_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop(submission_id: str, address: str | None = None, retry_timeout_s: float = DEFAULT_RETRY_TIMEOUT_S) -> bool:
    """Ask the job to stop; False when it had already ended."""
    return bool(_call("stop", submission_id, address, lambda c: c.stop_job(submission_id), retry_timeout_s))


def list_jobs(address: str | None = None, retry_timeout_s: float = DEFAULT_RETRY_TIMEOUT_S) -> list[JobInfo]:
    jobs = [_info(d) for d in _call("list", None, address, lambda c: c.list_jobs(), retry_timeout_s)
            if d.submission_id]
    return sorted(jobs, key=lambda job: job.start_time or 0)


def wait(submission_id: str, address: str | None = None, timeout_s: float = 600.0) -> JobInfo:
    """Poll until the job reaches a terminal state (SUCCEEDED, FAILED or STOPPED)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = status(submission_id, address)
        if info.status in TERMINAL_STATES:
            return info
        if time.monotonic() > deadline:
            raise JobsApiError(f"job {submission_id} still {info.status} after {timeout_s:.0f} s")
        time.sleep(1.0)
