"""The OpenAI-compatible HTTP API as a FastAPI app over any `ModelClient`.

Contract: `build_openai_app(client, settings)` serves `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health` and `/metrics`, and vLLM's admin routes `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (see adapters.py: a request's `model` may name any adapter of the
app's catalog). With `api_keys` set, the admin routes take only `admin_api_keys`. The app never touches an engine: a `ModelClient` hands
it streams of `GenerateChunk`s, either in process (`LocalClient`, tests) or through a Ray Serve
handle (`serve_app`). A stream the client leaves is closed, which aborts the request in its
replica.
- Every error is an OpenAI error body (`errors.to_openai_error`), unknown routes and unexpected
  exceptions included, carrying the request's id: the `x-request-id` header Serve's proxy set
  (or one made here when no proxy is in front, then echoed in the response headers).
- An error after a stream has started is a last SSE event in the same shape, then `[DONE]`.
- Bodies over `max_request_body_bytes` are refused with 413 before they are read whole.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from moeray.engine import InvalidRequestError
from moeray.platform.adapters import AdapterRef, CatalogClient, local_catalog
from moeray.platform.asgi import CountsOpenRequests, Lifecycle, RequestIds, request_id_of
from moeray.platform.errors import to_openai_error
from moeray.platform.metrics import RequestTimer, ServingMetrics
from moeray.platform.pipeline import ChatFormat, CompletionFormat, Format, collect, merge, stream_events
from moeray.platform.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoraAdapterRequest, OpenAIError,
                                     UnloadLoraAdapterRequest, new_id, now)
from moeray.platform.service import GenerateChunk, GenerateRequest, ReplicaService
from moeray.platform.settings import ServeSettings

logger = logging.getLogger(__name__)


class ModelClient(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...

    async def stats(self) -> dict[str, Any] | None: ...

    async def ready(self) -> str | None:
        """None when a replica can serve a request now; otherwise why not."""

    async def prepare_adapter(self, adapter: AdapterRef) -> None:
        """Load `adapter` on a replica (which then holds it), raising what the load raised."""


class LocalClient:
    """The replica service in this process (tests, single-process tools)."""

    def __init__(self, service: ReplicaService):
        self.service = service

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        return self.service.generate(request)

    async def stats(self) -> dict[str, Any] | None:
        return self.service.stats().as_dict()

    async def ready(self) -> str | None:
        return None if self.service.async_engine.is_running else "the engine thread has stopped"

    async def prepare_adapter(self, adapter: AdapterRef) -> None:
        self.service.adapters.release(await self.service.adapters.acquire(adapter))


def _param_of(location: tuple) -> str | None:
    """A pydantic error location as the request parameter OpenAI's style names: messages[0].role."""
    param = ""
    for part in location:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def build_openai_app(client: ModelClient, settings: ServeSettings, metrics: ServingMetrics | None = None,
                     behind_serve_proxy: bool = False, lifecycle: Lifecycle | None = None,
                     catalog: CatalogClient | None = None) -> FastAPI:
    """`behind_serve_proxy`: Serve's proxy sets the request id and returns it in the response, and
    the request metrics also go to Ray's metrics agent (ray_metrics.py). `catalog`: the app's
    adapters (default: one in this process, from the settings)."""
    app = FastAPI(title="moeray", description="OpenAI-compatible API for DeepSeek-V3-class MoE models")
    lifecycle = lifecycle or Lifecycle()
    app.add_middleware(CountsOpenRequests, lifecycle=lifecycle)
    app.add_middleware(RequestIds, echo=not behind_serve_proxy)
    metrics = metrics or ServingMetrics(cluster=behind_serve_proxy)

    def refuse_while_draining() -> None:
        if lifecycle.draining:
            raise OpenAIError(503, "the server is shutting down: retry, another replica will answer",
                              type="server_error", code="draining")

    model_name = settings.model_name
    catalog = catalog or local_catalog(settings)
    keys = [k.encode() for k in settings.api_key_values()]
    admin_keys = [k.encode() for k in settings.admin_key_values()]

    def error_response(request: Request, err: BaseException) -> JSONResponse:
        error = to_openai_error(err, request_id_of(request))  # logs the cause of a 5xx in full
        if error.status < 500:
            logger.info("request %s %s %s: %d %s (param %s)", error.request_id, request.method, request.url.path,
                        error.status, error.message, error.param)
        headers = dict(error.headers)
        if error.status in (429, 503):
            headers.setdefault("Retry-After", str(settings.retry_after_s))
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, err: OpenAIError):
        return error_response(request, err)

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, err: HTTPException):  # unknown path, wrong method
        if err.status_code == 404:
            message = (f"no route {request.url.path}; this server has /v1/chat/completions, /v1/completions, "
                       f"/v1/models, /health and /metrics")
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return error_response(request, OpenAIError(err.status_code, message,
                                                   code="not_found" if err.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception):
        return error_response(request, err)

    def bearer_matches(request: Request, accepted: list[bytes]) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        matched = False
        for key in accepted:  # compare against every key: the time taken does not reveal which matched
            matched |= hmac.compare_digest(token.strip().encode(), key)
        return scheme.lower() == "bearer" and matched

    def authorize(request: Request) -> None:
        if keys and not bearer_matches(request, keys):
            raise OpenAIError(401, "missing or incorrect API key: send Authorization: Bearer <key>",
                              code="invalid_api_key")

    def authorize_admin(request: Request) -> None:
        if admin_keys:
            if not bearer_matches(request, admin_keys):
                raise OpenAIError(401, "missing or incorrect admin API key: send Authorization: Bearer <admin key>",
                                  code="invalid_api_key")
        elif keys:
            raise OpenAIError(403, "the admin routes are closed on a server with api_keys and no admin_api_keys",
                              code="admin_routes_closed")

    async def read_body(request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be over the limit."""
        limit = settings.max_request_body_bytes
        too_large = OpenAIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                f"(setting max_request_body_bytes)", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(request: Request, model: type[BaseModel]):
        try:
            body = model.model_validate_json(await read_body(request))
        except ValidationError as err:
            problem = err.errors()[0]
            # A check across fields has no location of its own: it names its field in the context.
            param = ".".join(p for p in (_param_of(problem["loc"]), (problem.get("ctx") or {}).get("param")) if p) or None
            if problem["type"] in ("json_invalid", "json_type"):
                raise OpenAIError(400, f"request body is not valid JSON: {problem['msg']}") from None
            if problem["type"] == "model_type":
                raise OpenAIError(400, "the request body must be a JSON object") from None
            raise OpenAIError(400, f"{param}: {problem['msg']}" if param else problem["msg"], param=param) from None
        return body

    async def parse(request: Request, model: type[BaseModel]):
        """(the request body, the LoRA adapter its `model` selects; None: the base model)."""
        authorize(request)
        refuse_while_draining()
        body = await read_json(request, model)
        if body.model == model_name:
            return body, None
        adapter = await catalog.resolve(body.model)
        if adapter is None:
            names = [model_name, *(ref.name for ref in await catalog.listing())]
            served = ", ".join(f"'{name}'" for name in names[:20]) + (f" and {len(names) - 20} more"
                                                                       if len(names) > 20 else "")
            raise OpenAIError(404, f"the model '{body.model}' does not exist; this server serves {served}",
                              param="model", code="model_not_found")
        return body, adapter

    async def start(http: Request, requests: list[GenerateRequest]
                    ) -> tuple[list[AsyncIterator[GenerateChunk]], list[GenerateChunk]]:
        """Open every stream and take its first chunk: validation errors surface here, as 4xx."""
        streams, firsts = [], []
        try:
            for req in requests:
                stream = client.generate(req)
                streams.append(stream)
                firsts.append(await stream.__anext__())
        except BaseException as err:
            for stream in streams:
                await stream.aclose()
            raise to_openai_error(err, request_id_of(http)) from None
        return streams, firsts

    def sampling(body):
        try:
            return body.to_sampling_params(reasoning=settings.reasoning_parser is not None)
        except InvalidRequestError as err:
            raise OpenAIError(400, str(err), param=err.param) from None

    async def respond(http: Request, body, fmt: Format, requests: list[GenerateRequest]):
        """Start the requests' streams, then stream or collect the answer in `fmt`'s shape."""
        timer = RequestTimer(metrics, body.model)
        streams, firsts = await start(http, requests)
        prompt_tokens = sum(first.num_prompt_tokens for first in firsts)
        merged = merge(streams)
        if body.stream:
            async def events():
                outcome = "aborted"
                exclude = None if body.include_usage else {"usage"}
                try:
                    async for item in stream_events(fmt, merged, prompt_tokens, body.include_usage, metrics, timer):
                        yield _sse(item.model_dump(mode="json", exclude=exclude))
                    outcome = "ok"
                except Exception as err:  # noqa: BLE001 - a failure after the 200 goes into the stream
                    outcome = "error"
                    yield _sse(to_openai_error(err, request_id_of(http)).body())
                finally:
                    await merged.aclose()
                    timer.finish(prompt_tokens, outcome)
                yield _sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            answer = await collect(fmt, merged, prompt_tokens, metrics, timer)
        except Exception as err:
            timer.finish(prompt_tokens, "error")
            raise to_openai_error(err, request_id_of(http)) from None
        finally:
            await merged.aclose()
        timer.finish(prompt_tokens, "ok")
        return JSONResponse(answer.model_dump(mode="json"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, adapter = await parse(request, ChatCompletionRequest)
        params = sampling(body)
        request_id = new_id("chatcmpl")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        generate = GenerateRequest(request_id, params, messages=messages, adapter=adapter,
                                   tools=body.tool_definitions(), parse_tool_calls=body.calls_tools)
        return await respond(request, body, ChatFormat(request_id, body.model, now(), params.n), [generate])

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, adapter = await parse(request, CompletionRequest)
        params = sampling(body)
        prompts = body.prompts()
        if not prompts:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        request_id = new_id("cmpl")
        requests = [GenerateRequest(f"{request_id}-{i}", params, prompt=p, adapter=adapter, echo=body.echo)
                    for i, p in enumerate(prompts)]
        return await respond(request, body, CompletionFormat(request_id, body.model, now(), params.n, len(prompts)),
                             requests)

    # ---- the rest ----------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        base = {"id": model_name, "object": "model", "created": 0, "owned_by": "moeray", "root": model_name,
                "parent": None}
        return {"object": "list", "data": [base, *({"id": ref.name, "object": "model", "created": 0,
                                                    "owned_by": "moeray", "root": ref.uri, "parent": model_name}
                                                   for ref in await catalog.listing())]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        authorize_admin(request)
        refuse_while_draining()
        body = await read_json(request, LoadLoraAdapterRequest)
        adapter = await catalog.load(body.lora_name, body.lora_path)
        try:  # the weights too, on one replica, so that a bad adapter is refused here
            await client.prepare_adapter(adapter)
        except Exception as err:
            await catalog.unload(adapter.name)
            raise to_openai_error(err, request_id_of(request)) from None
        logger.info("loaded LoRA adapter %s from %s", adapter.name, adapter.uri)
        return Response(f"Success: LoRA adapter '{adapter.name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        authorize_admin(request)
        body = await read_json(request, UnloadLoraAdapterRequest)
        adapter = await catalog.unload(body.lora_name)
        logger.info("unloaded LoRA adapter %s", adapter.name)
        return Response(f"Success: LoRA adapter '{adapter.name}' removed successfully.", media_type="text/plain")

    @app.get("/health")
    async def health():
        refuse_while_draining()
        try:
            problem = await asyncio.wait_for(client.ready(), timeout=settings.health_timeout_s)
        except Exception as err:  # noqa: BLE001 - a health check that cannot answer is a failed one
            problem = f"the health check did not complete ({type(err).__name__})"
        if problem is not None:
            raise OpenAIError(503, f"not ready: {problem}", type="server_error", code="unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        try:
            metrics.replicas.update(await asyncio.wait_for(client.stats(), timeout=5))
        except Exception:  # noqa: BLE001 - metrics still render from the last snapshots
            pass
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
