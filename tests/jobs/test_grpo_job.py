"""GRPO end to end on Ray Train: the embedded default model learns to open Python functions with a
body that parses and returns, with rollouts by moeray's engine on the weights of every step; a
killed worker resumes; the exported model, served, beats the base model on held-out prompts."""

import json
import shutil
from pathlib import Path

import pytest

from moeray import LLM, SamplingParams
from moeray.jobs.export import export
from moeray.jobs.methods.grpo import RewardSpec
from moeray.jobs.rewards import Rewards
from moeray.jobs.spec import JobSpec, parse_spec
from moeray.jobs.trainer import run
from moeray.platform.default_model import DEFAULT_MODEL_DIR
from support import run_and_kill_workers

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).parents[2] / "examples" / "jobs" / "grpo-functions.yaml"
REPO = Path(__file__).parents[2]
REWARD = Rewards([RewardSpec(function="python_syntax", options={"contains": ["return"]})])


def example_spec(tmp_path, **changes) -> JobSpec:
    data = JobSpec.from_yaml(EXAMPLE).model_dump()
    data.update(base_model=str(DEFAULT_MODEL_DIR), output=str(tmp_path / "out"),
                checkpoint={**data["checkpoint"], "storage": str(tmp_path / "ckpt")})
    data["data"] = {"train": str(REPO / data["data"]["train"]), "eval": str(REPO / data["data"]["eval"])}
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return parse_spec(data)


def held_out_reward(model_folder) -> float:
    prompts = [json.loads(line)["prompt"] for line in (REPO / "examples/data/grpo-functions-eval.jsonl").open()]
    results = LLM(model_folder, max_model_len=64).generate(prompts, SamplingParams(
        n=8, temperature=1.0, max_tokens=8, stop=["\n\n", "\ndef ", "\nclass "], seed=123))
    completions = [completion.text for result in results for completion in result.outputs]
    totals, _ = REWARD.score([p for p in prompts for _ in range(8)], completions, [{}] * len(completions))
    return sum(totals) / len(totals)


def test_grpo_raises_the_reward_and_the_exported_model_beats_the_base(ray_session, tmp_path):
    spec = example_spec(tmp_path)
    result = run(spec)
    history = [json.loads(line) for line in (tmp_path / "ckpt" / spec.name / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == list(range(1, 41))
    first, last = (sum(row["reward"] for row in rows) / 5 for rows in (history[:5], history[-5:]))
    assert last > first + 0.4, (first, last)
    for row in history:
        # The engine sampled from the weights of that very step: its log-probabilities of the sampled
        # tokens are the trainer's (fp32).
        assert row["rollout_logprob_max_diff"] < 1e-4, row
        for key in ("reward_std", "rewards/python_syntax/mean", "rewards/python_syntax/std", "kl", "clip_fraction",
                    "completion_length", "rollout_tokens_per_s", "tokens_per_s", "weight_sync_s"):
            assert key in row, key
    assert history[-1]["eval_reward"] is not None
    with result.checkpoint.as_directory() as folder:
        assert (Path(folder) / "loss.png").read_bytes().startswith(b"\x89PNG")
        out = export(spec, folder)
    base_score, trained_score = held_out_reward(DEFAULT_MODEL_DIR), held_out_reward(out)
    assert trained_score > base_score + 0.3, (base_score, trained_score)


def test_a_killed_grpo_worker_resumes_from_its_last_checkpoint(ray_session, tmp_path):
    spec = example_spec(tmp_path, name="grpo-killed", train={"max_steps": 14}, checkpoint={"every_steps": 4},
                        eval={"every_steps": 100})
    metrics = tmp_path / "ckpt" / "grpo-killed" / "metrics.jsonl"
    # Killed once two checkpoints (steps 4 and 8) were due: Ray Train records one a moment after
    # the step that wrote it, so the resumed run starts after step 4 or after step 8.
    result, killed_at = run_and_kill_workers(run, spec, metrics, after_lines=10)
    assert killed_at is not None and result.metrics["step"] == 14
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] in (5, 9), steps  # continued after a checkpoint, not from 0
    with result.checkpoint.as_directory() as folder:
        history = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == list(range(1, 15))
    shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)
