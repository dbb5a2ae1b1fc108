"""The OpenAI wire format: request bodies, responses, stream chunks and errors.

Contract: request models ignore unknown fields (as OpenAI does) and check value ranges so that a
bad request is a 400 naming the parameter; `to_sampling_params()` maps a request onto the
engine's `SamplingParams`. Nothing here touches the engine or Ray.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from moeray.engine.params import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams


class OpenAIError(Exception):
    """An error the API reports as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.request_id = request_id  # also in the x-request-id header: the key to the server's log

    def for_request(self, request_id: str) -> OpenAIError:
        """The same error carrying `request_id` (a new one: this one may be raised again)."""
        return OpenAIError(self.status, self.message, self.type, self.param, self.code, self.headers, request_id)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          "request_id": self.request_id}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # Engine extensions that vLLM users expect (not part of OpenAI's API).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise PydanticCustomError("stop_type", "must be a string or a list of strings")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values = dict(n=self.n, max_tokens=max_tokens, stop=stop, seed=self.seed, logprobs=logprobs,
                      ignore_eos=self.ignore_eos)
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return SamplingParams(**values)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        """Content is text, or a list of text parts: this server reads no images, audio or files."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("content_type", "must be a string or a list of text parts")
        for index, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise PydanticCustomError("content_part", "part {index} has type '{kind}': only text parts are "
                                          "supported (this model reads no images, audio or files)",
                                          {"index": index, "kind": kind})
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("content_part", "part {index} needs a 'text' string", {"index": index})
        return value


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(self.max_completion_tokens or self.max_tokens, logprobs)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def token_ids(items) -> bool:
            return isinstance(items, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in items)

        if isinstance(value, str) or token_ids(value):
            return value
        if isinstance(value, list) and (all(isinstance(p, str) for p in value) or all(token_ids(p) for p in value)):
            return value
        raise PydanticCustomError("prompt_type", "must be a string, a list of strings, a list of token ids or a "
                                  "list of token-id lists")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            return [prompt]
        return list(prompt)

    def to_sampling_params(self) -> SamplingParams:
        if self.echo:
            raise OpenAIError(400, "echo is not supported", param="echo")
        return self._sampling(self.max_tokens if self.max_tokens is not None else 16, self.logprobs)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


FinishReason = Literal["stop", "length"]
