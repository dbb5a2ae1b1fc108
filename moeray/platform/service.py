"""What one model replica does for the HTTP layer: templating, validation, parsing, streaming, stats.

Contract: `ReplicaService.generate(request)` is an async iterator of `GenerateChunk`s. The first
chunk is yielded right after validation (no tokens yet, but the prompt's token count), so an
invalid request raises `InvalidRequestError` from the first `__anext__`, before the HTTP layer
commits to a 200. Leaving the iteration early aborts the request and frees its cache blocks.
Each choice's text goes through the reasoning parser (when the replica has one) and, for a
request that may call tools, the tool-call parser; a chunk carries the typed results (content,
reasoning, tool-call deltas, logprobs), never wire-format dicts. A choice that ends with whole
tool calls finishes with `tool_calls`. The messages are plain dataclasses: they cross process
boundaries (Ray Serve handles) pickled.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from moeray.engine import AsyncEngine, Engine, InvalidRequestError, SamplingParams
from moeray.engine.sampler import TokenLogprobs
from moeray.model.tokenizer import Tokenizer
from moeray.platform.adapters import AdapterRef, CatalogClient, ResidentAdapters
from moeray.platform.parsers.reasoning import ReasoningParser, prompt_opens_reasoning
from moeray.platform.parsers.tool_calls import Arguments, CallStarted, Content, Malformed, ToolCallParser


@dataclass
class GenerateRequest:
    request_id: str
    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # chat: the replica applies the template
    adapter: AdapterRef | None = None  # a LoRA adapter served beside the base model (the request's `model`)
    tools: list[dict[str, Any]] | None = None  # tool definitions, for the chat template
    parse_tool_calls: bool = False  # the output may hold tool calls: parse them out
    echo: bool = False  # completions: every choice starts with the prompt (and its logprobs, if asked)


@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass
class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] | None  # None with logprob None: an echoed prompt's first token


@dataclass
class ToolCallDelta:
    """A piece of one tool call: its header (id, name) once, then fragments of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ChunkOutput:
    index: int
    text: str  # content
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # Markup that turned out to be text (now in `text`): calls from this index on were not real.
    dropped_tool_calls_from: int | None = None


@dataclass
class GenerateChunk:
    request_id: str
    outputs: list[ChunkOutput]
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool
    stats: dict[str, Any] | None = None  # the replica's engine stats, on the last chunk
    replica_id: str = ""  # which replica answers (logs, and tests of draining and failover)
    num_draft_tokens: int = 0  # speculative decoding so far: drafts verified, and of those accepted
    num_accepted_tokens: int = 0
    queue_time_s: float | None = None  # arrival to the first step that ran the prompt, once known


@dataclass
class ReplicaStats:
    replica_id: str
    num_running: int
    num_waiting: int
    cache_usage: float
    prompt_tokens_total: int
    generation_tokens_total: int
    routed_tokens: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> tokens per expert
    # Speculative decoding since start (zeros without it): drafts proposed, accepted, verifications.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verify_steps: int = 0
    cached_prompt_tokens_total: int = 0
    preemptions_total: int = 0
    grammar_compiles_total: int = 0
    grammar_compile_seconds_total: float = 0.0
    # With expert shards: layer -> expert -> the shard serving it, and shard -> answering.
    expert_shards: dict[int, list[int]] = field(default_factory=dict)
    shard_health: dict[int, bool] = field(default_factory=dict)
    lora_adapters: list[str] = field(default_factory=list)  # the adapters this replica holds now
    lora_loads_total: int = 0  # adapters loaded since start (configured ones not counted), and evicted
    lora_evictions_total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class _ChoiceParsers:
    """One choice's reasoning and tool-call parsers, turning text deltas into a ChunkOutput."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None):
        self.reasoning, self.tools = reasoning, tools

    def output(self, index: int, text: str, token_ids: list[int], logprobs, finish_reason: str | None) -> ChunkOutput:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        if finish_reason is not None and self.reasoning is not None:
            more_reasoning, more_content = self.reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        out = ChunkOutput(index, content, token_ids, logprobs, finish_reason, reasoning)
        if self.tools is None:
            return out
        events = self.tools.feed(content)
        if finish_reason is not None:
            events += self.tools.finish()
        out.text = ""
        for event in events:
            if isinstance(event, Content):
                out.text += event.text
            elif isinstance(event, CallStarted):
                out.tool_calls.append(ToolCallDelta(event.index, event.id, event.name))
            elif isinstance(event, Arguments):
                out.tool_calls.append(ToolCallDelta(event.index, arguments=event.text))
            elif isinstance(event, Malformed):
                out.text += event.text
                out.tool_calls = [d for d in out.tool_calls if d.index < event.first_index]
                out.dropped_tool_calls_from = event.first_index
        if finish_reason == "stop" and self.tools.calls:
            out.finish_reason = "tool_calls"
        return out


class ReplicaService:
    def __init__(self, engine: Engine | Callable[[], Engine], replica_id: str | None = None,
                 reasoning_parser: str | None = None, experts: Any = None, max_loras: int = 4,
                 configured_adapters: list[AdapterRef] = (), catalog: CatalogClient | None = None):
        """`configured_adapters`: the engine's adapters from its build (named by their engine key);
        `catalog`: the app's, which the replica follows to drop unloaded adapters."""
        # A build function runs on the engine thread (see AsyncEngine: one OpenMP team per process).
        self.async_engine = AsyncEngine(engine)
        self.engine = self.async_engine.engine
        self.adapters = ResidentAdapters(self.async_engine, max_loras, list(configured_adapters), catalog)
        self.tokenizer: Tokenizer = self.engine.tokenizer
        self.replica_id = replica_id or f"pid-{os.getpid()}"
        self.reasoning_parser = reasoning_parser  # "deepseek_r1" or None
        self.experts = experts  # the engine's ShardedExperts, for the stats of its shards; None: local experts

    def _prompt(self, request: GenerateRequest) -> tuple[str | list[int], bool]:
        """(prompt ids or text, whether the prompt leaves a reasoning block open)."""
        if request.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True,
                                                          tools=request.tools)
            except ValueError as err:
                raise InvalidRequestError(str(err), "messages") from None
            # The template already wrote the special tokens (bos among them).
            return self.engine.tokenize_prompt(text, "messages", add_special_tokens=False), prompt_opens_reasoning(text)
        if request.prompt is None:
            raise InvalidRequestError("either prompt or messages is required", "prompt")
        return request.prompt, False

    def _parsers(self, request: GenerateRequest, opens_reasoning: bool) -> list[_ChoiceParsers]:
        chat = request.messages is not None
        return [_ChoiceParsers(ReasoningParser(opens_reasoning) if chat and self.reasoning_parser else None,
                               ToolCallParser() if request.parse_tool_calls else None)
                for _ in range(request.params.n)]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if request.adapter is None:
            async for chunk in self._generate(request, None):
                yield chunk
            return
        adapter = await self.adapters.acquire(request.adapter)
        try:
            async for chunk in self._generate(request, adapter):
                yield chunk
        finally:
            self.adapters.release(adapter)

    async def _generate(self, request: GenerateRequest, adapter: str | None) -> AsyncIterator[GenerateChunk]:
        prompt, opens_reasoning = self._prompt(request)
        try:
            stream = await self.async_engine.generate(prompt, request.params, request.request_id, adapter)
        except InvalidRequestError as err:
            if request.messages is not None and err.param == "prompt":
                err.param = "messages"
            raise
        parsers = self._parsers(request, opens_reasoning)
        num_prompt = len(prompt) if isinstance(prompt, list) else len(self.tokenizer.encode(prompt))
        yield GenerateChunk(request.request_id, [], num_prompt, 0, False, replica_id=self.replica_id)
        echo = request.echo
        async for output in stream:
            chunk = GenerateChunk(request.request_id, [
                parsers[o.index].output(o.index, o.text, o.token_ids, self._logprobs(o.logprobs), o.finish_reason)
                for o in output.outputs], output.num_prompt_tokens, output.num_cached_tokens, output.finished,
                replica_id=self.replica_id, num_draft_tokens=output.num_draft_tokens,
                num_accepted_tokens=output.num_accepted_tokens, queue_time_s=output.queue_time_s)
            if echo:  # the first output: every choice starts with the prompt
                chunk.outputs[:0] = self._echo(prompt, output.prompt_logprobs, request.params.n)
                echo = False
            if output.finished:
                chunk.stats = self.stats().as_dict()
            yield chunk

    def _echo(self, prompt: str | list[int], entries, n: int) -> list[ChunkOutput]:
        """The prompt as the start of each of the n choices. Its tokens' texts leave special tokens
        out (an empty string for bos), so that text offsets index the echoed text."""
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=True)
        logprobs = None
        if entries is not None:
            logprobs = []
            for entry, token_id in zip(entries, self.engine.tokenize_prompt(prompt) if isinstance(prompt, str)
                                       else prompt):
                token = self.tokenizer.decode([token_id], skip_special_tokens=True)
                token_bytes = list(token.encode("utf-8", errors="replace"))
                if entry is None:
                    logprobs.append(TokenLogprob(token, None, token_bytes, None))
                    continue
                top = []
                for alternative_id, value in entry.top:
                    alternative, alternative_bytes = self._token(alternative_id)
                    top.append(TopLogprob(alternative, value, alternative_bytes))
                logprobs.append(TokenLogprob(token, entry.logprob, token_bytes, top))
        return [ChunkOutput(i, text, [], logprobs, None) for i in range(n)]

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8", errors="replace"))

    def _logprobs(self, entries: list[TokenLogprobs] | None) -> list[TokenLogprob] | None:
        if entries is None:
            return None
        out = []
        for entry in entries:
            token, token_bytes = self._token(entry.token_id)
            top = []
            for token_id, logprob in entry.top:
                alternative, alternative_bytes = self._token(token_id)
                top.append(TopLogprob(alternative, logprob, alternative_bytes))
            out.append(TokenLogprob(token, entry.logprob, token_bytes, top))
        return out

    def stats(self) -> ReplicaStats:
        stats = self.engine.stats()
        spec = stats.speculative
        expert_shards, shard_health = self.experts.shard_view() if self.experts is not None else ({}, {})
        return ReplicaStats(
            self.replica_id, stats.num_running, stats.num_waiting, stats.cache.usage, stats.prompt_tokens_total,
            stats.generation_tokens_total, self.engine.routed_token_counts(),
            spec_draft_tokens=spec.draft_tokens if spec else 0, spec_accepted_tokens=spec.accepted_tokens if spec else 0,
            spec_verify_steps=spec.verify_steps if spec else 0,
            cached_prompt_tokens_total=stats.cached_prompt_tokens_total, preemptions_total=stats.preemptions_total,
            grammar_compiles_total=stats.grammar_compiles_total,
            grammar_compile_seconds_total=stats.grammar_compile_seconds_total,
            expert_shards=expert_shards, shard_health=shard_health, lora_adapters=self.adapters.names,
            lora_loads_total=self.adapters.loads_total, lora_evictions_total=self.adapters.evictions_total)

    def shutdown(self) -> None:
        self.async_engine.shutdown()
