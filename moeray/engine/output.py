"""From sampled token ids to text deltas: detokenization, stop conditions, finish reasons.

Contract: one `SequenceOutput` per generated sequence. `add_token(token, logprobs)` returns the
finish reason (`"stop"`, `"length"`) or None, and `take_delta()` returns what the client has
not seen yet. Stop strings are matched on the detokenized text, across token boundaries, and
are not part of the output: text that could still turn out to be the start of a stop string
is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeray.engine.params import SamplingParams
from moeray.engine.sampler import TokenLogprobs
from moeray.model.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class CompletionDelta:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta, not the cumulative result)."""

    request_id: str
    outputs: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    # On a request's first output when it asked for prompt_logprobs: one entry per prompt token,
    # None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # Speculative decoding, so far for this request: drafts verified, and of those accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Seconds from arrival to the first step that ran the request's prompt; None until then.
    queue_time_s: float | None = None


@dataclass
class SequenceOutput:
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    max_output_tokens: int
    text: str = ""
    num_emitted_chars: int = 0
    num_output_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    finish_reported: bool = False

    @classmethod
    def create(cls, index: int, params: SamplingParams, tokenizer: Tokenizer, prompt_ids: list[int],
               max_output_tokens: int) -> "SequenceOutput":
        detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        return cls(index, params, detok, tokenizer.eos_token_ids, max_output_tokens)

    @property
    def _holdback(self) -> int:
        return max((len(s) for s in self.params.stop), default=1) - 1

    def add_token(self, token_id: int, logprobs: TokenLogprobs | None) -> str | None:
        self.num_output_tokens += 1
        self.new_token_ids.append(token_id)
        if logprobs is not None:
            self.new_logprobs.append(logprobs)
        if (not self.params.ignore_eos and token_id in self.eos_token_ids) or token_id in self.params.stop_token_ids:
            self.text += self.detokenizer.flush()
            return self._finish("stop")
        search_from = max(0, len(self.text) - self._holdback)
        self.text += self.detokenizer.add(token_id)
        for stop in self.params.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[:at]
                return self._finish("stop")
        if self.num_output_tokens >= self.max_output_tokens:
            self.text += self.detokenizer.flush()
            return self._finish("length")
        return None

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        return reason

    def finish(self, reason: str) -> str:
        """End the sequence for a reason found outside (its grammar is complete)."""
        self.text += self.detokenizer.flush()
        return self._finish(reason)

    def take_delta(self) -> CompletionDelta:
        safe = len(self.text) if self.finish_reason else max(self.num_emitted_chars, len(self.text) - self._holdback)
        report = self.finish_reason if not self.finish_reported else None
        delta = CompletionDelta(self.index, self.new_token_ids, self.text[self.num_emitted_chars:safe],
                                self.new_logprobs if self.params.logprobs is not None else None, report)
        self.finish_reported = self.finish_reason is not None
        self.num_emitted_chars = safe
        self.new_token_ids, self.new_logprobs = [], []
        return delta
