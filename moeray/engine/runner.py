"""Turns a scheduled step into flat tensors and runs the model's cached path.

Contract: `ModelRunner.execute(chunks)` takes the scheduler's chunks (decodes first, then
prefill chunks), builds token ids [T], positions [T], the slot mapping [T] and the per-sequence
block tables, runs every layer once over all T tokens (so each MoE layer routes the whole step
at once, through the given expert backend), and returns a `StepResult`: logits (float32) for
the chunks that reach the end of their sequence, in chunk order (one row each, or 1 + k rows for
a chunk verifying k drafts), and with `want_hidden` the final hidden states of all T tokens.
Given a `NativeDecoder` (built by the engine, see `moeray.kernels.cpu.decoder.prepare`), a
step's single-token and verifying chunks of the base model, however many, run as one native
call from token ids to logits (the same results up to float rounding), and only its prompt
chunks take the torch path. With remote experts that can be submitted asynchronously, the
step runs as two micro-batches so attention overlaps expert work.
`draft_mtp(rows, k)` runs the MTP layer after a step (natively where packed): its cache
entries for every computed position, and k chained greedy drafts (`moeray.engine.speculative`).
Sequences served by LoRA adapters run through their adapter's model (which shares all other
weights and the latent cache with the base model), one forward per adapter present in the step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from moeray.engine.attention import AttentionMetadata, PrefillSpan, StepAttention
from moeray.engine.cache import LatentCache
from moeray.engine.scheduler import ScheduledChunk
from moeray.kernels.cpu.decoder import NativeDecoder
from moeray.kernels.policy import KernelPolicy, using
from moeray.model.moe import ExpertBackend
from moeray.model.transformer import DeepseekForCausalLM


@dataclass
class Span:
    """Tokens of one sequence at positions [start, start + len(token_ids)), computed in one step."""

    token_ids: list[int]
    start: int
    block_table: list[int]


def chunk_span(chunk: ScheduledChunk) -> Span:
    """A chunk's tokens: its sequence's, then the drafts it verifies."""
    seq, end = chunk.seq, chunk.start + chunk.num_tokens - len(chunk.draft)
    return Span(seq.token_ids[chunk.start:end] + list(chunk.draft), chunk.start, seq.block_table)


def sampled_rows(chunk: ScheduledChunk) -> int:
    """Logit rows a chunk yields: none mid-prompt, its last position, or 1 + k verifying k drafts."""
    return 1 + len(chunk.draft) if chunk.samples else 0


@dataclass
class StepResult:
    logits: torch.Tensor  # [R, V] float32: each chunk's `sampled_rows`, in chunk order
    hidden: torch.Tensor | None  # [T, D] float32 final hidden states of every computed token, when asked


@dataclass
class MtpRows:
    """MTP inputs of one sequence after a step: the main model's hidden states [n, D] at
    positions start.., each with the token after it (`next_token_ids` [n])."""

    start: int
    next_token_ids: list[int]
    hidden: torch.Tensor
    block_table: list[int]
    drafts: int  # drafts wanted from the last row (0: only write the cache entries)


def _split(chunks: list[ScheduledChunk], result: StepResult) -> list[StepResult]:
    logits = result.logits.split([sampled_rows(c) for c in chunks])
    hidden = result.hidden.split([c.num_tokens for c in chunks]) if result.hidden is not None else [None] * len(chunks)
    return [StepResult(rows, states) for rows, states in zip(logits, hidden)]


def _join(parts: list[StepResult], vocab_size: int) -> StepResult:
    logits = torch.cat([p.logits for p in parts]) if parts else torch.empty(0, vocab_size)
    hidden = torch.cat([p.hidden for p in parts]) if parts and parts[0].hidden is not None else None
    return StepResult(logits, hidden)


class ModelRunner:
    def __init__(self, model: DeepseekForCausalLM, cache: LatentCache, experts: ExpertBackend | None = None,
                 overlap_microbatches: bool = True, adapters: dict[str, DeepseekForCausalLM] | None = None,
                 native: NativeDecoder | None = None, kernels: KernelPolicy = KernelPolicy()):
        self.model, self.cache, self.experts = model, cache, experts
        self.overlap_microbatches = overlap_microbatches
        self.models: dict[str | None, DeepseekForCausalLM] = {None: model, **(adapters or {})}
        self.device = next(model.parameters()).device
        self.native = native
        self.kernels = kernels  # the policy every step runs under

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.cache.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, chunks: list[ScheduledChunk]):
        """(token ids [T], positions [T], attention metadata, logit rows [R]) of a step: a chunk
        that samples has logits at its last position, or at all 1 + k when it verifies k drafts."""
        return self.prepare_spans([chunk_span(c) for c in chunks], [sampled_rows(c) for c in chunks])

    def prepare_spans(self, spans: list[Span], rows_per_span: list[int]):
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_slots: list[list[int]] = []
        prefills: list[PrefillSpan] = []
        logit_rows: list[int] = []
        for span, num_rows in zip(spans, rows_per_span):
            start, n = span.start, len(span.token_ids)
            row = len(token_ids)
            token_ids += span.token_ids
            positions += range(start, start + n)
            slots += self._slots(span.block_table, start, start + n)
            if n == 1 and not prefills:
                decode_slots.append(self._slots(span.block_table, 0, start + 1))
            else:
                context = None if start == 0 else torch.tensor(self._slots(span.block_table, 0, start + n),
                                                               device=self.device)
                prefills.append(PrefillSpan(slice(row, row + n), start, context))
            logit_rows += range(row + n - num_rows, row + n)

        decode_slot_tensor = decode_mask = None
        if decode_slots:
            longest = max(map(len, decode_slots))
            decode_slot_tensor = torch.tensor([s + [0] * (longest - len(s)) for s in decode_slots], device=self.device)
            lengths = torch.tensor([len(s) for s in decode_slots], device=self.device)
            decode_mask = (torch.arange(longest, device=self.device)[None, :] < lengths[:, None])[:, None, :]
        meta = AttentionMetadata(torch.tensor(slots, device=self.device), len(decode_slots), decode_slot_tensor,
                                 decode_mask, prefills)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(token_ids), as_tensor(positions), meta, as_tensor(logit_rows)

    @property
    def overlaps(self) -> bool:
        """Remote experts that can be submitted asynchronously: run two micro-batches."""
        return self.overlap_microbatches and hasattr(self.experts, "submit")

    def execute(self, chunks: list[ScheduledChunk], block_copies: list[tuple[int, int]] = (),
                want_hidden: bool = False) -> StepResult:
        with using(self.kernels), torch.inference_mode():
            self.cache.copy_blocks(list(block_copies))
            adapters = {chunk.seq.adapter for chunk in chunks}
            if len(adapters) == 1:
                return self._execute(self.models[adapters.pop()], chunks, want_hidden)
            # One forward per adapter (each keeps decodes before prefills), then the logits back
            # in chunk order.
            parts: dict[int, StepResult] = {}
            for adapter in adapters:
                group = [chunk for chunk in chunks if chunk.seq.adapter == adapter]
                parts.update(zip(map(id, group), _split(group, self._execute(self.models[adapter], group,
                                                                             want_hidden))))
            return _join([parts[id(chunk)] for chunk in chunks], self.model.args.vocab_size)

    def _execute(self, model: DeepseekForCausalLM, chunks: list[ScheduledChunk], want_hidden: bool) -> StepResult:
        if self.overlaps and len(chunks) >= 2 and not want_hidden:
            return StepResult(self._execute_overlapped(model, chunks), None)
        if self.native is not None and model is self.model:
            # Single-token chunks and verifications attend to their whole prefix through the
            # cache, so they run natively; prompt chunks of more tokens go through torch.
            native = [chunk for chunk in chunks if chunk.num_tokens == 1 or chunk.draft]
            if len(native) == len(chunks):
                return self._execute_native(chunks, want_hidden)
            if native:  # the rest through torch, results back in chunk order
                rest = [chunk for chunk in chunks if chunk.num_tokens != 1 and not chunk.draft]
                parts = dict(zip(map(id, native), _split(native, self._execute_native(native, want_hidden))))
                parts.update(zip(map(id, rest), _split(rest, self._execute_torch(model, rest, want_hidden))))
                return _join([parts[id(chunk)] for chunk in chunks], model.args.vocab_size)
        return self._execute_torch(model, chunks, want_hidden)

    def _execute_torch(self, model: DeepseekForCausalLM, chunks: list[ScheduledChunk], want_hidden: bool) -> StepResult:
        token_ids, positions, meta, logit_rows = self.prepare(chunks)
        hidden = model.forward_tokens(token_ids, positions, StepAttention(self.cache, meta), self.experts)
        return StepResult(model.logits(hidden[logit_rows]).float(), hidden.float() if want_hidden else None)

    def _execute_native(self, chunks: list[ScheduledChunk], want_hidden: bool) -> StepResult:
        spans = [chunk_span(chunk) for chunk in chunks]
        token_ids, positions, token_seq, rows = [], [], [], []
        for i, (chunk, span) in enumerate(zip(chunks, spans)):
            end = len(token_ids) + len(span.token_ids)
            token_ids += span.token_ids
            positions += range(span.start, span.start + len(span.token_ids))
            token_seq += [i] * len(span.token_ids)
            rows += range(end - sampled_rows(chunk), end)
        every_row = len(rows) == len(token_ids)
        logits, hidden = self.native.run(token_ids, positions, token_seq, [span.block_table for span in spans],
                                         self.cache.block_size, logit_rows=None if every_row else rows,
                                         want_hidden=want_hidden)
        return StepResult(logits, hidden)

    # ---- MTP drafting -------------------------------------------------------------------------
    def draft_mtp(self, rows: list[MtpRows], count: int) -> list[list[int]]:
        """Write MTP depth 0's cache entries for every row set, and return up to `count` chained
        greedy drafts for each set with `drafts > 0` (`drafts` of them; none for the others).
        See `moeray.engine.speculative` for what the rows are."""
        with using(self.kernels), torch.inference_mode():
            spans = [Span(r.next_token_ids, r.start, r.block_table) for r in rows]
            ends = list(itertools.accumulate(len(span.token_ids) for span in spans))
            drafting = [i for i, r in enumerate(rows) if r.drafts > 0]
            last_rows = [ends[i] - 1 for i in drafting]
            logits, state = self._mtp(spans, torch.cat([r.hidden for r in rows]), last_rows, count > 1)
            drafts = {i: [token] for i, token in zip(drafting, logits.argmax(dim=-1).tolist())}
            if count > 1:
                state = state[last_rows]  # [len(active), D], aligned with `active`
            active = drafting
            for step in range(1, count):
                still = [j for j, i in enumerate(active) if rows[i].drafts > step]
                if not still:
                    break
                active, state = [active[j] for j in still], state[still]
                # Draft step + 1 comes from the row `step` past a set's last row: (the previous
                # draft row's state, the previous draft).
                chain = [Span([drafts[i][-1]], spans[i].start + len(spans[i].token_ids) + step - 1, rows[i].block_table)
                         for i in active]
                logits, state = self._mtp(chain, state, None, True)
                for i, token in zip(active, logits.argmax(dim=-1).tolist()):
                    drafts[i].append(token)
            return [drafts.get(i, []) for i in range(len(rows))]

    def _mtp(self, spans: list[Span], previous: torch.Tensor, logit_rows: list[int] | None,
             want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MTP depth 0 over `spans` (natively where packed): (logits at `logit_rows`, states)."""
        if self.native is not None and self.native.num_mtp_layers:
            token_ids, positions, token_seq = [], [], []
            for i, span in enumerate(spans):
                token_ids += span.token_ids
                positions += range(span.start, span.start + len(span.token_ids))
                token_seq += [i] * len(span.token_ids)
            return self.native.run(token_ids, positions, token_seq, [span.block_table for span in spans],
                                   self.cache.block_size, depth=0, previous_hidden=previous, logit_rows=logit_rows,
                                   want_hidden=want_hidden)
        token_ids, positions, meta, _ = self.prepare_spans(spans, [0] * len(spans))
        dtype = self.model.lm_head.weight.dtype
        state, head_input = self.model.mtp_forward(0, previous.to(self.device, dtype), token_ids, positions,
                                                   StepAttention(self.cache, meta))
        chosen = head_input if logit_rows is None else head_input[torch.tensor(logit_rows, dtype=torch.long, device=self.device)]
        return self.model.logits(chosen).float(), state.float()

    def _execute_overlapped(self, model: DeepseekForCausalLM, chunks: list[ScheduledChunk]) -> torch.Tensor:
        # Split at the chunk closest to half the tokens; each half keeps decodes before prefills.
        total, running, split = sum(c.num_tokens for c in chunks), 0, 1
        for i, chunk in enumerate(chunks[:-1]):
            running += chunk.num_tokens
            split = i + 1
            if running * 2 >= total:
                break
        halves = [self.prepare(chunks[:split]), self.prepare(chunks[split:])]
        hidden = model.forward_microbatches(
            [(tokens, positions, StepAttention(self.cache, meta)) for tokens, positions, meta, _ in halves],
            self.experts)
        rows = [h[logit_rows] for h, (_, _, _, logit_rows) in zip(hidden, halves)]
        return model.logits(torch.cat(rows)).float()
