"""Speculative decoding is lossless: greedy tokens are those without it (MTP and n-gram drafts,
k = 1..3, natively and through torch, under every scheduling condition), MTP drafts are what the
MTP layer predicts from the whole sequence, and sampled tokens keep their distribution."""

from __future__ import annotations

import pytest
import torch
from support import write_random_adapter, write_tiny_tokenizer

import moeray.model
from moeray.engine import LLM, Engine, EngineConfig, EngineConfigError, SamplingParams
from moeray.engine.params import GrammarSpec
from moeray.engine.speculative import SpeedGate
from moeray.kernels.policy import KernelPolicy
from moeray.model import ModelArgs, save_checkpoint
from moeray.model.mla import DenseCausalAttention
from moeray.model.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# Repetitive prompts give prompt lookup something to find; the others give it nothing.
PROMPTS = [[5, 6, 7, 8, 9, 10] * 3, [11, 12, 13], [20, 30, 40, 50, 60, 70, 80, 90], [7] * 20,
           [100, 101, 102, 100, 101], [3, 4, 5, 3, 4, 5, 3]]
PATHS = {"native": {}, "torch": {"kernels": KernelPolicy(native_decoder=False)}}
METHODS = [("mtp", 1), ("mtp", 2), ("mtp", 3), ("ngram", 1), ("ngram", 2), ("ngram", 3)]


@pytest.fixture(scope="module")
def mtp_folder(tmp_path_factory):
    """A random checkpoint of the small test shape with one MTP layer, and the tiny tokenizer."""
    folder = tmp_path_factory.mktemp("mtp-checkpoint")
    args = ModelArgs(num_nextn_predict_layers=1)
    model = moeray.model.build(args, seed=3, mtp_depth=1)
    save_checkpoint(model, folder, args)
    write_tiny_tokenizer(folder)
    return folder


def generate(llm: LLM, prompts, params) -> list[list[int]]:
    return [result.outputs[0].token_ids for result in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def reference(mtp_folder):
    return generate(LLM(mtp_folder), PROMPTS, GREEDY)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method, k", METHODS, ids=[f"{m}-{k}" for m, k in METHODS])
def test_greedy_tokens_are_identical_with_and_without_speculation(mtp_folder, reference, method, k, path):
    llm = LLM(mtp_folder, speculative={"method": method, "adaptive": False, "num_speculative_tokens": k, "min_acceptance": 0.0},
              **PATHS[path])
    results = llm.generate(PROMPTS, GREEDY)
    assert [result.outputs[0].token_ids for result in results] == reference
    stats = llm.engine.stats().speculative
    assert stats.verify_steps > 0 and stats.draft_tokens >= stats.verify_steps
    # Each request's own counts (its usage) add up to the engine's.
    assert sum(result.num_draft_tokens for result in results) == stats.draft_tokens
    assert sum(result.num_accepted_tokens for result in results) == stats.accepted_tokens
    if method == "ngram":  # the repetitive prompts have drafts accepted: emitted runs longer than one
        assert stats.accepted_tokens > 0


def _mtp_drafts_from_scratch(model, tokens: list[int], count: int) -> list[int]:
    """What depth 0 predicts after `tokens`, chained on its own state, by a dense forward over
    the whole sequence (no cache): the main model's hidden states, the MTP rows (h_i, t_{i+1}),
    then each further row (the previous row's MTP state, the previous draft)."""
    ids = torch.tensor(tokens)
    n = len(tokens)
    main = model.forward_tokens(ids, torch.arange(n), DenseCausalAttention(1, n))
    inputs, next_ids, drafts = main[:n - 1], ids[1:], []
    for _ in range(count):
        rows = inputs.shape[0]
        state, head_input = model.mtp_forward(0, inputs, next_ids, torch.arange(1, rows + 1),
                                              DenseCausalAttention(1, rows))
        drafts.append(int(model.logits(head_input[-1]).argmax()))
        inputs = torch.cat([inputs, state[-1:]])
        next_ids = torch.cat([next_ids, torch.tensor([drafts[-1]])])
    return drafts


@pytest.mark.parametrize("path", PATHS)
@torch.inference_mode()  # the engine's routed-token counters are inference tensors
def test_mtp_drafts_are_the_mtp_layers_prediction_from_the_whole_sequence(mtp_folder, path):
    llm = LLM(mtp_folder, speculative={"method": "mtp", "adaptive": False, "num_speculative_tokens": 3, "min_acceptance": 0.0},
              **PATHS[path])
    engine, model = llm.engine, llm.engine.model
    engine.add_request("r", PROMPTS[2], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    checked = 0
    while engine.has_unfinished:
        engine.step()
        request = engine.requests.get("r")
        seq = request.seqs[0] if request else None
        if seq is not None and seq.draft_token_ids:
            assert seq.draft_token_ids == _mtp_drafts_from_scratch(model, seq.token_ids, len(seq.draft_token_ids))
            checked += 1
    assert checked >= 5


def _oracle(llm: LLM, continuations: dict[tuple[int, ...], list[int]]) -> None:
    """Replace prompt lookup by drafts of the true greedy continuation: every draft is accepted."""
    def propose(seq_id, tokens, count):
        for prompt, full in continuations.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                return full[len(tokens):len(tokens) + count]
        return []

    llm.engine.speculator.ngram.propose = propose


@pytest.mark.parametrize("limit", [
    {"max_tokens": 7},  # inside a run of 1 + 3
    {"stop_token_ids": "the 6th token"},
    {"stop": "a piece of the text"},
], ids=["max_tokens", "stop_token_ids", "stop_string"])
def test_a_finish_inside_an_accepted_run_cuts_where_plain_decoding_does(mtp_folder, reference, limit):
    params = dict(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    plain = LLM(mtp_folder)
    if "stop_token_ids" in limit:
        limit = {"stop_token_ids": [reference[0][5]]}
    if "stop" in limit:
        text = plain.generate(PROMPTS[:1], SamplingParams(**params))[0].outputs[0].text
        limit = {"stop": [text[len(text) // 2:len(text) // 2 + 3]]}
    params.update(limit)
    expected = plain.generate(PROMPTS, SamplingParams(**params))
    llm = LLM(mtp_folder, speculative={"method": "ngram", "adaptive": False, "num_speculative_tokens": 3})
    _oracle(llm, {tuple(p): p + out for p, out in zip(PROMPTS, reference)})
    results = llm.generate(PROMPTS, SamplingParams(**params))
    for got, want in zip(results, expected):
        got, want = got.outputs[0], want.outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        for a, b in zip(got.logprobs, want.logprobs, strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    stats = llm.engine.stats().speculative
    assert stats.accepted_tokens > 0 and stats.mean_accepted_length > 2.0  # the oracle's runs are long


@pytest.mark.parametrize("options", [
    {"enable_prefix_caching": True, "block_size": 4},
    {"max_num_batched_tokens": 8, "block_size": 4},  # chunked prefill, and a budget that cuts drafts
    {"num_cache_blocks": 24, "block_size": 4, "enable_prefix_caching": False},  # preemption by recompute
], ids=["prefix-caching", "chunked-prefill", "preemption"])
@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_greedy_tokens_stay_identical_whatever_the_cache_and_scheduler_do(mtp_folder, reference, method, options):
    llm = LLM(mtp_folder, max_model_len=256, **options,
              speculative={"method": method, "adaptive": False, "num_speculative_tokens": 3, "min_acceptance": 0.0})
    generate(llm, PROMPTS[:2], GREEDY)  # a first wave whose blocks the prefix cache can share
    assert generate(llm, PROMPTS, GREEDY) == reference
    stats = llm.engine.stats()
    if "num_cache_blocks" in options:
        assert stats.preemptions_total > 0
    if options.get("enable_prefix_caching"):
        assert stats.cache.prefix_hits > 0


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_a_grammar_constrained_greedy_output_is_the_same_with_drafts(mtp_folder, method):
    params = SamplingParams(temperature=0, max_tokens=60, structured=GrammarSpec("regex", r"(ab|cd){2,12}x"))
    expected = [r.outputs[0].text for r in LLM(mtp_folder).generate(PROMPTS, params)]
    llm = LLM(mtp_folder, speculative={"method": method, "adaptive": False, "num_speculative_tokens": 3, "min_acceptance": 0.0})
    assert [r.outputs[0].text for r in llm.generate(PROMPTS, params)] == expected
    assert all(text.endswith("x") for text in expected)


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_lora_adapter_requests_batch_with_base_requests_under_speculation(mtp_folder, tmp_path, method):
    from moeray.model.lora import merged_variant

    write_random_adapter(mtp_folder, tmp_path, seed=4)
    tokenizer = Tokenizer.from_pretrained(mtp_folder)

    def run(speculative):
        base = moeray.model.load(mtp_folder, mtp_depth=1)
        config = EngineConfig(max_model_len=256, speculative=speculative)
        engine = Engine(base, tokenizer, config, adapters={"tuned": merged_variant(base, tmp_path)})
        outputs = {}
        for i, prompt in enumerate(PROMPTS):
            for adapter in (None, "tuned"):
                engine.add_request(f"{i}-{adapter}", prompt, GREEDY, adapter)
                outputs[f"{i}-{adapter}"] = []
        while engine.has_unfinished:
            for out in engine.step():
                outputs[out.request_id] += out.outputs[0].token_ids if out.outputs else []
        return outputs

    expected = run(None)
    assert run({"method": method, "num_speculative_tokens": 2, "min_acceptance": 0.0}) == expected
    assert expected["0-None"] != expected["0-tuned"]


def test_speculative_options_are_checked_naming_the_option(mtp_folder, hf_folder):
    with pytest.raises(EngineConfigError, match="num_speculative_tokens"):
        LLM(mtp_folder, speculative={"method": "mtp", "num_speculative_tokens": 0})
    with pytest.raises(EngineConfigError, match="speculative.method"):
        LLM(mtp_folder, speculative={"method": "eagle"})
    with pytest.raises(ValueError, match="no multi-token-prediction layer"):
        LLM(hf_folder[0], speculative={"method": "mtp"})


def _chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness of fit, cells with small expectation pooled; p from the chi-square
    distribution's survival function."""
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    wanted = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    statistic = ((observed - wanted) ** 2 / wanted).sum()
    dof = torch.tensor((observed.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic.double() / 2))


@torch.no_grad()
def test_speculative_sampling_keeps_the_models_distribution(tmp_path):
    """A vocabulary of 8 with a peaked distribution, so that n-gram drafts are accepted often and
    rejected often. Tokens 2 and 3 are sampled in verifications (1 + 2 positions); the pair of
    the first two tokens must follow p(t1) p(t2 | t1), and the third its marginal, computed
    exactly from the model, by chi-square tests (fixed seeds; each p > 0.001)."""
    args = ModelArgs(vocab_size=8, num_nextn_predict_layers=0)
    model = moeray.model.build(args, seed=5)
    model.lm_head.weight.mul_(20.0)  # top probabilities of 0.4 to 0.85
    write_tiny_tokenizer(tmp_path)
    prompt = [3, 1, 1, 1, 6, 0, 6, 0, 3, 3, 3, 3]  # the model's own greedy path: lookup often finds its next token

    def probs(tokens):
        return torch.softmax(model(torch.tensor([tokens]))[0, -1].double(), -1)

    first = probs(prompt)
    joint = torch.stack([torch.stack([first[a] * probs(prompt + [a])[b] * probs(prompt + [a, b])
                                      for b in range(8)]) for a in range(8)])  # [8, 8, 8]
    samples = 1200
    engine = Engine(model, Tokenizer.from_pretrained(tmp_path),
                    EngineConfig(max_model_len=64, seed=7, max_num_seqs=64,
                                 speculative={"method": "ngram", "adaptive": False, "num_speculative_tokens": 2, "min_acceptance": 0.0}))
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    outputs = {}
    for i in range(samples):
        engine.add_request(str(i), prompt, params)
        outputs[str(i)] = []
    while engine.has_unfinished:
        for out in engine.step():
            outputs[out.request_id] += out.outputs[0].token_ids if out.outputs else []
    stats = engine.stats().speculative
    assert stats.accepted_tokens > 100 and stats.draft_tokens - stats.accepted_tokens > 100  # both outcomes
    pairs, thirds = torch.zeros(64, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    for tokens in outputs.values():
        pairs[tokens[0] * 8 + tokens[1]] += 1
        thirds[tokens[2]] += 1
    assert _chi_square_p_value(pairs, joint.sum(2).flatten() * samples) > 0.001
    assert _chi_square_p_value(thirds, joint.sum((0, 1)) * samples) > 0.001


def test_seeded_sampling_gives_the_same_tokens_with_or_without_speculation(mtp_folder, reference):
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    plain = generate(LLM(mtp_folder), PROMPTS, params)
    llm = LLM(mtp_folder, speculative={"method": "ngram", "adaptive": False, "num_speculative_tokens": 3})
    _oracle(llm, {tuple(p): p + out for p, out in zip(PROMPTS, plain)})
    assert generate(llm, PROMPTS, params) == plain
    assert llm.engine.stats().speculative.accepted_tokens > 0


@pytest.mark.slow
def test_expert_shards_give_the_same_greedy_tokens_under_speculation(ray_session, mtp_folder, reference):
    """Routed experts in two ExpertShard actors (the MTP layer's stay in the replica)."""
    from moeray.actors.dispatch import start_expert_parallel

    router, backend = start_expert_parallel(str(mtp_folder), 2, name="speculative", num_cpus=0.5)
    try:
        for method in ("mtp", "ngram"):
            llm = LLM(mtp_folder, experts=backend,
                      speculative={"method": method, "adaptive": False, "num_speculative_tokens": 2, "min_acceptance": 0.0})
            assert generate(llm, PROMPTS, GREEDY) == reference, method
            assert llm.engine.stats().speculative.verify_steps > 0
    finally:
        ray_session.get(router.shutdown.remote())


CODE_PROMPTS = ["def fib(n):", "class Stack:\n    def push(self, item):", "import os\n\ndef read(path):",
                "def parse(text):\n    \"\"\"Parse", "for line in lines:", "    return self._"]


def test_the_embedded_default_models_trained_mtp_head_drafts_losslessly():
    from moeray.platform.default_model import DEFAULT_MODEL_DIR

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = generate(LLM(DEFAULT_MODEL_DIR), CODE_PROMPTS, params)
    for k in (1, 2, 3):
        llm = LLM(DEFAULT_MODEL_DIR, speculative={"method": "mtp", "num_speculative_tokens": k, "adaptive": False,
                                                  "min_acceptance": 0.0})
        assert generate(llm, CODE_PROMPTS, params) == expected, k
        # A trained head, not a random one: the first draft is right more often than not (0.6 here).
        stats = llm.engine.stats().speculative
        if k == 1:
            assert stats.acceptance_rate > 0.45, stats


def test_the_speed_gate_drafts_only_at_batch_sizes_where_drafting_measures_faster():
    gate = SpeedGate(probe_interval=12)
    chosen = []
    for step in range(48):
        for num_decoding in (1, 32):
            drafting = gate.choose(num_decoding)
            chosen.append((num_decoding, drafting))
            # At batch 1 a drafting step costs 1.3x a plain one and emits 1.8 tokens: it pays.
            # At batch 32 it costs 2x and emits 1.5 tokens a sequence: it does not.
            per_step = {1: (1.3, 1.8), 32: (2.0, 1.5)}[num_decoding] if drafting else (1.0, 1.0)
            gate.observe(num_decoding, drafting, per_step[0] * 1e-3, round(per_step[1] * num_decoding))
    after_warmup = chosen[12:]
    at_one = [drafting for n, drafting in after_warmup if n == 1]
    at_32 = [drafting for n, drafting in after_warmup if n == 32]
    # Mostly the faster mode, with a few steps of the other one in each probe interval.
    assert sum(at_one) / len(at_one) > 0.7 and sum(at_32) / len(at_32) < 0.3
    assert any(at_32) and not all(at_one)  # the other mode is still re-measured


def test_the_speed_gate_probes_less_while_its_choice_holds_and_follows_a_change():
    gate = SpeedGate(probe_interval=8)
    drafting_faster = False
    drafted = []
    for step in range(1200):
        if step == 900:  # the workload changes: drafting now pays
            drafting_faster = True
        drafting = gate.choose(32)
        drafted.append(drafting)
        cost = (0.7 if drafting_faster else 1.5) if drafting else 1.0
        gate.observe(32, drafting, cost * 1e-3, 32)
    # Intervals of 8, 16, ... up to 128 steps between 3-step probes: fewer than 40 slow steps in
    # 900, where a fixed interval of 8 would have spent over 300.
    assert 10 < sum(drafted[:900]) < 40
    # Found within two probes (the average of the slow mode takes a few samples to come down),
    # then mostly kept.
    assert sum(drafted[1160:]) / len(drafted[1160:]) > 0.8


def test_with_the_gate_outputs_are_unchanged_and_counts_still_add_up(mtp_folder, reference):
    llm = LLM(mtp_folder, speculative={"method": "mtp", "num_speculative_tokens": 2, "gate_probe_interval": 6})
    results = llm.generate(PROMPTS, GREEDY)
    assert [result.outputs[0].token_ids for result in results] == reference
    stats = llm.engine.stats().speculative
    assert sum(result.num_accepted_tokens for result in results) == stats.accepted_tokens
