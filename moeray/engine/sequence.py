"""One generated sequence: its tokens, its place in the latent cache, its progress.

Contract: a `Sequence` is plain bookkeeping (no torch). `token_ids` holds prompt + output;
`num_computed_tokens` of them already have their latent in the cache (blocks in `block_table`).
A step computes tokens `[num_computed_tokens, num_computed_tokens + chunk)`; when that reaches
the end of `token_ids` the step also samples the next token. Preemption throws the cache away
and sets `num_computed_tokens` back to 0, so the sequence is recomputed as one long prompt.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from moeray.engine.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_next_seq_id = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # scheduling order: lower = older; preemption picks the highest
    seq_id: int = field(default_factory=lambda: next(_next_seq_id))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # content hashes of full computed blocks
    fork_pending: int = 0  # siblings to fork off once the prompt is computed (n > 1)
    finish_reason: str | None = None
    num_preemptions: int = 0
    adapter: str | None = None  # the LoRA adapter that serves this sequence; None: the base model
    draft_token_ids: list[int] = field(default_factory=list)  # speculative drafts for the next step

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_decode(self) -> bool:
        """Only the last sampled token is missing from the cache."""
        return self.num_uncomputed_tokens == 1 and self.num_output_tokens > 0
