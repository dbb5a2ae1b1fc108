"""The OpenAI wire format: request bodies and errors (responses and chunks: `responses.py`).

Contract:
- Request models ignore unknown fields, as OpenAI does, but refuse the OpenAI fields moeray does
  not implement (`audio`, `prediction`, ...) with a 400 naming the field instead of dropping
  them, and check value ranges so that a bad request is a 400 naming the parameter. (A check
  across fields names its parameter in the error's context, `param`.)
- `to_sampling_params(reasoning)` maps a request onto the engine's `SamplingParams`, its
  structured output included: `response_format`, vLLM's `structured_outputs` or its older
  `guided_*` fields, or the grammar of its tools (`tool_choice` required or a named function,
  and `auto`, where the grammar lets free text run until a call begins). At most one of them.
  With a reasoning parser the grammar starts after the reasoning block.
Nothing here touches the engine or Ray.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from moeray.engine.params import MAX_LOGPROBS, MAX_STOP_STRINGS, GrammarSpec, SamplingParams
from moeray.platform.parsers.reasoning import CLOSE as REASONING_END

# OpenAI request fields this server does not implement: refused, never silently dropped.
UNIMPLEMENTED_FIELDS = ("audio", "prediction", "web_search_options", "functions", "function_call",
                        "reasoning_effort", "verbosity", "suffix")
TOOL_MARKUP_FORMAT = "deepseek_v3"


class OpenAIError(Exception):
    """An error the API reports as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.request_id = request_id  # also in the x-request-id header: the key to the server's log

    def __reduce__(self):  # crosses Ray's process boundaries whole (the default pickles only the message)
        return OpenAIError, (self.status, self.message, self.type, self.param, self.code, self.headers,
                             self.request_id)

    def for_request(self, request_id: str) -> OpenAIError:
        """The same error carrying `request_id` (a new one: this one may be raised again)."""
        return OpenAIError(self.status, self.message, self.type, self.param, self.code, self.headers, request_id)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          "request_id": self.request_id}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- structured outputs ---------------------------------------------------------------------------
class JsonSchemaSpec(_Lenient):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(_Lenient):
    type: Literal["text"]


class JsonObjectFormat(_Lenient):
    type: Literal["json_object"]


class JsonSchemaFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(_Lenient):
    """vLLM's `structured_outputs` extra: exactly one of its fields."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, name)]
        if len(given) != 1:
            raise PydanticCustomError("one_structured_output", "give exactly one of json, regex, choice, grammar "
                                      "or json_object")
        return self

    def spec(self, param: str) -> GrammarSpec:
        if self.json_ is not None:
            schema = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
            return GrammarSpec("json_schema", schema, param)
        if self.regex is not None:
            return GrammarSpec("regex", self.regex, param)
        if self.choice is not None:
            return GrammarSpec("choice", json.dumps(self.choice), param)
        if self.grammar is not None:
            return GrammarSpec("grammar", self.grammar, param)
        return GrammarSpec("json_object", "", param)


# ---- tools ------------------------------------------------------------------------------------
class FunctionDefinition(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(_Lenient):
    name: str
    arguments: str


class MessageToolCall(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


# ---- messages ---------------------------------------------------------------------------------
class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

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

    @model_validator(mode="after")
    def _tool_messages_name_their_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("tool_call_id", "a tool message needs the tool_call_id of the call it answers",
                                      {"param": "tool_call_id"})
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "only assistant messages carry tool_calls", {"param": "tool_calls"})
        if self.content is None and not self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("content", "content is required for a {role} message",
                                      {"role": self.role, "param": "content"})
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False


# ---- requests ---------------------------------------------------------------------------------
class _Request(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    store: bool | None = None
    modalities: list[str] | None = None
    # Engine extensions that vLLM users expect (not part of OpenAI's API).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    # Known OpenAI fields that this server does not implement: refused, not ignored.
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    suffix: Any = None

    @field_validator(*UNIMPLEMENTED_FIELDS)
    @classmethod
    def _unimplemented(cls, value: Any, info) -> Any:
        if value is not None:
            hint = " (use tools and tool_choice)" if info.field_name in ("functions", "function_call") else ""
            raise PydanticCustomError("unimplemented", "is not supported by this server{hint}", {"hint": hint})
        return value

    @field_validator("store")
    @classmethod
    def _no_storage(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unimplemented", "this server does not store completions")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value not in (None, ["text"]):
            raise PydanticCustomError("unimplemented", "this server only produces text (modalities: ['text'])")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise PydanticCustomError("stop_type", "must be a string or a list of strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise PydanticCustomError("logit_bias", "keys must be token ids, got '{token}'", {"token": token})
            if not -100 <= bias <= 100:
                raise PydanticCustomError("logit_bias", "biases must be between -100 and 100")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _grammars(self) -> list[tuple[str, GrammarSpec | None]]:
        """Every structured output the request asks for, with the parameter that asked."""
        found: list[tuple[str, GrammarSpec | None]] = []
        if self.response_format is not None and self.response_format.type != "text":
            if isinstance(self.response_format, JsonSchemaFormat):
                spec = self.response_format.json_schema
                found.append(("response_format", GrammarSpec("json_schema", json.dumps(spec.schema_),
                                                             "response_format", strict=spec.strict is not False)))
            else:
                found.append(("response_format", GrammarSpec("json_object", "", "response_format")))
        if self.structured_outputs is not None:
            found.append(("structured_outputs", self.structured_outputs.spec("structured_outputs")))
        for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                text = value if isinstance(value, str) else json.dumps(value)
                found.append((name, GrammarSpec(kind, text, name)))
        return found

    def _structured(self, reasoning: bool) -> GrammarSpec | None:
        found = self._grammars()
        if len(found) > 1:
            raise OpenAIError(400, f"{found[1][0]}: only one structured output per request; {found[0][0]} "
                              f"is set too", param=found[1][0])
        if not found:
            return None
        spec = found[0][1]
        return GrammarSpec(spec.kind, spec.spec, spec.param, spec.strict, REASONING_END if reasoning else None)

    def _sampling(self, max_tokens: int | None, logprobs: int | None, structured: GrammarSpec | None
                  ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values = dict(n=self.n, max_tokens=max_tokens, stop=stop, seed=self.seed, logprobs=logprobs,
                      ignore_eos=self.ignore_eos, structured=structured,
                      logit_bias={int(t): b for t, b in (self.logit_bias or {}).items()})
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return SamplingParams(**values)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise PydanticCustomError("tool_choice", "names function '{name}', which is not among the tools",
                                      {"name": self.tool_choice.function.name, "param": "tool_choice"})
        if self.tool_choice == "required" and not names:
            raise PydanticCustomError("tool_choice", "'required' needs at least one tool", {"param": "tool_choice"})
        if len(set(names)) != len(names):
            raise PydanticCustomError("tools", "tool names must be unique", {"param": "tools"})
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold tool calls (they are then parsed out of the output)."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_definitions(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template reads them (also when tool_choice is 'none')."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def _tool_grammar(self, reasoning: bool) -> GrammarSpec:
        if self.response_format is not None and self.response_format.type != "text" or self._grammars():
            raise OpenAIError(400, "response_format: a structured output cannot be combined with tools; leave "
                              "tool_choice at 'none' or drop response_format", param="response_format")
        choice = self.tool_choice or "auto"
        spec = {"format": TOOL_MARKUP_FORMAT, "tools": self.tool_definitions(),
                "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
                "parallel_tool_calls": self.parallel_tool_calls is not False}
        return GrammarSpec("tool_calls", json.dumps(spec), "tools", start_after=REASONING_END if reasoning else None)

    def to_sampling_params(self, reasoning: bool = False) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        structured = self._tool_grammar(reasoning) if self.calls_tools else self._structured(reasoning)
        return self._sampling(self.max_completion_tokens or self.max_tokens, logprobs, structured)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

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

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            return [prompt]
        return list(prompt)

    def to_sampling_params(self, reasoning: bool = False) -> SamplingParams:
        if self.best_of not in (None, self.n):
            raise OpenAIError(400, "best_of is not supported (other than equal to n)", param="best_of")
        max_tokens = self.max_tokens if self.max_tokens is not None else 16
        params = self._sampling(max_tokens, self.logprobs, self._structured(reasoning=False))
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs  # echo with logprobs scores the prompt (lm-eval's loglikelihood)
        return params


# ---- runtime LoRA adapters (vLLM's admin routes) -----------------------------------------------
class LoadLoraAdapterRequest(_Lenient):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)  # a PEFT adapter folder or s3:// URI


class UnloadLoraAdapterRequest(_Lenient):
    lora_name: str = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
