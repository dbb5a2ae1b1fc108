"""Fine-tuning data: JSONL reading and validation, SFT/DPO tokenization, packing, batching, splits, and
the order the trainer reads its examples in."""

import json
import re
from itertools import pairwise

import pytest
import torch

from moeray.jobs.data import (IGNORE_INDEX, DataError, pack, pad_batch, read_jsonl, split_eval, tokenize_dpo,
                              tokenize_sft, tokenize_text, validate_dpo_row, validate_sft_row,
                              validate_text_row)
from moeray.jobs import trainer
from moeray.jobs.spec import parse_spec
from moeray.model.tokenizer import Tokenizer
from moeray.platform.default_model import DEFAULT_MODEL_DIR
from support import EOS, write_jsonl, write_tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello world"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Add two numbers"},
    {"role": "assistant", "content": "def add(a, b): return a + b"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return Tokenizer.from_pretrained(folder)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_read_jsonl_returns_line_numbers_and_skips_blank_lines(tmp_path):
    uri = write_lines(tmp_path / "train.jsonl", ['{"a": 1}', "", "   ", '{"b": 2}'])
    assert read_jsonl(uri) == [(1, {"a": 1}), (4, {"b": 2})]


@pytest.mark.parametrize("bad_line, problem", [
    ('{"messages": [}', "invalid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
])
def test_read_jsonl_names_file_and_line_of_a_bad_row(tmp_path, bad_line, problem):
    uri = write_lines(tmp_path / "train.jsonl", ['{"ok": true}', "", bad_line, '{"ok": true}'])
    with pytest.raises(DataError, match=rf"train\.jsonl:3: {problem}"):
        read_jsonl(uri)


def test_read_jsonl_invalid_utf8_and_missing_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid UTF-8"):
        read_jsonl(str(path))
    with pytest.raises(DataError, match=r"absent\.jsonl: cannot read"):
        read_jsonl(str(tmp_path / "absent.jsonl"))


def test_valid_sft_row_passes():
    assert validate_sft_row({"messages": CONVERSATION, "id": 7}, "train.jsonl", 1) == CONVERSATION


@pytest.mark.parametrize("row, problem", [
    ({}, "missing 'messages'"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": "hi"}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}, "x"]}, r"messages\[1\] must be an object"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     r"messages\[1\]\.role must be one of system, developer, user, assistant, tool; got 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]},
     r"messages\[1\]\.content must be a string"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "messages has no assistant message"),
])
def test_invalid_sft_rows_are_named_with_their_line(row, problem):
    with pytest.raises(DataError, match=rf"^train\.jsonl:3: {problem}"):
        validate_sft_row(row, "train.jsonl", 3)


def test_valid_dpo_rows_pass():
    validate_dpo_row({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}, "pairs.jsonl", 1)
    validate_dpo_row({"prompt": CONVERSATION[:2], "chosen": [{"role": "assistant", "content": "Hi"}],
                      "rejected": [{"role": "assistant", "content": "No"}]}, "pairs.jsonl", 1)


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "Hi", "chosen": "Hello"}, "missing 'rejected'"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "prompt must be a string or a list of messages"),
    ({"prompt": CONVERSATION[:2], "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant",
                                                                                    "content": "b"}]},
     r"chosen\[0\]\.content must be a string"),
    ({"prompt": CONVERSATION[:3], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt must not end with an assistant message"),
    ({"prompt": CONVERSATION[:2], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "b"}]}, "rejected must end with an assistant message"),
    ({"prompt": "Hi", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
     r"mixes the standard \(string\) and conversational \(message list\) formats: prompt is a string, chosen is "
     r"a string, rejected is a message list"),
])
def test_invalid_dpo_rows_are_named_with_their_line(row, problem):
    with pytest.raises(DataError, match=rf"^pairs\.jsonl:9: {problem}"):
        validate_dpo_row(row, "pairs.jsonl", 9)


def test_sft_labels_cover_exactly_the_assistant_turns(tokenizer):
    input_ids, labels = tokenize_sft(CONVERSATION, tokenizer, max_length=512)
    assert input_ids == tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False, tokenize=True)
    assert len(labels) == len(input_ids)
    trained = [label for label in labels if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, input_ids))
    assert tokenizer.decode(trained, skip_special_tokens=False) == f"Hello there!{EOS}def add(a, b): return a + b{EOS}"
    # The prompt side (bos, system prompt, user turns, assistant markers) carries no loss.
    assert labels[0] == IGNORE_INDEX and labels[-1] == tokenizer.eos_token_id


def test_sft_truncates_to_max_length(tokenizer):
    full_ids, full_labels = tokenize_sft(CONVERSATION, tokenizer, max_length=512)
    input_ids, labels = tokenize_sft(CONVERSATION, tokenizer, max_length=10)
    assert (input_ids, labels) == (full_ids[:10], full_labels[:10])


def test_sft_rejects_a_template_that_is_not_prefix_stable(tmp_path):
    write_tiny_tokenizer(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # The generation prompt opens a reasoning block that finished turns never show.
    config["chat_template"] = config["chat_template"].replace("{{- '<｜Assistant｜>' -}}",
                                                              "{{- '<｜Assistant｜>think:' -}}")
    config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match="not prefix-stable at assistant message 2"):
        tokenize_sft(CONVERSATION, Tokenizer.from_pretrained(tmp_path), max_length=512)


def test_dpo_standard_rows_are_tokenized_as_they_are(tokenizer):
    """TRL's standard format: strings, no chat template (bos before the prompt, eos after each side)."""
    parts = tokenize_dpo({"prompt": "Hello world", "chosen": "Hello there!", "rejected": "Go away"}, tokenizer, 512)
    assert parts["prompt_ids"] == tokenizer.encode("Hello world")
    assert tokenizer.decode(parts["prompt_ids"], skip_special_tokens=False) == f"{tokenizer.bos_token}Hello world"
    assert tokenizer.decode(parts["chosen_ids"], skip_special_tokens=False) == f"Hello there!{EOS}"
    assert tokenizer.decode(parts["rejected_ids"], skip_special_tokens=False) == f"Go away{EOS}"


def test_dpo_message_form_matches_the_chat_template(tokenizer):
    prompt = CONVERSATION[:4]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "def add(a, b): return a + b"}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    parts = tokenize_dpo(row, tokenizer, 512)
    whole = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False, tokenize=True)
    assert parts["prompt_ids"] + parts["chosen_ids"] == whole
    assert parts["rejected_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(parts["prompt_ids"], skip_special_tokens=False).endswith("<｜Assistant｜>")


def test_dpo_truncates_the_prompt_from_the_left_keeping_bos(tokenizer):
    row = {"prompt": "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
           "chosen": "Hi", "rejected": "Go away"}
    full = tokenize_dpo(row, tokenizer, 512)
    max_length = len(full["rejected_ids"]) + 6
    parts = tokenize_dpo(row, tokenizer, max_length)
    assert len(parts["prompt_ids"]) + len(parts["rejected_ids"]) == max_length
    assert parts["prompt_ids"] == full["prompt_ids"][:1] + full["prompt_ids"][-5:]
    assert parts["prompt_ids"][0] == tokenizer.bos_token_id
    assert (parts["chosen_ids"], parts["rejected_ids"]) == (full["chosen_ids"], full["rejected_ids"])


def examples_of(lengths):
    return [([100 * n + i for i in range(length)], [1000 * n + i for i in range(length)])
            for n, length in enumerate(lengths)]


def test_pack_first_fit():
    examples = examples_of([5, 3, 6, 2, 4, 1, 8])
    rows = pack(examples, max_length=8)
    assert all(len(row["input_ids"]) <= 8 for row in rows)
    # first-fit in order: [5, 3] [6, 2] [4, 1] [8]
    assert [len(row["input_ids"]) for row in rows] == [8, 8, 5, 8]
    found = []
    for row in rows:
        assert len(row["labels"]) == len(row["position_ids"]) == len(row["segment_ids"]) == len(row["input_ids"])
        segments = row["segment_ids"]
        assert segments[0] == 1 and all(b in (a, a + 1) for a, b in pairwise(segments))
        for segment in sorted(set(segments)):
            positions = [i for i, s in enumerate(segments) if s == segment]
            assert [row["position_ids"][i] for i in positions] == list(range(len(positions)))
            found.append(([row["input_ids"][i] for i in positions], [row["labels"][i] for i in positions]))
    assert sorted(found) == sorted(examples)  # every example exactly once, intact


def test_pack_truncates_long_examples_and_drops_empty_ones():
    rows = pack(examples_of([12, 0, 2]), max_length=8)
    assert [row["segment_ids"] for row in rows] == [[1] * 8, [1, 1]]
    assert rows[0]["input_ids"] == list(range(8))


def test_pack_is_fast_enough_for_many_examples():
    rows = pack(examples_of([1 + (i * 37) % 300 for i in range(5000)]), max_length=512)
    assert sum(len(row["input_ids"]) for row in rows) == sum(1 + (i * 37) % 300 for i in range(5000))


def test_pad_batch_of_packed_rows():
    rows = pack(examples_of([3, 4, 2]), max_length=7)
    batch = pad_batch(rows, pad_id=2)
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids"}
    assert all(tensor.shape == (2, 7) and tensor.dtype == torch.long for tensor in batch.values())
    assert batch["input_ids"][1].tolist() == [200, 201, 2, 2, 2, 2, 2]
    assert batch["labels"][1].tolist() == [2000, 2001] + [IGNORE_INDEX] * 5
    assert batch["segment_ids"][1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_pad_batch_creates_positions_and_segments_for_plain_rows():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_split_eval_is_deterministic_and_complete():
    rows = [{"n": n} for n in range(100)]
    train, evaluation = split_eval(rows, 0.1, seed=3)
    assert (train, evaluation) == split_eval(rows, 0.1, seed=3)
    assert len(evaluation) == 10 and len(train) == 90
    assert sorted(r["n"] for r in train + evaluation) == list(range(100))
    assert train == sorted(train, key=lambda r: r["n"])  # input order kept
    assert split_eval(rows, 0.1, seed=4)[1] != evaluation
    assert split_eval(rows, 0.0, seed=3) == (rows, [])
    assert [len(part) for part in split_eval(rows[:3], 0.01, seed=0)] == [2, 1]  # at least one held out


def test_text_rows_become_full_rows_of_the_token_stream(tokenizer):
    rows = tokenize_text(["def f():\n    return 1\n", "import os\n" * 40], tokenizer, max_length=32)
    stream = [tokenizer.bos_token_id, *tokenizer.encode("def f():\n    return 1\n", add_special_tokens=False),
              tokenizer.eos_token_id, tokenizer.bos_token_id]
    assert rows[0]["input_ids"][:len(stream)] == stream
    assert all(len(row["input_ids"]) == 32 for row in rows[:-1]) and len(rows[-1]["input_ids"]) >= 8
    assert all(row["labels"] == row["input_ids"] for row in rows)


def test_text_row_without_text_is_named():
    with pytest.raises(DataError, match=r"corpus\.jsonl:7: text must be a non-empty string"):
        validate_text_row({"content": "x"}, "corpus.jsonl", 7)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny."},
]


def test_tool_calls_train_on_the_call_markup_and_not_on_the_tool_output():
    """The embedded default model's template has no tool support: moeray's tool template renders."""
    from moeray.platform.default_model import DEFAULT_MODEL_DIR

    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    assert validate_sft_row({"messages": TOOL_CONVERSATION, "tools": TOOLS}, "train.jsonl", 1) == TOOL_CONVERSATION
    ids, labels = tokenize_sft(TOOL_CONVERSATION, tokenizer, 4096, TOOLS)
    learned = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX], skip_special_tokens=False)
    assert "get_weather" in learned and '{"city": "Paris"}' in learned and "<｜tool▁calls▁begin｜>" in learned
    assert "It is 18 C and sunny." in learned and "18 C and sunny<" not in learned  # the tool's output is context
    assert "Weather in Paris?" not in learned and '"required"' not in learned  # nor the prompt and the tool list


@pytest.mark.parametrize("change, message", [
    ({1: {"role": "user", "tool_calls": [{"function": {"name": "x", "arguments": "{}"}}], "content": "hi"}},
     r"messages\[1\]\.tool_calls: only assistant messages call tools"),
    ({1: {"role": "assistant", "tool_calls": [{"function": {"name": "x", "arguments": "{oops"}}], "content": None}},
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not JSON"),
    ({2: {"role": "tool", "content": "18 C"}}, r"messages\[2\]\.tool_call_id must name the call"),
])
def test_bad_tool_messages_are_named_with_their_line(change, message):
    messages = [change.get(i, m) for i, m in enumerate(TOOL_CONVERSATION)]
    with pytest.raises(DataError, match=rf"train\.jsonl:4: {message}"):
        validate_sft_row({"messages": messages}, "train.jsonl", 4)


def _dataset_order(spec_data: dict) -> dict[str, list[int]]:
    """Each dataset the trainer builds for `spec_data`, as the row numbers of its examples in order."""
    spec = parse_spec(spec_data)
    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    datasets = trainer._datasets(spec, trainer.prepare(spec))
    return {name: [int(re.search(r"row (\d+)", tokenizer.decode(example["input_ids"])).group(1))
                   for example in dataset.iter_rows()] for name, dataset in datasets.items()}


def test_training_examples_are_shuffled_once_by_the_seed(ray_session, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"row {i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(120)]
    spec = {"name": "order", "base_model": str(DEFAULT_MODEL_DIR), "method": "sft", "output": str(tmp_path / "out"),
            "data": {"train": write_jsonl(tmp_path / "train.jsonl", rows), "eval_fraction": 0.1},
            "train": {"seed": 3}, "checkpoint": {"storage": str(tmp_path / "ckpt")}}
    shuffled = _dataset_order(spec)
    assert sorted(shuffled["train"] + shuffled["eval"]) == list(range(120))  # nothing lost, nothing repeated
    assert shuffled["train"] != sorted(shuffled["train"])
    # The same seed: the same order, so a resumed job sees it again (held-out rows come in read order).
    assert _dataset_order(spec)["train"] == shuffled["train"]
    assert _dataset_order({**spec, "train": {"seed": 4}})["train"] != shuffled["train"]
    read_order = _dataset_order({**spec, "data": {**spec["data"], "shuffle": False}})
    # Read order: Ray Data keeps each block's rows in file order but not the blocks' (preserve_order is off).
    assert sorted(read_order["train"]) == sorted(shuffled["train"]) and read_order["train"] != shuffled["train"]
