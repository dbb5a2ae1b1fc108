"""The DeepSeek-V2/V3 model in plain PyTorch. Imports no ray.

`load(path, dtype, device)` builds the model from a Hugging Face checkpoint folder or an s3://
URI (tensors are fetched one at a time by byte range, never as a local copy); `build`
creates a randomly initialised one from `ModelArgs` (tests, pre-training).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moeray.model.checkpoint import (CheckpointError, CheckpointReader, is_routed_expert, load_weights,
                                     read_model_args, save_checkpoint)
from moeray.model.config import ConfigError, ModelArgs
from moeray.model.moe import TopkGate
from moeray.model.transformer import DeepseekForCausalLM

__all__ = ["ModelArgs", "ConfigError", "CheckpointError", "DeepseekForCausalLM", "load", "build",
           "save_checkpoint"]


def _cast(model: DeepseekForCausalLM, dtype: torch.dtype) -> DeepseekForCausalLM:
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, TopkGate):
            module.float()  # routing stays float32 whatever the model dtype
    return model


def build(args: ModelArgs, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          seed: int | None = 0) -> DeepseekForCausalLM:
    """A randomly initialised model (std 0.02), reproducible for a given seed."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(args)
    model = _cast(model, dtype).to_empty(device=device)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    model.init_weights(generator=generator)
    return model.eval()


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         progress: bool | None = None, local_experts: bool = True) -> DeepseekForCausalLM:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint (folder or s3:// URI); weights stream in one
    at a time.

    With `local_experts=False` the routed experts are left out (they live in expert shards) and
    are not read at all.
    """
    args = read_model_args(path)
    with torch.device("meta"):
        model = DeepseekForCausalLM(args, local_experts)
    model = _cast(model, dtype).to_empty(device=device)
    load_weights(model, CheckpointReader(path, args.fp8_block_size), args.num_hidden_layers, progress,
                 skip=None if local_experts else is_routed_expert)
    return model.eval()
