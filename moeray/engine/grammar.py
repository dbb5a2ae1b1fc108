"""Constrained decoding with xgrammar: grammars compiled once per engine, a matcher per sequence.

Contract:
- `Grammars(tokenizer, vocab_size)` compiles a `GrammarSpec` (params.py) into an xgrammar
  `CompiledGrammar`, once per distinct spec (an LRU cache keyed by the spec), on a small thread
  pool with a time limit: an invalid spec, a JSON-schema keyword xgrammar would silently not
  enforce, or a compile slower than `compile_timeout_s` raises `InvalidRequestError` naming the
  spec's request parameter (a slow compile keeps running on its worker; the engine never waits).
- `Grammars.matcher(spec)` gives a fresh `SequenceGrammar` for one sequence.
- `SequenceGrammar` follows one sequence's output. Until `spec.start_after` has been generated
  (a reasoning block's end) it constrains nothing; then `fill(bitmask, row)` writes the tokens
  the grammar allows next, and `advance(token_id, text)` feeds it the sampled token (the text
  after the marker, when the marker ends inside a token). The tokenizer's EOS ids are the
  grammar's stop tokens, so EOS is allowed exactly where the grammar may end.
- `mask_logits(logits, [(row, grammar), ...])` masks, in place, the tokens each row's grammar
  does not allow next to -inf (one bitmask for the step, xgrammar's CPU or GPU kernel).

Why xgrammar (not llguidance): it is what vLLM and SGLang use by default, it ships DeepSeek's
tool-call and reasoning formats as structural tags (`get_model_structural_tag`), and its CPU mask
kernel and compiler cache serve a CPU replica as they serve a GPU one.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from moeray.engine.params import GrammarSpec, InvalidRequestError
from moeray.model.tokenizer import Tokenizer

CACHE_SIZE = 256
# JSON-schema keywords xgrammar accepts but does not enforce (it would let violating output
# through): a request using one is refused rather than answered with JSON the schema forbids.
UNENFORCED_KEYWORDS = frozenset({"uniqueItems", "not", "if", "then", "else", "dependentRequired",
                                 "dependentSchemas", "contains", "minContains", "maxContains",
                                 "contentEncoding", "contentMediaType", "contentSchema"})
# Keywords whose values are subschemas (or maps / lists of them): where the check descends.
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "not", "if", "then",
               "else", "contains")
# Grammars compiled to compact JSON (no whitespace between tokens): no raw control character is
# valid anywhere in their output, so tokens holding one are masked too. (xgrammar compiles a
# string's minLength / maxLength to a character class that lets them into JSON strings; spelling
# the bound as a pattern instead costs ~400x in mask time at a bound of 200 characters.)
COMPACT_JSON_KINDS = ("json_schema", "json_object")
# xgrammar's C++ errors start with a time and a source location: "[12:00:00] /x/y.cc:42: ".
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _vocabulary_kind(tokenizer: Tokenizer):
    """xgrammar's name for how token strings map to bytes, read from tokenizer.json's decoder."""
    import xgrammar as xgr

    decoder = json.loads(tokenizer.backend_json()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {part.get("type") for part in parts}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _subschemas(schema: dict, path: str = ""):
    """(JSON pointer, schema) of `schema` and of every schema nested in it."""
    yield path, schema
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                if isinstance(sub, dict):
                    yield from _subschemas(sub, f"{path}/{key}/{name}")
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                if isinstance(sub, dict):
                    yield from _subschemas(sub, f"{path}/{key}/{i}")
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), dict):
            yield from _subschemas(schema[key], f"{path}/{key}")


def unenforced_keywords(schema: Any) -> list[str]:
    """Where `schema` uses a keyword of UNENFORCED_KEYWORDS (or an allOf of several schemas),
    as JSON pointers ('/properties/tags/uniqueItems')."""
    if not isinstance(schema, dict):
        return []
    found = []
    for path, sub in _subschemas(schema):
        found += [f"{path}/{key}" for key in sub if key in UNENFORCED_KEYWORDS]
        if isinstance(sub.get("allOf"), list) and len(sub["allOf"]) > 1:
            found.append(f"{path}/allOf")
    return found


def _check_json_schema(text: str, param: str) -> str:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidRequestError(f"{param}: the schema is not valid JSON ({err.msg})", param) from None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        raise InvalidRequestError(f"{param}: not a valid JSON schema at {where}: {err.message}", param) from None
    unenforced = unenforced_keywords(schema)
    if unenforced:
        raise InvalidRequestError(f"{param}: the schema uses {', '.join(unenforced)}, which constrained decoding "
                                  f"cannot enforce here", param)
    return text


# The tool-call markup formats a `tool_calls` grammar can take, by xgrammar's model name: DeepSeek-V3
# writes the same markup as DeepSeek-R1 (whose reasoning block is left to `start_after`).
TOOL_MARKUP = {"deepseek_v3": "deepseek_r1"}


def _tool_call_tag(spec: GrammarSpec):
    """The structural tag of a request's tools: free text then calls (auto), or calls only."""
    import xgrammar as xgr

    options = json.loads(spec.spec)
    tools = []
    for i, tool in enumerate(options["tools"]):
        function = dict(tool["function"])
        parameters = function.get("parameters") or {"type": "object"}
        _check_json_schema(json.dumps(parameters), f"{spec.param}[{i}].function.parameters")
        tools.append({"type": "function", "function": {**function, "parameters": parameters}})
    return xgr.get_model_structural_tag(TOOL_MARKUP[options["format"]], tools=tools, tool_choice=options["tool_choice"],
                                        reasoning="disabled", parallel_tool_calls=options["parallel_tool_calls"],
                                        max_whitespace_cnt=1)


class Grammars:
    """Compiles and caches the grammars of one engine's requests."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, compile_timeout_s: float = 10.0):
        import xgrammar as xgr

        self._xgr = xgr
        encoded = [""] * vocab_size
        for token, token_id in tokenizer.vocabulary().items():
            if token_id < vocab_size:
                encoded[token_id] = token
        info = xgr.TokenizerInfo(encoded, _vocabulary_kind(tokenizer), vocab_size=vocab_size,
                                 stop_token_ids=sorted(tokenizer.eos_token_ids))
        self.vocab_size = vocab_size
        self.compile_timeout_s = compile_timeout_s
        self._info = info
        self._no_control_characters: torch.Tensor | None = None
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="moeray-grammar")
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles_total = 0  # cache misses compiled to the end, and the seconds they took
        self.compile_seconds_total = 0.0

    def compile(self, spec: GrammarSpec):
        """The compiled grammar of `spec` (from the cache when it was compiled before)."""
        key = spec.cache_key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        future = self._pool.submit(self._compile, spec)
        try:
            compiled = future.result(timeout=self.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise InvalidRequestError(f"{spec.param}: compiling its grammar took longer than "
                                      f"{self.compile_timeout_s:g} s; simplify it", spec.param) from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        started = time.perf_counter()
        compiled = self._compile_uncounted(spec)
        with self._lock:
            self.compiles_total += 1
            self.compile_seconds_total += time.perf_counter() - started
        return compiled

    def _compile_uncounted(self, spec: GrammarSpec):
        compiler = self._compiler
        try:
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(_check_json_schema(spec.spec, spec.param), any_whitespace=False,
                                                    separators=(",", ":"), strict_mode=spec.strict)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                    separators=(",", ":"))
            if spec.kind == "regex":
                return compiler.compile_regex(spec.spec)
            if spec.kind == "choice":
                choices = json.loads(spec.spec)
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in choices))
            if spec.kind == "grammar":
                return compiler.compile_grammar(spec.spec)
            if spec.kind == "tool_calls":
                return compiler.compile_structural_tag(_tool_call_tag(spec))
        except InvalidRequestError:
            raise
        except Exception as err:  # noqa: BLE001 - xgrammar reports every bad grammar as RuntimeError
            message = _LOCATION.sub("", str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
            raise InvalidRequestError(f"{spec.param}: {message[:300]}", spec.param) from None
        raise InvalidRequestError(f"{spec.param}: unknown kind of grammar {spec.kind!r}", spec.param)

    def matcher(self, spec: GrammarSpec) -> SequenceGrammar:
        also = self._json_safe_tokens() if spec.kind in COMPACT_JSON_KINDS else None
        return SequenceGrammar(self._xgr.GrammarMatcher(self.compile(spec)), self.vocab_size, spec.start_after, also)

    def _json_safe_tokens(self) -> torch.Tensor:
        """A bitmask [ceil(V / 32)] of the tokens with no raw control character (U+0000-U+001F)."""
        if self._no_control_characters is None:
            mask = self._xgr.allocate_token_bitmask(1, self.vocab_size)[0]  # all allowed
            bad = [i for i, text in enumerate(self._info.decoded_vocab) if any(byte < 0x20 for byte in text)]
            if bad:
                ids = torch.tensor(bad, dtype=torch.long)
                words = torch.zeros_like(mask).index_add_(0, ids // 32, torch.bitwise_left_shift(
                    torch.ones_like(ids, dtype=torch.int32), (ids % 32).to(torch.int32)))
                mask &= ~words
            self._no_control_characters = mask
        return self._no_control_characters


def mask_logits(logits: torch.Tensor, constrained: list[tuple[int, SequenceGrammar]]) -> None:
    """Set to -inf, in place, each constrained row's tokens its grammar does not allow next.
    logits [N, V]; `constrained` holds (row, grammar) pairs of active grammars."""
    import xgrammar as xgr

    vocab_size = constrained[0][1].vocab_size
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab_size)  # [N, ceil(V / 32)] int32
    for row, grammar in constrained:
        grammar.fill(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=[row for row, _ in constrained])


class SequenceGrammar:
    """One sequence's place in its grammar (inactive until `start_after` has been generated)."""

    def __init__(self, matcher, vocab_size: int, start_after: str | None = None, also: torch.Tensor | None = None):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._also = also  # a bitmask every mask of this grammar is intersected with
        self._start_after = start_after
        self._tail = ""  # the end of the text so far, while waiting for `start_after`
        self.active = start_after is None
        self.failed = False  # a token the grammar did not allow got through (then constraining stops)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._also is not None:
            bitmask[row] &= self._also

    def advance(self, token_id: int, text: str) -> None:
        """Follow the sampled token; `text` is what it decodes to (used while inactive)."""
        if self.failed:
            return
        if self.active:
            self.failed = not self._matcher.accept_token(token_id)
            return
        self._tail += text
        at = self._tail.find(self._start_after)
        if at == -1:
            self._tail = self._tail[-len(self._start_after):]
            return
        self.active = True
        rest = self._tail[at + len(self._start_after):]
        if rest:
            self.failed = not self._matcher.accept_string(rest)

    @property
    def constraining(self) -> bool:
        """Whether the next token must be masked by this grammar."""
        return self.active and not self.failed

    @property
    def terminated(self) -> bool:
        return self.active and self._matcher.is_terminated()
