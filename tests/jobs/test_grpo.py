"""GRPO's parts without Ray: rollouts through moeray's engine that follow the trained weights,
group-normalised advantages, the clipped objective with its k3 KL, and row checks."""

import json
import sys
import types

import pytest
import torch

import moeray.model
from moeray.jobs.data import DataError, flatten
from moeray.model.lora import apply_lora
from moeray.jobs.methods import WorkerContext, method_for
from moeray.jobs.methods.grpo import completion_logprobs
from moeray.jobs.rollouts import RolloutEngine
from moeray.jobs.trainer import prepare
from moeray.model.tokenizer import Tokenizer
from support import make_spec, write_jsonl

PROMPTS = [{"prompt": "def add(a, b):\n"}, {"prompt": "def square(x):\n"}]


def grpo_spec(tmp_path, base, **grpo):
    options = {"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 12, "temperature": 1.0,
               "rewards": [{"function": "regex", "options": {"pattern": "e"}}], **grpo}
    return make_spec(tmp_path, base, method="grpo", grpo=options, train={"max_length": 64, "per_device_batch_size": 4})


def engine_logprobs(results) -> torch.Tensor:
    return torch.tensor([entry.logprob for result in results for completion in result.outputs
                         for entry in completion.logprobs])


def trainer_logprobs(model, results) -> torch.Tensor:
    rows = [{"input_ids": result.prompt_token_ids + completion.token_ids,
             "labels": [-100] * len(result.prompt_token_ids) + completion.token_ids}
            for result in results for completion in result.outputs]
    with torch.no_grad():
        return completion_logprobs(model.eval(), rows, 1.0, "cpu")[1]


def sample(engine, tokenizer, seed):
    from moeray.engine.params import SamplingParams

    prompts = [tokenizer.encode(row["prompt"]) for row in PROMPTS]
    return engine.generate(prompts, [SamplingParams(n=3, temperature=1.0, max_tokens=10, logprobs=0, seed=seed + i)
                                     for i in range(len(prompts))])


def sgd_step(model, lr=0.05):
    """One large optimiser step on a language-model loss, so that the weights clearly move."""
    model.train()
    ids = list(range(5, 40))
    logits = model(torch.tensor([ids]))[0, :-1]  # [S-1, V]
    torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= lr * param.grad.sign()
                param.grad = None


@pytest.mark.parametrize("lora", [False, True])
def test_the_engine_samples_from_the_updated_weights(base, lora):
    """After every optimiser step the engine's log-probabilities of its sampled tokens equal the
    trainer's for the same tokens (fp32, 1e-4); without the sync they do not."""
    tokenizer = Tokenizer.from_pretrained(base)
    policy = moeray.model.load(base)
    if lora:
        apply_lora(policy, ["q_b_proj", "o_proj", "kv_b_proj"], rank=4, alpha=8, seed=1)
        for module in policy.modules():  # a non-zero adapter, so the merged weights differ from the base
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B.weight, std=0.05)
    engine = RolloutEngine(policy, tokenizer, max_model_len=64)
    results = sample(engine, tokenizer, seed=0)
    assert (engine_logprobs(results) - trainer_logprobs(policy, results)).abs().max() < 1e-4
    for step in range(2):
        sgd_step(policy)
        stale = sample(engine, tokenizer, seed=10 + step)
        assert (engine_logprobs(stale) - trainer_logprobs(policy, stale)).abs().max() > 1e-3  # not synced yet
        seconds = engine.sync(policy)
        assert 0 <= seconds < 5
        synced = sample(engine, tokenizer, seed=20 + step)
        assert (engine_logprobs(synced) - trainer_logprobs(policy, synced)).abs().max() < 1e-4


def test_a_round_samples_groups_and_normalises_advantages_within_each(tmp_path, base, monkeypatch):
    module = types.ModuleType("grpo_test_rewards")
    module.length = lambda prompts, completions, **columns: [float(len(c)) for c in completions]
    monkeypatch.setitem(sys.modules, "grpo_test_rewards", module)
    spec = grpo_spec(tmp_path, base, rewards=[{"function": "grpo_test_rewards:length"}], beta=0.1, num_iterations=2)
    method = method_for(spec)
    tokenizer = Tokenizer.from_pretrained(base)
    policy = moeray.model.load(base)
    context = WorkerContext(spec, tokenizer, policy, torch.device("cpu"),
                            reference=moeray.model.load(base).eval(), rollouts=method.make_rollouts(policy, tokenizer))
    plan = method.plan(method.encode(PROMPTS, tokenizer, True), context)
    assert len(plan.steps) == 2 and plan.steps[0] == plan.steps[1]  # num_iterations passes over one round
    sequences = [row for micro in plan.steps[0] for row in micro]
    assert len(sequences) == 2 * 4 and all(len(micro) <= 4 for micro in plan.steps[0])
    for group in (sequences[:4], sequences[4:]):
        lengths = torch.tensor([float(len(tokenizer.decode([t for t, label in zip(r["input_ids"], r["labels"])
                                                             if label != -100]))) for r in group])
        expected = (lengths - lengths.mean()) / (lengths.std() + 1e-4)
        torch.testing.assert_close(torch.tensor([r["advantage"] for r in group]), expected, atol=1e-4, rtol=1e-4)
    assert plan.metrics["rollout_logprob_max_diff"] < 1e-4
    assert plan.metrics["reward"] == pytest.approx(plan.metrics["rewards/length/mean"])
    assert plan.metrics["completion_length"] > 0 and plan.metrics["rollout_tokens_per_s"] > 0


def test_the_loss_is_the_clipped_objective_with_the_k3_penalty(tmp_path, base):
    spec = grpo_spec(tmp_path, base, epsilon=0.2, beta=0.1, temperature=0.7)
    method = method_for(spec)
    policy = moeray.model.build(moeray.model.ModelArgs.from_file(base / "config.json"), seed=3)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, advantage in ((9, 1.5), (6, -0.7), (11, 0.2)):
        ids = torch.randint(3, 200, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:], "advantage": advantage})
    with torch.no_grad():
        current, _, _ = completion_logprobs(policy, rows, 0.7, "cpu")
    offsets = torch.randn(current.shape, generator=generator) * 0.3  # old policy: off by up to ~e^0.9
    reference = current + torch.randn(current.shape, generator=generator) * 0.2
    start = 0
    for row in rows:
        count = len(row["input_ids"]) - 4
        row["old_logprobs"] = (current[start:start + count] + offsets[start:start + count]).tolist()
        row["ref_logprobs"] = reference[start:start + count].tolist()
        start += count
    loss, metrics = method.loss(policy, rows, WorkerContext(spec, None, policy, torch.device("cpu")))

    # The formula, written out over a padded batch through the full head.
    expected = []
    for row in rows:
        logits = policy(torch.tensor([row["input_ids"]]))[0, 3:-1] / 0.7  # [count, V], predicting ids[4:]
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(row["input_ids"][4:])[:, None]).squeeze(1)
        ratio = torch.exp(logp - torch.tensor(row["old_logprobs"]))
        surrogate = torch.minimum(ratio * row["advantage"], ratio.clamp(0.8, 1.2) * row["advantage"])
        ref = torch.tensor(row["ref_logprobs"])
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        expected.append(-(surrogate - 0.1 * kl).mean())
    torch.testing.assert_close(loss, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)
    assert 0 < metrics["clip_fraction"] < 1 and metrics["kl"] > 0
    assert metrics["tokens"] == int((flatten(rows).next_labels != -100).sum())


def test_rows_must_carry_what_their_rewards_need(tmp_path, base):
    spec = grpo_spec(tmp_path, base, rewards=[{"function": "exact_match"}])
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1 + 1 =", "answer": "2"}, {"prompt": "2 + 2 ="}])
    with pytest.raises(DataError, match=r"train\.jsonl:2: missing 'answer', which reward function 'exact_match' needs"):
        prepare(spec)
    (tmp_path / "train.jsonl").write_text(json.dumps({"answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing 'prompt'"):
        prepare(spec)


def test_conversational_prompts_get_the_generation_prompt(tmp_path, base):
    spec = grpo_spec(tmp_path, base)
    tokenizer = Tokenizer.from_pretrained(base)
    messages = [{"role": "user", "content": "Say hi"}]
    standard, conversational = method_for(spec).encode([{"prompt": "Say hi"}, {"prompt": messages}], tokenizer, True)
    assert standard["prompt_ids"] == tokenizer.encode("Say hi")
    assert conversational["prompt_ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                         tokenize=True)
    assert json.loads(conversational["row"]) == {"prompt": messages}
