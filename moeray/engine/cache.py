"""The paged MLA latent cache: per layer, one row per token slot holding latent + rope key.

Contract: `LatentCache.layers[l]` is a [num_blocks * block_size, kv_lora_rank + rope_dim] tensor
(layers num_hidden_layers.. for the MTP layers that speculative decoding runs, `mtp_layers`);
token slot `block_id * block_size + offset` of a sequence is where its latent lives. Nothing per
head is cached: that is MLA's point (576 numbers per token and layer for DeepSeek-V3 instead of
128 heads x (192 + 128) for plain multi-head K/V).
"""

from __future__ import annotations

import os

import torch

from moeray.model import ModelArgs


def cache_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes one token occupies across all layers."""
    return args.num_hidden_layers * args.cache_numbers_per_token() * dtype.itemsize


def full_kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """What a per-head K/V cache (keys of qk_head_dim, values of v_head_dim) would take."""
    return args.num_hidden_layers * args.full_kv_numbers_per_token() * dtype.itemsize


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class LatentCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", mtp_layers: int = 0):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.latent_dim = args.kv_lora_rank
        width = args.cache_numbers_per_token()
        # zeros (calloc) so untouched blocks cost no resident memory on CPU.
        self.layers = [torch.zeros(num_blocks * block_size, width, dtype=dtype, device=device)
                       for _ in range(args.num_hidden_layers + mtp_layers)]
        self.bytes_per_token = cache_bytes_per_token(args, dtype) * len(self.layers) // args.num_hidden_layers

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_token * self.num_blocks * self.block_size

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (a forked sequence's partial block)."""
        if not pairs:
            return
        bs = self.block_size
        offsets = torch.arange(bs)
        src = torch.cat([s * bs + offsets for s, _ in pairs])
        dst = torch.cat([d * bs + offsets for _, d in pairs])
        for layer in self.layers:
            layer[dst.to(layer.device)] = layer[src.to(layer.device)]
