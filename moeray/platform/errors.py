"""How a failure reaches a client: one mapping from exceptions to OpenAI error bodies.

Contract:
- `to_openai_error(err)` first unwraps Ray's wrappers (a `RayTaskError` carries the remote
  exception as its `cause`, and a call through two deployments nests them), then maps the cause
  by its type, never by its text or the name of its class:
  - `OpenAIError`: as it is; `InvalidRequestError`: 400 naming its parameter;
  - Serve's back-pressure: 503 `queue_full`; experts without a live shard, a stopped engine, a
    replica or node that died, a deployment with no replica: 503 `unavailable`;
  - anything else: 500 with a fixed message. Only those two kinds of message reach a client,
    so no body ever carries a traceback, a pid, an ip, an actor id or terminal escape codes.
- Every 5xx is logged with its full cause; every error body carries the request id that the
  `x-request-id` response header carries too, so a user's report leads to the log line.
- `ReplicaStartupError` is what a model replica raises when it cannot start for a reason that
  retrying cannot heal (a missing file, a checkpoint that does not match its tokenizer): the
  CLI recognises it in Serve's status and reports its message in one line.
"""

from __future__ import annotations

import logging
import re

from moeray.engine.params import InvalidRequestError
from moeray.platform.protocol import OpenAIError

logger = logging.getLogger(__name__)

# Marks the message of a ReplicaStartupError inside the traceback Serve keeps as status text.
STARTUP_ERROR_MARK = "moeray replica could not start: "


class ReplicaStartupError(RuntimeError):
    """A model replica cannot start, and starting it again would fail the same way."""

    def __init__(self, message: str):
        super().__init__(STARTUP_ERROR_MARK + message)
        self.message = message


def startup_error_in(status_text: str) -> str | None:
    """The message of a ReplicaStartupError in Serve's deployment status text, if any."""
    match = re.search(re.escape(STARTUP_ERROR_MARK) + r"(.+)$", status_text, re.MULTILINE)
    return match.group(1).strip() if match else None


def unwrap(err: BaseException) -> BaseException:
    """The exception Ray's task and actor wrappers carry, however deeply nested."""
    from ray.exceptions import RayTaskError

    seen = 0
    while isinstance(err, RayTaskError) and err.cause is not None and seen < 16:
        err, seen = err.cause, seen + 1
    return err


def _own_unavailable_types() -> tuple[type[BaseException], ...]:
    from moeray.actors.dispatch import ExpertsUnavailableError
    from moeray.engine.async_engine import EngineDeadError

    return ExpertsUnavailableError, EngineDeadError


def _unavailable_types() -> tuple[type[BaseException], ...]:
    """Failures of the serving machinery itself: the request may succeed if sent again."""
    from ray import exceptions as ray_errors
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (*_own_unavailable_types(), ray_errors.RayActorError, ray_errors.WorkerCrashedError,
            ray_errors.NodeDiedError, ray_errors.LocalRayletDiedError, ray_errors.ObjectLostError,
            DeploymentUnavailableError, ReplicaUnavailableError)


def to_openai_error(err: BaseException, request_id: str | None = None) -> OpenAIError:
    """The OpenAI error a client gets for `err` (logged here when it is the server's fault)."""
    from ray.serve.exceptions import BackPressureError

    cause = unwrap(err)
    if isinstance(cause, OpenAIError):
        error = cause
    elif isinstance(cause, InvalidRequestError):
        error = OpenAIError(400, str(cause), param=cause.param)
    elif isinstance(cause, BackPressureError):
        error = OpenAIError(503, "the server is at capacity: retry later", type="server_overloaded",
                            code="queue_full")
    elif isinstance(cause, _unavailable_types()):
        logger.warning("request %s: the model is unavailable: %s", request_id, _one_line(cause))
        # Our own errors say what is missing (their text is ours); Ray's say it with pids and ips.
        why = str(cause) if isinstance(cause, _own_unavailable_types()) else (
            "a replica or an expert shard failed, or none is running yet")
        error = OpenAIError(503, f"the model is unavailable right now ({why}): retry later", type="server_error",
                            code="unavailable")
    else:
        # The cause in one line, then the whole exception (a Ray wrapper's text is the remote traceback).
        logger.error("request %s failed: %s", request_id, _one_line(cause), exc_info=(type(err), err, err.__traceback__))
        error = OpenAIError(500, "internal server error: the server log has the details under this request's id",
                            type="server_error", code="internal_error")
    if request_id is not None and error.request_id is None:
        error = error.for_request(request_id)
    return error


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
