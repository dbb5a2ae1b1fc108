"""The reasoning and tool-call parsers over every way a stream can split their text: in two at
each position, and one character at a time (a tag split across tokens anywhere)."""

import json

import pytest

from moeray.platform.parsers.reasoning import ReasoningParser, prompt_opens_reasoning
from moeray.platform.parsers.tool_calls import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, Arguments,
                                                CallStarted, Content, Malformed, ToolCallParser)


def splits(text: str):
    """Every way to cut `text` in two, and the character-by-character stream."""
    for at in range(len(text) + 1):
        yield [text[:at], text[at:]]
    yield list(text)


def reasoning_of(deltas: list[str], starts_inside: bool = False) -> tuple[str, str]:
    parser, reasoning, content = ReasoningParser(starts_inside), "", ""
    for delta in deltas:
        r, c = parser.feed(delta)
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize("text, starts_inside, expected", [
    ("<think>\nLet me see.\n</think>\n\nIt is 4.", False, ("\nLet me see.\n", "It is 4.")),
    ("Let me see.</think>It is 4.", True, ("Let me see.", "It is 4.")),  # the template opened the block
    ("It is 4, no thinking.", False, ("", "It is 4, no thinking.")),
    ("<think>still thinking", False, ("still thinking", "")),
    ("  <think>a<b</think>x</thin", False, ("a<b", "x</thin")),
])
def test_reasoning_is_split_out_however_the_text_arrives(text, starts_inside, expected):
    for deltas in splits(text):
        assert reasoning_of(deltas, starts_inside) == expected, deltas


def test_a_prompt_that_opens_the_block_is_recognised():
    assert prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<think>old</think><｜Assistant｜>")
    assert not prompt_opens_reasoning("<｜Assistant｜>")


def markup(*calls: tuple[str, str]) -> str:
    inner = "\n".join(f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}" for name, args in calls)
    return f"{CALLS_BEGIN}{inner}{CALLS_END}"


def parse(deltas: list[str]) -> tuple[str, list[tuple[str, str]], list]:
    """(content, [(name, arguments)] as streamed, all events) of one stream."""
    parser, events = ToolCallParser(), []
    for delta in deltas:
        events += parser.feed(delta)
    events += parser.finish()
    content, calls = "", {}
    for event in events:
        if isinstance(event, Content):
            content += event.text
        elif isinstance(event, CallStarted):
            calls[event.index] = [event.name, ""]
        elif isinstance(event, Arguments):
            calls[event.index][1] += event.text
        elif isinstance(event, Malformed):
            for index in [i for i in calls if i >= event.first_index]:
                del calls[index]
            content += event.text
    assert [(c.name, c.arguments) for c in parser.calls] == [tuple(v) for v in calls.values()]
    return content, [tuple(v) for v in calls.values()], events


WEATHER = '{"city": "Paris", "unit": "celsius"}'
TIME = '{"zone": "CET"}'


@pytest.mark.parametrize("text, content, calls", [
    ("Let me check. " + markup(("get_weather", WEATHER)), "Let me check. ", [("get_weather", WEATHER)]),
    (markup(("get_weather", WEATHER), ("get_time", TIME)), "", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
    (markup(("get_weather", WEATHER))[:-len(CALLS_END)], "", [("get_weather", WEATHER)]),  # no closing tag
])
def test_tool_calls_are_parsed_however_the_text_arrives(text, content, calls):
    for deltas in splits(text):
        assert parse(deltas)[:2] == (content, calls), deltas


@pytest.mark.parametrize("text", [
    CALLS_BEGIN + CALL_BEGIN + "method" + SEP + "x\n```json\n{}\n```" + CALL_END + CALLS_END,  # not a function
    markup(("get_weather", '{"city": ')),  # arguments that are not JSON
    markup(("get_weather", "[1, 2]")),  # not an object
    markup(("get_weather", WEATHER))[:60],  # cut inside the call (max_tokens)
    CALLS_BEGIN + "oops, not a call",
])
def test_malformed_markup_is_plain_content(text):
    for deltas in splits(text):
        content, calls, events = parse(deltas)
        assert calls == [] and content == text, deltas


def test_arguments_stream_as_they_arrive_and_each_call_gets_an_id():
    text = markup(("get_weather", WEATHER), ("get_time", TIME))
    _, _, events = parse(list(text))
    started = [e for e in events if isinstance(e, CallStarted)]
    assert [e.name for e in started] == ["get_weather", "get_time"] and len({e.id for e in started}) == 2
    fragments = [e for e in events if isinstance(e, Arguments) and e.index == 0]
    assert len(fragments) > 5 and json.loads("".join(e.text for e in fragments)) == json.loads(WEATHER)


def test_a_cut_after_whole_calls_keeps_them_and_makes_the_rest_text():
    whole = markup(("get_weather", WEATHER), ("get_time", TIME))
    cut = whole[:whole.rindex(CALL_BEGIN) + 20]  # inside the second call's header
    rest = cut[cut.rindex("\n" + CALL_BEGIN):]
    for deltas in splits(cut):
        assert parse(deltas)[:2] == (rest, [("get_weather", WEATHER)]), deltas
