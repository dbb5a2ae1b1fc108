"""Training text available offline on every machine: the Python standard library's own source.

Contract: `stdlib_sources(limit_bytes)` returns the text of the standard library's top-level
and first-level modules (tests and site-packages left out) in a fixed order, up to about
`limit_bytes`; `write_stdlib_jsonl(path, ...)` writes them as pre-training rows
`{"text": ...}`, one chunk of at most `chunk_lines` lines per row, and returns the row count.
`write_chat_jsonl(path)` writes SFT conversations made from the same source and from templates:
a user asks for a function (by its signature, or by its docstring's first line) and the
assistant answers with the standard library's code; and weather, time and unit-conversion
questions with tools offered, answered by an OpenAI-style tool call (or in plain words when no
tool fits). With `replay`, pre-training rows are mixed in as plain text rows, so that a
fine-tune keeps modelling code (`--replay FILE --replay-rows N` takes them from FILE's training
rows only: those outside the held-out split its pre-training job's `eval_fraction` and seed
make, so replay never trains on the rows that measure the pre-training). All of it is
deterministic for a given Python installation.

    python -m moeray.jobs.corpus OUT.jsonl [--limit-mb 8] [--chunk-lines 80] [--chat]
        [--replay STDLIB.jsonl --replay-rows N --replay-eval-fraction 0.01 --replay-seed 0]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from pathlib import Path


def stdlib_sources(limit_bytes: int = 8 << 20) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def write_stdlib_jsonl(path: str | Path, limit_bytes: int = 8 << 20, chunk_lines: int = 80) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with path.open("w", encoding="utf-8") as out:
        for source in stdlib_sources(limit_bytes):
            lines = source.splitlines(keepends=True)
            for start in range(0, len(lines), chunk_lines):
                chunk = "".join(lines[start:start + chunk_lines])
                if chunk.strip():
                    out.write(json.dumps({"text": chunk}) + "\n")
                    rows += 1
    return rows


def _functions(limit_bytes: int, most_lines: int = 30) -> list[tuple[str, str, str]]:
    """(signature line, docstring's first line or "", source) of short top-level functions."""
    found = []
    for source in stdlib_sources(limit_bytes):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            body = lines[node.lineno - 1:node.end_lineno]
            if len(body) > most_lines or not body[0].startswith("def ") or not body[0].endswith(":"):
                continue
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            found.append((body[0], doc[0].strip() if doc else "", "\n".join(body) + "\n"))
    return found


WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert_units", "description": "Convert a value between units",
                                      "parameters": {"type": "object", "properties": {
                                          "value": {"type": "number"}, "from_unit": {"type": "string"},
                                          "to_unit": {"type": "string"}},
                                          "required": ["value", "from_unit", "to_unit"]}}},
]
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Cairo", "Lima", "Seoul", "Boston",
          "Sydney", "Toronto", "Mumbai", "Nairobi", "Dublin", "Vienna", "Prague", "Lisbon", "Athens"]
WEATHER_ASKS = ["What is the weather in {city}?", "What's the weather like in {city} today?",
                "Is it raining in {city}?", "How warm is it in {city}?", "Weather in {city}, please.",
                "Tell me the weather in {city}."]
TIME_ASKS = ["What time is it in {city}?", "What is the local time in {city}?", "Current time in {city}?"]
PLAIN = [("Hello!", "Hello! How can I help you today?"), ("Thanks!", "You're welcome."),
         ("Who are you?", "I am a small language model served by moeray."),
         ("What can you do?", "I can write Python code and call the tools I am given.")]


def _call(name: str, arguments: dict, index: int) -> dict:
    return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def write_chat_jsonl(path: str | Path, limit_bytes: int = 8 << 20, tool_rows: int = 1200, seed: int = 0,
                     replay: list[dict] = ()) -> int:
    """SFT conversations, and the `replay` text rows (see the module docstring); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for signature, doc, code in _functions(limit_bytes):
        rows.append({"messages": [{"role": "user", "content": signature}, {"role": "assistant", "content": code}]})
        if doc:
            ask = f"Write a Python function that does this: {doc}"
            rows.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": code}]})
    for i in range(tool_rows):
        city = rng.choice(CITIES)
        kind = rng.random()
        if kind < 0.55:
            arguments = {"city": city}
            ask = rng.choice(WEATHER_ASKS).format(city=city)
            if rng.random() < 0.3:
                unit = rng.choice(["celsius", "fahrenheit"])
                arguments["unit"] = unit
                ask += f" In {unit}."
            answer = {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", arguments, i)]}
        elif kind < 0.8:
            ask = rng.choice(TIME_ASKS).format(city=city)
            answer = {"role": "assistant", "content": None, "tool_calls": [_call("get_time", {"city": city}, i)]}
        elif kind < 0.92:
            value = rng.randint(1, 500)
            units = rng.choice([("km", "miles"), ("kg", "pounds"), ("celsius", "fahrenheit"), ("liters", "gallons")])
            ask = f"Convert {value} {units[0]} to {units[1]}."
            answer = {"role": "assistant", "content": None,
                      "tool_calls": [_call("convert_units", {"value": value, "from_unit": units[0],
                                                             "to_unit": units[1]}, i)]}
        else:
            ask, reply = rng.choice(PLAIN)
            answer = {"role": "assistant", "content": reply}
        rows.append({"messages": [{"role": "user", "content": ask}, answer], "tools": WEATHER_TOOLS})
    rows += [{"text": row["text"]} for row in replay]
    rng.shuffle(rows)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    return len(rows)


def replay_rows(path: Path, count: int, eval_fraction: float, seed: int) -> list[dict]:
    """`count` rows of the pre-training file `path`, evenly spaced over its training split."""
    # torch and Ray come with the trainer: imported only where replay needs its split.
    from moeray.jobs.trainer import held_out_threshold, row_hash

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    below = held_out_threshold(rows, eval_fraction, seed) if eval_fraction else None
    training = [row for row in rows if below is None or row_hash(row, seed) >= below]
    step = max(len(training) / max(count, 1), 1.0)
    return [training[int(i * step)] for i in range(min(count, len(training)))]


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the standard library's source as pre-training JSONL.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit-mb", type=float, default=8.0)
    parser.add_argument("--chunk-lines", type=int, default=80)
    parser.add_argument("--chat", action="store_true", help="write the SFT conversations instead")
    parser.add_argument("--replay", type=Path, help="with --chat: pre-training JSONL to mix text rows from")
    parser.add_argument("--replay-rows", type=int, default=0)
    parser.add_argument("--replay-eval-fraction", type=float, default=0.01,
                        help="the pre-training job's data.eval_fraction: its held-out rows are never replayed")
    parser.add_argument("--replay-seed", type=int, default=0, help="the pre-training job's train.seed")
    opts = parser.parse_args()
    if opts.chat:
        replay = replay_rows(opts.replay, opts.replay_rows, opts.replay_eval_fraction, opts.replay_seed) \
            if opts.replay else []
        rows = write_chat_jsonl(opts.out, int(opts.limit_mb * (1 << 20)), replay=replay)
    else:
        rows = write_stdlib_jsonl(opts.out, int(opts.limit_mb * (1 << 20)), opts.chunk_lines)
    print(f"wrote {rows} rows to {opts.out}")


if __name__ == "__main__":
    main()
