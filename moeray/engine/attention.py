"""Paged MLA attention for one engine step.

Contract: `StepAttention` implements the model's `AttentionBackend` for the flat tokens of a
step (decode tokens first, then prefill chunks, as the runner lays them out). For each layer it
1. writes every token's latent + rope key into its cache slot (`slot_mapping`);
2. decode tokens (one query each): the absorbed form, batched over sequences, reading each
   sequence's cached latents through its block table (padded to the longest, masked); on CUDA
   (`kernels.use_triton`) the Triton paged kernel reads the cache in place instead of gathering,
   and on CPU a few sequences take one C call (`kernels.cpu_latent_decode`);
3. prefill chunks: the expanded form; a chunk that starts at position 0 attends causally to
   itself, a later chunk (or one after a prefix-cache hit) gathers its cached prefix first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeray import kernels
from moeray.engine.cache import LatentCache
from moeray.model.mla import MultiHeadLatentAttention


@dataclass
class PrefillSpan:
    rows: slice  # rows of the step's flat tokens
    start: int  # position of the chunk's first token
    context_slots: torch.Tensor | None  # [start + n] slots of every key it sees; None when start == 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of every token in the step
    num_decodes: int  # the first rows are decode tokens
    decode_slots: torch.Tensor | None  # [B, S_max] slots of each decode's keys (padding: slot 0)
    decode_mask: torch.Tensor | None  # [B, 1, S_max] True where the key is real
    prefills: list[PrefillSpan]
    decode_lengths: torch.Tensor | None = field(init=False)  # [B] keys per decode, once per step

    def __post_init__(self) -> None:
        # The mask's row sums (no host sync); every layer's decode reads them.
        self.decode_lengths = None if self.decode_mask is None else self.decode_mask[:, 0].sum(dim=-1)


class StepAttention:
    def __init__(self, cache: LatentCache, meta: AttentionMetadata):
        self.cache, self.meta = cache, meta

    def __call__(self, attn: MultiHeadLatentAttention, q_nope: torch.Tensor, q_pe: torch.Tensor,
                 latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        meta, r = self.meta, self.cache.latent_dim
        layer = self.cache.layers[attn.layer_idx]  # [slots, r + dr]
        layer[meta.slot_mapping] = torch.cat((latent, k_pe), dim=-1).to(layer.dtype)

        out = q_nope.new_empty(q_nope.shape[0], attn.num_heads, attn.v_dim)  # [T, H, dv]
        b = meta.num_decodes
        if b and kernels.use_triton(layer.device):
            out[:b] = self._decode_paged(attn, q_nope[:b], q_pe[:b], layer)
        elif b and (fused := kernels.cpu_latent_decode(q_nope[:b], q_pe[:b], attn.kv_b_proj.weight, layer,
                                                       meta.decode_slots, meta.decode_lengths,
                                                       attn.softmax_scale)) is not None:
            out[:b] = fused
        elif b:
            slots = meta.decode_slots
            keys = layer.index_select(0, slots.flatten()).view(*slots.shape, -1).to(q_nope.dtype)  # [B, S_max, r+dr]
            out[:b] = attn.attend_absorbed(q_nope[:b, None], q_pe[:b, None], keys[..., :r], keys[..., r:],
                                           mask=meta.decode_mask)[:, 0]
        for span in meta.prefills:
            q_n, q_p = q_nope[span.rows][None], q_pe[span.rows][None]
            if span.context_slots is None:
                out[span.rows] = attn.attend_expanded(q_n, q_p, latent[span.rows][None], k_pe[span.rows][None],
                                                      causal=True)[0]
                continue
            keys = layer.index_select(0, span.context_slots).to(q_nope.dtype)  # [S, r + dr]
            n = span.rows.stop - span.rows.start
            key_pos = torch.arange(keys.shape[0], device=keys.device)
            query_pos = torch.arange(span.start, span.start + n, device=keys.device)
            mask = (key_pos[None, :] <= query_pos[:, None])[None]  # [1, n, S]
            out[span.rows] = attn.attend_expanded(q_n, q_p, keys[None, :, :r], keys[None, :, r:], mask=mask)[0]
        return out

    def _decode_paged(self, attn: MultiHeadLatentAttention, q_nope: torch.Tensor, q_pe: torch.Tensor,
                      layer: torch.Tensor) -> torch.Tensor:
        """`attend_absorbed` for one query per sequence, attending in the cache where it lies.

        q_nope [B, H, dn], q_pe [B, H, dr] -> [B, H, dv]. The runner lays decode_slots out as
        block_table[p // bs] * bs + p % bs, so every bs-th slot names a block, and
        `decode_lengths` are the mask's row sums: no new metadata and no host sync.
        """
        meta, bs = self.meta, self.cache.block_size
        block_tables = torch.div(meta.decode_slots[:, ::bs], bs, rounding_mode="floor")  # [B, ceil(S_max / bs)]
        w_uk, w_uv = attn._kv_b_weights()  # [H, dn, r], [H, dv, r]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [H, B, r] -> [B, H, r]
        out_latent = kernels.paged_latent_decode(q_latent, q_pe, layer, block_tables, meta.decode_lengths, bs,
                                                 attn.softmax_scale, max_seq_len=meta.decode_slots.shape[1])
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, dv]
