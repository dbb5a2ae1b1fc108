"""GRPO's rollouts and its step: moeray's engine against transformers' `generate`, and where a step's time goes.

`cd bench && ../.venv/bin/python grpo.py` (the embedded default model, float32, CPU):
1. rollout output tokens/s: the same prompts, G completions each, sampled by moeray's
   `RolloutEngine` (continuous batching over the paged latent cache, the prompt prefilled once
   per group) and by transformers' `DeepseekV3ForCausalLM.generate` (one left-padded batch of
   prompts x G, `do_sample`, its KV cache), in alternating rounds, medians reported. Both sides
   generate exactly `--tokens` tokens per completion (EOS ignored / min_new_tokens).
2. one GRPO step of the example job's shape, in process (`Grpo.plan`, the loss and optimiser
   step, `after_step`): the share of its time in rollout, the old/reference log-prob forward,
   training and the weight sync, medians over `--steps` steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moeray.model
from common import report
from moeray.engine.params import SamplingParams
from moeray.jobs.methods import WorkerContext, method_for
from moeray.jobs.rollouts import RolloutEngine
from moeray.jobs.spec import parse_spec
from moeray.model.tokenizer import Tokenizer
from moeray.platform.default_model import DEFAULT_MODEL_DIR

NAMES = ["add(a, b)", "square(x)", "is_empty(items)", "greet(name)", "get_name(self)", "count(items)",
         "area(width, height)", "first(items)"]


def moeray_rollouts(engine: RolloutEngine, prompts: list[list[int]], group: int, tokens: int, seed: int) -> int:
    params = [SamplingParams(n=group, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=seed + i, logprobs=0)
              for i in range(len(prompts))]
    results = engine.generate(prompts, params)
    return sum(len(c.token_ids) for r in results for c in r.outputs)


def hf_rollouts(model, prompts: list[list[int]], group: int, tokens: int, pad_id: int) -> int:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding, as generate wants
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             num_return_sequences=group, max_new_tokens=tokens, min_new_tokens=tokens,
                             pad_token_id=pad_id)
    return (out.shape[1] - width) * out.shape[0]


def step_shares(steps: int) -> dict[str, float]:
    spec = parse_spec({
        "name": "bench", "base_model": str(DEFAULT_MODEL_DIR), "method": "grpo", "output": "unused",
        "data": {"train": "unused.jsonl"}, "checkpoint": {"storage": "unused"},
        "train": {"max_length": 48, "per_device_batch_size": 32, "learning_rate": 1e-3},
        "grpo": {"num_generations": 8, "prompts_per_step": 8, "max_new_tokens": 8, "beta": 0.02,
                 "stop": ["\n\n", "\ndef ", "\nclass "],
                 "rewards": [{"function": "python_syntax", "options": {"contains": ["return"]}}]}})
    method = method_for(spec)
    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    policy = moeray.model.load(DEFAULT_MODEL_DIR).train()
    context = WorkerContext(spec, tokenizer, policy, torch.device("cpu"),
                            reference=moeray.model.load(DEFAULT_MODEL_DIR).eval().requires_grad_(False),
                            rollouts=method.make_rollouts(policy, tokenizer))
    rows = method.encode([{"prompt": f"def {name}:\n"} for name in NAMES], tokenizer, True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    parts: dict[str, list[float]] = {"rollout": [], "logprobs": [], "train": [], "sync": []}
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        plan = method.plan(rows, context)
        planned = time.perf_counter() - start
        start = time.perf_counter()
        for micro_batches in plan.steps:
            for micro in micro_batches:
                loss, _ = method.loss(policy, micro, context)
                (loss / len(micro_batches)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        trained = time.perf_counter() - start
        synced = method.after_step(context)["weight_sync_s"]
        parts["rollout"].append(plan.metrics["rollout_s"])
        parts["logprobs"].append(planned - plan.metrics["rollout_s"])
        parts["train"].append(trained)
        parts["sync"].append(synced)
    return {name: statistics.median(values[1:]) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    opts = parser.parse_args()
    torch.manual_seed(0)
    from transformers import DeepseekV3ForCausalLM

    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    prompts = [tokenizer.encode(f"def {name}:\n") for name in NAMES]
    policy = moeray.model.load(DEFAULT_MODEL_DIR)
    engine = RolloutEngine(policy, tokenizer, max_model_len=128, max_num_seqs=len(prompts) * opts.group)
    theirs = DeepseekV3ForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    pad_id = tokenizer.eos_token_id or 0
    sides = {"moeray": lambda seed: moeray_rollouts(engine, prompts, opts.group, opts.tokens, seed),
             "transformers": lambda seed: hf_rollouts(theirs, prompts, opts.group, opts.tokens, pad_id)}
    for side in sides.values():
        side(0)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(opts.rounds):
        for name, side in sides.items():
            start = time.perf_counter()
            tokens = side(round_index)
            rates[name].append(tokens / (time.perf_counter() - start))
    ours, hf = (statistics.median(rates[name]) for name in sides)
    shares = step_shares(opts.steps)
    total = sum(shares.values())
    report("grpo", {"prompts": len(prompts), "group": opts.group, "tokens_per_completion": opts.tokens,
                    "rounds": opts.rounds, "moeray_rollout_tokens_per_s": ours, "transformers_tokens_per_s": hf,
                    "ratio": ours / hf, "rounds_moeray": rates["moeray"], "rounds_transformers": rates["transformers"],
                    "step_seconds": shares, "step_total_s": total},
           [(f"rollout tok/s ({len(prompts)} prompts x G={opts.group}, {opts.tokens} tokens)", f"{ours:.0f}",
             f"{hf:.0f} (transformers generate)", f"{ours / hf:.2f}x (target >= 3)")]
           + [(f"GRPO step: {name} (s, share)", f"{seconds:.3f}", "", f"{seconds / total:.0%}")
              for name, seconds in shares.items()])


if __name__ == "__main__":
    main()
