"""Draining a whole app: new requests get 503 while the open ones finish, then it goes.

Serve drains a replica it stops (downscale, redeploy) by itself: it routes nothing new to it and
waits for its open requests, up to `graceful_shutdown_timeout_s`. It cannot do that for a whole
application: once an app is deleted its route is gone, and for as long as its replicas finish
their streams the proxy answers every new request with a plain-text 404. So `moeray serve`
drains the app before it deletes it:
- it creates a `DrainCoordinator`, a named actor holding the `draining` flag, before deploying;
- each HTTP replica (`watch_drain`) tells it twice a second how many requests it has open and
  reads the flag back; once set, the replica answers new requests 503 with Retry-After;
- `drain_app` sets the flag, waits until every HTTP replica has seen it and has nothing open
  (or the graceful timeout passes), then deletes the app, which no longer waits for anything.
Where no coordinator exists (a RayService, tests deploying apps themselves) the replicas look
for one every few seconds and otherwise serve as usual.
"""

from __future__ import annotations

import logging
import threading
import time

from moeray.platform.asgi import Lifecycle

logger = logging.getLogger(__name__)

NAMESPACE = "moeray"
REPORT_INTERVAL_S = 0.5
LOOKUP_INTERVAL_S = 5.0
# A replica not heard from for this long has stopped (or died): it has nothing left to drain.
STALE_AFTER_S = 3.0


def coordinator_name(app_name: str) -> str:
    return f"{app_name}-drain"


class DrainCoordinator:
    """The draining flag of one app, and what its HTTP replicas last said they had open."""

    def __init__(self):
        self._draining = False
        self._reports: dict[str, tuple[float, int, bool]] = {}  # replica -> (when, open requests, saw flag)

    def start(self) -> None:
        self._draining = True

    def report(self, replica_id: str, open_requests: int, saw_draining: bool) -> bool:
        """A replica's open request count (counted after it saw the flag, if `saw_draining`);
        answers the flag."""
        self._reports[replica_id] = (time.monotonic(), open_requests, saw_draining)
        return self._draining

    def open_requests(self) -> int | None:
        """Open requests of the live replicas; None while one of them has not seen the flag."""
        now = time.monotonic()
        live = [(count, saw) for when, count, saw in self._reports.values() if now - when <= STALE_AFTER_S]
        if not all(saw for _, saw in live):
            return None
        return sum(count for count, _ in live)


def start_coordinator(app_name: str):
    """The app's coordinator, owned by the caller (it goes when the caller's driver exits)."""
    import ray

    return ray.remote(DrainCoordinator).options(name=coordinator_name(app_name), namespace=NAMESPACE,
                                                get_if_exists=True, num_cpus=0).remote()


def drain_app(app_name: str, coordinator, timeout_s: float) -> float:
    """Set the flag, wait for the open requests to finish (at most `timeout_s`), delete the app;
    returns the seconds it took."""
    import ray
    from ray import serve

    started = time.monotonic()
    ray.get(coordinator.start.remote())
    while time.monotonic() - started < timeout_s:
        if ray.get(coordinator.open_requests.remote()) == 0:
            break
        time.sleep(0.2)
    serve.delete(app_name)  # what is still open after the timeout, Serve's own graceful stop ends
    return time.monotonic() - started


def watch_drain(app_name: str, replica_id: str | None = None) -> Lifecycle:
    """A replica's `Lifecycle`, kept in step with the app's coordinator by a daemon thread."""
    import os

    lifecycle = Lifecycle()
    replica_id = replica_id or f"{os.getpid()}-{id(lifecycle)}"
    threading.Thread(target=_follow, args=(app_name, replica_id, lifecycle), name="moeray-drain-watch",
                     daemon=True).start()
    return lifecycle


def _follow(app_name: str, replica_id: str, lifecycle: Lifecycle) -> None:
    import ray

    coordinator = None
    while True:
        if coordinator is None:
            try:
                coordinator = ray.get_actor(coordinator_name(app_name), namespace=NAMESPACE)
            except ValueError:  # none: this app is not run by `moeray serve`
                time.sleep(LOOKUP_INTERVAL_S)
                continue
        saw = lifecycle.draining
        try:
            lifecycle.draining = ray.get(coordinator.report.remote(replica_id, lifecycle.open_requests, saw),
                                         timeout=10) or saw
        except Exception:  # noqa: BLE001 - the coordinator went with its CLI; look again later
            coordinator = None
            continue
        time.sleep(REPORT_INTERVAL_S)
