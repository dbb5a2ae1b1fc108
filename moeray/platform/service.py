"""What one model replica does for the HTTP layer: templating, validation, streaming, stats.

Contract: `ReplicaService.generate(request)` is an async iterator of `GenerateChunk`s. The first
chunk is yielded right after validation (no tokens yet, but the prompt's token count), so an
invalid request raises `InvalidRequestError` from the first `__anext__`, before the HTTP layer
commits to a 200. Leaving the iteration early aborts the request and frees its cache blocks.
The messages are plain dataclasses: they cross process boundaries (Ray Serve handles) pickled.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from moeray.engine import AsyncEngine, Engine, InvalidRequestError, SamplingParams
from moeray.engine.sampler import TokenLogprobs
from moeray.model.tokenizer import Tokenizer


@dataclass
class GenerateRequest:
    request_id: str
    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # chat: the replica applies the template
    adapter: str | None = None  # a LoRA adapter served beside the base model (the request's `model`)


@dataclass
class ChunkOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None  # OpenAI chat format, one entry per token
    finish_reason: str | None


@dataclass
class GenerateChunk:
    request_id: str
    outputs: list[ChunkOutput]
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool
    stats: dict[str, Any] | None = None  # the replica's engine stats, on the last chunk
    replica_id: str = ""  # which replica answers (logs, and tests of draining and failover)


@dataclass
class ReplicaStats:
    replica_id: str
    num_running: int
    num_waiting: int
    cache_usage: float
    prompt_tokens_total: int
    generation_tokens_total: int
    routed_tokens: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> tokens per expert

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class ReplicaService:
    def __init__(self, engine: Engine | Callable[[], Engine], replica_id: str | None = None):
        # A build function runs on the engine thread (see AsyncEngine: one OpenMP team per process).
        self.async_engine = AsyncEngine(engine)
        self.engine = self.async_engine.engine
        self.tokenizer: Tokenizer = self.engine.tokenizer
        self.replica_id = replica_id or f"pid-{os.getpid()}"

    def _prompt_ids(self, request: GenerateRequest) -> str | list[int]:
        if request.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
            except ValueError as err:
                raise InvalidRequestError(str(err), "messages") from None
            # The template already wrote the special tokens (bos among them).
            return self.engine.tokenize_prompt(text, "messages", add_special_tokens=False)
        if request.prompt is None:
            raise InvalidRequestError("either prompt or messages is required", "prompt")
        return request.prompt

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        prompt = self._prompt_ids(request)
        try:
            stream = await self.async_engine.generate(prompt, request.params, request.request_id, request.adapter)
        except InvalidRequestError as err:
            if request.messages is not None and err.param == "prompt":
                err.param = "messages"
            raise
        num_prompt = len(prompt) if isinstance(prompt, list) else len(self.tokenizer.encode(prompt))
        yield GenerateChunk(request.request_id, [], num_prompt, 0, False, replica_id=self.replica_id)
        async for output in stream:
            chunk = GenerateChunk(request.request_id, [
                ChunkOutput(o.index, o.text, o.token_ids, self._logprobs(o.logprobs), o.finish_reason)
                for o in output.outputs], output.num_prompt_tokens, output.num_cached_tokens, output.finished,
                replica_id=self.replica_id)
            if output.finished:
                chunk.stats = self.stats().as_dict()
            yield chunk

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8", errors="replace"))

    def _logprobs(self, entries: list[TokenLogprobs] | None) -> list[dict[str, Any]] | None:
        if entries is None:
            return None
        out = []
        for entry in entries:
            token, token_bytes = self._token(entry.token_id)
            top = []
            for token_id, logprob in entry.top:
                alt, alt_bytes = self._token(token_id)
                top.append({"token": alt, "logprob": logprob, "bytes": alt_bytes})
            out.append({"token": token, "logprob": entry.logprob, "bytes": token_bytes, "top_logprobs": top})
        return out

    def stats(self) -> ReplicaStats:
        stats = self.engine.stats()
        return ReplicaStats(self.replica_id, stats.num_running, stats.num_waiting, stats.cache.usage,
                            stats.prompt_tokens_total, stats.generation_tokens_total, self.engine.routed_token_counts())

    def shutdown(self) -> None:
        self.async_engine.shutdown()
