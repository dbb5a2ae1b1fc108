"""Engine options, with defaults that work for a laptop CPU and scale to a GPU.

Contract: `EngineConfig` holds every option an engine replica takes; `resolve(args, device)`
fills in what depends on the model and the machine (context length, cache size) and rejects
combinations that could never serve a request, naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moeray.engine.cache import cache_bytes_per_token, device_memory_bytes
from moeray.engine.speculative import SpeculativeConfig, SpeculativeConfigError
from moeray.kernels.policy import KernelPolicy
from moeray.model import ModelArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfigError(ValueError):
    """An engine option is out of range or contradicts another; `option` names it."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16  # tokens per cache block
    num_cache_blocks: int | None = None  # explicit cache size; overrides cache_memory_fraction
    cache_memory_fraction: float = 0.1  # of the device's memory (free GPU memory, or RAM on CPU)
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 64  # running sequences at most
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0  # for requests without a seed
    # With remote experts: run each step as two micro-batches so one's attention overlaps the other's
    # experts. Pays off when shards have their own devices; on a few shared CPU cores it does not.
    overlap_microbatches: bool = False
    # FP8 checkpoints (DeepSeek-V3): "keep" serves the float8 weights with their block scales
    # (dequantised inside the GEMM), "dequantize" converts them at load; "auto": keep on CUDA.
    fp8: str = "auto"
    # A structured-output grammar that takes longer to compile is refused (HTTP 400).
    grammar_compile_timeout_s: float = 10.0
    kernels: KernelPolicy = KernelPolicy()  # which native kernels may run
    speculative: SpeculativeConfig | None = None  # speculative decoding (MTP or n-gram drafts); None: off

    def __post_init__(self) -> None:
        if isinstance(self.speculative, dict):  # LLM(speculative={...}), settings
            try:
                object.__setattr__(self, "speculative", SpeculativeConfig(**self.speculative))
            except TypeError as err:
                raise EngineConfigError(f"engine option speculative: {err}", "speculative") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def _need(self, ok: bool, option: str, why: str) -> None:
        if not ok:
            raise EngineConfigError(f"engine option {option}: {why}, got {getattr(self, option)!r}", option)

    def check(self, args: ModelArgs) -> int:
        """Reject options that can never serve `args`' model (no device needed); returns the
        context length."""
        need = self._need
        need(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        try:
            torch.device(self.device)
        except RuntimeError:
            need(False, "device", "must be a torch device such as cpu, cuda or cuda:1")
        need(self.block_size >= 1, "block_size", "must be >= 1")
        need(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        need(0 < self.cache_memory_fraction <= 0.95, "cache_memory_fraction", "must be in (0, 0.95]")
        max_len = self.max_model_len or args.max_position_embeddings
        need(2 <= max_len <= args.max_position_embeddings, "max_model_len",
             f"must be between 2 and the model's max_position_embeddings ({args.max_position_embeddings})")
        if self.speculative is not None:
            try:
                self.speculative.check()
            except SpeculativeConfigError as err:
                raise EngineConfigError(f"engine option {err}", err.option) from None
        if not self.enable_chunked_prefill:
            need(self.max_num_batched_tokens >= max_len, "max_num_batched_tokens",
                 f"without chunked prefill it must hold a whole prompt (max_model_len {max_len})")
        return max_len

    def resolve(self, args: ModelArgs) -> "EngineConfig":
        need = self._need
        max_len = self.check(args)
        blocks_per_seq = -(-max_len // self.block_size)
        num_blocks = self.num_cache_blocks
        if num_blocks is None:
            block_bytes = cache_bytes_per_token(args, self.torch_dtype) * self.block_size
            budget = int(device_memory_bytes(torch.device(self.device)) * self.cache_memory_fraction)
            # More than every running sequence at full length can ever use is wasted memory.
            num_blocks = min(budget // block_bytes, self.max_num_seqs * blocks_per_seq + 1)
        need(num_blocks is not None and num_blocks >= 1, "num_cache_blocks", "the cache needs at least one block")
        return replace(self, max_model_len=max_len, num_cache_blocks=num_blocks)
