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
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_FILE = "spec.yaml"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


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


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise JobsApiError(f"cannot reach the Ray Jobs API at {url}: {err}") from None


def _call(action: str, job: str | None, function, *args, **kwargs):
    """function(*args, **kwargs), with the SDK's errors made into one `JobsApiError` line."""
    try:
        return function(*args, **kwargs)
    except RuntimeError as err:  # the SDK raises RuntimeError with the server's answer
        text = str(err)
        if job and ("does not exist" in text or "404" in text):
            raise JobsApiError(f"no job with submission id {job!r} on this cluster") from None
        raise JobsApiError(f"{action} failed: {text}") from None
    except ConnectionError as err:
        raise JobsApiError(f"{action} failed: the cluster is not reachable ({err})") from None


def submit(spec_path: str | Path, address: str | None = None, submission_id: str | None = None) -> str:
    from moeray.jobs.spec import JobSpec
    from moeray.jobs.trainer import absolute_paths, prepare

    spec = absolute_paths(JobSpec.from_yaml(spec_path))
    prepare(spec, check_only=True)  # every data, model and storage error surfaces here, before the cluster sees it
    client = _client(address)
    submission_id = submission_id or f"moeray-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="moeray-job-") as working_dir:
        (Path(working_dir) / SPEC_FILE).write_text(spec.to_yaml())
        return _call("submit", None, client.submit_job, entrypoint=f"moeray jobs run {SPEC_FILE}",
                     submission_id=submission_id, runtime_env={"working_dir": working_dir},
                     metadata={"moeray_job": spec.name, "method": spec.method})


def _info(details) -> JobInfo:
    seconds = lambda ms: ms / 1000 if ms else None  # noqa: E731 - the API reports milliseconds
    return JobInfo(details.submission_id, str(details.status.value if hasattr(details.status, "value")
                                               else details.status),
                   details.message or "", details.entrypoint, seconds(details.start_time), seconds(details.end_time))


def status(submission_id: str, address: str | None = None) -> JobInfo:
    client = _client(address)
    return _info(_call("status", submission_id, client.get_job_info, submission_id))


def logs(submission_id: str, address: str | None = None, follow: bool = False) -> Iterator[str]:
    """The job's log text; with `follow`, chunks as they are written until the job ends."""
    client = _client(address)
    if not follow:
        yield _call("logs", submission_id, client.get_job_logs, submission_id)
        return
    import asyncio

    _call("logs", submission_id, client.get_job_info, submission_id)  # unknown ids fail before streaming
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


def stop(submission_id: str, address: str | None = None) -> bool:
    """Ask the job to stop; False when it had already ended."""
    client = _client(address)
    return bool(_call("stop", submission_id, client.stop_job, submission_id))


def list_jobs(address: str | None = None) -> list[JobInfo]:
    client = _client(address)
    jobs = [_info(d) for d in _call("list", None, client.list_jobs) if d.submission_id]
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
