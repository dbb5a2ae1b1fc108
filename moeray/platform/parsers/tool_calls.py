"""DeepSeek-V3's tool-call markup, parsed out of generated text as it streams.

The markup (what `assets/chat_templates/deepseek_v3_tools.jinja` teaches and
`engine/grammar.py` enforces):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>…<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Contract: `ToolCallParser()` follows one completion. `feed(delta)` returns events: `Content`
(text outside the markup), `CallStarted(index, id, name)` once a call's header is whole,
`Arguments(index, text)` fragments as they arrive; `finish()` returns the rest. When markup
turns out malformed (an unexpected token between calls, a header that is not
`function<sep>NAME`, arguments that are not a JSON object, or the text ending inside a call),
it is text after all: `Malformed(text, first_index)` carries the markup since the last whole
call (all of it when there is none), and a call started in it (index `first_index`) is to be
dropped; whole calls before it stand. `calls` holds the calls completed so far.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from moeray.platform.parsers.holdback import partial_tag_length

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
ARGS_BEGIN, ARGS_END = "\n```json\n", "\n```"
_HEADER = re.compile(r"function" + re.escape(SEP) + r"([A-Za-z0-9_.\-]{1,64})$")
MAX_HEADER_CHARS = 200


@dataclass
class Content:
    text: str


@dataclass
class CallStarted:
    index: int
    id: str
    name: str


@dataclass
class Arguments:
    index: int
    text: str


@dataclass
class Malformed:
    text: str  # the markup, as the plain text it turned out to be
    first_index: int  # calls from this index on were never real


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    calls: list[ToolCall] = field(default_factory=list)
    _state: str = "content"  # content | calls | header | arguments | closing | after
    _pending: str = ""
    _markup: str = ""  # the raw text since CALLS_BEGIN, for a fallback to content
    _first_index: int = 0

    def feed(self, delta: str) -> list:
        self._pending += delta
        events: list = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list:
        events: list = []
        if self._state == "content":
            if self._pending:
                events.append(Content(self._pending))
        elif self._state == "after":
            events += [Content(self._pending)] if self._pending.strip() else []
        elif self._state == "calls" and self._markup == "" and self.calls and not self._pending.strip():
            pass  # whole calls, only the closing tag missing: the model stopped right after them
        else:  # ended inside the markup: it was text
            events.append(self._malformed())
        self._pending = ""
        return events

    # ---- the scanner ------------------------------------------------------------------------
    def _consume(self, count: int) -> str:
        taken, self._pending = self._pending[:count], self._pending[count:]
        if self._state != "content":
            self._markup += taken
        return taken

    def _malformed(self) -> Malformed:
        event = Malformed(self._markup + self._pending, self._first_index)
        del self.calls[self._first_index:]
        self._markup, self._pending, self._state = "", "", "after"
        return event

    def _step(self, events: list) -> bool:
        """Advance over the pending text once; False when more text is needed."""
        state, pending = self._state, self._pending
        if state == "content":
            at = pending.find(CALLS_BEGIN)
            if at == -1:
                keep = partial_tag_length(pending, CALLS_BEGIN)
                if len(pending) > keep:
                    events.append(Content(self._consume(len(pending) - keep)))
                return False
            if at:
                events.append(Content(self._consume(at)))
            self._state, self._first_index = "calls", len(self.calls)
            self._consume(len(CALLS_BEGIN))
            return True
        if state == "calls":  # between calls: another one, or the end
            stripped = pending.lstrip("\n")
            for tag, next_state in ((CALL_BEGIN, "header"), (CALLS_END, "after")):
                if stripped.startswith(tag):
                    self._consume(len(pending) - len(stripped) + len(tag))
                    self._state = next_state
                    if next_state == "after":
                        self._markup = ""
                    return True
            if any(tag.startswith(stripped) for tag in (CALL_BEGIN, CALLS_END)):
                return False
            events.append(self._malformed())
            return False
        if state == "header":
            at = pending.find(ARGS_BEGIN)
            if at == -1:
                if len(pending) > MAX_HEADER_CHARS:
                    events.append(self._malformed())
                return False
            match = _HEADER.fullmatch(pending[:at])
            if match is None:
                events.append(self._malformed())
                return False
            self._consume(at + len(ARGS_BEGIN))
            call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", match.group(1))
            self.calls.append(call)
            events.append(CallStarted(len(self.calls) - 1, call.id, call.name))
            self._state = "arguments"
            return True
        if state == "arguments":
            at = pending.find(ARGS_END + CALL_END)
            if at == -1:
                keep = partial_tag_length(pending, ARGS_END + CALL_END)
                if len(pending) > keep:
                    self._add_arguments(self._consume(len(pending) - keep), events)
                return False
            self._add_arguments(self._consume(at), events)
            self._consume(len(ARGS_END + CALL_END))
            if not _is_json_object(self.calls[-1].arguments):
                events.append(self._malformed())
                return False
            # A whole call: what goes wrong after it no longer unmakes it.
            self._state, self._markup, self._first_index = "calls", "", len(self.calls)
            return True
        if state == "after":  # text after the markup (none is expected) stays content
            if pending.strip():
                events.append(Content(self._consume(len(pending))))
            return False
        raise AssertionError(state)

    def _add_arguments(self, text: str, events: list) -> None:
        if text:
            self.calls[-1].arguments += text
            events.append(Arguments(len(self.calls) - 1, text))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
