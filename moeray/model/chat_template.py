"""Chat templates: rendered as transformers renders them, plus moeray's own tool template.

Contract:
- `ChatTemplate(source, where)` compiles a Jinja chat template the way transformers does
  (immutable sandbox, trim/lstrip blocks, loop controls, `raise_exception`, `strftime_now`, a
  non-escaping `tojson`); a template that does not compile is a `ChatTemplateError` naming
  `where` and the line. `render(messages, ...)` passes `messages`, `tools` (as
  `apply_chat_template(tools=...)` does), `add_generation_prompt` and any extra keywords.
- `supports_tools` says whether a template can render tool calls; `conversation_uses_tools`
  whether a conversation has tool parts (offered tools, calls, results).
- `DEEPSEEK_V3_TOOLS` is moeray's DeepSeek-V3-style template (assets/chat_templates): tools in
  the system prompt, calls in DeepSeek-V3's markup (what `platform/parsers/tool_calls.py`
  parses and `engine/grammar.py` constrains), results in its tool-output markup.
- Messages are validated first: an error names the message's index and field.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

TOOL_TEMPLATE_FILE = Path(__file__).resolve().parent.parent / "assets" / "chat_templates" / "deepseek_v3_tools.jinja"


class ChatTemplateError(jinja2.exceptions.TemplateError, ValueError):
    """A chat template failed: it called raise_exception(), or it does not compile."""


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes HTML characters and non-ASCII text; templates written for
    # transformers expect plain json.dumps output instead.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _text_of(content: Any, where: str) -> str | None:
    """A message's content as text: a string, a list of text parts joined, or None."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise ValueError(f"{where}.content must be a string or a list of text parts")


def _validated_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ValueError(f"{where}.tool_calls must be a list of tool calls")
    validated = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}.tool_calls[{i}] needs a function with a name")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise ValueError(f"{where}.tool_calls[{i}].function.arguments must be a JSON string")
        validated.append({**call, "type": call.get("type", "function"),
                          "function": {**function, "arguments": arguments}})
    return validated


def validated_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as templates expect them (text content, tool calls checked), naming what is wrong."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list of {role, content} objects")
    validated = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{where}.role must be a string")
        content = _text_of(message.get("content"), where)
        checked = {**message, "content": content}
        if message.get("tool_calls"):
            checked["tool_calls"] = _validated_tool_calls(message["tool_calls"], where)
        elif content is None:
            if message["role"] != "assistant":
                raise ValueError(f"{where}.content must be a string or a list of text parts")
            checked["content"] = ""
        validated.append(checked)
    return validated


class ChatTemplate:
    def __init__(self, source: str, where: str):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source, self.where = source, where
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ChatTemplateError(f"chat template {where} does not compile: line {err.lineno}: "
                                    f"{err.message}") from err

    @property
    def supports_tools(self) -> bool:
        """Whether the template can render a tool-calling conversation: it reads tool calls. (A
        template that only lists `tools` has no way to write the calls the model then makes, so
        a conversation's prefixes and the whole would render differently.)"""
        return "tool_calls" in self.source


    def render(self, messages: list[dict[str, Any]], tools: list | None = None, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **extra)


def conversation_uses_tools(messages: list[dict[str, Any]], tools: list | None) -> bool:
    """Tools are offered, or an assistant message calls one, or a tool message answers one."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def deepseek_v3_tools() -> ChatTemplate:
    """moeray's DeepSeek-V3-style tool template."""
    return ChatTemplate(TOOL_TEMPLATE_FILE.read_text(encoding="utf-8"), str(TOOL_TEMPLATE_FILE))
