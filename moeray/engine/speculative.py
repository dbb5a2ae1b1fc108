"""Speculative decoding: cheap drafts, verified k + 1 positions in one forward, lossless.

Contract:
- `SpeculativeConfig(method, num_speculative_tokens)`: `mtp` drafts from the model's own
  multi-token-prediction layer (DeepSeek-V3's), `ngram` from prompt lookup (the longest recent
  n-gram of the sequence seen earlier in it proposes what followed it; no model at all).
- Drafts live on the sequence (`Sequence.draft_token_ids`) between steps. The scheduler gives a
  decoding sequence 1 + len(drafts) positions; the runner computes their logits in one forward
  over the paged latent cache (natively where the decoder applies); the engine then samples
  position by position, each exactly as its own decode step would (penalties, grammar, logit
  bias, logprobs, stop strings, max_tokens), and stops at the first sampled token that differs
  from the draft or at a finish. The latents of rejected positions are rolled back by not
  counting them computed: the next step overwrites their slots.
- Why this is lossless for sampling too: drafts are point proposals (the draft model's argmax,
  or a lookup). The speculative-sampling rule for a point proposal d (accept with probability
  p(d), else sample from p without d) gives the same distribution as sampling x ~ p and
  accepting iff x == d, which is what the engine does. Each emitted token consumes the
  sequence's generator exactly as one decode step does, so a seeded request's tokens are the
  same with or without speculation, and greedy tokens are identical.
- `DraftPolicy` turns drafting down for a sequence whose drafts keep being rejected (an
  exponential average of its acceptance below `min_acceptance` stops its drafts, a probe of one
  draft every `probe_interval` steps can bring them back), so a low-acceptance workload pays
  little for verification it does not use.
- `SpeedGate` (`adaptive`, on by default) decides for the whole batch whether drafting pays at
  the current batch size: it times decode steps with drafts and without (seconds per emitted
  token, averaged per batch-size bucket), runs whichever is faster, and re-measures the other
  for a few steps `gate_probe_interval` steps after choosing; each re-measurement that
  confirms the choice doubles the wait for the next (up to 16x), one that overturns it starts
  again from `gate_probe_interval`, so a steady workload pays little for probing. Acceptance
  alone cannot say whether drafting pays: a verification's cost against a plain step depends on
  the model, the batch and the machine, so where drafts are accepted but verification costs
  more than they save (a small model, a large batch), drafting switches off. Gated-off MTP
  steps skip the MTP layer altogether (see below).
- MTP drafting (`MtpDrafter`, driven by the runner): after each step, every position the main
  model computed (up to the verified end) runs through MTP depth 0 with the token after it:
  (h_i, t_{i+1}) at position i writes that position's entry in the MTP layer's own latent cache
  layer (index num_hidden_layers, same block tables), and a sequence's last row gives its first
  draft. Drafts 2..k chain depth 0 on its own hidden state, as vLLM does for V3's single layer.
  While drafting is on, every sequence's rows are computed, its prompt's included, so every
  cached block's MTP entries are there for a later request that shares it; while the gate has
  it off, none are (the MTP layer's work on prompts would otherwise cost a large batch more
  than speculation ever saves there). Stale MTP entries (positions computed while gated off, a
  prefix shared up to a block boundary, a forked sibling's first token) only lower the
  acceptance rate; they can never change an output. Re-measurements of drafting after a
  gated-off stretch therefore see lower acceptance than a fresh start would: the gate leans to
  staying off where it measured off faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

METHODS = ("mtp", "ngram")


class SpeculativeConfigError(ValueError):
    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "mtp"
    num_speculative_tokens: int = 1
    prompt_lookup_max: int = 4  # n-gram sizes tried, longest first (ngram)
    prompt_lookup_min: int = 1
    min_acceptance: float = 0.25  # below this averaged acceptance a sequence stops drafting
    probe_interval: int = 8  # steps between one-draft probes of a sequence that stopped
    adaptive: bool = True  # SpeedGate: draft only at batch sizes where it measures faster
    gate_probe_interval: int = 64  # steps to the first re-measurement of the mode the gate did not choose

    def check(self, mtp_depth: int | None = None) -> None:
        """Reject bad options, naming them; with `mtp_depth` (the model's MTP layers) also a
        method the model cannot serve."""
        def need(ok: bool, option: str, why: str) -> None:
            if not ok:
                raise SpeculativeConfigError(f"speculative.{option}: {why}, got {getattr(self, option)!r}",
                                             f"speculative.{option}")

        need(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
        need(isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 8,
             "num_speculative_tokens", "must be an integer from 1 to 8")
        need(1 <= self.prompt_lookup_min <= self.prompt_lookup_max, "prompt_lookup_min",
             "must be at least 1 and at most prompt_lookup_max")
        need(0.0 <= self.min_acceptance < 1.0, "min_acceptance", "must be in [0, 1)")
        need(self.probe_interval >= 1, "probe_interval", "must be >= 1")
        need(self.gate_probe_interval >= 2 * SpeedGate.probe_steps, "gate_probe_interval",
             f"must be >= {2 * SpeedGate.probe_steps}")
        if self.method == "mtp" and mtp_depth is not None:
            need(mtp_depth >= 1, "method", "the model has no multi-token-prediction layer "
                 "(num_nextn_predict_layers tensors at model.layers.<num_hidden_layers>.*); use ngram")


@dataclass
class SpeculativeStats:
    """Counters since start: drafts proposed and accepted, and verification steps (one per
    sequence that verified drafts in a step)."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0

    def snapshot(self) -> "SpeculativeStats":
        return SpeculativeStats(self.draft_tokens, self.accepted_tokens, self.verify_steps)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step (accepted drafts plus the one sampled)."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0


@dataclass
class _SequenceAcceptance:
    average: float = 1.0
    steps_since_probe: int = 0


@dataclass
class DraftPolicy:
    """How many drafts each sequence gets next step (see the module docstring)."""

    config: SpeculativeConfig
    smoothing: float = 0.3  # weight of the latest step in the average
    _state: dict[int, _SequenceAcceptance] = field(default_factory=dict)

    def record(self, seq_id: int, proposed: int, accepted: int) -> None:
        state = self._state.setdefault(seq_id, _SequenceAcceptance())
        state.average += self.smoothing * (accepted / proposed - state.average)

    def budget(self, seq_id: int) -> int:
        state = self._state.setdefault(seq_id, _SequenceAcceptance())
        if state.average >= self.config.min_acceptance:
            return self.config.num_speculative_tokens
        state.steps_since_probe += 1
        if state.steps_since_probe >= self.config.probe_interval:
            state.steps_since_probe = 0
            return 1
        return 0

    def forget(self, seq_id: int) -> None:
        self._state.pop(seq_id, None)


@dataclass
class _BucketTiming:
    per_token_s: dict[bool, float] = field(default_factory=dict)  # drafting? -> averaged seconds per token
    samples: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    steps: int = 0
    chosen: bool | None = None  # the mode measured faster, once both are measured
    interval: int = 0  # steps from one re-measurement of the other mode to the next
    next_probe: int = 0  # the step at which that re-measurement starts


class SpeedGate:
    """Drafting on or off for the next step, by measured speed (see the module docstring).
    Batch sizes are bucketed by powers of two: 1, 2-3, 4-7, ... sequences decoding. The mode not
    chosen is re-measured `probe_interval` steps after a choice is made; each re-measurement
    that confirms the choice doubles the wait for the next (up to `max_backoff` times
    `probe_interval`), and one that overturns it starts again from `probe_interval`: a stable
    workload pays for fewer probes of the slower mode."""

    probe_steps = 3  # steps of a mode measured at a time (the first of them pays for the switch)
    max_backoff = 16

    def __init__(self, probe_interval: int = 64, smoothing: float = 0.25):
        self.probe_interval, self.smoothing = probe_interval, smoothing
        self._buckets: dict[int, _BucketTiming] = {}

    def choose(self, num_decoding: int) -> bool:
        """Whether the next step (of `num_decoding` decoding sequences) drafts."""
        timing = self._buckets.setdefault(num_decoding.bit_length(), _BucketTiming())
        timing.steps += 1
        for drafting in (True, False):  # measure both modes first, drafting first
            if timing.samples[drafting] < self.probe_steps:
                return drafting
        faster = timing.per_token_s[True] < timing.per_token_s[False]
        if faster != timing.chosen:  # the first choice, or a re-measurement overturned it
            timing.chosen, timing.interval = faster, self.probe_interval
            timing.next_probe = timing.steps + timing.interval
        elif timing.steps >= timing.next_probe + self.probe_steps:  # a re-measurement confirmed it
            timing.interval = min(2 * timing.interval, self.max_backoff * self.probe_interval)
            timing.next_probe = timing.steps + timing.interval
        probing = timing.next_probe <= timing.steps < timing.next_probe + self.probe_steps
        return not faster if probing else faster

    def observe(self, num_decoding: int, drafting: bool, seconds: float, tokens: int) -> None:
        """A decode-only step of that mode took `seconds` and emitted `tokens` tokens."""
        if tokens <= 0:
            return
        timing = self._buckets.setdefault(num_decoding.bit_length(), _BucketTiming())
        sample = seconds / tokens
        previous = timing.per_token_s.get(drafting)
        # The first sample of a probe also pays for the switch (stale MTP entries, new drafts): it
        # is seen, but the average leans on the steps after it.
        timing.per_token_s[drafting] = sample if previous is None else previous + self.smoothing * (sample - previous)
        timing.samples[drafting] += 1


@dataclass
class _LookupIndex:
    """n-gram -> the index just after its latest occurrence, over tokens[:indexed]."""

    grams: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0


class NgramProposer:
    """Prompt lookup: the sequence's longest suffix (prompt_lookup_max down to _min tokens) that
    occurred earlier in it proposes the tokens that followed that occurrence. The index is kept
    per sequence and extended by the new tokens only, so a step costs O(new tokens)."""

    def __init__(self, config: SpeculativeConfig):
        self.low, self.high = config.prompt_lookup_min, config.prompt_lookup_max
        self._indexes: dict[int, _LookupIndex] = {}

    def propose(self, seq_id: int, tokens: list[int], count: int) -> list[int]:
        index = self._indexes.setdefault(seq_id, _LookupIndex())
        end = len(tokens) - 1  # n-grams ending before the last token: the suffix must not find itself
        for stop in range(index.indexed, end):
            for n in range(self.low, min(self.high, stop + 1) + 1):
                index.grams[tuple(tokens[stop + 1 - n:stop + 1])] = stop + 1
        index.indexed = max(index.indexed, end)
        for n in range(min(self.high, len(tokens) - 1), self.low - 1, -1):
            follows = index.grams.get(tuple(tokens[len(tokens) - n:]))
            if follows is not None:
                return tokens[follows:follows + count]
        return []

    def forget(self, seq_id: int) -> None:
        self._indexes.pop(seq_id, None)


class Speculator:
    """The engine's speculative side: records each verification, and after every step gives each
    decoding sequence its drafts for the next (by prompt lookup, or through the runner's MTP
    layer, which also writes the MTP cache entries of everything the step computed)."""

    def __init__(self, config: SpeculativeConfig, runner, block_manager):
        self.config, self.runner, self.block_manager = config, runner, block_manager
        self.uses_mtp = config.method == "mtp"
        self.policy = DraftPolicy(config)
        self.ngram = None if self.uses_mtp else NgramProposer(config)
        self.stats = SpeculativeStats()
        self.gate = SpeedGate(config.gate_probe_interval) if config.adaptive else None
        self._chosen: tuple[int, bool] | None = None  # (sequences decoding, drafting?) of the running step
        self._next: tuple[int, bool] = (0, True)  # the same, decided for the step after it
        self._propose_s = 0.0  # time the last propose took: part of the cost of the step it drafted for
        self._decode_only = False  # whether the running step's chunks all decode

    def plan(self, chunks) -> bool:
        """Before a step runs: whether its results draft for the next one (the gate's choice for
        the sequences that sample in it). True means an MTP step must keep its hidden states and
        block tables for `propose`; a gated-off step needs neither."""
        num_decoding = sum(1 for chunk in chunks if chunk.samples)
        drafting = self.gate is None or self.gate.choose(num_decoding)
        self._next = (num_decoding, drafting)
        self._decode_only = all(_decodes(chunk) for chunk in chunks)  # before the step moves the sequences on
        return drafting

    def timed(self, emitted: dict[int, int], seconds: float) -> None:
        """The step `plan` saw ran in `seconds` (forward and sampling); a decode-only one informs the gate."""
        if self.gate is not None and self._chosen is not None and self._decode_only:
            num_decoding, drafting = self._chosen
            self.gate.observe(num_decoding, drafting, seconds + self._propose_s, sum(emitted.values()))
        self._chosen = None

    def record(self, seq, draft: tuple[int, ...], emitted: int) -> int:
        """A verification of `draft` that emitted `emitted` tokens (now the end of seq.token_ids);
        returns how many drafts were accepted."""
        tokens = seq.token_ids[len(seq.token_ids) - emitted:]
        matched = next((i for i, (token, guess) in enumerate(zip(tokens, draft)) if token != guess),
                       min(len(tokens), len(draft)))
        self.stats.draft_tokens += len(draft)
        self.stats.accepted_tokens += matched
        self.stats.verify_steps += 1
        self.policy.record(seq.seq_id, len(draft), matched)
        return matched

    def forget(self, seq) -> None:
        self.policy.forget(seq.seq_id)
        if self.ngram is not None:
            self.ngram.forget(seq.seq_id)

    def _budget(self, seq, room) -> int:
        if seq.is_finished or not seq.is_decode:
            return 0
        return max(0, min(self.policy.budget(seq.seq_id), room(seq)))

    def propose(self, chunks, emitted: dict[int, int], hidden, tables, room) -> None:
        """Drafts for the next step, on `seq.draft_token_ids`, as `plan` decided. `hidden` [T, D] are
        the step's final hidden states (MTP), `tables` the block tables the step ran with (both
        None when `plan` said no drafting), `room(seq)` the most drafts worth verifying."""
        start = time.perf_counter()
        self._chosen = self._next
        drafting = self._next[1]
        try:
            self._propose(chunks, emitted, hidden, tables, room, drafting)
        finally:
            # After a step with prompt chunks the MTP rows are mostly prompt positions, work either
            # mode pays: not a cost of the drafts.
            self._propose_s = time.perf_counter() - start if self._decode_only else 0.0

    def _propose(self, chunks, emitted, hidden, tables, room, drafting: bool) -> None:
        if not self.uses_mtp:
            for chunk in chunks:
                count = self._budget(chunk.seq, room) if drafting and id(chunk) in emitted else 0
                if count:
                    chunk.seq.draft_token_ids = self.ngram.propose(chunk.seq.seq_id, chunk.seq.token_ids, count)
            return
        if not drafting:
            # Gated off: no MTP work at all, prompt rows included. Those are most of the MTP
            # layer's cost at a large batch (a prompt's every position, against one row per
            # decoding sequence), which would otherwise make speculation slower than off even
            # when it never drafts. Their entries stay stale: lower acceptance, never an output.
            return
        from moeray.engine.runner import MtpRows  # torch: only the MTP path needs it

        rows, offset, owners = [], 0, []
        for chunk, table in zip(chunks, tables):
            seq = chunk.seq
            valid = emitted[id(chunk)] if chunk.draft else chunk.num_tokens  # positions whose latents stay
            count = self._budget(seq, room) if id(chunk) in emitted else 0  # it sampled this step
            # Chained drafts write entries past the sequence's last token: room for them first.
            if count > 1 and not self.block_manager.ensure_capacity(seq, seq.num_tokens + count - 2):
                count = 1
            rows.append(MtpRows(chunk.start, seq.token_ids[chunk.start + 1:chunk.start + valid + 1],
                                hidden[offset:offset + valid], table if seq.is_finished else seq.block_table, count))
            owners.append(chunk)
            offset += chunk.num_tokens
        if not rows:
            return
        drafts = self.runner.draft_mtp(rows, max(r.drafts for r in rows))
        for chunk, draft in zip(owners, drafts):
            if draft:
                chunk.seq.draft_token_ids = draft


def _decodes(chunk) -> bool:
    """Whether a chunk decodes (its sequence's prompt is all computed before it)."""
    return chunk.start >= chunk.seq.num_prompt_tokens
