"""The OpenAI-compatible HTTP API as a FastAPI app over any `ModelClient`.

Contract: `build_openai_app(client, settings)` serves `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health` and `/metrics`. The app never touches an engine: a `ModelClient` hands
it streams of `GenerateChunk`s, either in process (`LocalClient`, tests) or through a Ray Serve
handle (`serve_app`). Every failure a client can cause is an OpenAI error body with the right
status; a stream the client leaves is closed, which aborts the request in its replica.
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

from moeray.engine import InvalidRequestError
from moeray.platform.metrics import RequestTimer, ServingMetrics
from moeray.platform.protocol import (ChatCompletionRequest, CompletionRequest, OpenAIError, new_id, now,
                                      usage)
from moeray.platform.service import GenerateChunk, GenerateRequest, ReplicaService
from moeray.platform.settings import ServeSettings

logger = logging.getLogger(__name__)


class ModelClient(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...

    async def stats(self) -> dict[str, Any] | None: ...


class LocalClient:
    """The replica service in this process (tests, single-process tools)."""

    def __init__(self, service: ReplicaService):
        self.service = service

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        return self.service.generate(request)

    async def stats(self) -> dict[str, Any] | None:
        return self.service.stats().as_dict()


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _translate(err: BaseException) -> OpenAIError:
    """Map exceptions from the model side onto OpenAI errors (Ray wraps them, keeping the class)."""
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, InvalidRequestError):
        return OpenAIError(400, str(err), param=err.param)
    name = type(err).__name__
    if "BackPressure" in name:
        return OpenAIError(503, "the server is at capacity, retry later", type="server_overloaded",
                           code="queue_full")
    if "Unavailable" in name or "Dead" in name or "ActorDied" in name or "ExpertsUnavailable" in str(err):
        return OpenAIError(503, f"the model is unavailable: {err}", type="server_error", code="unavailable")
    logger.exception("request failed", exc_info=err)
    return OpenAIError(500, f"internal error: {name}", type="server_error")


class _Choice:
    """Accumulates one choice of a non-streaming response."""

    def __init__(self):
        self.text, self.tokens, self.logprobs, self.finish_reason = "", 0, None, None

    def add(self, output) -> None:
        self.text += output.text
        self.tokens += len(output.token_ids)
        if output.logprobs is not None:
            self.logprobs = (self.logprobs or []) + output.logprobs
        self.finish_reason = output.finish_reason or self.finish_reason


def _completion_logprobs(entries: list[dict[str, Any]] | None, offset: int) -> dict[str, Any] | None:
    """Chat-style per-token logprobs in the legacy completions layout."""
    if entries is None:
        return None
    offsets, position = [], offset
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


async def _merge(streams: list[AsyncIterator[GenerateChunk]]) -> AsyncIterator[tuple[int, GenerateChunk]]:
    """Interleave several prompt streams as their chunks arrive; closing this closes them all."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, done))
        except BaseException as err:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


def build_openai_app(client: ModelClient, settings: ServeSettings, metrics: ServingMetrics | None = None) -> FastAPI:
    app = FastAPI(title="moeray", description="OpenAI-compatible API for DeepSeek-V3-class MoE models")
    metrics = metrics or ServingMetrics()
    model_name = settings.model_name
    adapters = sorted(settings.lora_adapters)
    keys = [k.encode() for k in settings.api_key_values()]

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, err: OpenAIError):
        headers = dict(err.headers)
        if err.status in (429, 503):
            headers.setdefault("Retry-After", str(settings.retry_after_s))
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        matched = False
        for key in keys:  # compare against every key: the time taken does not reveal which matched
            matched |= hmac.compare_digest(token.strip().encode(), key)
        if scheme.lower() != "bearer" or not matched:
            raise OpenAIError(401, "missing or incorrect API key: send Authorization: Bearer <key>",
                              code="invalid_api_key")

    async def parse(request: Request, model: type[BaseModel]):
        authorize(request)
        try:
            body = model.model_validate_json(await request.body())
        except ValidationError as err:
            problem = err.errors()[0]
            param = ".".join(str(p) for p in problem["loc"]) or None
            if problem["type"] == "json_invalid":
                raise OpenAIError(400, f"request body is not valid JSON: {problem['msg']}") from None
            raise OpenAIError(400, f"{param}: {problem['msg']}" if param else problem["msg"], param=param) from None
        if body.model != model_name and body.model not in adapters:
            served = ", ".join(f"'{name}'" for name in (model_name, *adapters))
            raise OpenAIError(404, f"the model '{body.model}' does not exist; this server serves {served}",
                              param="model", code="model_not_found")
        return body

    def adapter_of(body) -> str | None:
        """The LoRA adapter a request's `model` selects (None: the base model)."""
        return body.model if body.model in adapters else None

    async def start(requests: list[GenerateRequest]) -> tuple[list[AsyncIterator[GenerateChunk]], list[GenerateChunk]]:
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
            raise _translate(err) from None
        return streams, firsts

    def sampling(body):
        try:
            return body.to_sampling_params()
        except InvalidRequestError as err:
            raise OpenAIError(400, str(err), param=err.param) from None

    # ---- chat --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        params = sampling(body)
        request_id = new_id("chatcmpl")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        timer = RequestTimer(metrics, body.model)
        streams, firsts = await start([GenerateRequest(request_id, params, messages=messages,
                                                       adapter=adapter_of(body))])
        stream, prompt_tokens = streams[0], firsts[0].num_prompt_tokens
        created = now()

        def chunk(choices, usage_value=None):
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                       "choices": choices}
            if body.include_usage:
                payload["usage"] = usage_value
            return _sse(payload)

        if body.stream:
            async def events():
                completion_tokens, cached, outcome = 0, 0, "aborted"
                try:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(params.n)])
                    async for part in stream:
                        metrics.replicas.update(part.stats)
                        cached = part.num_cached_tokens
                        for out in part.outputs:
                            completion_tokens += len(out.token_ids)
                            timer.on_tokens(len(out.token_ids))
                            if out.text or out.logprobs:
                                yield chunk([{"index": out.index, "delta": {"content": out.text},
                                              "logprobs": {"content": out.logprobs} if out.logprobs else None,
                                              "finish_reason": None}])
                            if out.finish_reason:
                                yield chunk([{"index": out.index, "delta": {}, "logprobs": None,
                                              "finish_reason": out.finish_reason}])
                    if body.include_usage:
                        yield chunk([], usage(prompt_tokens, completion_tokens, cached))
                    outcome = "ok"
                    yield _sse("[DONE]")
                except Exception as err:  # noqa: BLE001 - a failure after the 200 goes into the stream
                    outcome = "error"
                    yield _sse(_translate(err).body())
                    yield _sse("[DONE]")
                finally:
                    await stream.aclose()
                    timer.finish(prompt_tokens, outcome)
            return StreamingResponse(events(), media_type="text/event-stream")

        choices = [_Choice() for _ in range(params.n)]
        cached = 0
        try:
            async for part in stream:
                metrics.replicas.update(part.stats)
                cached = part.num_cached_tokens
                for out in part.outputs:
                    timer.on_tokens(len(out.token_ids))
                    choices[out.index].add(out)
        except Exception as err:
            timer.finish(prompt_tokens, "error")
            raise _translate(err) from None
        finally:
            await stream.aclose()
        timer.finish(prompt_tokens, "ok")
        return {"id": request_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "logprobs": {"content": c.logprobs} if c.logprobs is not None else None,
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": usage(prompt_tokens, sum(c.tokens for c in choices), cached)}

    # ---- completions ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parse(request, CompletionRequest)
        params = sampling(body)
        prompts = body.prompts()
        if not prompts:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        request_id = new_id("cmpl")
        timer = RequestTimer(metrics, body.model)
        streams, firsts = await start([GenerateRequest(f"{request_id}-{i}", params, prompt=p, adapter=adapter_of(body))
                                       for i, p in enumerate(prompts)])
        prompt_tokens = sum(f.num_prompt_tokens for f in firsts)
        created, n = now(), params.n

        def payload(choices, usage_value=None, streaming=True):
            out = {"id": request_id, "object": "text_completion", "created": created, "model": body.model,
                   "choices": choices}
            if not streaming or body.include_usage:
                out["usage"] = usage_value
            return out

        if body.stream:
            async def events():
                completion_tokens, outcome = 0, "aborted"
                offsets = [0] * (len(prompts) * n)
                merged = _merge(streams)
                try:
                    async for prompt_index, part in merged:
                        metrics.replicas.update(part.stats)
                        for out in part.outputs:
                            index = prompt_index * n + out.index
                            completion_tokens += len(out.token_ids)
                            timer.on_tokens(len(out.token_ids))
                            if out.text or out.finish_reason or out.logprobs:
                                yield _sse(payload([{"index": index, "text": out.text,
                                                     "logprobs": _completion_logprobs(out.logprobs, offsets[index]),
                                                     "finish_reason": out.finish_reason}]))
                            offsets[index] += len(out.text)
                    if body.include_usage:
                        yield _sse(payload([], usage(prompt_tokens, completion_tokens)))
                    outcome = "ok"
                    yield _sse("[DONE]")
                except Exception as err:  # noqa: BLE001
                    outcome = "error"
                    yield _sse(_translate(err).body())
                    yield _sse("[DONE]")
                finally:
                    await merged.aclose()
                    timer.finish(prompt_tokens, outcome)
            return StreamingResponse(events(), media_type="text/event-stream")

        choices = [_Choice() for _ in range(len(prompts) * n)]
        merged = _merge(streams)
        try:
            async for prompt_index, part in merged:
                metrics.replicas.update(part.stats)
                for out in part.outputs:
                    timer.on_tokens(len(out.token_ids))
                    choices[prompt_index * n + out.index].add(out)
        except Exception as err:
            timer.finish(prompt_tokens, "error")
            raise _translate(err) from None
        finally:
            await merged.aclose()
        timer.finish(prompt_tokens, "ok")
        return payload([{"index": i, "text": c.text, "logprobs": _completion_logprobs(c.logprobs, 0),
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                       usage(prompt_tokens, sum(c.tokens for c in choices)), streaming=False)

    # ---- the rest ----------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        base = {"id": model_name, "object": "model", "created": 0, "owned_by": "moeray"}
        return {"object": "list", "data": [base, *({"id": name, "object": "model", "created": 0, "owned_by": "moeray",
                                                    "parent": model_name} for name in adapters)]}

    @app.get("/health")
    async def health():
        try:
            await asyncio.wait_for(client.stats(), timeout=10)
        except Exception as err:  # noqa: BLE001
            raise OpenAIError(503, f"model replicas unavailable: {err}", type="server_error") from None
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        try:
            metrics.replicas.update(await asyncio.wait_for(client.stats(), timeout=5))
        except Exception:  # noqa: BLE001 - metrics still render from the last snapshots
            pass
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
