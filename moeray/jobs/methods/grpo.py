"""GRPO: group relative policy optimisation on verifiable rewards, rollouts by moeray's engine.

Each round, per worker: `prompts_per_step` prompts, G = `num_generations` completions each
from the worker's `RolloutEngine` (continuous batching, the paged latent cache, the policy's
current weights); rewards from `moeray.jobs.rewards`; advantages normalised within each
prompt's group, A = (r - mean) / (std + 1e-4); then `num_iterations` optimiser steps on

    loss = mean over completions of mean over their tokens of
           -( min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * KL_k3 ),
    ratio = exp(logp - logp_old),  KL_k3 = exp(ref - logp) - (ref - logp) - 1,

with log-probabilities of the sampling distribution (logits / temperature) on completion
tokens only. `logp_old` and `ref` come from one no-grad forward each before the first step;
the same forward yields the policy's raw log-probabilities, which must equal the engine's for
the sampled tokens (`rollout_logprob_max_diff` in every step's metrics). After each step the
engine's weights are synced (`weight_sync_s`).

Rows: TRL's formats; a `prompt` string is a standard prompt (the model continues it as it
is), a `prompt` or `messages` list a conversational one (chat template, generation prompt).
The other fields are the rewards' (`answer`, `tests`, `schema`, ...).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from moeray.engine.params import SamplingParams
from moeray.jobs.data import IGNORE_INDEX, DataError, _validate_messages, flatten
from moeray.jobs.methods.base import Method, Plan, Row, WorkerContext
from moeray.jobs.rewards import Rewards
from moeray.jobs.spec import JobSpec, _Strict

ADVANTAGE_EPS = 1e-4


class RewardSpec(_Strict):
    function: str = Field(description="A built-in reward (exact_match, regex, json_schema, python_tests, "
                          "python_syntax) or a user function 'package.module:function' taking TRL's "
                          "(prompts, completions, **columns).")
    weight: float = Field(1.0, description="Weight of this function in the summed reward.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the function, e.g. "
                                    "{pattern: ...} for regex or {timeout_s: 5} for python_tests.")
    fields: list[str] = Field(default_factory=list, description="Row fields the function needs beyond a "
                              "built-in's own (rows without them are rejected before training).")


class GrpoOptions(_Strict):
    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt (one group).")
    prompts_per_step: int = Field(4, ge=1, description="Prompts per worker per round of rollouts.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion; train.max_length bounds prompt plus "
                                "completion.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion (left out of it), "
                            "e.g. [\"\\ndef \", \"\\nclass \"] for function bodies.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip range of the policy ratio.")
    beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the reference model; 0: no "
                        "reference model is kept.")
    num_iterations: int = Field(1, ge=1, description="Optimiser steps on each round of rollouts.")
    scale_rewards: bool = Field(True, description="Divide advantages by their group's reward std.")
    rewards: list[RewardSpec] = Field(min_length=1, description="Reward functions, summed with their weights.")


class GrpoJob(JobSpec):
    method: Literal["grpo"] = Field(description="GRPO on verifiable rewards with rollouts by moeray's engine.")
    grpo: GrpoOptions = Field(description="GRPO options: groups, sampling, clipping, KL and rewards.")


def _prompt_ids(row: Row, tokenizer) -> list[int]:
    messages = row.get("messages", row.get("prompt"))
    if isinstance(messages, str):
        return tokenizer.encode(messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _seed(*parts: Any) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def completion_logprobs(model, rows: list[Row], temperature: float, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """(log p at `temperature` [M], raw log p [M], completion index [M]) of every completion
    token of the rows, in one padding-free forward with the head on those positions only."""
    batch = flatten(rows).to(device)
    where = (batch.next_labels != IGNORE_INDEX).nonzero().squeeze(1)  # [M]
    logits = model(batch.input_ids, batch.position_ids, lengths=batch.lengths, logits_at=where).float()  # [M, V]
    targets = batch.next_labels[where]
    tempered = -F.cross_entropy(logits / temperature, targets, reduction="none")
    raw = tempered if temperature == 1.0 else -F.cross_entropy(logits, targets, reduction="none")
    return tempered, raw, batch.sequence_of_token[where]


def _per_sequence_mean(values: torch.Tensor, sequence: torch.Tensor, count: int) -> torch.Tensor:
    totals = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, sequence, values)
    lengths = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(
        0, sequence, torch.ones_like(values))
    return totals / lengths.clamp(min=1)


class Grpo(Method):
    name = "grpo"
    spec_class = GrpoJob

    def __init__(self, spec: GrpoJob):
        super().__init__(spec)
        self.options = spec.grpo
        self.rewards = Rewards(self.options.rewards)

    def validate_row(self, row: Row, uri: str, line: int) -> None:
        where = f"{uri}:{line}"
        prompt = row.get("messages", row.get("prompt"))
        if prompt is None:
            raise DataError(f"{where}: missing 'prompt' (a string, or a list of messages) or 'messages'")
        if not isinstance(prompt, str):
            messages = _validate_messages(prompt, "messages" if "messages" in row else "prompt", where)
            if messages[-1]["role"] == "assistant":
                raise DataError(f"{where}: the prompt must not end with an assistant message")
        elif not prompt:
            raise DataError(f"{where}: prompt must not be empty")
        for field, reward in self.rewards.required_fields.items():
            if row.get(field) is None:
                raise DataError(f"{where}: missing '{field}', which reward function {reward!r} needs")

    def check(self, tokenizer) -> None:
        if self.options.max_new_tokens >= self.spec.train.max_length:
            raise ValueError(f"grpo.max_new_tokens ({self.options.max_new_tokens}) must be below train.max_length "
                             f"({self.spec.train.max_length}), which bounds prompt plus completion")

    def needs_reference(self) -> bool:
        return self.options.beta > 0

    def make_rollouts(self, policy, tokenizer):
        from moeray.jobs.rollouts import RolloutEngine

        return RolloutEngine(policy, tokenizer, self.spec.train.max_length,
                             max_num_seqs=self.options.prompts_per_step * self.options.num_generations,
                             seed=self.spec.train.seed)

    def rows_per_round(self) -> int:
        return self.options.prompts_per_step

    def steps_per_round(self) -> int:
        return self.options.num_iterations

    def encode(self, rows, tokenizer, training):
        budget = self.spec.train.max_length - self.options.max_new_tokens
        examples = []
        for row in rows:
            ids = _prompt_ids(row, tokenizer)
            prompt = row.get("messages", row.get("prompt"))
            text = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)
            examples.append({"prompt_ids": ids[-budget:], "prompt_text": text, "row": json.dumps(row)})
        return examples

    # ---- one round ------------------------------------------------------------------------------
    def _sample(self, rows: list[Row], ctx: WorkerContext, greedy: bool = False):
        step = ctx.state.get("rounds", 0)
        params = [SamplingParams(n=1 if greedy else self.options.num_generations,
                                 temperature=0.0 if greedy else self.options.temperature,
                                 top_p=1.0 if greedy else self.options.top_p,
                                 max_tokens=self.options.max_new_tokens, logprobs=0, stop=list(self.options.stop),
                                 seed=_seed(self.spec.train.seed, ctx.rank, step, i))
                  for i in range(len(rows))]
        started = time.perf_counter()
        results = ctx.rollouts.generate([list(row["prompt_ids"]) for row in rows], params)
        return results, time.perf_counter() - started

    def _score(self, rows: list[Row], results, ctx: WorkerContext):
        prompts, completions, fields = [], [], []
        for row, result in zip(rows, results):
            original = json.loads(row["row"])
            for completion in result.outputs:
                prompts.append(row["prompt_text"])
                completions.append(ctx.tokenizer.decode(completion.token_ids, skip_special_tokens=True))
                fields.append(original)
        return self.rewards.score(prompts, completions, fields)

    def plan(self, rows: list[Row], ctx: WorkerContext) -> Plan:
        results, rollout_s = self._sample(rows, ctx)
        ctx.state["rounds"] = ctx.state.get("rounds", 0) + 1
        totals, each = self._score(rows, results, ctx)
        rewards = torch.tensor(totals).view(len(rows), self.options.num_generations)  # [P, G]
        advantages = rewards - rewards.mean(1, keepdim=True)
        if self.options.scale_rewards:
            advantages = advantages / (rewards.std(1, keepdim=True) + ADVANTAGE_EPS)
        sequences, engine_logprobs = [], []
        for row, result, group_advantages in zip(rows, results, advantages):
            prompt = list(row["prompt_ids"])
            for completion, advantage in zip(result.outputs, group_advantages.tolist()):
                ids = list(completion.token_ids)
                sequences.append({"input_ids": prompt + ids, "labels": [IGNORE_INDEX] * len(prompt) + ids,
                                  "advantage": advantage})
                engine_logprobs += [entry.logprob for entry in completion.logprobs or []]
        drift = self._attach_old_logprobs(sequences, engine_logprobs, ctx)
        completion_tokens = sum(len(s["input_ids"]) for s in sequences) - sum(len(r["prompt_ids"]) for r in rows) * \
            self.options.num_generations
        metrics = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "completion_length": completion_tokens / len(sequences),
                   "rollout_tokens_per_s": completion_tokens / max(rollout_s, 1e-9), "rollout_s": rollout_s,
                   "rollout_logprob_max_diff": drift}
        for name, scores in each.items():
            values = torch.tensor(scores)
            metrics[f"rewards/{name}/mean"] = float(values.mean())
            metrics[f"rewards/{name}/std"] = float(values.std())
        size = self.spec.train.per_device_batch_size
        micro_batches = [sequences[i:i + size] for i in range(0, len(sequences), size)]
        return Plan([micro_batches] * self.options.num_iterations, metrics)

    @torch.no_grad()
    def _attach_old_logprobs(self, sequences: list[Row], engine_logprobs: list[float], ctx: WorkerContext) -> float:
        """Store each sequence's old-policy and reference log-probabilities (no grad, eval mode:
        the weights the engine sampled with) and return the largest difference between the
        engine's raw log-probabilities and the policy's for the same tokens."""
        was_training = ctx.model.training
        ctx.model.eval()
        tempered, raw, sequence = completion_logprobs(ctx.model, sequences, self.options.temperature, ctx.device)
        ctx.model.train(was_training)
        reference = None
        if ctx.reference is not None:
            reference, _, _ = completion_logprobs(ctx.reference, sequences, self.options.temperature, ctx.device)
        for index, row in enumerate(sequences):
            mine = sequence == index
            row["old_logprobs"] = tempered[mine].tolist()
            row["ref_logprobs"] = reference[mine].tolist() if reference is not None else None
        engine = torch.tensor(engine_logprobs, dtype=raw.dtype)
        if engine.numel() != raw.numel():
            raise RuntimeError(f"the engine returned {engine.numel()} log-probabilities for {raw.numel()} tokens")
        return float((engine - raw.cpu()).abs().max()) if raw.numel() else 0.0

    def loss(self, model, rows, ctx):
        logprobs, _, sequence = completion_logprobs(model, rows, self.options.temperature, ctx.device)
        device = logprobs.device
        old = torch.tensor([v for r in rows for v in r["old_logprobs"]], device=device)
        advantage = torch.tensor([r["advantage"] for r in rows], device=device)[sequence]  # [M]
        ratio = torch.exp(logprobs - old)
        epsilon = self.options.epsilon
        clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
        objective = torch.minimum(ratio * advantage, clipped * advantage)
        metrics = {"clip_fraction": float(((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).float().mean()),
                   "tokens": int(logprobs.numel())}
        if self.options.beta > 0:
            ref = torch.tensor([v for r in rows for v in r["ref_logprobs"]], device=device)
            kl = torch.exp(ref - logprobs) - (ref - logprobs) - 1  # k3: unbiased, always >= 0
            objective = objective - self.options.beta * kl
            metrics["kl"] = float(kl.detach().mean())
        loss = -_per_sequence_mean(objective, sequence, len(rows)).mean()
        return loss, metrics

    def after_step(self, ctx: WorkerContext) -> dict[str, float]:
        return {"weight_sync_s": ctx.rollouts.sync(ctx.model)}

    def evaluate(self, rows: list[Row], ctx: WorkerContext) -> dict[str, float]:
        """Mean reward of greedy completions of the eval prompts."""
        if not rows:
            return {}
        results, _ = self._sample(rows, ctx, greedy=True)
        totals, _ = self._score(rows, results, ctx)
        return {"eval_reward": sum(totals) / len(totals)}
