"""Next-token sampling for a batch of sequences, with the semantics a vLLM user expects.

Contract:
- `Sampler()(logits [N, V] float32, rows)` picks one next token for each of the N rows.
  `rows[i]` (a `SamplingRow`) carries row i's `SamplingParams`, its prompt and output tokens so
  far, and its own `torch.Generator` when the request has a seed. It returns a `SamplerOutput`:
  N token ids and, per row, `TokenLogprobs` (None where `params.logprobs` is None).
  `logits` is never modified.
- Order: penalties on a float32 copy (repetition over tokens in prompt or output:
  positive logits divided by the penalty, negative ones multiplied; `frequency_penalty * count`
  and `presence_penalty * (count > 0)` subtracted, output tokens only). Greedy rows
  (temperature 0) take the argmax of the penalised logits; top-k/top-p/min-p do not apply.
  Other rows: divide by temperature, then top-k (tokens tied with the k-th value stay), top-p
  (keep the smallest set of tokens whose mass >= top_p; the top token always survives), min-p
  (drop tokens whose probability is below min_p * the top probability), then draw by
  exponential race: argmax(probs / q), q ~ Exp(1) per vocabulary entry, which samples from
  probs without normalising them.
- Randomness: a row with a generator draws V uniforms from it per sampled step, nothing on a
  greedy step; rows without one share the Sampler's generator.
  Every filter is row-wise, so a seeded row's tokens depend only on its own logits, params and
  generator: never on which rows share its batch, their order or their params.
- Then `params.logit_bias` is added, and a row with an active grammar (`SamplingRow.grammar`)
  has every token its grammar does not allow next set to -inf: greedy or sampled, the token is
  one the grammar accepts, and batch mates without a grammar are untouched.
- logprobs come from log_softmax of the RAW logits (before penalties, bias, grammar and
  temperature, as vLLM returns by default): the sampled token's plus the top `params.logprobs`
  alternatives.
- `apply_penalties(logits, rows)` is public so tests can check the penalised logits.
- logits not 2-D, or a row count that differs from the logits' rows: ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeray.engine.params import SamplingParams

if TYPE_CHECKING:
    from moeray.engine.grammar import SequenceGrammar


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far by this sequence
    generator: torch.Generator | None = None  # per-sequence RNG when the request has a seed
    grammar: SequenceGrammar | None = None  # the sequence's place in its grammar, if it has one


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # top-`params.logprobs` (token_id, logprob), descending


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # None for rows whose params.logprobs is None


def _check_shapes(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [num_rows, vocab_size], got shape {tuple(logits.shape)}")
    if logits.shape[0] != len(rows):
        raise ValueError(f"got {len(rows)} sampling rows for {logits.shape[0]} rows of logits; "
                         "need exactly one SamplingRow per logits row")


def _uses_penalty(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)


def _token_counts(id_lists: list[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each list: [R, V] float32."""
    width = max((len(ids) for ids in id_lists), default=0)
    # Pad with the out-of-vocabulary id V: its counts land in an extra column that is dropped.
    padded = torch.tensor([list(ids) + [vocab_size] * (width - len(ids)) for ids in id_lists],
                          dtype=torch.long, device=device).view(len(id_lists), width)  # [R, L]
    counts = torch.zeros(len(id_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, frequency and presence penalties: [N, V] float32; `logits` is never modified.

    When no row uses a penalty this is `logits.float()` (for float32 input, `logits` itself), so
    callers must not write into the result.
    """
    _check_shapes(logits, rows)
    penalised_rows = [i for i, row in enumerate(rows) if _uses_penalty(row.params)]
    if not penalised_rows:
        return logits.float()  # the common case pays for no count tensors at all
    vocab_size, device = logits.shape[1], logits.device
    params = [rows[i].params for i in penalised_rows]
    row_index = torch.tensor(penalised_rows, device=device)
    sub = logits.index_select(0, row_index).float()  # [R, V], a copy

    def per_row(values: list[float]) -> torch.Tensor:  # [R, 1]
        return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

    output_counts = _token_counts([rows[i].output_token_ids for i in penalised_rows], vocab_size, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        # Prompt counts only for rows that use the repetition penalty: prompts can be long.
        prompts = [rows[i].prompt_token_ids if p.repetition_penalty != 1.0 else ()
                   for i, p in zip(penalised_rows, params)]
        seen = (_token_counts(prompts, vocab_size, device) + output_counts) > 0  # [R, V]
        repetition = per_row([p.repetition_penalty for p in params])
        sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
    frequency = per_row([p.frequency_penalty for p in params])
    presence = per_row([p.presence_penalty for p in params])
    sub = sub - frequency * output_counts - presence * (output_counts > 0).float()

    penalised = logits.to(torch.float32, copy=True)
    penalised.index_copy_(0, row_index, sub)
    return penalised


def _constrain(logits: torch.Tensor, penalised: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """`penalised` with the rows' logit biases added and their grammars' masks applied (a copy
    when `penalised` is `logits` itself, which must stay as it is for the logprobs)."""
    biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
    constrained = [(i, row.grammar) for i, row in enumerate(rows) if row.grammar is not None
                   and row.grammar.constraining]
    if not biased and not constrained:
        return penalised
    if penalised.data_ptr() == logits.data_ptr():
        penalised = penalised.clone()
    for i in biased:
        bias = rows[i].params.logit_bias
        ids = torch.tensor([t for t in bias if t < penalised.shape[1]], dtype=torch.long, device=penalised.device)
        values = torch.tensor([bias[t] for t in bias if t < penalised.shape[1]], device=penalised.device)
        penalised[i].index_add_(0, ids, values)
    if constrained:
        from moeray.engine.grammar import mask_logits

        mask_logits(penalised, constrained)
    return penalised


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k drops. logits [S, V]; top_k [S], each in [1, V)."""
    # A threshold at the k-th largest VALUE, not a cut after k sorted indices: a value does not
    # depend on how ties are ordered nor on the k_max the batch mates set, so each row keeps the
    # same set whatever its batch (ties with the k-th value are kept, as vLLM does). topk, not a
    # full sort: k is small and a CPU sort of the vocabulary costs ~20x more.
    largest = logits.topk(int(top_k.max()), dim=-1).values  # [S, k_max], descending
    kth_largest = largest.gather(1, (top_k - 1)[:, None])  # [S, 1]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-p drops. logits [S, V]; top_p [S], each in (0, 1)."""
    # Stable, so ties break by token id: the same in every batch.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [S, V] each
    sorted_probs = sorted_logits.softmax(dim=-1)
    # A token stays while the mass ranked above it is still short of top_p, so the kept set is
    # the smallest whose mass reaches top_p; rank 0 has nothing above it and always stays.
    # Only rows with top_p < 1 come here: cumsum rounding would otherwise trim a row's tail.
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_above >= top_p[:, None]  # [S, V]
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def _filter_rows(logits: torch.Tensor, row_ids: list[int], settings: torch.Tensor,
                 apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`apply` on the rows `row_ids` of logits [M, V] only; settings [len(row_ids)]."""
    if len(row_ids) == logits.shape[0]:
        return apply(logits, settings)  # the usual uniform batch: no gather, no scatter
    if row_ids:
        index = torch.tensor(row_ids, device=logits.device)
        logits.index_copy_(0, index, apply(logits.index_select(0, index), settings))
    return logits


class Sampler:
    """Samples one token per row; `seed` seeds the generator shared by rows without their own."""

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._shared_generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared_generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()  # a fresh Generator has a fixed default seed: make it random
            else:
                generator.manual_seed(self.seed)
            self._shared_generators[device] = generator
        return generator

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        _check_shapes(logits, rows)
        if not rows:
            return SamplerOutput([], [])
        device = logits.device
        penalised = _constrain(logits, apply_penalties(logits, rows), rows)  # [N, V] float32; may alias logits
        sampled = [i for i, row in enumerate(rows) if row.params.temperature != 0.0]
        if not sampled:
            token_ids = penalised.argmax(dim=-1)  # all greedy: no gather, no copies
        elif len(sampled) == len(rows):
            token_ids = self._sample(penalised, list(rows))
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
            greedy = [i for i, row in enumerate(rows) if row.params.temperature == 0.0]
            greedy_index = torch.tensor(greedy, device=device)
            token_ids[greedy_index] = penalised.index_select(0, greedy_index).argmax(dim=-1)
            sampled_index = torch.tensor(sampled, device=device)
            token_ids[sampled_index] = self._sample(penalised.index_select(0, sampled_index),
                                                    [rows[i] for i in sampled])
        token_list = token_ids.tolist()
        return SamplerOutput(token_list, _gather_logprobs(logits, rows, token_ids, token_list))

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Filtered random draw for non-greedy rows. logits [M, V] -> token ids [M]."""
        vocab_size, device = logits.shape[1], logits.device
        params = [row.params for row in rows]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        scaled = logits / temperature[:, None]  # [M, V], a new tensor

        # Each filter runs on the rows that ask for it only: the others stay bit for bit.
        top_k_rows = [j for j, p in enumerate(params) if 0 < p.top_k < vocab_size]
        top_k = torch.tensor([params[j].top_k for j in top_k_rows], dtype=torch.long, device=device)
        scaled = _filter_rows(scaled, top_k_rows, top_k, _apply_top_k)
        top_p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
        top_p = torch.tensor([params[j].top_p for j in top_p_rows], dtype=torch.float32, device=device)
        scaled = _filter_rows(scaled, top_p_rows, top_p, _apply_top_p)

        probs = scaled.softmax(dim=-1)  # [M, V]
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
            # min_p == 0 gives a threshold of 0, which no probability is below: rows are unaffected.
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        # Exponential race: argmax(probs / q) is a draw from probs / probs.sum(), so neither the
        # masking above nor this needs a renormalisation.
        return (probs / self._exponential_noise(rows, vocab_size, device)).argmax(dim=-1)

    def _exponential_noise(self, rows: list[SamplingRow], vocab_size: int,
                           device: torch.device) -> torch.Tensor:
        """Exp(1) noise [M, V]: each seeded row from its own generator, the rest from the shared one."""
        # -log(u), u ~ U[0, 1): Exp(1) in (0, inf], ~6x cheaper on CPU than exponential_(). u = 0
        # gives inf, so that token loses this race; never a division by zero.
        noise = torch.empty(len(rows), vocab_size, device=device)
        shared = [j for j, row in enumerate(rows) if row.generator is None]
        if len(shared) == len(rows):
            torch.rand(noise.shape, generator=self._shared_generator(device), device=device, out=noise)
        else:
            for j, row in enumerate(rows):
                if row.generator is not None:
                    # Drawn on the generator's device, so CPU generators also serve GPU logits.
                    noise[j] = torch.rand(vocab_size, generator=row.generator, device=row.generator.device)
            if shared:
                shared_noise = torch.rand(len(shared), vocab_size, generator=self._shared_generator(device),
                                          device=device)
                noise.index_copy_(0, torch.tensor(shared, device=device), shared_noise)
        return noise.log_().neg_()


def _gather_logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: torch.Tensor,
                     token_list: list[int]) -> list[TokenLogprobs | None]:
    """Logprobs of the sampled tokens and top alternatives, from the raw logits."""
    result: list[TokenLogprobs | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    wanted_index = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, wanted_index).float(), dim=-1)  # [L, V]
    sampled = logprobs.gather(1, token_ids[wanted_index][:, None]).squeeze(1).tolist()
    most = min(max(rows[i].params.logprobs for i in wanted), logits.shape[1])
    top_values, top_ids = logprobs.topk(most, dim=-1)  # [L, most], descending
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(wanted):
        k = rows[i].params.logprobs
        result[i] = TokenLogprobs(token_list[i], sampled[j], list(zip(top_ids[j][:k], top_values[j][:k])))
    return result
