"""The DeepSeek-V2/V3 model in plain PyTorch. Imports no ray.

`load(path, dtype, device, fp8=...)` builds the model from a Hugging Face checkpoint folder or an
s3:// URI (tensors are fetched one at a time by byte range, never as a local copy); `build`
creates a randomly initialised one from `ModelArgs` (tests, pre-training).

FP8 checkpoints (DeepSeek-V3 ships float8 e4m3 weights with 128x128 `weight_scale_inv` block
scales), by `fp8`:
- "keep": every Linear whose checkpoint weight is FP8 becomes an `Fp8Linear` holding the FP8
  weight and its scales, and FP8 routed experts stay FP8 (`RoutedExperts.keep_fp8`); no
  full-precision copy of those weights is ever made. The GEMMs dequantise inside the Triton
  kernels on CUDA; elsewhere the torch reference dequantises per call (correct, slow).
- "dequantize": every weight is dequantised once at load into `dtype` (fast on CPU, 2-4x the
  memory of the checkpoint).
- "auto" (the default): "keep" on CUDA, "dequantize" elsewhere.
Always dequantised: `kv_b_proj` (see `_keep_fp8`) and non-FP8 tensors (embeddings, norms, router,
lm_head are bf16 in V3).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moeray.kernels.fp8 import Fp8Linear
from moeray.model.checkpoint import (CheckpointError, CheckpointReader, hf_name, is_routed_expert, load_weights,
                                     mtp_layers_in, read_model_args, save_checkpoint)
from moeray.model.config import ConfigError, ModelArgs
from moeray.model.layers import Linear
from moeray.model.moe import RoutedExperts, TopkGate
from moeray.model.transformer import DeepseekForCausalLM

__all__ = ["ModelArgs", "ConfigError", "CheckpointError", "DeepseekForCausalLM", "load", "build",
           "save_checkpoint", "mtp_depth_of", "FP8_MODES"]

FP8_MODES = ("auto", "keep", "dequantize")


def _cast(model: DeepseekForCausalLM, dtype: torch.dtype) -> DeepseekForCausalLM:
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, TopkGate):
            module.float()  # routing stays float32 whatever the model dtype
    return model


def build(args: ModelArgs, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          seed: int | None = 0, mtp_depth: int = 0) -> DeepseekForCausalLM:
    """A randomly initialised model (std 0.02), reproducible for a given seed, with `mtp_depth`
    multi-token-prediction layers."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(args, mtp_depth=mtp_depth)
    model = _cast(model, dtype).to_empty(device=device)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    model.init_weights(generator=generator)
    return model.eval()


def _keep_fp8(model: DeepseekForCausalLM, reader: CheckpointReader, dtype: torch.dtype) -> None:
    """On a meta model: turn the layers whose checkpoint weights are FP8 into FP8 layers.

    `kv_b_proj` stays a full-precision Linear: the absorbed MLA decode path reads its weight
    matrix directly (`MultiHeadLatentAttention._kv_b_weights`) to fold it into the query and the
    output, and it is small (kv_lora_rank x heads * (dn + dv): 16M numbers per V3 layer).
    """
    layers = model.args.num_hidden_layers
    for name, module in list(model.named_modules()):
        if (isinstance(module, Linear) and not name.endswith("kv_b_proj")
                and reader.is_fp8(hf_name(f"{name}.weight", layers))):
            fp8 = Fp8Linear(module.in_features, module.out_features, reader.block_size,
                            bias=module.bias is not None, device="meta")
            if fp8.bias is not None:
                fp8.bias = torch.nn.Parameter(fp8.bias.to(dtype))
            model.set_submodule(name, fp8)
        elif isinstance(module, RoutedExperts) and reader.is_fp8(hf_name(f"{name}.0.gate_proj.weight", layers)):
            module.keep_fp8(reader.block_size)


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         progress: bool | None = None, local_experts: bool = True, fp8: str = "auto",
         mtp_depth: int = 0) -> DeepseekForCausalLM:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint (folder or s3:// URI); weights stream in one
    at a time.

    With `local_experts=False` the routed experts are left out (they live in expert shards) and
    are not read at all. `fp8` ("auto", "keep" or "dequantize") says whether FP8 weights stay FP8;
    see the module docstring. `mtp_depth` MTP layers are loaded too (the rest of the checkpoint's
    are skipped and reported); `mtp_depth_of(path)` says how many it holds.
    """
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}, got {fp8!r}")
    keep = fp8 == "keep" or (fp8 == "auto" and torch.device(device).type == "cuda")
    args = read_model_args(path)
    reader = CheckpointReader(path, args.fp8_block_size)
    present = mtp_layers_in(reader, args.num_hidden_layers)
    if mtp_depth > present:
        raise CheckpointError(f"checkpoint {path} holds {present} multi-token-prediction layers (tensors at "
                              f"model.layers.{args.num_hidden_layers}.* and on); {mtp_depth} were asked for")
    # Built on meta, so an FP8 layer never has a full-precision weight allocated, even briefly.
    with torch.device("meta"):
        model = DeepseekForCausalLM(args, local_experts, mtp_depth)
    model = _cast(model, dtype)
    if keep:
        _keep_fp8(model, reader, dtype)  # after the cast, which would convert float8 parameters too
    model = model.to_empty(device=device)
    load_weights(model, reader, args.num_hidden_layers, progress,
                 skip=None if local_experts else _is_shard_expert)
    return model.eval()


def _is_shard_expert(name: str) -> bool:
    """A routed expert that expert shards hold: the main stack's (MTP layers keep theirs local)."""
    return is_routed_expert(name) and not name.startswith("model.mtp_layers.")


def mtp_depth_of(path: str | Path) -> int:
    """How many MTP layers a checkpoint holds tensors of (its index only; no weights are read).
    config.json's `num_nextn_predict_layers` is not enough: transformers writes 1 for every V3
    config and saves no MTP tensors."""
    args = read_model_args(path)
    return mtp_layers_in(CheckpointReader(path, args.fp8_block_size), args.num_hidden_layers)
