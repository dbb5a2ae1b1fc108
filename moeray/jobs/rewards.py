"""Reward functions for GRPO, built in or imported by path, combined with weights.

Contract: a user's reward function takes TRL's batched form, `fn(prompts, completions,
**columns)`, where `columns` holds each extra field of the rows as a list (`answer`, `tests`,
...) and the spec's `options` come as further keywords; it returns one float per completion
(None counts as 0). `Rewards(specs)` resolves every function
once (a built-in name or `package.module:function`; an unknown name or a failed import raises
`RewardError` naming it), says which row fields they need (`required_fields`), and
`score(prompts, completions, rows)` returns the weighted sum per completion and each
function's own scores. A function that raises scores 0 for that batch and the error is
logged: a bad reward never stops the job.

Built-ins:
- `exact_match`: the completion's final answer (after `####`, else the last number) equals
  the row's `answer` (the same extraction, numbers compared as numbers) -> 1 or 0;
- `regex`: the option `pattern` (or the row's `pattern`) is found (`mode: search`, `^` and `$`
  at every line) or matches the whole stripped completion (`mode: fullmatch`) -> 1 or 0;
- `json_schema`: the completion is a JSON document valid against the row's `schema` (or the
  option `schema`) -> 1 or 0;
- `python_tests`: the program (the prompt followed by the completion, or the completion alone
  with `include_prompt: false`; a fenced code block is taken from it) passes the row's `tests`
  in the sandbox (`moeray.jobs.sandbox`) -> the fraction that passed;
- `python_syntax`: that program parses (`ast.parse`) and contains every string of the option
  `contains` -> 1 or 0.
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from moeray.jobs.sandbox import SandboxLimits, run_python

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FENCED = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


class RewardError(ValueError):
    """A reward function cannot be found or is given options it does not take."""


def final_answer(text: str) -> str | None:
    """GSM8K's convention: what follows the last `####`, else the last number in the text."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else (text.strip() or None)


def answers_equal(got: str | None, expected: Any) -> bool:
    want = final_answer(str(expected))
    if got is None or want is None:
        return False
    try:
        return abs(float(got) - float(want)) < 1e-9
    except ValueError:
        return got.strip() == want.strip()


def program_of(prompt: str, completion: str, include_prompt: bool = True) -> str:
    fenced = _FENCED.search(completion)
    if fenced:
        return fenced.group(1)
    return prompt + completion if include_prompt else completion


# Built-ins take their options as one dict, apart from the row columns: an option and a column
# may share a name (json_schema's `schema` option stands for every row's `schema` field).
def exact_match(prompts, completions, options, answer, **_) -> list[float]:
    return [float(answers_equal(final_answer(c), a)) for c, a in zip(completions, answer)]


def regex(prompts, completions, options, **columns) -> list[float]:
    patterns = [options["pattern"]] * len(completions) if "pattern" in options else columns.get("pattern")
    if patterns is None:
        raise RewardError("reward 'regex' needs the option 'pattern' or a 'pattern' field in every row")
    mode = options.get("mode", "search")
    if mode == "fullmatch":
        return [float(re.fullmatch(p, c.strip()) is not None) for p, c in zip(patterns, completions)]
    return [float(re.search(p, c, re.MULTILINE) is not None) for p, c in zip(patterns, completions)]


def json_schema(prompts, completions, options, **columns) -> list[float]:
    schemas = [options["schema"]] * len(completions) if "schema" in options else columns.get("schema")
    scores = []
    for completion, row_schema in zip(completions, schemas):
        try:
            jsonschema.validate(json.loads(completion), row_schema)
            scores.append(1.0)
        except (ValueError, jsonschema.ValidationError):
            scores.append(0.0)
    return scores


def python_syntax(prompts, completions, options, **_) -> list[float]:
    contains, include_prompt = options.get("contains", ()), options.get("include_prompt", True)
    scores = []
    for prompt, completion in zip(prompts, completions):
        program = program_of(prompt, completion, include_prompt)
        try:
            with warnings.catch_warnings():  # model-written code warns a lot ("invalid escape sequence")
                warnings.simplefilter("ignore")
                ast.parse(program)
        except (SyntaxError, ValueError):
            scores.append(0.0)
            continue
        scores.append(float(all(word in program for word in contains)))
    return scores


def python_tests(prompts, completions, options, tests, **_) -> list[float]:
    limits = SandboxLimits(timeout_s=options.get("timeout_s", 5.0), memory_mb=options.get("memory_mb", 512),
                           max_processes=options.get("max_processes", 16))
    include_prompt = options.get("include_prompt", True)

    def one(args) -> float:
        prompt, completion, row_tests = args
        cases = [row_tests] if isinstance(row_tests, str) else list(row_tests)
        return run_python(program_of(prompt, completion, include_prompt), cases, limits).fraction

    with ThreadPoolExecutor(max(1, options.get("parallel", 2))) as pool:
        return list(pool.map(one, zip(prompts, completions, tests)))


# name -> (function, row fields it needs unless an option supplies them)
BUILTINS: dict[str, tuple[RewardFn, tuple[str, ...]]] = {
    "exact_match": (exact_match, ("answer",)),
    "regex": (regex, ()),
    "json_schema": (json_schema, ("schema",)),
    "python_tests": (python_tests, ("tests",)),
    "python_syntax": (python_syntax, ()),
}


def resolve(function: str) -> RewardFn:
    if function in BUILTINS:
        return BUILTINS[function][0]
    module_name, _, attribute = function.partition(":")
    if not module_name or not attribute:
        raise RewardError(f"reward function {function!r}: not a built-in ({', '.join(BUILTINS)}) nor an "
                          "import path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward function {function!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise RewardError(f"reward function {function!r}: {module_name!r} has no function {attribute!r}")
    return fn


@dataclass
class RewardFunction:
    name: str  # as the metrics name it
    fn: RewardFn
    weight: float
    options: dict[str, Any] = field(default_factory=dict)
    fields: tuple[str, ...] = ()  # row fields it needs
    builtin: bool = False

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list:
        if self.builtin:
            return list(self.fn(prompts, completions, options=self.options, **columns))
        return list(self.fn(prompts, completions, **{**columns, **self.options}))  # TRL's form; options win


class Rewards:
    def __init__(self, specs: Sequence[Any]):
        """`specs`: objects with `function`, `weight`, `options` and `fields` (the GRPO spec's
        reward entries)."""
        self.functions: list[RewardFunction] = []
        for spec in specs:
            fn = resolve(spec.function)
            needed = list(BUILTINS[spec.function][1]) if spec.function in BUILTINS else []
            needed = [f for f in needed if f not in spec.options] + list(spec.fields)
            name = spec.function.rsplit(":", 1)[-1]
            if any(f.name == name for f in self.functions):
                name = f"{name}_{len(self.functions)}"
            self.functions.append(RewardFunction(name, fn, spec.weight, dict(spec.options), tuple(needed),
                                                 spec.function in BUILTINS))

    @property
    def required_fields(self) -> dict[str, str]:
        """Row field -> the reward function that needs it."""
        return {name: function.name for function in self.functions for name in function.fields}

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              rows: Sequence[dict[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
        columns = {key: [row.get(key) for row in rows] for key in {k for row in rows for k in row}}
        columns.pop("prompt", None)
        columns.pop("messages", None)
        totals = [0.0] * len(completions)
        each: dict[str, list[float]] = {}
        for function in self.functions:
            try:
                scores = function(list(prompts), list(completions), columns)
                if len(scores) != len(completions):
                    raise ValueError(f"returned {len(scores)} scores for {len(completions)} completions")
                scores = [float(s) if s is not None else 0.0 for s in scores]
            except Exception:  # a user's reward must not stop the job
                log.exception("reward function %s failed; its scores count as 0 for this batch", function.name)
                scores = [0.0] * len(completions)
            each[function.name] = scores
            totals = [t + function.weight * s for t, s in zip(totals, scores)]
        return totals, each
