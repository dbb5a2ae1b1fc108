"""How `moeray serve` deploys: run the app while watching its replicas start (`drain.py` stops it).

Contract:
- `deploy(settings)` runs the Serve app and returns once it is ready. While it waits it reads
  Serve's status: a replica that raised `ReplicaStartupError` (a reason retrying cannot heal)
  ends the wait at once with `ReplicaFailedError(permanent=True)` carrying that replica's own
  message in one line; a deployment Serve gave up on ends it with its last error line.
"""

from __future__ import annotations

import re
import threading

from moeray.platform.errors import startup_error_in
from moeray.platform.settings import ServeSettings

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ReplicaFailedError(RuntimeError):
    """The model replicas could not start; `permanent` when starting again would fail the same way."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


def _application(settings: ServeSettings):
    from moeray.platform.serve_app import build_app

    return build_app(settings.model_dump(mode="json") | {"api_keys": settings.api_key_values(),
                                                          "admin_api_keys": settings.admin_key_values()})


def _failure(app_name: str) -> tuple[str, bool] | None:
    """(message, permanent) when a replica of the app failed to start, from Serve's status."""
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None:
        return None
    texts = [application.message] + [d.message for d in application.deployments.values()]
    for text in texts:
        message = startup_error_in(_ANSI_ESCAPE.sub("", text or ""))
        if message:
            return message, True
    if application.status == "DEPLOY_FAILED":
        return _last_error_line("\n".join(texts)), False
    return None


def _last_error_line(text: str) -> str:
    """The `Type: message` line that ends a traceback, or the text's last line."""
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", text).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (errors or lines or ["the deployment failed"])[-1]


def deploy(settings: ServeSettings, poll_s: float = 0.5) -> None:
    from ray import serve

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            serve.run(_application(settings), name=settings.app_name, route_prefix="/",
                      blocking=False)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            outcome.append(err)

    runner = threading.Thread(target=run, name="moeray-deploy", daemon=True)
    runner.start()
    while runner.is_alive():
        runner.join(poll_s)
        failure = _failure(settings.app_name)
        if failure is not None:
            raise ReplicaFailedError(*failure)
    if outcome and outcome[0] is not None:
        failure = _failure(settings.app_name)
        raise ReplicaFailedError(*(failure or (_last_error_line(str(outcome[0])), False))) from None


