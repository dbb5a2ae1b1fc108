"""Sampler: penalties, greedy, top-k/top-p/min-p, the distribution drawn, per-request seeds,
logprobs from the raw logits, and clear errors."""

import random

import pytest
import torch

from moeray.engine.params import SamplingParams
from moeray.engine.sampler import Sampler, SamplingRow, apply_penalties


def row(prompt=(), output=(), seed=None, **params) -> SamplingRow:
    """A row as the engine builds it: a seeded request gets its own generator."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRow(SamplingParams(seed=seed, **params), list(prompt), list(output), generator)


def draws(logits_row: torch.Tensor, count: int, sampler: Sampler | None = None, **params) -> torch.Tensor:
    """`count` independent draws from one row of logits, as one batch of identical rows."""
    sampler = sampler or Sampler(seed=0)
    logits = logits_row.expand(count, -1).contiguous()  # [count, V]
    return torch.tensor(sampler(logits, [row(**params) for _ in range(count)]).token_ids)


# --- penalties and greedy -------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, [row(temperature=0.0, top_k=3, top_p=0.5, min_p=0.5) for _ in range(16)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 16


def test_repetition_penalty_moves_greedy_off_a_prompt_token():
    logits = torch.tensor([[2.0, 1.9, 0.5, -1.0]])
    assert Sampler()(logits, [row(prompt=[0], temperature=0.0)]).token_ids == [0]
    penalised = Sampler()(logits, [row(prompt=[0], temperature=0.0, repetition_penalty=1.2)])
    assert penalised.token_ids == [1]  # 2.0 / 1.2 = 1.67 < 1.9


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.9, 0.5, -1.0, 3.0]])
    before = logits.clone()
    penalised = apply_penalties(logits, [row(prompt=[0], output=[3], repetition_penalty=2.0)])
    torch.testing.assert_close(penalised, torch.tensor([[1.0, 1.9, 0.5, -2.0, 3.0]]))
    assert torch.equal(logits, before)  # the input is never modified


def test_presence_and_frequency_penalties_shift_output_tokens_by_exact_amounts():
    logits = torch.zeros(2, 5)
    rows = [row(prompt=[3, 4, 4], output=[1, 1, 2], frequency_penalty=0.5, presence_penalty=0.25),
            row(prompt=[3], output=[1, 1, 2])]  # no penalty: untouched, even in a penalised batch
    penalised = apply_penalties(logits, rows)
    expected = torch.tensor([[0.0, -2 * 0.5 - 0.25, -1 * 0.5 - 0.25, 0.0, 0.0],  # prompt tokens: untouched
                             [0.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(penalised, expected)


def test_no_penalty_means_no_copy_and_no_count_work():
    logits = torch.randn(3, 7)
    assert apply_penalties(logits, [row(output=[1, 2]) for _ in range(3)]) is logits


# --- filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    out = Sampler(seed=0)(logits, [row(temperature=temperature, top_k=1) for _ in range(32)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_top_token():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(2))
    out = Sampler(seed=0)(logits, [row(temperature=2.0, top_p=1e-6) for _ in range(32)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(("params", "allowed"), [
    ({"top_p": 0.75}, {0, 1}),  # 0.5 + 0.3 reaches 0.75: the smallest such set
    ({"top_p": 0.6}, {0, 1}),
    ({"top_k": 3}, {0, 1, 2}),
    ({"min_p": 0.2}, {0, 1, 2}),  # threshold 0.2 * 0.5 = 0.1 drops 0.05 and 0.03
    ({"top_k": 2, "top_p": 0.6}, {0}),  # top-p after top-k: 0.5 / 0.8 already reaches 0.6
])
def test_filters_keep_exactly_the_allowed_tokens(params, allowed):
    logits = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03]).log()
    tokens = draws(logits, 3000, **params)
    assert set(tokens.tolist()) == allowed  # never outside the set, and every allowed one appears


def test_top_k_keeps_tokens_tied_with_the_kth_value():
    # A value threshold keeps every tie, so the kept set cannot depend on tie order or batch.
    logits = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    assert set(draws(logits, 2000, top_k=2).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("seeded_rows", [False, True])
def test_empirical_frequencies_match_softmax(temperature, seeded_rows):
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    expected = (probs.log() / temperature).softmax(dim=-1)
    count = 4000
    logits = probs.log().expand(count, -1).contiguous()
    rows = [row(temperature=temperature, seed=i if seeded_rows else None) for i in range(count)]
    tokens = torch.tensor(Sampler(seed=0)(logits, rows).token_ids)
    frequencies = torch.bincount(tokens, minlength=5).float() / count
    # One standard error is at most sqrt(0.25 / 4000) = 0.008.
    torch.testing.assert_close(frequencies, expected, atol=0.03, rtol=0)


def test_sampler_seed_makes_unseeded_rows_reproducible():
    logits = torch.zeros(64, 1000)
    first = Sampler(seed=7)(logits, [row() for _ in range(64)]).token_ids
    assert Sampler(seed=7)(logits, [row() for _ in range(64)]).token_ids == first
    assert Sampler(seed=8)(logits, [row() for _ in range(64)]).token_ids != first


# --- per-request seeds ------------------------------------------------------------------------

VOCAB = 100
TARGET = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.02,
          "presence_penalty": 0.5, "repetition_penalty": 1.1}


def step_logits(step: int) -> torch.Tensor:
    """The model's logits for the target sequence at `step`: the same whatever the batch."""
    return 2 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(1000 + step))


def random_batch_mate(rng: random.Random) -> SamplingRow:
    params = rng.choice([
        {"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.5, "min_p": 0.1}, {"frequency_penalty": 1.0},
        {"top_k": 1, "repetition_penalty": 1.5, "logprobs": 3},
    ])
    seed = rng.choice([None, rng.randrange(10_000)])
    return row(prompt=[rng.randrange(VOCAB) for _ in range(5)], seed=seed, **params)


def generate(seed: int, with_batch_mates: bool, steps: int = 20, **params) -> list[int]:
    target = row(prompt=[1, 2, 3], seed=seed, **params)
    sampler, rng = Sampler(), random.Random(seed)
    for step in range(steps):
        rows = [target]
        if with_batch_mates:
            rows = [random_batch_mate(rng) for _ in range(rng.randrange(1, 8))]
            rows.insert(rng.randrange(len(rows) + 1), target)  # a different position each step
        logits = torch.randn(len(rows), VOCAB) * 3
        position = rows.index(target)
        logits[position] = step_logits(step)
        target.output_token_ids.append(sampler(logits, rows).token_ids[position])
    return list(target.output_token_ids)


@pytest.mark.parametrize("params", [TARGET, {"temperature": 1.0}])
def test_seeded_row_is_reproducible_whatever_its_batch_mates(params):
    alone = generate(seed=1234, with_batch_mates=False, **params)
    assert generate(seed=1234, with_batch_mates=False, **params) == alone
    assert generate(seed=1234, with_batch_mates=True, **params) == alone
    assert generate(seed=4321, with_batch_mates=False, **params) != alone


# --- logprobs ---------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    rows = [row(logprobs=None),
            row(logprobs=0, temperature=0.5, repetition_penalty=2.0, prompt=[0, 1, 2]),
            row(logprobs=5, temperature=1.5, top_k=10, presence_penalty=1.0, output=[3, 4]),
            row(logprobs=20, temperature=0.0)]
    out = Sampler(seed=0)(logits, rows)
    raw = logits.log_softmax(dim=-1)
    assert out.logprobs[0] is None
    for i, k in [(1, 0), (2, 5), (3, 20)]:
        entry = out.logprobs[i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(raw[i, entry.token_id].item(), abs=1e-6)
        assert len(entry.top) == k
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True)
        expected = raw[i].topk(k)
        assert [token for token, _ in entry.top] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert out.logprobs[3].logprob == pytest.approx(out.logprobs[3].top[0][1])  # greedy: the top one


# --- errors and speed -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(10,), (2, 3, 10)])
def test_logits_must_be_2d(shape):
    with pytest.raises(ValueError, match=r"logits must be 2-D \[num_rows, vocab_size\]"):
        Sampler()(torch.zeros(shape), [row(), row()])


def test_one_row_per_logits_row():
    with pytest.raises(ValueError, match="got 1 sampling rows for 2 rows of logits"):
        Sampler()(torch.zeros(2, 10), [row()])
    with pytest.raises(ValueError, match="got 3 sampling rows for 2 rows of logits"):
        apply_penalties(torch.zeros(2, 10), [row(), row(), row()])


def test_empty_batch():
    out = Sampler()(torch.zeros(0, 10), [])
    assert out.token_ids == [] and out.logprobs == []
