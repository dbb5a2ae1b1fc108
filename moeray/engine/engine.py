"""One model replica: requests in, token deltas out, one batched step at a time.

Contract:
- `Engine.add_request(request_id, prompt, params)` validates everything first and raises
  `InvalidRequestError` (naming the parameter) before any work; a request that is accepted can
  always be served, alone if need be.
- `Engine.step()` schedules, runs the model once, samples, and returns a `RequestOutput` delta
  for every request that produced something. Finished and aborted requests free their cache
  blocks at once.
- n > 1: the prompt is computed once; the completions fork from it and share its blocks.
- `params.prompt_logprobs`: the request's first output carries the log-probability of every
  prompt token (`score_prompt`: one uncached forward when the request is added).
- Not thread-safe: `AsyncEngine` drives it from one thread.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moeray.engine.block_manager import BlockManager, CacheUsage
from moeray.engine.cache import LatentCache
from moeray.engine.config import EngineConfig
from moeray.engine.output import RequestOutput, SequenceOutput
from moeray.engine.params import InvalidRequestError, SamplingParams, short_repr
from moeray.engine.runner import ModelRunner
from moeray.engine.sampler import Sampler, SamplingRow, TokenLogprobs
from moeray.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from moeray.engine.sequence import Sequence
from moeray.engine.speculative import SpeculativeStats, Speculator
from moeray.kernels.policy import using
from moeray.model.mla import VarlenCausalAttention
from moeray.model.moe import ExpertBackend
from moeray.model.tokenizer import Tokenizer
from moeray.model.transformer import DeepseekForCausalLM

if TYPE_CHECKING:
    from moeray.engine.grammar import Grammars, SequenceGrammar


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: list[SequenceOutput]
    seqs: dict[int, Sequence] = field(default_factory=dict)  # index -> live sequence
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # sent with the first output, then dropped
    num_draft_tokens: int = 0  # speculative drafts verified for this request, and how many were accepted
    num_accepted_tokens: int = 0
    arrived_at: float = field(default_factory=time.perf_counter)
    queue_time_s: float | None = None  # from arrival to the first step that ran its prompt

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    cache: CacheUsage
    prompt_tokens_total: int
    generation_tokens_total: int
    preemptions_total: int
    speculative: SpeculativeStats | None = None  # with speculative decoding
    # Prompt tokens the prefix cache served, counted once per request (at its first admission);
    # with prompt_tokens_total (computed tokens) they make the prefix-cache hit rate.
    cached_prompt_tokens_total: int = 0
    grammar_compiles_total: int = 0  # grammars compiled (cache misses), and the seconds they took
    grammar_compile_seconds_total: float = 0.0


def _sequence_generator(seed: int | None, index: int) -> torch.Generator | None:
    """Per-completion RNG: the same (seed, index) gives the same stream in any batch."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class Engine:
    def __init__(self, model: DeepseekForCausalLM, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 experts: ExpertBackend | None = None, adapters: dict[str, DeepseekForCausalLM] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.adapters = dict(adapters or {})
        self.args = model.args
        self.config = config.resolve(self.args)
        self.block_manager = BlockManager(self.config.num_cache_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_batched_tokens, self.config.max_num_seqs,
                                                   self.config.enable_chunked_prefill), self.block_manager)
        speculative = self.config.speculative
        if speculative is not None:
            speculative.check(model.mtp_depth)
        mtp = speculative is not None and speculative.method == "mtp"
        self.cache = LatentCache(self.args, self.config.num_cache_blocks, self.config.block_size,
                                 self.config.torch_dtype, self.config.device, mtp_layers=1 if mtp else 0)
        self.runner = ModelRunner(model, self.cache, experts, self.config.overlap_microbatches, self.adapters,
                                  native=self._prepare_native(model, experts), kernels=self.config.kernels)
        self.speculator = (Speculator(speculative, self.runner, self.block_manager)
                           if speculative is not None else None)
        self.sampler = Sampler(self.config.seed)
        self.requests: dict[str, _Request] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._grammar_states: dict[int, SequenceGrammar] = {}  # seq_id -> its grammar, if it has one
        self._grammars: Grammars | None = None  # built on the first structured request
        self._arrivals = itertools.count()
        self._pending_copies: list[tuple[int, int]] = []
        self._prompt_tokens_total = self._generation_tokens_total = self._cached_prompt_tokens_total = 0

    def _prepare_native(self, model: DeepseekForCausalLM, experts: ExpertBackend | None):
        """The packed native decoder for this engine's decode steps, where the policy allows it."""
        if experts is not None or not self.config.kernels.native_decoder or torch.device(self.config.device).type != "cpu":
            return None
        from moeray.kernels.cpu import decoder

        return decoder.prepare(model, self.cache)

    def refresh_weights(self) -> None:
        """The model's weights changed in place (a trainer's sync): re-pack what the native decoder reads."""
        if self.runner.native is not None:
            self.runner.native.refresh(self.model)

    # ---- requests ---------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int], param: str = "prompt",
                        add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt. A text that cannot fit the context is refused before it is
        tokenized (tokenizing a body of megabytes would take the engine's time for nothing)."""
        max_len = self.config.max_model_len
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError(f"{param} must not be empty", param)
            most_chars = max_len * self.tokenizer.max_token_bytes
            if len(prompt) > most_chars:
                raise InvalidRequestError(f"the {param} has {len(prompt)} characters, but this model's maximum "
                                          f"context length is {max_len} tokens, which hold at most {most_chars} "
                                          f"characters of text", param)
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequestError(f"{param} must be a non-empty string or list of token ids", param)
        if len(prompt) >= max_len:
            raise InvalidRequestError(f"the {param} has {len(prompt)} tokens, but this model's maximum context "
                                      f"length is {max_len} tokens (prompt plus output)", param)
        vocab = self.args.vocab_size
        for i, token in enumerate(prompt):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidRequestError(f"{param}[{i}] = {short_repr(token)} is not a token id in [0, {vocab})",
                                          param)
        return list(prompt)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> tuple[list[int], int]:
        """Tokenize and check a request; returns (prompt ids, max output tokens). No side effects."""
        params.validate()
        prompt_ids = self.tokenize_prompt(prompt)
        max_len = self.config.max_model_len
        if len(prompt_ids) >= max_len:
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens, but this model's maximum "
                                      f"context length is {max_len} tokens (prompt plus output)", "prompt")
        room = max_len - len(prompt_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(f"max_tokens is {params.max_tokens}, but the prompt has {len(prompt_ids)} "
                                      f"tokens and the maximum context length is {max_len}: at most {room} "
                                      f"tokens can be generated", "max_tokens")
        max_output = params.max_tokens or room
        blocks = self.block_manager.blocks_needed(len(prompt_ids) + max_output)
        if blocks > self.block_manager.num_blocks:
            raise InvalidRequestError(f"prompt plus max_tokens ({len(prompt_ids) + max_output} tokens) does not "
                                      f"fit in the KV cache ({self.block_manager.num_blocks} blocks of "
                                      f"{self.config.block_size})", "max_tokens")
        for token in params.stop_token_ids:
            if token >= self.args.vocab_size:
                raise InvalidRequestError(f"stop_token_ids holds {token}, not a token id", "stop_token_ids")
        for token in params.logit_bias:
            if token >= self.args.vocab_size:
                raise InvalidRequestError(f"logit_bias names token {token}, not a token id", "logit_bias")
        if params.structured is not None:
            self.grammars.compile(params.structured)  # once per distinct grammar; errors name the parameter
        return prompt_ids, max_output

    @property
    def grammars(self) -> Grammars:
        """The engine's grammar compiler (xgrammar is imported on the first structured request)."""
        if self._grammars is None:
            from moeray.engine.grammar import Grammars

            self._grammars = Grammars(self.tokenizer, self.args.vocab_size, self.config.grammar_compile_timeout_s)
        return self._grammars

    def _track(self, seq: Sequence, index: int) -> None:
        """A new sequence's random generator and grammar state."""
        self._generators[seq.seq_id] = _sequence_generator(seq.params.seed, index)
        if seq.params.structured is not None:
            self._grammar_states[seq.seq_id] = self.grammars.matcher(seq.params.structured)

    def _untrack(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)
        self._grammar_states.pop(seq.seq_id, None)
        if self.speculator is not None:
            self.speculator.forget(seq)

    def add_adapter(self, name: str, model: DeepseekForCausalLM) -> None:
        """Serve `model` (a LoRA variant of the base model, `merged_variant`) as adapter `name`
        from the next step on. A name is a cache namespace too: give a changed adapter a new name."""
        if name in self.adapters:
            raise ValueError(f"the engine already has an adapter named {name!r}")
        self.adapters[name] = self.runner.models[name] = model

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name`; refused while a request uses it."""
        busy = [rid for rid, request in self.requests.items()
                if any(seq.adapter == name for seq in request.seqs.values())]
        if busy:
            raise ValueError(f"adapter {name!r} still serves {len(busy)} request(s)")
        self.adapters.pop(name, None)
        self.runner.models.pop(name, None)

    def check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise InvalidRequestError(f"no adapter named {adapter!r}; this engine has "
                                      f"{sorted(self.adapters) or 'none'}", "model")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter: str | None = None) -> None:
        """Queue a request; `adapter` names one of the engine's LoRA adapters (None: the base model)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        self.check_adapter(adapter)
        prompt_ids, max_output = self.validate(prompt, params)
        outputs = [SequenceOutput.create(i, params, self.tokenizer, prompt_ids, max_output) for i in range(params.n)]
        request = _Request(request_id, prompt_ids, params, outputs)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = self.score_prompt(prompt_ids, params.prompt_logprobs, adapter)
        seq = Sequence(request_id, 0, list(prompt_ids), len(prompt_ids), params, next(self._arrivals),
                       fork_pending=params.n - 1, adapter=adapter)
        request.seqs[0] = seq
        self._track(seq, 0)
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in self.scheduler.abort(request_id):
            self._untrack(seq)
        return True

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        grammars = self._grammars
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.block_manager.usage(),
                           self._prompt_tokens_total, self._generation_tokens_total,
                           self.scheduler.num_preemptions,
                           None if self.speculator is None else self.speculator.stats.snapshot(),
                           self._cached_prompt_tokens_total,
                           grammars.compiles_total if grammars else 0, grammars.compile_seconds_total if grammars else 0.0)

    def routed_token_counts(self) -> dict[int, list[int]]:
        """MoE layer index -> tokens routed to each of its experts since start."""
        counts = {}
        for layer in self.model.model.layers:
            routed = getattr(layer.mlp, "routed_tokens", None)
            if routed is not None:
                counts[layer.mlp.layer_idx] = routed.tolist()
        return counts

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        drafting = self.speculator is not None and self.speculator.plan(plan.chunks)
        mtp = drafting and self.speculator.uses_mtp
        # Block tables as the step ran: a sequence that finishes below gives its blocks back (the
        # block manager gives it a new, empty list), but its MTP cache entries are still written
        # through these, since cached prefixes keep them.
        tables = [chunk.seq.block_table for chunk in plan.chunks] if mtp else None
        result = self.runner.execute(plan.chunks, self._pending_copies, want_hidden=mtp)
        self._pending_copies = []
        self.scheduler.complete(plan.chunks)
        for chunk in plan.chunks:
            if chunk.start < chunk.seq.num_prompt_tokens:
                self._prompt_tokens_total += min(chunk.num_tokens, chunk.seq.num_prompt_tokens - chunk.start)
            if chunk.seq.index == 0 and chunk.start == chunk.seq.num_cached_tokens:  # first chunk of the prompt
                request = self.requests[chunk.seq.request_id]
                request.num_cached_tokens = chunk.seq.num_cached_tokens
                if request.queue_time_s is None:
                    request.queue_time_s = started - request.arrived_at
                    self._cached_prompt_tokens_total += chunk.seq.num_cached_tokens

        touched: dict[str, _Request] = {}
        emitted = self._sample(plan.chunks, result.logits, touched)
        for chunk in plan.chunks:
            if chunk.draft:
                request = self.requests[chunk.seq.request_id]
                request.num_draft_tokens += len(chunk.draft)
                request.num_accepted_tokens += self.speculator.record(chunk.seq, chunk.draft, emitted[id(chunk)])
                if not chunk.seq.is_finished:  # the verified drafts' latents stay
                    self.scheduler.accept(chunk.seq, emitted[id(chunk)] - 1)
        if self.speculator is not None:
            self.speculator.timed(emitted, time.perf_counter() - started)
            self.speculator.propose(plan.chunks, emitted, result.hidden, tables, self._draft_room)
        return [self._collect(request) for request in touched.values()]

    def _sample(self, chunks: list[ScheduledChunk], logits: torch.Tensor, touched: dict[str, _Request]
                ) -> dict[int, int]:
        """Sample every chunk that reaches its sequence's end; a verification position by position,
        each as its own decode step would, while the sampled token equals the draft (see
        `moeray.engine.speculative`). Returns tokens emitted per chunk (by id)."""
        emitted: dict[int, int] = {}
        pending: list[tuple[ScheduledChunk, Sequence, int]] = []  # (chunk, sequence, its first logits row)
        row = 0
        for chunk in chunks:
            if chunk.samples:
                pending += [(chunk, seq, row) for seq in self._sequences_to_sample(chunk)]
                row += 1 + len(chunk.draft)
        # Plain greedy rows (no penalty, bias, grammar or logprobs) are the argmax of their raw
        # logits: one argmax for every position of every verification, no sampler call per position.
        best = logits.argmax(dim=-1).tolist() if all(self._plain_greedy(seq) for _, seq, _ in pending) else None
        position = 0  # of the verification: 0 is the sequence's own last token
        while pending:
            if best is not None:
                tokens, logprobs_list = [best[first + position] for _, _, first in pending], [None] * len(pending)
            else:
                rows = [SamplingRow(seq.params, self.requests[seq.request_id].prompt_token_ids, seq.output_token_ids,
                                    self._generators[seq.seq_id], self._grammar_states.get(seq.seq_id))
                        for _, seq, _ in pending]
                sampled = self.sampler(logits[[first + position for _, _, first in pending]], rows)
                tokens, logprobs_list = sampled.token_ids, sampled.logprobs
            still = []
            for (chunk, seq, first), token, logprobs in zip(pending, tokens, logprobs_list):
                finished = self._emit(seq, token, logprobs, touched)
                if seq is chunk.seq:
                    emitted[id(chunk)] = position + 1
                if not finished and seq is chunk.seq and position < len(chunk.draft) and token == chunk.draft[position]:
                    still.append((chunk, seq, first))
            pending, position = still, position + 1
        return emitted

    def _plain_greedy(self, seq: Sequence) -> bool:
        params = seq.params
        return (params.greedy and params.logprobs is None and not params.logit_bias and params.repetition_penalty == 1.0
                and params.frequency_penalty == 0.0 and params.presence_penalty == 0.0
                and seq.seq_id not in self._grammar_states)

    def _emit(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None, touched: dict[str, _Request]) -> bool:
        """Append a sampled token to its sequence and output; True when that finished it."""
        request = self.requests[seq.request_id]
        touched[request.request_id] = request
        seq.token_ids.append(token)
        self._generation_tokens_total += 1
        output = request.outputs[seq.index]
        reason = output.add_token(token, logprobs)
        grammar = self._grammar_states.get(seq.seq_id)
        if grammar is not None:
            grammar.advance(token, "" if grammar.active else self.tokenizer.decode([token], skip_special_tokens=False))
            if reason is None and grammar.terminated:  # the grammar's end (EOS is then its only way on)
                reason = output.finish("stop")
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._untrack(seq)
        return reason is not None

    def _draft_room(self, seq: Sequence) -> int:
        """Most drafts worth verifying next step: within max_tokens and the context length."""
        output = self.requests[seq.request_id].outputs[seq.index]
        return min(output.max_output_tokens - output.num_output_tokens - 1, self.config.max_model_len - seq.num_tokens)

    def _sequences_to_sample(self, chunk: ScheduledChunk) -> list[Sequence]:
        """The sequence itself, plus its n-1 siblings when its prompt has just been computed."""
        parent = chunk.seq
        if not parent.fork_pending:
            return [parent]
        request = self.requests[parent.request_id]
        siblings = []
        for index in range(1, parent.fork_pending + 1):
            child = Sequence(parent.request_id, index, list(parent.token_ids), parent.num_prompt_tokens,
                             parent.params, parent.arrival, adapter=parent.adapter)
            self._track(child, index)  # its own grammar state: siblings diverge from the first token
            request.seqs[index] = child
            siblings.append(child)
        parent.fork_pending = 0
        for child in siblings:
            # Share the prompt's blocks; with no block free for the partial tail, recompute it
            # later instead (the prefix cache still shares the full blocks).
            if self.block_manager.num_free_blocks > 0:
                copy = self.block_manager.fork(parent, child)
                if copy is not None:
                    self._pending_copies.append(copy)
                self.scheduler.add_running(child)
            else:
                self.scheduler.add(child)
        return [parent, *siblings]

    def _collect(self, request: _Request) -> RequestOutput:
        deltas = [o.take_delta() for o in request.outputs]
        deltas = [d for d in deltas if d.token_ids or d.text or d.finish_reason]
        finished = request.finished
        if finished:
            del self.requests[request.request_id]
        prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
        return RequestOutput(request.request_id, deltas, finished, len(request.prompt_token_ids),
                             request.num_cached_tokens, prompt_logprobs, request.num_draft_tokens,
                             request.num_accepted_tokens, request.queue_time_s)

    @torch.inference_mode()
    def score_prompt(self, prompt_ids: list[int], top: int, adapter: str | None = None) -> list[TokenLogprobs | None]:
        """Log-probabilities of each prompt token given the ones before it (raw logits, as sampled
        logprobs are), and the `top` most likely alternatives: one uncached forward over the prompt
        through the engine's experts, outside the paged cache, so that nothing a cached prefix or
        a preemption does can change them."""
        if len(prompt_ids) < 2:
            return [None] * len(prompt_ids)
        device = self.config.device
        ids = torch.tensor(prompt_ids, device=device)
        positions = torch.arange(len(prompt_ids), device=device)
        model = self.runner.models[adapter]
        with using(self.config.kernels):
            hidden = model.forward_tokens(ids, positions, VarlenCausalAttention([len(prompt_ids)]), self.runner.experts)
        logprobs = torch.log_softmax(model.logits(hidden[:-1]).float(), dim=-1)  # [S-1, V]
        chosen = logprobs.gather(1, ids[1:, None]).squeeze(1).tolist()
        entries: list[TokenLogprobs | None] = [None]
        if top:
            values, indices = logprobs.topk(min(top, logprobs.shape[1]), dim=-1)
            for i, value in enumerate(chosen):
                entries.append(TokenLogprobs(prompt_ids[i + 1], value,
                                             list(zip(indices[i].tolist(), values[i].tolist()))))
        else:
            entries += [TokenLogprobs(token, value, []) for token, value in zip(prompt_ids[1:], chosen)]
        return entries
