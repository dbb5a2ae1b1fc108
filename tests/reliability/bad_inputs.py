"""A catalogue of bad requests a public endpoint meets, each with the answer it must get: the
status, and the field the error must name (in `param`, or in the message where OpenAI's shape
has no param, as for a body that is not JSON)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MODEL = "moeray-default"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]

# What a message must never carry: a traceback, a Ray task or actor, a pid, an ip, escape codes.
INTERNALS = re.compile(r"Traceback|File \"|\x1b\[|ray::|actor_id|pid=|ip=|\bat 0x[0-9a-f]+|RayTaskError")


@dataclass(frozen=True)
class BadInput:
    name: str
    body: Any  # a dict is sent as JSON, bytes as they are
    status: int
    names: str  # the field the error names
    path: str = CHAT
    method: str = "POST"

    def content(self) -> bytes | None:
        if self.method == "GET":
            return None
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "x", "max_tokens": 4, **fields}


CATALOGUE = [
    BadInput("unknown role", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    BadInput("image part", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/cat.png"}}]}]), 400, "messages[0].content"),
    BadInput("content is a number", chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    BadInput("no messages", chat(messages=[]), 400, "messages"),
    BadInput("messages missing", {"model": MODEL}, 400, "messages"),
    BadInput("max_tokens 10**12", chat(max_tokens=10**12), 400, "max_tokens"),
    BadInput("max_tokens 0", chat(max_tokens=0), 400, "max_tokens"),
    BadInput("max_tokens not a number", chat(max_tokens="many"), 400, "max_tokens"),
    BadInput("temperature out of range", chat(temperature=5), 400, "temperature"),
    BadInput("temperature wrong type", chat(temperature="hot"), 400, "temperature"),
    BadInput("top_p 0", chat(top_p=0), 400, "top_p"),
    BadInput("huge n", chat(n=1000), 400, "n"),
    BadInput("huge top_logprobs", chat(logprobs=True, top_logprobs=1000), 400, "top_logprobs"),
    BadInput("top_logprobs without logprobs", chat(top_logprobs=2), 400, "top_logprobs"),
    BadInput("huge stop list", chat(stop=[f"s{i}" for i in range(1000)]), 400, "stop"),
    BadInput("stop of numbers", chat(stop=[1, 2]), 400, "stop"),
    BadInput("empty stop string", chat(stop=[""]), 400, "stop"),
    BadInput("presence_penalty out of range", chat(presence_penalty=9), 400, "presence_penalty"),
    BadInput("negative top_k", chat(top_k=-5), 400, "top_k"),
    BadInput("min_p above 1", chat(min_p=2), 400, "min_p"),
    BadInput("repetition_penalty 0", chat(repetition_penalty=0), 400, "repetition_penalty"),
    BadInput("seed not an integer", chat(seed="abc"), 400, "seed"),
    BadInput("unknown model", chat(model="gpt-17"), 404, "model"),
    BadInput("invalid JSON", b'{"model": "moeray-default", "messages": [', 400, "JSON"),
    BadInput("invalid UTF-8", b'{"model": "moeray-default", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
             400, "JSON"),
    BadInput("body not an object", b"[1, 2, 3]", 400, "body"),
    BadInput("oversize body", json.dumps(chat(messages=[{"role": "user", "content": "x" * (5 << 20)}])).encode(),
             413, "body"),
    BadInput("prompt longer than the context", completion(prompt="word " * 30_000), 400, "prompt", COMPLETIONS),
    BadInput("token id out of vocabulary", completion(prompt=[1, 2, 10**9]), 400, "prompt", COMPLETIONS),
    BadInput("negative token id", completion(prompt=[1, -3]), 400, "prompt", COMPLETIONS),
    BadInput("mixed prompt list", completion(prompt=[[1, 2], "x"]), 400, "prompt", COMPLETIONS),
    BadInput("empty prompt", completion(prompt=""), 400, "prompt", COMPLETIONS),
    BadInput("echo not a boolean", completion(echo=[1]), 400, "echo", COMPLETIONS),
    BadInput("huge legacy logprobs", completion(logprobs=50), 400, "logprobs", COMPLETIONS),
    BadInput("unknown route", {"model": MODEL, "input": "x"}, 404, "/v1/embeddings", "/v1/embeddings"),
    BadInput("wrong method", None, 405, "/v1/completions", COMPLETIONS, "GET"),
]


def problems_with(item: BadInput, status: int, text: str) -> list[str]:
    """What is wrong with the answer to a bad input (empty: it is right)."""
    found = []
    if status != item.status:
        found.append(f"status {status}, expected {item.status}")
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return found + [f"not an OpenAI error body: {text[:200]!r}"]
    if not {"message", "type", "param", "code"} <= set(error):
        found.append(f"error lacks OpenAI's fields: {sorted(error)}")
    if item.names not in (error.get("param") or "") and item.names not in error.get("message", ""):
        found.append(f"names neither in param nor in message: {error}")
    if INTERNALS.search(text):
        found.append(f"carries internals: {text[:300]!r}")
    if not error.get("request_id"):
        found.append("no request id in the body")
    return found
