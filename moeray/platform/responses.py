"""The OpenAI wire format's responses and stream chunks, as pydantic models.

Contract: each model dumps (`model_dump(mode="json")`) to the JSON OpenAI's API returns, nulls
where OpenAI has them (`finish_reason`, `logprobs`); a stream delta carries only what it has
(`role`, `content`, `reasoning_content`, `tool_calls`), and an assistant message carries
`reasoning_content` and `tool_calls` only when there are some.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_serializer


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    # With speculative decoding: OpenAI's names for predicted tokens that were and were not used.
    completion_tokens_details: dict[str, int] | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, draft_tokens: int = 0,
           accepted_draft_tokens: int = 0) -> Usage:
        details = None
        if draft_tokens:
            details = {"accepted_prediction_tokens": accepted_draft_tokens,
                       "rejected_prediction_tokens": draft_tokens - accepted_draft_tokens}
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details={"cached_tokens": cached_tokens}, completion_tokens_details=details)


# ---- logprobs ---------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class CompletionLogprobs(BaseModel):
    """The legacy completions layout: parallel lists."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token, as OpenAI does
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


# ---- tool calls -------------------------------------------------------------------------------
class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallChunk(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta

    @model_serializer
    def _only_what_it_has(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"], out["type"] = self.id, "function"
        out["function"] = {k: v for k, v in self.function.model_dump().items() if v is not None}
        return out


# ---- chat ---------------------------------------------------------------------------------------
class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer
    def _optional_parts(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None

    @model_serializer
    def _only_what_it_has(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("role", "content", "reasoning_content"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return out


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- completions --------------------------------------------------------------------------------
class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
