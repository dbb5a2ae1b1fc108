"""Task files and their scoring, independent of where completions come from.

Contract: `load_items(task)` reads the task's JSONL and returns its items (row and prompt),
checked before any model runs: a row without a field its kind or its template needs raises
`DataError` naming `file:line` and the field. `score_task(task, items, backend, seed)` asks the
backend for completions or log-likelihoods and returns a `TaskResult`: the task's metrics (with
their standard errors, lm-eval's sample stddev / sqrt(n)) and one record per item.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Protocol

from moeray.jobs.data import DataError, read_jsonl
from moeray.jobs.eval.spec import TaskSpec
from moeray.jobs.rewards import answers_equal, final_answer
from moeray.jobs.sandbox import SandboxLimits, run_python

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Backend(Protocol):
    def generate(self, prompts: list[str], n: int, temperature: float, max_tokens: int, stop: list[str],
                 seed: int) -> list[list[str]]:
        """n completions of each prompt."""

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Summed log-probability of each continuation's tokens after its context."""


@dataclass
class Item:
    line: int
    row: dict[str, Any]
    prompt: str


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]
    items: list[dict[str, Any]] = field(default_factory=list)


def _fields_of(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def load_items(task: TaskSpec) -> list[Item]:
    required = {"exact_match": ["answer"], "pass_at_k": ["tests"], "multiple_choice": ["choices", "answer"]}[task.kind]
    items = []
    for line, row in read_jsonl(task.file):
        where = f"{task.file}:{line}"
        for name in [*_fields_of(task.prompt_template), *required]:
            if row.get(name) is None:
                raise DataError(f"{where}: missing '{name}' (task {task.label!r}, kind {task.kind})")
        if task.kind == "multiple_choice":
            choices = row["choices"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{where}: choices must be a list of at least two strings")
            if not isinstance(row["answer"], int) or not 0 <= row["answer"] < len(choices):
                raise DataError(f"{where}: answer must be the index of the right choice (0..{len(choices) - 1})")
        if task.kind == "pass_at_k" and not (isinstance(row["tests"], str) or (
                isinstance(row["tests"], list) and all(isinstance(t, str) for t in row["tests"]))):
            raise DataError(f"{where}: tests must be a string or a list of strings of Python")
        try:
            prompt = task.prompt_template.format(**row)
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"{where}: prompt_template cannot be filled from this row ({err})") from None
        items.append(Item(line, row, prompt))
        if task.limit is not None and len(items) == task.limit:
            break
    if not items:
        raise DataError(f"{task.file}: no items")
    return items


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def extract(text: str, extractor: str) -> str | None:
    if extractor == "text":
        return text.strip()
    if extractor == "first_line":
        return text.strip().split("\n", 1)[0].strip()
    if extractor == "first_number":
        match = _NUMBER.search(text)
        return match.group(0) if match else None
    return final_answer(text)


def _exact_match(task: TaskSpec, items: list[Item], backend: Backend, seed: int) -> TaskResult:
    completions = backend.generate([item.prompt for item in items], 1, task.temperature, task.max_tokens, task.stop,
                                   seed)
    records, scores = [], []
    for item, (completion,) in zip(items, completions):
        got = extract(completion, task.extractor)
        expected = str(item.row["answer"]).strip()
        correct = got is not None and (got == expected or (task.extractor.endswith("number")
                                                           and answers_equal(got, expected)))
        scores.append(float(correct))
        records.append({"line": item.line, "prompt": item.prompt, "completion": completion, "extracted": got,
                        "answer": expected, "correct": correct})
    mean, stderr = mean_and_stderr(scores)
    return TaskResult(task.label, task.kind, {"exact_match": mean, "exact_match_stderr": stderr}, records)


def _pass_at_k(task: TaskSpec, items: list[Item], backend: Backend, seed: int) -> TaskResult:
    completions = backend.generate([item.prompt for item in items], task.samples, task.temperature, task.max_tokens,
                                   task.stop, seed)
    limits = SandboxLimits(timeout_s=task.timeout_s)
    records = []
    per_k: dict[int, list[float]] = {k: [] for k in task.k}
    for item, samples in zip(items, completions):
        tests = [item.row["tests"]] if isinstance(item.row["tests"], str) else item.row["tests"]
        passed = [run_python(item.prompt + sample, tests, limits).all_passed for sample in samples]
        for k in task.k:
            per_k[k].append(pass_at_k(len(samples), sum(passed), k))
        records.append({"line": item.line, "prompt": item.prompt, "completions": samples, "passed": passed})
    metrics = {}
    for k, values in per_k.items():
        metrics[f"pass@{k}"], metrics[f"pass@{k}_stderr"] = mean_and_stderr(values)
    return TaskResult(task.label, task.kind, metrics, records)


def _multiple_choice(task: TaskSpec, items: list[Item], backend: Backend, seed: int) -> TaskResult:
    pairs = [(item.prompt, task.choice_template.format(choice=choice, **{k: v for k, v in item.row.items()
                                                                        if k != "choice"}))
             for item in items for choice in item.row["choices"]]
    scores = backend.loglikelihood(pairs)
    records, correct_list, start = [], [], 0
    for item in items:
        count = len(item.row["choices"])
        mine = scores[start:start + count]
        start += count
        best = max(range(count), key=lambda i: mine[i])
        correct_list.append(float(best == item.row["answer"]))
        records.append({"line": item.line, "prompt": item.prompt, "loglikelihoods": mine, "chosen": best,
                        "answer": item.row["answer"], "correct": best == item.row["answer"]})
    mean, stderr = mean_and_stderr(correct_list)
    return TaskResult(task.label, task.kind, {"acc": mean, "acc_stderr": stderr}, records)


SCORERS = {"exact_match": _exact_match, "pass_at_k": _pass_at_k, "multiple_choice": _multiple_choice}


def score_task(task: TaskSpec, items: list[Item], backend: Backend, seed: int = 0) -> TaskResult:
    return SCORERS[task.kind](task, items, backend, seed)
