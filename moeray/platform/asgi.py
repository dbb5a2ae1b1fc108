"""What every moeray HTTP app has around its routes: request ids, an open-request count, a lifecycle.

Contract:
- `RequestIds` makes sure every request has an `x-request-id` header by the time a route sees
  it: Serve's proxy sets one (and returns it itself); without a proxy it is made here and
  echoed in the response. `request_id_of(request)` reads it.
- `CountsOpenRequests` keeps `Lifecycle.open_requests`: requests from their start to their
  response's last byte (or the connection's end).
- `Lifecycle.draining` is set by whoever stops the app (`drain.py`); the routes then refuse new
  work.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import MutableHeaders

REQUEST_ID_HEADER = "x-request-id"


@dataclass
class Lifecycle:
    """Between the app and whoever stops it (`drain.py`): `draining` once the app is being
    stopped (new requests then get 503 and /health fails, while open streams finish), and how
    many requests are open, streams until their last event."""

    draining: bool = False
    open_requests: int = 0


class RequestIds:
    """ASGI middleware: every request has an `x-request-id` header by the time a route sees it.
    Serve's proxy sets one (and returns it itself); without a proxy it is made here and echoed."""

    def __init__(self, app, echo: bool):
        self.app, self.echo = app, echo

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = MutableHeaders(scope=scope)
        request_id = headers.get(REQUEST_ID_HEADER)
        if request_id is None:
            request_id = uuid.uuid4().hex
            headers.append(REQUEST_ID_HEADER, request_id)
        if not self.echo:
            return await self.app(scope, receive, send)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in response_headers:
                    response_headers.append(REQUEST_ID_HEADER, request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


class CountsOpenRequests:
    """ASGI middleware: `lifecycle.open_requests` counts requests from their start to their
    response's last byte (or the connection's end)."""

    def __init__(self, app, lifecycle: Lifecycle):
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.lifecycle.open_requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.open_requests -= 1


def request_id_of(request: Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER, "")
