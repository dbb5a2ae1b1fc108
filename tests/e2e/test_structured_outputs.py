"""Structured outputs, tool calls and reasoning over HTTP with the official openai client, on the
embedded default model served by the real Serve app (tests/platform/test_parsers.py holds the
parsers' unit tests, tests/engine/test_structured.py the engine's)."""

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from support import deploy, undeploy

pytestmark = pytest.mark.slow
MODEL = "moeray-default"


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    language: str = Field(json_schema_extra={"enum": ["python", "c"]})


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def base(serve_port):
    yield deploy({"engine": {"max_model_len": 2048}}, "/structured", serve_port, "structured")
    undeploy("structured")


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def test_parse_with_a_pydantic_model_returns_the_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A person:"}],
                                               response_format=Person, max_tokens=120, temperature=0.8, seed=1)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and completion.choices[0].finish_reason == "stop"
    assert person.language in ("python", "c") and 0 <= person.age <= 120


def test_a_streamed_json_schema_answer_validates(client):
    schema = Person.model_json_schema()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person:"}], max_tokens=120, stream=True, seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"regex": r"[a-z]{4}\d{2}"}}, lambda t: len(t) == 6 and t[:4].isalpha() and t[4:].isdigit()),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
    # Bounded: an unbounded integer lets a model write digits up to max_tokens.
    ({"guided_json": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
                      "required": ["n"]}},
     lambda t: 0 <= json.loads(t)["n"] <= 999),
], ids=["regex", "choice", "guided_choice", "guided_json"])
def test_vllm_style_extras_constrain_completions_too(client, extra, check):
    for n in (1, 3):
        completion = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40, n=n, seed=2,
                                               extra_body=extra)
        assert all(check(choice.text) for choice in completion.choices), [c.text for c in completion.choices]


def test_json_object_mode_with_logprobs_and_max_tokens_cut(client):
    cut = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                         max_tokens=3, logprobs=True, top_logprobs=2)
    choice = cut.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert len(choice.logprobs.content) == 3


def arguments_of(call, tool) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_carry_valid_arguments_streamed_and_not(client, tool_choice):
    # One call (parallel_tool_calls off): a random model would otherwise add calls up to max_tokens.
    options = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=200, tool_choice=tool_choice, seed=5,
                   parallel_tool_calls=False)
    response = client.chat.completions.create(**options)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        arguments_of(call, tool)
        assert call.id.startswith("call_") and call.type == "function"
    assert len(choice.message.tool_calls) == 1
    if isinstance(tool_choice, dict):
        assert choice.message.tool_calls[0].function.name == "get_weather"

    stream = client.chat.completions.create(**options, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.id:
                calls[delta.index] = [delta.id, delta.function.name, ""]
            calls[delta.index][2] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(name, json.loads(args)) for _, name, args in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]


def test_parallel_tool_calls_may_be_several(client):
    # The default model learned to end after one call. A newline is what the grammar takes after a
    # call to start another one (ending the list is markup it can also spell out byte by byte), so
    # a strong bias towards it gives several calls, each parsed whole with its own id; the one cut
    # by max_tokens is dropped.
    from moeray.model.tokenizer import Tokenizer
    from moeray.platform.default_model import DEFAULT_MODEL_DIR

    newline = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR).vocabulary()["Ċ"]  # byte-level BPE's "\n"
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=200,
                                              tool_choice="required", seed=5, logit_bias={str(newline): 30})
    calls = response.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({call.id for call in calls}) == len(calls), response
    for call in calls:
        arguments_of(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])


def test_a_tool_result_turn_is_accepted(client):
    call = {"id": "call_abc", "type": "function", "function": {"name": "get_weather",
                                                                "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees, sunny"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=16)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert response.usage.prompt_tokens > 100  # the tool list, the call and its result were all rendered


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"store": True}, "store"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0]"),
])
def test_bad_structured_and_unimplemented_inputs_are_400_naming_the_field(base, body, param):
    response = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4,
                                                               **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] and error["param"].startswith(param) and "/project/cpp" not in error["message"], error


def test_unknown_non_openai_fields_stay_ignored(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                              extra_body={"some_future_field": {"x": 1}})
    assert response.choices[0].finish_reason in ("stop", "length")


def test_a_chat_template_override_that_opens_reasoning_in_the_prompt(deployed, tmp_path):
    """--chat-template with a template that writes <think> after the assistant tag (as DeepSeek-R1's
    does): the answer starts inside the reasoning block, which this random model never closes, so
    it is all reasoning_content, and a response_format grammar, which starts after the block, never
    constrains it."""
    from moeray.platform.default_model import DEFAULT_MODEL_DIR

    config = json.loads((DEFAULT_MODEL_DIR / "tokenizer_config.json").read_text())
    template = config["chat_template"].replace("{{ '<｜Assistant｜>' }}{% endif %}",
                                               "{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
    assert template != config["chat_template"]
    (tmp_path / "thinking.jinja").write_text(template)
    base = deployed({"engine": {"max_model_len": 2048}, "reasoning_parser": "deepseek_r1",
                     "chat_template": str(tmp_path / "thinking.jinja")}, "/thinking", "thinking")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    for extra in ({}, {"response_format": {"type": "json_object"}}):
        message = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                                 **extra).choices[0].message
        assert message.reasoning_content and not message.content
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == message.reasoning_content
