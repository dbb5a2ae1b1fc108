"""Continuous batching: which tokens of which sequences the next step computes.

Contract (no torch): `schedule()` builds one step under a token budget of
`max_num_batched_tokens`:
1. running decodes (one token each, plus its speculative drafts while the budget and free blocks
   allow: a verification, whose drafts are dropped before anything is preempted for them),
   oldest first;
2. running sequences still in their prompt, a chunk each;
3. waiting sequences, first come first served, while the budget, `max_num_seqs` and free
   blocks allow. With chunked prefill a prompt is cut to the budget left, so a long prompt
   never stalls the decodes scheduled before it.
When a running sequence needs a block and none is free, the newest running sequence not yet
scheduled in this step is preempted (blocks freed, recomputed later from the front of the
waiting queue); if there is none, the sequence itself is.
`complete(chunks)` advances the scheduled sequences' computed counts after a step; a
verification counts only its sequence's own token, the engine adds the drafts it accepts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeray.engine.block_manager import BlockManager
from moeray.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int  # including the drafts
    draft: tuple[int, ...] = ()  # drafts verified after the sequence's last token

    @property
    def samples(self) -> bool:
        """This chunk reaches the end of the sequence, so its last position yields a token."""
        return self.start + self.num_tokens - len(self.draft) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling that already holds its blocks."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.block_manager.free(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in aborted:
            self.finish(seq, "abort")
        return aborted

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # resumes before anything newer
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        scheduled: set[int] = set()

        decodes = [s for s in self.running if s.is_decode]
        prefills = [s for s in self.running if not s.is_decode]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = seq.num_uncomputed_tokens
            if num_tokens > budget:
                if not chunked:
                    continue
                num_tokens = budget
            draft = self._fit_draft(seq, budget - num_tokens) if seq.draft_token_ids else ()
            if draft:
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens + len(draft), draft))
                scheduled.add(seq.seq_id)
                budget -= num_tokens + len(draft)
                continue
            while not self.block_manager.ensure_capacity(seq, seq.num_computed_tokens + num_tokens):
                victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
                if not victims:
                    self._preempt(seq, out)
                    break
                self._preempt(max(victims, key=lambda s: s.arrival), out)
            if seq.status is SequenceStatus.RUNNING:
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
                scheduled.add(seq.seq_id)
                budget -= num_tokens

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq in out.preempted:
                break  # do not thrash: it just lost its blocks
            self.block_manager.allocate_prefix(seq)
            num_tokens = seq.num_uncomputed_tokens
            if num_tokens > budget and not chunked:
                self.block_manager.free(seq)
                break
            num_tokens = min(num_tokens, budget)
            if not self.block_manager.ensure_capacity(seq, seq.num_computed_tokens + num_tokens):
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
        return out

    def _fit_draft(self, seq: Sequence, budget: int) -> tuple[int, ...]:
        """The drafts that fit the budget left and the free blocks, without preempting anyone."""
        draft = seq.draft_token_ids[:budget]
        seq.draft_token_ids = []
        while draft and not self.block_manager.ensure_capacity(seq, seq.num_tokens + len(draft)):
            draft = draft[:-1]
        return tuple(draft)

    def complete(self, chunks: list[ScheduledChunk]) -> None:
        """Record that the step computed these chunks (their latents are now in the cache); of a
        verification only the sequence's own token, until the engine accepts drafts."""
        for chunk in chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens - len(chunk.draft)
            self.block_manager.commit(chunk.seq)

    def accept(self, seq: Sequence, num_drafts: int) -> None:
        """`num_drafts` verified drafts are now tokens of `seq` whose latents stay cached."""
        seq.num_computed_tokens += num_drafts
        self.block_manager.commit(seq)
