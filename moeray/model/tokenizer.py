"""Tokenizer and streaming detokenizer for Hugging Face tokenizer folders.

Contract:
* ``Tokenizer.from_pretrained(folder)`` needs ``tokenizer.json`` (missing -> ``FileNotFoundError``
  naming the full path). Optional ``tokenizer_config.json`` gives ``chat_template`` (a string, or
  ``{"name", "template"}`` entries of which "default" is used; ``chat_template.jinja`` is the
  fallback), bos/eos/pad/unk tokens (strings, AddedToken-like dicts with "content", or null),
  ``add_bos_token`` (False unless true) and ``model_max_length``. Optional ``generation_config.json``
  adds its ``eos_token_id`` (int or list) to ``eos_token_ids``. Malformed JSON -> ``ValueError``
  naming the file and the line.
* ``encode`` prepends bos once when ``add_special_tokens`` and ``add_bos_token`` hold and a bos
  token exists; otherwise it encodes the bare text. ``decode`` skips special tokens by default.
* ``apply_chat_template`` renders like transformers (``chat_template.py``) with ``messages``,
  ``tools``, ``add_generation_prompt``, the special tokens that are set and any extra keywords; a
  conversation with tools under a template without tool support is rendered by moeray's
  DeepSeek-V3-style tool template. A bad message -> ``ValueError`` naming its index.
  ``tokenize=True`` encodes without special tokens: the template already carries bos.
* ``IncrementalDetokenizer`` turns generated ids into text deltas one id at a time; no delta ends
  in a half-decoded UTF-8 character, and each id costs O(1) amortized (a small window is decoded).

No ray or transformers imports: this module runs inside serving replicas and tests alike.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from moeray.model.chat_template import (ChatTemplate, ChatTemplateError, conversation_uses_tools,  # noqa: F401
                                        deepseek_v3_tools, validated_messages)

REPLACEMENT_CHAR = "\ufffd"
# Prompt ids kept as left context for the first generated ids, so that decoders which strip a
# leading space at the start of a decode (SentencePiece-style) see the text that precedes them.
PROMPT_CONTEXT_IDS = 4
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _token_content(value: Any, key: str, source: Path) -> str | None:
    """Special tokens appear as plain strings or as serialized AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} must be a string, an object with a 'content' string, or null")


def _select_chat_template(value: Any, source: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        return named["default"] if isinstance(named.get("default"), str) else None
    raise ValueError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


class Tokenizer:
    """A Hugging Face tokenizer folder: fast tokenizer, special tokens and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, folder: Path, config: dict[str, Any],
                 chat_template: str | None, generation_eos_ids: Iterable[int] = ()) -> None:
        source = folder / "tokenizer_config.json"
        self._backend = backend
        self._folder = folder
        # Only the tokens that are set: transformers leaves unset ones undefined in templates too.
        self._special_tokens: dict[str, str] = {
            key: token for key in SPECIAL_TOKEN_KEYS
            if (token := _token_content(config.get(key), key, source)) is not None}
        self.add_bos_token: bool = config.get("add_bos_token") is True
        max_length = config.get("model_max_length")
        self.model_max_length: int | None = max_length if isinstance(max_length, int) else None
        self._chat_template = chat_template
        self._compiled_template: ChatTemplate | None = None
        self._tool_template: ChatTemplate | None = None
        eos_ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        self._eos_token_ids = frozenset(eos_ids | set(generation_eos_ids))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        folder = Path(path).expanduser().absolute()
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"{tokenizer_file}: cannot be loaded: {err}") from err
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) or {}
        chat_template = _select_chat_template(config.get("chat_template"), config_file)
        template_file = folder / "chat_template.jinja"  # where newer transformers versions save it
        if chat_template is None and template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        generation_file = folder / "generation_config.json"
        generation_eos = (_read_json(generation_file) or {}).get("eos_token_id")
        generation_eos_ids = [generation_eos] if isinstance(generation_eos, int) else generation_eos or []
        if not isinstance(generation_eos_ids, list) or not all(isinstance(i, int) for i in generation_eos_ids):
            raise ValueError(f"{generation_file}: eos_token_id must be an int or a list of ints")
        return cls(backend, folder, config, chat_template, generation_eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        """Token string (as the vocabulary spells it) -> id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer.json document (its model, pre-tokenizer and decoder)."""
        return self._backend.to_str()

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token stands for, so on the characters of text
        per token: a text longer than n * max_token_bytes characters has more than n tokens.
        (A token's vocabulary string is never shorter in UTF-8 than what it decodes to: byte-level
        symbols are one byte each, SentencePiece's U+2581 is three for a space.)"""
        return max(len(token.encode("utf-8")) for token in self.vocabulary())

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_token_id("pad_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def _special_token_id(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return self.token_to_id(token) if token is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        bos_id = self.bos_token_id
        if not (add_special_tokens and self.add_bos_token and bos_id is not None):
            return self._backend.encode(text, add_special_tokens=False).ids
        ids = self._backend.encode(text, add_special_tokens=True).ids
        # The post-processor (or the text itself) may already start with bos: never double it.
        return ids if ids[:1] == [bos_id] else [bos_id, *ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def _template(self) -> ChatTemplate:
        if self._compiled_template is None:
            if self._chat_template is None:
                raise ValueError(f"tokenizer folder {self._folder} has no chat_template "
                                 "(neither in tokenizer_config.json nor in chat_template.jinja)")
            self._compiled_template = ChatTemplate(self._chat_template, f"of {self._folder}")
        return self._compiled_template

    def with_chat_template(self, source: str, where: str) -> Tokenizer:
        """This tokenizer with another chat template (`moeray serve --chat-template FILE`)."""
        other = copy.copy(self)
        other._chat_template, other._compiled_template = source, ChatTemplate(source, where)
        return other

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, tools: list[dict[str, Any]] | None = None,
                            **extra: Any) -> str | list[int]:
        """Render a conversation. When it involves tools and the chat template cannot render
        them, moeray's DeepSeek-V3-style tool template renders it instead."""
        messages = validated_messages(messages)
        template = self._template()
        if conversation_uses_tools(messages, tools) and not template.supports_tools:
            if self._tool_template is None:
                self._tool_template = deepseek_v3_tools()
            template = self._tool_template
        rendered = template.render(messages, tools, add_generation_prompt, **{**self._special_tokens, **extra})
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered


class IncrementalDetokenizer:
    """Streams the text of one request's generated ids without splitting UTF-8 characters.

    Two offsets index the id list: text for ids[prefix:read] has been emitted already; ids from
    read on are pending. Each step decodes only ids[prefix:], so the emitted ids before ``read``
    act as left context (they fix leading-space handling) and the window stays a few ids long.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)[-PROMPT_CONTEXT_IDS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def _emit(self, allow_incomplete: bool) -> str:
        emitted_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset)
        # A trailing U+FFFD means the last id ended inside a multi-byte character: wait for more.
        if window_text.endswith(REPLACEMENT_CHAR) and not allow_incomplete:
            return ""
        delta = window_text[len(emitted_text):]
        # Ids that decode to nothing (skipped special tokens) do not move the window, so the
        # context in front of the next visible id is kept.
        if delta:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._text += delta
        return delta

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(allow_incomplete=False)

    def flush(self) -> str:
        """Emits what is still pending, a trailing U+FFFD included if the ids end mid-character."""
        return self._emit(allow_incomplete=True) if self._read_offset < len(self._ids) else ""
