"""Rollouts for RL training: moeray's serving engine, colocated with a Ray Train worker.

Layout (why): each training worker owns one `RolloutEngine`, an `Engine` over its own copy of
the policy in the same process. After every optimiser step `sync(policy)` copies the weights
that can have changed (the trainable ones, with LoRA adapters merged in: W + alpha/r * B @ A;
the routers' correction biases) into the engine's tensors in place, a memory copy with no
serialisation, no object store and no collective. The engine's native decoder reads packed copies of
the weights, so `sync` re-packs them (`Engine.refresh_weights`), also a plain copy. A pool of rollout actors fed through
the object store would free the trainers' memory for a large model, at the price of shipping
the weights every step; at the sizes this runs on (CPU workers, small models) the colocated
copy is faster and simpler.

Contract:
- `RolloutEngine(policy, tokenizer, max_model_len, max_num_seqs, seed)` builds the engine from
  the policy as it is (LoRA wrappers included). Prefix caching is off: cached blocks would
  hold latents computed by earlier weights. A prompt's G completions are one request with
  `n = G`, so they share its prefill.
- `sync(policy)` copies the policy's current weights in and returns the seconds it took; afterwards the engine's log-probabilities of any
  tokens equal the policy's (up to float rounding).
- `generate(prompt_ids, params)` (one `SamplingParams` per prompt) returns the engine's `GenerationResult`s, in prompt order.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

from moeray.engine.config import EngineConfig
from moeray.engine.engine import Engine
from moeray.engine.llm import Completion, GenerationResult
from moeray.engine.params import SamplingParams
from moeray.model.lora import LoraLinear, merge_lora
from moeray.model.tokenizer import Tokenizer


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: FSDP2 parameters are DTensors holding a shard."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _sources(policy: torch.nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """Engine tensor name -> the policy value it must hold, for every tensor that training can
    change: merged LoRA targets, trainable parameters, and the routers' correction biases."""
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    for name, module in policy.named_modules():
        if isinstance(module, LoraLinear):
            def merged(module=module) -> torch.Tensor:
                delta = _full(module.lora_B.weight) @ _full(module.lora_A.weight)  # [out, r] @ [r, in]
                return _full(module.base_layer.weight) + module.scaling * delta
            sources[f"{name}.weight"] = merged
    for name, param in policy.named_parameters():
        if param.requires_grad and ".lora_" not in name:
            sources[name.replace(".base_layer.", ".")] = lambda param=param: _full(param)
    for name, buffer in policy.named_buffers():
        if name.endswith("e_score_correction_bias"):
            sources[name] = lambda buffer=buffer: buffer
    return sources


class RolloutEngine:
    def __init__(self, policy: torch.nn.Module, tokenizer: Tokenizer, max_model_len: int, max_num_seqs: int = 64,
                 seed: int = 0):
        model = copy.deepcopy(policy)
        merge_lora(model)
        model.eval().requires_grad_(False)
        config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max(2048, max_model_len), enable_prefix_caching=False,
                              seed=seed, device=str(next(policy.parameters()).device))
        self.engine = Engine(model, tokenizer, config)
        self._targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self._requests = 0

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> float:
        """Copy the policy's current weights in. The policy's tensors are looked up on every call:
        FSDP replaces them after the engine is built. Under FSDP this is a collective (every
        worker gathers each sharded parameter), so every worker must call it."""
        started = time.perf_counter()
        sources = _sources(policy)
        missing = set(sources) - set(self._targets)
        if missing:
            raise ValueError(f"the rollout engine's model has no tensors {sorted(missing)[:3]}: the policy's "
                             "structure differs from the model it was copied from")
        for name, source in sources.items():
            self._targets[name].copy_(source())
        self.engine.refresh_weights()
        return time.perf_counter() - started

    def generate(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        """All prompts in flight at once (one engine, continuous batching), each with its params."""
        results: dict[str, GenerationResult] = {}
        for ids, request_params in zip(prompt_ids, params, strict=True):
            request_id = f"rollout-{self._requests}"
            self._requests += 1
            self.engine.add_request(request_id, ids, request_params)
            results[request_id] = GenerationResult(request_id, list(ids),
                                                   [Completion(i) for i in range(request_params.n)])
        pending = set(results)
        while pending:
            for delta in self.engine.step():
                results[delta.request_id].add(delta)
                if delta.finished:
                    pending.discard(delta.request_id)
        return list(results.values())
