"""Tests for moeray.model.tokenizer against a tiny byte-level BPE tokenizer built on the fly.

transformers is used only as the reference renderer for chat templates.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from moeray.model.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

from support import (ASSISTANT, BOS, CORPUS, DEEPSEEK_STYLE_TEMPLATE, EOS, ROUND_TRIP_TEXTS, USER,
                     write_tiny_tokenizer)


def _update_config(folder: Path, **changes: Any) -> None:
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None and key == "chat_template":
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_folder: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def reference_tokenizer(tiny_folder: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_folder))


# ---------------------------------------------------------------- loading and special tokens


def test_special_tokens_and_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.bos_token == BOS
    assert tokenizer.eos_token == EOS
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    # BpeTrainer puts the special tokens first, in order.
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.token_to_id(USER) == 2 and tokenizer.id_to_token(3) == ASSISTANT
    assert tokenizer.eos_token_ids == frozenset({1})
    assert tokenizer.add_bos_token is True
    assert tokenizer.model_max_length == 4096
    assert tokenizer.vocab_size == 400
    assert tokenizer.chat_template == DEEPSEEK_STYLE_TEMPLATE


def test_accepts_str_path(tiny_folder: Path) -> None:
    assert Tokenizer.from_pretrained(str(tiny_folder)).bos_token_id == 0


def test_generation_config_extends_stop_ids(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == frozenset({1, 3})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == frozenset({1, 2})


def test_missing_tokenizer_json_names_full_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as excinfo:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path.absolute() / "tokenizer.json") in str(excinfo.value)


def test_malformed_config_names_file_and_line(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{\n  "bos_token": "<s>",\n  "eos_token": oops\n}\n')
    with pytest.raises(ValueError) as excinfo:
        Tokenizer.from_pretrained(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "tokenizer_config.json") in message
    assert "line 3" in message


def test_config_is_optional(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    bare = Tokenizer.from_pretrained(tmp_path)
    assert bare.bos_token is None and bare.chat_template is None and bare.add_bos_token is False
    assert bare.encode("hi") == bare.encode("hi", add_special_tokens=False)


def test_named_chat_templates_pick_default(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    _update_config(tmp_path, chat_template=[{"name": "tool_use", "template": "tools!"},
                                            {"name": "default", "template": "default!"}])
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "default!"


def test_chat_template_jinja_file_is_a_fallback(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    _update_config(tmp_path, chat_template=None)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "x"


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == BOS + text
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]


def test_bos_added_once(tokenizer: Tokenizer, tmp_path: Path) -> None:
    assert tokenizer.encode(BOS + "hello").count(tokenizer.bos_token_id) == 1
    # A post-processor that already prepends bos must not lead to a second one.
    write_tiny_tokenizer(tmp_path)
    backend = BackendTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    with_processor = Tokenizer.from_pretrained(tmp_path)
    assert with_processor.encode("hello") == tokenizer.encode("hello")


def test_no_bos_unless_config_asks(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    _update_config(tmp_path, add_bos_token=False)
    plain = Tokenizer.from_pretrained(tmp_path)
    assert plain.encode("hello") == plain.encode("hello", add_special_tokens=False)
    assert 0 not in plain.encode("hello")


# ---------------------------------------------------------------- chat template

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello!"}],
    "with_system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    "multi_turn": [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Experts wake and route\ntokens flow"},
        {"role": "user", "content": "Now in 中文, with 🚀."},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "def f(x):\n    return x"},
        {"role": "assistant", "content": "C'est une fonction identité."},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tokenizer: Tokenizer, reference_tokenizer: Any, name: str,
                                            add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[name]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = reference_tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    last = messages[-1]
    expected_end = ASSISTANT if add_generation_prompt else EOS if last["role"] == "assistant" else last["content"]
    assert rendered.startswith(BOS) and rendered.endswith(expected_end)

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected_ids = reference_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                           add_generation_prompt=add_generation_prompt)
    assert ids == list(expected_ids)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_extra_variables_and_tojson_match_transformers(tokenizer: Tokenizer, reference_tokenizer: Any) -> None:
    tools = [{"name": "météo", "description": "天气 lookup", "parameters": {"city": "string"}}]
    messages = CONVERSATIONS["single_user"]
    rendered = tokenizer.apply_chat_template(messages, tools=tools)
    assert rendered == reference_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                               add_generation_prompt=True)
    assert '"météo"' in rendered and "天气" in rendered  # no \\u escapes, as json.dumps(ensure_ascii=False)


def test_text_parts_are_joined(tokenizer: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]}]
    plain = [{"role": "user", "content": "Hello there"}]
    assert tokenizer.apply_chat_template(parts) == tokenizer.apply_chat_template(plain)


@pytest.mark.parametrize("bad_message, field", [
    ("just a string", "messages[2] "),
    ({"content": "no role"}, "messages[2].role"),
    ({"role": 7, "content": "x"}, "messages[2].role"),
    ({"role": "user"}, "messages[2].content must be a string or a list of text parts"),
    ({"role": "user", "content": None}, "messages[2].content must be a string or a list of text parts"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}, "messages[2].content"),
])
def test_bad_message_names_its_index(tokenizer: Tokenizer, bad_message: Any, field: str) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, bad_message]
    with pytest.raises(ValueError) as excinfo:
        tokenizer.apply_chat_template(messages)
    assert field in str(excinfo.value)


def test_raise_exception_in_template(tokenizer: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unsupported role: narrator") as excinfo:
        tokenizer.apply_chat_template([{"role": "narrator", "content": "42"}])
    assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, jinja2.TemplateError)


def test_missing_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    _update_config(tmp_path, chat_template=None)
    bare = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no chat_template") as excinfo:
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(tmp_path) in str(excinfo.value)


def test_template_syntax_error_is_reported(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    _update_config(tmp_path, chat_template="{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_strftime_now_and_compiled_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_tokenizer(tmp_path)
    _update_config(tmp_path, chat_template="{{ strftime_now('%Y') }}|{{ messages | length }}")
    dated = Tokenizer.from_pretrained(tmp_path)
    compiled = []
    original_from_string = jinja2.sandbox.ImmutableSandboxedEnvironment.from_string

    def counting_from_string(self: Any, *args: Any, **kwargs: Any) -> Any:
        compiled.append(args[0])
        return original_from_string(self, *args, **kwargs)

    monkeypatch.setattr(jinja2.sandbox.ImmutableSandboxedEnvironment, "from_string", counting_from_string)
    for _ in range(3):
        assert dated.apply_chat_template([{"role": "user", "content": "x"}]) == f"{datetime.now():%Y}|1"
    assert len(compiled) == 1


# ---------------------------------------------------------------- incremental detokenizer


def _stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.add(token_id) for token_id in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_incremental_detokenizer_never_splits_characters(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("Prompt:"))
    deltas = _stream(detokenizer, ids)
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids) == text


def test_multibyte_text_really_splits_inside_characters(tokenizer: Tokenizer) -> None:
    # Guards the test above: with this tiny vocabulary, emoji bytes span several ids.
    ids = tokenizer.encode("👍🏽 👨‍👩‍👧", add_special_tokens=False)
    assert any(tokenizer.decode(ids[: end]).endswith("\ufffd") for end in range(1, len(ids)))
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    assert "" in [detokenizer.add(token_id) for token_id in ids]


def test_flush_emits_a_truly_incomplete_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🚀", add_special_tokens=False)
    cut = next(end for end in range(1, len(ids)) if tokenizer.decode(ids[:end]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    deltas = [detokenizer.add(token_id) for token_id in ids[:cut]]
    assert "\ufffd" not in "".join(deltas)
    tail = detokenizer.flush()
    assert tail.endswith("\ufffd")
    assert detokenizer.text == tokenizer.decode(ids[:cut])
    assert detokenizer.flush() == ""


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("done", add_special_tokens=False) + [tokenizer.eos_token_id]
    skipping = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    assert "".join(_stream(skipping, ids)) == "done"
    keeping = IncrementalDetokenizer(tokenizer, prompt_ids=[], skip_special_tokens=False)
    assert "".join(_stream(keeping, ids)) == "done" + EOS


def test_leading_space_after_prompt_byte_level(tokenizer: Tokenizer) -> None:
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=True)
    generated = tokenizer.encode(" Hello world", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
    assert "".join(_stream(detokenizer, generated)) == " Hello world"


def _metaspace_folder(folder: Path) -> Path:
    """A SentencePiece-style tokenizer whose decoder drops the space in front of the first word."""
    backend = BackendTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    return folder


def test_leading_space_after_prompt_metaspace(tmp_path: Path) -> None:
    sentencepiece_like = Tokenizer.from_pretrained(_metaspace_folder(tmp_path))
    prompt = "Assistant:"
    full_ids = sentencepiece_like.encode(prompt + " hello world")
    prompt_ids = sentencepiece_like.encode(prompt)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    generated = full_ids[len(prompt_ids):]
    # Decoding the generated ids alone loses the space; the prompt context keeps it.
    assert sentencepiece_like.decode(generated) == "hello world"
    detokenizer = IncrementalDetokenizer(sentencepiece_like, prompt_ids=prompt_ids)
    assert "".join(_stream(detokenizer, generated)) == " hello world"


def test_skipped_special_token_keeps_space_context(tmp_path: Path) -> None:
    sentencepiece_like = Tokenizer.from_pretrained(_metaspace_folder(tmp_path))
    hello_ids = sentencepiece_like.encode(" hello")
    world_ids = sentencepiece_like.encode(" world")
    assert sentencepiece_like.decode(world_ids) == "world"
    # A skipped special token decodes to nothing; it must not become the only context of " world".
    generated = hello_ids + [sentencepiece_like.token_to_id("</s>")] + world_ids
    detokenizer = IncrementalDetokenizer(sentencepiece_like, prompt_ids=[])
    assert "".join(_stream(detokenizer, generated)) == "hello world"


def test_decode_window_stays_small(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    text = " ".join(ROUND_TRIP_TEXTS) * 20
    ids = tokenizer.encode(text, add_special_tokens=False)
    window_sizes: list[int] = []
    original_decode = Tokenizer.decode

    def recording_decode(self: Tokenizer, token_ids: Any, skip_special_tokens: bool = True) -> str:
        token_ids = list(token_ids)
        window_sizes.append(len(token_ids))
        return original_decode(self, token_ids, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", recording_decode)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode(text))
    _stream(detokenizer, ids)
    monkeypatch.undo()
    assert len(ids) > 1000
    assert max(window_sizes) <= 12
    assert detokenizer.text == text
