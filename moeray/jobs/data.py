"""Fine-tuning data: JSONL rows, their validation, tokenization, packing and batching.

Contract:
* ``read_jsonl(uri)`` reads a local path or an ``s3://bucket/key`` object (boto3, which honours
  ``AWS_ENDPOINT_URL``) and returns ``(line_number, row)`` for every non-blank line. Unreadable
  files, malformed JSON, invalid UTF-8 and rows that are not JSON objects raise ``DataError``
  naming ``uri:line``; nothing is returned then.
* Formats follow TRL: a "standard" row's fields are strings, tokenized as they are (bos first,
  eos after a completion), with no chat template; a "conversational" row's are message lists,
  rendered by the chat template; a row mixing the two is refused (``row_format``).
* SFT rows hold ``text``, ``prompt`` + ``completion`` (loss on the completion), or ``messages``: a non-empty list of ``{"role": system|developer|user|assistant|tool,
  "content": str}`` with at least one assistant message; an assistant message may carry
  ``tool_calls`` (JSON-object arguments; its content may then be null) and a tool message names
  its ``tool_call_id``; an optional ``tools`` list is offered to the template. DPO rows hold ``prompt``, ``chosen`` and
  ``rejected``, each a string or such a message list (a prompt list must not end with an
  assistant message; chosen/rejected lists must). Validators raise ``DataError`` naming
  ``uri:line`` and the field.
* ``tokenize_sft`` returns ``(input_ids, labels)`` of the chat-templated conversation; labels are
  -100 except on the tokens each assistant message adds (its content, its tool-call markup and
  the end-of-sentence token closing the turn). The template must be prefix-stable (rendering a conversation's prefix
  yields a token prefix of the whole), else ``DataError``.
* ``tokenize_dpo`` returns ``prompt_ids`` and the ``chosen_ids``/``rejected_ids`` continuations,
  each ending with end-of-sentence unless truncated; the prompt is cut from the left (keeping a
  leading bos) so that prompt plus the longest continuation fits ``max_length``.
* ``pack`` fills rows first-fit with ``position_ids`` restarting per example and ``segment_ids``
  1, 2, ... per example; ``pad_batch`` right-pads rows into tensors (segment 0 marks padding).
* ``flatten`` turns rows (plain, or packed and split at their segments) into one stream of
  sequences without padding, with each position's next-token label, as training consumes them.
* Pre-training rows hold ``text`` (a non-empty string). ``tokenize_text`` joins the rows'
  tokens (each document framed by bos/eos) and cuts the stream into rows of ``max_length``
  tokens, every token a label, as language-model pre-training does.
* ``split_eval`` is a deterministic function of the rows, the fraction and the seed.

No ray imports: this module runs in the driver, in workers and in tests alike.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeray.model.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value that cross-entropy skips
ROLES = ("system", "developer", "user", "assistant", "tool")

Example = tuple[list[int], list[int]]  # (input_ids, labels)


class DataError(ValueError):
    """A data file or one of its rows is unreadable or invalid."""


def _read_bytes(uri: str) -> bytes:
    if uri.startswith("s3://"):
        import boto3  # imported lazily: local-only runs and tests need no AWS setup
        import botocore.exceptions

        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key:
            raise DataError(f"{uri}: expected s3://bucket/key")
        try:
            return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            raise DataError(f"{uri}: cannot read: {err}") from err
    try:
        return Path(uri).read_bytes()
    except OSError as err:
        raise DataError(f"{uri}: cannot read: {err.strerror}") from err


def read_jsonl(uri: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, raw in enumerate(_read_bytes(uri).split(b"\n"), start=1):
        try:
            # utf-8-sig on the first line only: editors on Windows like to start files with a BOM.
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{uri}:{number}: not valid UTF-8 at byte {err.start}") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{uri}:{number}: invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{uri}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _validate_messages(messages: Any, field: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {field} must be a non-empty list of messages")
    for index, message in enumerate(messages):
        name = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {name} must be an object with role and content")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: {name}.role must be one of {', '.join(ROLES)}; got {message.get('role')!r}")
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant":
                raise DataError(f"{where}: {name}.tool_calls: only assistant messages call tools")
            _validate_tool_calls(calls, f"{name}.tool_calls", where)
        if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise DataError(f"{where}: {name}.tool_call_id must name the call the tool message answers")
        content = message.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise DataError(f"{where}: {name}.content must be a string")
    return messages


def _validate_tool_calls(calls: Any, name: str, where: str) -> None:
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: {name} must be a non-empty list")
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: {name}[{i}].function.name must be a string")
        arguments = function.get("arguments")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: {name}[{i}].function.arguments is not JSON ({err.msg})") from None
        if not isinstance(parsed, dict):
            raise DataError(f"{where}: {name}[{i}].function.arguments must be a JSON object")


def _validate_tools(tools: Any, where: str) -> None:
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise DataError(f"{where}: tools must be a list of {{type: function, function: {{name, parameters}}}}")


def validate_sft_row(row: dict[str, Any], uri: str, line: int) -> list[dict[str, Any]] | None:
    """Checks an SFT row in one of TRL's formats and returns its messages (None for a standard
    row): conversational `messages` (with the tools they may call) or `prompt` + `completion`
    message lists; standard `prompt` + `completion` strings or a `text` string."""
    where = f"{uri}:{line}"
    if "messages" not in row and ("prompt" in row or "completion" in row):
        for field in ("prompt", "completion"):
            if field not in row:
                raise DataError(f"{where}: missing '{field}' (a prompt-completion row has both)")
        if row_format(row, ("prompt", "completion"), where) == "standard":
            return None
        messages = _validate_messages(row["prompt"], "prompt", where) + _validate_messages(
            row["completion"], "completion", where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: completion must end with an assistant message")
        return messages
    if "messages" not in row and "text" in row:
        validate_text_row(row, uri, line)
        return None
    if "messages" not in row:
        raise DataError(f"{where}: missing 'messages' (or 'prompt' and 'completion', or 'text')")
    messages = _validate_messages(row["messages"], "messages", where)
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: messages has no assistant message to train on")
    if row.get("tools") is not None:
        _validate_tools(row["tools"], where)
    return messages


def row_format(row: dict[str, Any], fields: Sequence[str], where: str) -> str:
    """TRL's two formats: "standard" (every field a string, tokenized as it is) or
    "conversational" (every field a message list, rendered by the chat template). A row mixing
    them is refused, naming which field is which."""
    kinds = {field: "string" if isinstance(row[field], str) else "message list" for field in fields if field in row}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{field} is a {kind}" for field, kind in kinds.items())
        raise DataError(f"{where}: mixes the standard (string) and conversational (message list) formats: "
                        f"{described}; make them all strings or all message lists")
    return "standard" if all(kind == "string" for kind in kinds.values()) else "conversational"


def tokenize_standard(prompt: str, completion: str | None, tokenizer: Tokenizer, max_length: int) -> Example:
    """A standard (string) row as it is: bos + prompt, then the completion and eos; labels on the
    completion (and eos) only. With no completion every token is a label (a `text` row)."""
    prompt_ids = tokenizer.encode(prompt)
    if completion is None:
        ids = prompt_ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        return ids[:max_length], list(ids[:max_length])
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return ids[:max_length], labels[:max_length]


def tokenize_sft_row(row: dict[str, Any], tokenizer: Tokenizer, max_length: int) -> Example:
    """(input_ids, labels) of a validated SFT row in any of its formats."""
    if "messages" in row:
        return tokenize_sft(row["messages"], tokenizer, max_length, row.get("tools"))
    if "text" in row and "prompt" not in row:
        return tokenize_standard(row["text"], None, tokenizer, max_length)
    if isinstance(row["prompt"], str):
        return tokenize_standard(row["prompt"], row["completion"], tokenizer, max_length)
    return tokenize_sft(row["prompt"] + row["completion"], tokenizer, max_length, row.get("tools"))


def validate_text_row(row: dict[str, Any], uri: str, line: int) -> str:
    text = row.get("text")
    if not isinstance(text, str) or not text:
        raise DataError(f"{uri}:{line}: text must be a non-empty string")
    return text


def tokenize_text(texts: Sequence[str], tokenizer: Tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Documents as one token stream (bos + text + eos each), cut into rows of max_length tokens.

    A last piece shorter than a quarter row is dropped (too little context to learn from).
    """
    stream: list[int] = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if tokenizer.bos_token_id is not None:
            stream.append(tokenizer.bos_token_id)
        stream += ids
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    rows = []
    for start in range(0, len(stream), max_length):
        piece = stream[start:start + max_length]
        if len(piece) >= max(2, max_length // 4):
            rows.append({"input_ids": piece, "labels": list(piece)})
    return rows


def validate_dpo_row(row: dict[str, Any], uri: str, line: int) -> dict[str, Any]:
    """Checks a DPO row and returns it."""
    where = f"{uri}:{line}"
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            raise DataError(f"{where}: missing '{field}'")
        if not isinstance(row[field], (str, list)):
            raise DataError(f"{where}: {field} must be a string or a list of messages")
    if row_format(row, ("prompt", "chosen", "rejected"), where) == "standard":
        return row
    for field in ("prompt", "chosen", "rejected"):
        value = row[field]
        messages = _validate_messages(value, field, where)
        ends_with_assistant = messages[-1]["role"] == "assistant"
        if field == "prompt" and ends_with_assistant:
            raise DataError(f"{where}: prompt must not end with an assistant message")
        if field != "prompt" and not ends_with_assistant:
            raise DataError(f"{where}: {field} must end with an assistant message")
    return row


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
            tools: list[dict[str, Any]] | None = None) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         tools=tools)


def _continuation(prefix: list[int], full: list[int], what: str) -> list[int]:
    if full[:len(prefix)] != prefix:
        raise DataError(f"the chat template is not prefix-stable at {what}: the tokens of the conversation "
                        "before it are not a prefix of the tokens with it, so its tokens cannot be located")
    return full[len(prefix):]


def _through_last_eos(ids: list[int], tokenizer: Tokenizer) -> list[int]:
    """Drops template text after the turn's last end-of-sentence token (e.g. a newline): the model
    should learn to stop, not to emit separators it never generates."""
    for end in range(len(ids), 0, -1):
        if ids[end - 1] in tokenizer.eos_token_ids:
            return ids[:end]
    return ids


def tokenize_sft(messages: list[dict[str, Any]], tokenizer: Tokenizer, max_length: int,
                 tools: list[dict[str, Any]] | None = None) -> Example:
    """(input_ids, labels) of a conversation; loss only on what assistant messages add (their
    tool-call markup included), with `tools` offered to the template as serving offers them.

    Each assistant message i adds the tokens between rendering messages[:i] with a generation
    prompt and rendering messages[:i + 1] without one. A fully truncated-away answer leaves all
    labels at -100; callers may drop such rows.
    """
    input_ids = _render(tokenizer, messages, False, tools)
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True, tools)
        through = _render(tokenizer, messages[:index + 1], False, tools)
        added = _through_last_eos(_continuation(before, through, f"assistant message {index}"), tokenizer)
        _continuation(through, input_ids, f"the messages after message {index}")
        labels[len(before):len(before) + len(added)] = added
    return input_ids[:max_length], labels[:max_length]


def _as_messages(value: str | list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def tokenize_dpo(row: dict[str, Any], tokenizer: Tokenizer, max_length: int) -> dict[str, list[int]]:
    """Prompt ids and the chosen/rejected continuations (each closes with end-of-sentence). A
    standard row (strings) is tokenized as it is; a conversational one through the template."""
    if isinstance(row["prompt"], str):
        prompt_ids = tokenizer.encode(row["prompt"])
        continuations = {}
        for field in ("chosen", "rejected"):
            ids = tokenizer.encode(row[field], add_special_tokens=False)
            continuations[field] = ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        return _fit_dpo(prompt_ids, continuations, tokenizer, max_length)
    prompt = _as_messages(row["prompt"], "user")
    prompt_ids = _render(tokenizer, prompt, add_generation_prompt=True)
    continuations = {}
    for field in ("chosen", "rejected"):
        full = _render(tokenizer, prompt + _as_messages(row[field], "assistant"), add_generation_prompt=False)
        ids = _through_last_eos(_continuation(prompt_ids, full, field), tokenizer)
        if not ids or ids[-1] not in tokenizer.eos_token_ids:
            # Some templates leave the end-of-sentence token out; DPO must still learn to stop.
            if tokenizer.eos_token_id is None:
                raise DataError("the tokenizer has no eos_token to close DPO continuations with")
            ids = [*ids, tokenizer.eos_token_id]
        continuations[field] = ids
    return _fit_dpo(prompt_ids, continuations, tokenizer, max_length)


def _fit_dpo(prompt_ids: list[int], continuations: dict[str, list[int]], tokenizer: Tokenizer,
             max_length: int) -> dict[str, list[int]]:
    longest = max(len(ids) for ids in continuations.values())
    prompt_budget = max(max_length - longest, 0)
    if len(prompt_ids) > prompt_budget:
        # Keep the end of the prompt (closest to the answer) and a leading bos, which models expect.
        head = prompt_ids[:1] if prompt_budget >= 2 and prompt_ids[0] == tokenizer.bos_token_id else []
        tail_length = prompt_budget - len(head)
        prompt_ids = head + (prompt_ids[-tail_length:] if tail_length else [])
    room = max_length - len(prompt_ids)
    return {"prompt_ids": prompt_ids, "chosen_ids": continuations["chosen"][:room],
            "rejected_ids": continuations["rejected"][:room]}


def _first_fit(lengths: Sequence[int], capacity: int) -> list[int]:
    """Row index of each length under first-fit, in O(log n) per item.

    A max-tree over n rows (enough for n items) holds each row's free room; unopened rows have
    full room and lie after every opened one, so "first row with room" also opens rows in order.
    """
    size = 1
    while size < len(lengths):
        size *= 2
    room = [capacity] * (2 * size)
    rows = []
    for length in lengths:
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= length else 2 * node + 1
        room[node] -= length
        rows.append(node - size)
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return rows


def pack(examples: Sequence[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy first-fit packing into rows of at most max_length tokens, in example order.

    Examples longer than max_length are truncated; empty ones are dropped.
    """
    kept = []
    for input_ids, labels in examples:
        if len(input_ids) != len(labels):
            raise ValueError(f"input_ids and labels differ in length ({len(input_ids)} != {len(labels)})")
        if input_ids:
            kept.append((list(input_ids[:max_length]), list(labels[:max_length])))
    assignment = _first_fit([len(input_ids) for input_ids, _ in kept], max_length)
    rows: list[dict[str, list[int]]] = [
        {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
        for _ in range(max(assignment, default=-1) + 1)]
    for (input_ids, labels), index in zip(kept, assignment):
        row = rows[index]
        segment = row["segment_ids"][-1] + 1 if row["segment_ids"] else 1
        row["input_ids"] += input_ids
        row["labels"] += labels
        row["position_ids"] += range(len(input_ids))
        row["segment_ids"] += [segment] * len(input_ids)
    return rows


def pad_batch(rows: Sequence[dict[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads rows to the longest: input_ids with pad_id, labels with -100, positions and
    segments with 0. Rows without segment_ids/position_ids count as one sequence each."""
    if not rows:
        raise ValueError("pad_batch needs at least one row")
    width = max(len(row["input_ids"]) for row in rows)
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "segment_ids": 0}
    batch: dict[str, list[list[int]]] = {key: [] for key in fills}
    for row in rows:
        length = len(row["input_ids"])
        values = {"input_ids": row["input_ids"], "labels": row["labels"],
                  "position_ids": row.get("position_ids", range(length)),
                  "segment_ids": row.get("segment_ids", [1] * length)}
        for key, fill in fills.items():
            if len(values[key]) != length:
                raise ValueError(f"{key} has {len(values[key])} entries, input_ids has {length}")
            batch[key].append([*values[key], *[fill] * (width - length)])
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


@dataclass
class SequenceBatch:
    """Sequences concatenated without padding: what `DeepseekForCausalLM(..., lengths=...)` takes."""

    input_ids: torch.Tensor  # [N]
    position_ids: torch.Tensor  # [N], restarting at 0 for each sequence
    lengths: list[int]  # tokens of each sequence, in order; sum is N
    next_labels: torch.Tensor  # [N] label of the following token of the same sequence, else IGNORE_INDEX

    @property
    def sequence_of_token(self) -> torch.Tensor:  # [N]
        sizes = torch.tensor(self.lengths, device=self.input_ids.device)
        return torch.arange(len(self.lengths), device=sizes.device).repeat_interleave(sizes)

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.position_ids.to(device), self.lengths,
                             self.next_labels.to(device))


def flatten(rows: Sequence[dict[str, Sequence[int]]]) -> SequenceBatch:
    """Rows with input_ids and labels as one padding-free stream of sequences. A packed row
    (segment_ids) splits into its examples, so no label is predicted across two examples."""
    if not rows:
        raise ValueError("flatten needs at least one row")
    input_ids: list[int] = []
    next_labels: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for row in rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        segments = list(row.get("segment_ids") or [1] * len(ids))
        if not len(ids) == len(labels) == len(segments):
            raise ValueError(f"input_ids ({len(ids)}), labels ({len(labels)}) and segment_ids ({len(segments)}) "
                             "differ in length")
        start = 0
        for end in range(1, len(ids) + 1):
            if end == len(ids) or segments[end] != segments[start]:
                input_ids += ids[start:end]
                next_labels += labels[start + 1:end] + [IGNORE_INDEX]
                positions += range(end - start)
                lengths.append(end - start)
                start = end
    return SequenceBatch(torch.tensor(input_ids), torch.tensor(positions), lengths, torch.tensor(next_labels))


def split_eval(rows: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, eval): a seeded random share of rows held out; both keep the input order.

    A positive fraction holds out at least one row, and training keeps at least one.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    count = round(len(rows) * fraction)
    if fraction > 0:
        count = min(max(count, 1), len(rows) - 1)
    if count <= 0:
        return list(rows), []
    held_out = set(random.Random(seed).sample(range(len(rows)), count))
    train = [row for index, row in enumerate(rows) if index not in held_out]
    evaluation = [row for index, row in enumerate(rows) if index in held_out]
    return train, evaluation
