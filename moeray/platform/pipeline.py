"""One pipeline from the replicas' typed chunks to OpenAI responses.

Contract:
- `merge(streams)` interleaves the streams of a request's prompts (a completions request may
  hold several) as (prompt index, chunk); closing it closes them all.
- A `Format` turns `ChunkOutput`s into the endpoint's shape. Choice `i` of prompt `p` is choice
  `p * n + i`. `opening()` gives the stream's first chunks, `deltas(choice, out)` the chunks of
  one output, `add(choice, out)` accumulates it for a whole response, `whole(usage)` builds it,
  `usage_chunk(usage)` closes a stream that asked for usage. `ChatFormat` and
  `CompletionFormat` differ in nothing else.
- `stream_events` and `collect` drive a Format over the merged streams (the one loop both
  endpoints share) and feed the request's metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from moeray.platform.metrics import RequestTimer, ServingMetrics
from moeray.platform.responses import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                       ChatCompletionChunk, ChatDelta, ChoiceLogprobs, Completion, CompletionChoice,
                                       CompletionLogprobs, FunctionCall, FunctionDelta, TokenLogprobEntry, ToolCall,
                                       ToolCallChunk, TopLogprob, Usage)
from moeray.platform.service import ChunkOutput, GenerateChunk, TokenLogprob


async def merge(streams: list[AsyncIterator[GenerateChunk]]) -> AsyncIterator[tuple[int, GenerateChunk]]:
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


def _entry(logprob: TokenLogprob) -> TokenLogprobEntry:
    return TokenLogprobEntry(token=logprob.token, logprob=logprob.logprob, bytes=logprob.bytes,
                             top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes)
                                           for t in logprob.top_logprobs])


@dataclass
class _Accumulated:
    """One choice of a whole (non-streamed) response, as its outputs arrive."""

    text: str = ""
    reasoning: str = ""
    tool_calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [id, name, arguments]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def add(self, out: ChunkOutput) -> None:
        if out.dropped_tool_calls_from is not None:
            for index in [i for i in self.tool_calls if i >= out.dropped_tool_calls_from]:
                del self.tool_calls[index]
        self.text += out.text
        self.reasoning += out.reasoning
        for delta in out.tool_calls:
            if delta.id is not None:
                self.tool_calls[delta.index] = [delta.id, delta.name or "", ""]
            self.tool_calls[delta.index][2] += delta.arguments
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.finish_reason = out.finish_reason or self.finish_reason


class Format:
    """What an endpoint's responses look like (see the module's contract)."""

    def __init__(self, request_id: str, model: str, created: int, n: int, num_prompts: int = 1):
        self.request_id, self.model, self.created, self.n = request_id, model, created, n
        self.choices = [_Accumulated() for _ in range(n * num_prompts)]

    def add(self, choice: int, out: ChunkOutput) -> None:
        self.choices[choice].add(out)

    def opening(self) -> list:
        return []


class ChatFormat(Format):
    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)

    def opening(self) -> list[ChatCompletionChunk]:
        return [self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                             for i in range(len(self.choices))])]

    def deltas(self, choice: int, out: ChunkOutput) -> list[ChatCompletionChunk]:
        chunks = []
        calls = [ToolCallChunk(index=d.index, id=d.id, function=FunctionDelta(name=d.name, arguments=d.arguments))
                 for d in out.tool_calls]
        if out.text or out.reasoning or calls or out.logprobs:
            delta = ChatDelta(content=out.text or None, reasoning_content=out.reasoning or None, tool_calls=calls or None)
            logprobs = ChoiceLogprobs(content=[_entry(lp) for lp in out.logprobs]) if out.logprobs else None
            chunks.append(self._chunk([ChatChunkChoice(index=choice, delta=delta, logprobs=logprobs)]))
        if out.finish_reason:
            chunks.append(self._chunk([ChatChunkChoice(index=choice, delta=ChatDelta(),
                                                       finish_reason=out.finish_reason)]))
        return chunks

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def whole(self, usage: Usage) -> ChatCompletion:
        choices = []
        for i, c in enumerate(self.choices):
            calls = [ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))
                     for call_id, name, arguments in c.tool_calls.values()]
            message = AssistantMessage(content=c.text if c.text or not calls else None,
                                       reasoning_content=c.reasoning or None, tool_calls=calls or None)
            logprobs = ChoiceLogprobs(content=[_entry(lp) for lp in c.logprobs]) if c.logprobs is not None else None
            choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=c.finish_reason))
        return ChatCompletion(id=self.request_id, created=self.created, model=self.model, choices=choices,
                              usage=usage)


def _legacy_logprobs(entries: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs | None:
    if entries is None:
        return None
    offsets, position = [], offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    tops = [None if e.top_logprobs is None else {t.token: t.logprob for t in e.top_logprobs} for e in entries]
    return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=tops, text_offset=offsets)


class CompletionFormat(Format):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._offsets = [0] * len(self.choices)  # characters streamed per choice (logprobs' text_offset)

    def _completion(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage)

    def deltas(self, choice: int, out: ChunkOutput) -> list[Completion]:
        if not (out.text or out.finish_reason or out.logprobs):
            return []
        chunk = self._completion([CompletionChoice(index=choice, text=out.text, finish_reason=out.finish_reason,
                                                   logprobs=_legacy_logprobs(out.logprobs, self._offsets[choice]))])
        self._offsets[choice] += len(out.text)
        return [chunk]

    def usage_chunk(self, usage: Usage) -> Completion:
        return self._completion([], usage)

    def whole(self, usage: Usage) -> Completion:
        return self._completion([CompletionChoice(index=i, text=c.text, logprobs=_legacy_logprobs(c.logprobs, 0),
                                                  finish_reason=c.finish_reason)
                                 for i, c in enumerate(self.choices)], usage)


@dataclass
class _Counts:
    prompt_tokens: int
    completion_tokens: int = 0
    # Per prompt (a completions request may carry several), the latest of each request's
    # running totals: prompt tokens from the prefix cache, speculative drafts and accepted drafts.
    per_prompt: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def usage(self) -> Usage:
        cached, drafts, accepted = (sum(column) for column in zip(*self.per_prompt.values() or [(0, 0, 0)]))
        return Usage.of(self.prompt_tokens, self.completion_tokens, cached, drafts, accepted)


async def _outputs(merged, fmt: Format, counts: _Counts, metrics: ServingMetrics, timer: RequestTimer):
    """(choice index, output) of every output of the merged streams, counted and timed."""
    async for prompt_index, part in merged:
        metrics.replicas.update(part.stats)
        counts.per_prompt[prompt_index] = (part.num_cached_tokens, part.num_draft_tokens, part.num_accepted_tokens)
        timer.on_queue_time(prompt_index, part.queue_time_s)
        for out in part.outputs:
            counts.completion_tokens += len(out.token_ids)
            timer.on_tokens(len(out.token_ids))
            timer.on_finish_reason(out.finish_reason)
            yield prompt_index * fmt.n + out.index, out


async def stream_events(fmt: Format, merged, prompt_tokens: int, include_usage: bool, metrics: ServingMetrics,
                        timer: RequestTimer) -> AsyncIterator:
    """The response objects of a streamed answer, in order (the HTTP layer writes them as SSE)."""
    counts = _Counts(prompt_tokens)
    for chunk in fmt.opening():
        yield chunk
    async for choice, out in _outputs(merged, fmt, counts, metrics, timer):
        for chunk in fmt.deltas(choice, out):
            yield chunk
    if include_usage:
        yield fmt.usage_chunk(counts.usage())


async def collect(fmt: Format, merged, prompt_tokens: int, metrics: ServingMetrics, timer: RequestTimer):
    """The whole answer, once every stream has ended."""
    counts = _Counts(prompt_tokens)
    async for choice, out in _outputs(merged, fmt, counts, metrics, timer):
        fmt.add(choice, out)
    return fmt.whole(counts.usage())
