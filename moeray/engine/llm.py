"""Offline generation: `LLM(model=path).generate(prompts, SamplingParams(...))`.

Contract: every prompt is validated before any work starts (one invalid prompt raises
`InvalidRequestError` and nothing runs); results come back in prompt order, each with its n
completions (token ids, text, finish reason, logprobs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence as Seq

from moeray.engine.build import build_engine
from moeray.engine.config import EngineConfig
from moeray.engine.engine import RequestOutput
from moeray.engine.params import InvalidRequestError, SamplingParams
from moeray.engine.sampler import TokenLogprobs
from moeray.model.moe import ExpertBackend


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0
    num_draft_tokens: int = 0  # speculative decoding: drafts verified, and of those accepted
    num_accepted_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        self.num_cached_tokens = delta.num_cached_tokens
        self.num_draft_tokens, self.num_accepted_tokens = delta.num_draft_tokens, delta.num_accepted_tokens
        for part in delta.outputs:
            completion = self.outputs[part.index]
            completion.text += part.text
            completion.token_ids += part.token_ids
            if part.logprobs is not None:
                completion.logprobs = (completion.logprobs or []) + part.logprobs
            completion.finish_reason = part.finish_reason or completion.finish_reason


class LLM:
    """Offline engine over a checkpoint folder or s3:// URI. `experts` takes an `ExpertBackend`
    for routed experts that live elsewhere (for Ray actors: `moeray.actors.dispatch.
    start_expert_parallel(model, shards)[1]`); engine options are `EngineConfig`'s fields."""

    def __init__(self, model: str | Path, tokenizer: str | Path | None = None, dtype: str = "float32",
                 device: str = "cpu", experts: ExpertBackend | None = None, **engine_options: Any):
        self.engine = build_engine(model, EngineConfig(dtype=dtype, device=device, **engine_options), experts,
                                   tokenizer)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @staticmethod
    def _as_prompt_list(prompts) -> list[str | list[int]]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # a single prompt given as token ids
        return list(prompts)

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[GenerationResult]:
        prompt_list = self._as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise InvalidRequestError(f"got {len(params_list)} sampling params for {len(prompt_list)} prompts",
                                          "sampling_params")
        for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
            try:
                self.engine.validate(prompt, params)
            except InvalidRequestError as err:
                raise InvalidRequestError(f"prompt {i}: {err}", err.param) from None

        results: dict[str, GenerationResult] = {}
        for prompt, params in zip(prompt_list, params_list):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, params)
            results[request_id] = GenerationResult(request_id, self.engine.requests[request_id].prompt_token_ids,
                                                   [Completion(i) for i in range(params.n)])
        pending = set(results)
        try:
            while pending:
                for delta in self.engine.step():
                    results[delta.request_id].add(delta)
                    if delta.finished:
                        pending.discard(delta.request_id)
        finally:
            for request_id in pending:
                self.engine.abort(request_id)
        return list(results.values())

    def chat(self, messages_list: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[GenerationResult]:
        if messages_list and isinstance(messages_list[0], dict):
            messages_list = [messages_list]
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=add_generation_prompt, tokenize=True)
                   for m in messages_list]
        return self.generate(prompts, sampling_params)
