"""Reward functions: the built-ins, user functions by import path, weights, and failures."""

import sys
import types

import pytest

from moeray.jobs.methods.grpo import RewardSpec
from moeray.jobs.rewards import RewardError, Rewards, final_answer


def rewards(*specs):
    return Rewards([RewardSpec.model_validate(spec) for spec in specs])


def test_final_answer_follows_gsm8k():
    assert final_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert final_answer("The total is 1,234 apples.") == "1234"
    assert final_answer("first 3 then -2.5.") == "-2.5"


def test_exact_match_compares_extracted_numbers():
    total, each = rewards({"function": "exact_match"}).score(
        ["q"] * 3, ["... #### 42", "it is 41", "42.0"], [{"answer": "#### 42"}, {"answer": "42"}, {"answer": 42}])
    assert total == [1.0, 0.0, 1.0] and each == {"exact_match": [1.0, 0.0, 1.0]}


def test_regex_search_and_fullmatch():
    search = rewards({"function": "regex", "options": {"pattern": r"\breturn\b"}})
    assert search.score(["p", "p"], ["x\n    return 1", "pass"], [{}, {}])[0] == [1.0, 0.0]
    full = rewards({"function": "regex", "options": {"pattern": r"\d+", "mode": "fullmatch"}})
    assert full.score(["p", "p"], [" 12 ", "12 apples"], [{}, {}])[0] == [1.0, 0.0]
    per_row = rewards({"function": "regex"})
    assert per_row.score(["p"], ["abc"], [{"pattern": "b"}])[0] == [1.0]


def test_json_schema_validates_the_completion():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    scorer = rewards({"function": "json_schema"})
    assert scorer.score(["p"] * 3, ['{"n": 3}', '{"n": "3"}', "not json"], [{"schema": schema}] * 3)[0] == [1, 0, 0]


def test_python_tests_run_in_the_sandbox():
    scorer = rewards({"function": "python_tests", "options": {"timeout_s": 2}})
    prompts = ["def add(a, b):\n"] * 3
    completions = ["    return a + b\n", "    return a - b\n", "    while True:\n        pass\n"]
    tests = [["assert add(1, 2) == 3", "assert add(0, 0) == 0"]] * 3
    assert scorer.score(prompts, completions, [{"tests": t} for t in tests])[0] == [1.0, 0.5, 0.0]
    fenced = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert scorer.score(["Write add."], [fenced], [{"tests": "assert add(2, 3) == 5"}])[0] == [1.0]


def test_python_syntax_parses_the_program():
    scorer = rewards({"function": "python_syntax", "options": {"contains": ["return"]}})
    prompts = ["def f(x):\n"] * 3
    assert scorer.score(prompts, ["    return x\n", "    x +\n", "    pass\n"], [{}] * 3)[0] == [1.0, 0.0, 0.0]


def test_user_functions_by_import_path_with_weights(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.length = lambda prompts, completions, **columns: [len(c) / 10 for c in completions]
    module.bonus = lambda prompts, completions, bonus, **columns: bonus
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    scorer = rewards({"function": "my_rewards:length", "weight": 2.0},
                     {"function": "my_rewards:bonus", "weight": 0.5, "fields": ["bonus"]})
    assert scorer.required_fields == {"bonus": "bonus"}
    total, each = scorer.score(["p", "p"], ["abcde", "a"], [{"bonus": 1.0}, {"bonus": 0.0}])
    assert total == pytest.approx([2 * 0.5 + 0.5, 2 * 0.1]) and set(each) == {"length", "bonus"}


def test_a_failing_reward_scores_zero_and_the_rest_still_count(monkeypatch):
    module = types.ModuleType("broken_rewards")

    def explode(prompts, completions, **columns):
        raise RuntimeError("boom")
    module.explode = explode
    module.short = lambda prompts, completions, **columns: [1.0]  # wrong length
    monkeypatch.setitem(sys.modules, "broken_rewards", module)
    scorer = rewards({"function": "broken_rewards:explode"}, {"function": "broken_rewards:short"},
                     {"function": "regex", "options": {"pattern": "a"}})
    total, each = scorer.score(["p", "p"], ["a", "b"], [{}, {}])
    assert total == [1.0, 0.0] and each["explode"] == [0.0, 0.0] and each["short"] == [0.0, 0.0]


@pytest.mark.parametrize("function, problem", [
    ("no_such_builtin", "not a built-in"),
    ("moeray_no_such_module:score", "cannot import 'moeray_no_such_module'"),
    ("json:no_such_function", "'json' has no function 'no_such_function'"),
])
def test_unknown_functions_are_named(function, problem):
    with pytest.raises(RewardError, match=problem):
        rewards({"function": function})
