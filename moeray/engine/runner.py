"""Turns a scheduled step into flat tensors and runs the model's cached path.

Contract: `ModelRunner.execute(chunks)` takes the scheduler's chunks (decodes first, then
prefill chunks), builds token ids [T], positions [T], the slot mapping [T] and the per-sequence
block tables, runs every layer once over all T tokens (so each MoE layer routes the whole step
at once, through the given expert backend), and returns logits [N, V] (float32) for the N
chunks that reach the end of their sequence, in chunk order. Given a `NativeDecoder` (built by
the engine, see `moeray.kernels.cpu.decoder.prepare`), a step's single-token chunks of the base
model, however many, run as one native call from token ids to logits (the same results up to
float rounding), and only its prefill chunks take the torch path. With remote experts that can be submitted asynchronously, the
step runs as two micro-batches so attention overlaps expert work.
Sequences served by LoRA adapters run through their adapter's model (which shares all other
weights and the latent cache with the base model), one forward per adapter present in the step.
"""

from __future__ import annotations

import torch

from moeray.engine.attention import AttentionMetadata, PrefillSpan, StepAttention
from moeray.engine.cache import LatentCache
from moeray.engine.scheduler import ScheduledChunk
from moeray.kernels.cpu.decoder import NativeDecoder
from moeray.kernels.policy import KernelPolicy, using
from moeray.model.moe import ExpertBackend
from moeray.model.transformer import DeepseekForCausalLM


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
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_slots: list[list[int]] = []
        prefills: list[PrefillSpan] = []
        logit_rows: list[int] = []
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            row = len(token_ids)
            token_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += self._slots(seq.block_table, start, start + n)
            if n == 1 and not prefills:
                decode_slots.append(self._slots(seq.block_table, 0, start + 1))
            else:
                context = None if start == 0 else torch.tensor(self._slots(seq.block_table, 0, start + n),
                                                               device=self.device)
                prefills.append(PrefillSpan(slice(row, row + n), start, context))
            if chunk.samples:
                logit_rows.append(row + n - 1)

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

    def execute(self, chunks: list[ScheduledChunk], block_copies: list[tuple[int, int]] = ()) -> torch.Tensor:
        with using(self.kernels), torch.inference_mode():
            return self._execute_step(chunks, block_copies)

    def _execute_step(self, chunks: list[ScheduledChunk], block_copies) -> torch.Tensor:
        self.cache.copy_blocks(list(block_copies))
        adapters = {chunk.seq.adapter for chunk in chunks}
        if len(adapters) == 1:
            return self._execute(self.models[adapters.pop()], chunks)
        # One forward per adapter (each keeps decodes before prefills), then the logits back in
        # the order of the sampling chunks.
        sampling_order = [chunk for chunk in chunks if chunk.samples]
        rows: dict[int, torch.Tensor] = {}
        for adapter in adapters:
            group = [chunk for chunk in chunks if chunk.seq.adapter == adapter]
            logits = self._execute(self.models[adapter], group)
            for chunk, row in zip([c for c in group if c.samples], logits, strict=True):
                rows[id(chunk)] = row
        if not sampling_order:
            return torch.empty(0, self.model.args.vocab_size, device=self.device)
        return torch.stack([rows[id(chunk)] for chunk in sampling_order])

    def _execute(self, model: DeepseekForCausalLM, chunks: list[ScheduledChunk]) -> torch.Tensor:
        if self.overlaps and len(chunks) >= 2:
            return self._execute_overlapped(model, chunks)
        if self.native is not None and model is self.model:
            decodes = [chunk for chunk in chunks if chunk.num_tokens == 1]
            if len(decodes) == len(chunks):
                return self._execute_native(chunks)
            if decodes:  # the decodes natively, the prefill chunks through torch, logits in chunk order
                rest = [chunk for chunk in chunks if chunk.num_tokens != 1]
                rows = dict(zip([id(c) for c in decodes if c.samples], self._execute_native(decodes)))
                rows.update(zip([id(c) for c in rest if c.samples], self._execute_torch(model, rest)))
                sampling = [rows[id(chunk)] for chunk in chunks if chunk.samples]
                return torch.stack(sampling) if sampling else torch.empty(0, model.args.vocab_size)
        return self._execute_torch(model, chunks)

    def _execute_torch(self, model: DeepseekForCausalLM, chunks: list[ScheduledChunk]) -> torch.Tensor:
        token_ids, positions, meta, logit_rows = self.prepare(chunks)
        hidden = model.forward_tokens(token_ids, positions, StepAttention(self.cache, meta), self.experts)
        return model.logits(hidden[logit_rows]).float()

    def _execute_native(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        # Single-token chunks attend to their whole prefix, so each is a decode here, even the
        # last token of a prompt whose other tokens came from the prefix cache.
        logits = self.native.step([chunk.seq.token_ids[chunk.start] for chunk in chunks],
                                  [chunk.start for chunk in chunks], list(range(len(chunks))),
                                  [chunk.seq.block_table for chunk in chunks], self.cache.block_size)
        sampling = [row for row, chunk in enumerate(chunks) if chunk.samples]
        return logits if len(sampling) == len(chunks) else logits[sampling]

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
