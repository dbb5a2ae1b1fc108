"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

Contract:
- `MultiHeadLatentAttention.forward(x [T, D], rope, attention)` projects T flat tokens into
  queries and the compact per-token cache entry (normalised latent [T, r] + roped key [T, dr]),
  hands them to an `AttentionBackend`, and projects the per-head result back to [T, D].
- The backend decides which keys each query sees (a causal batch, a paged cache...). It uses one
  of two mathematically equal computations this module provides:
  * `attend_expanded`: decompress keys and values per head from the latent (cheap for prefill,
    where queries ~ keys);
  * `attend_absorbed`: fold `kv_b_proj` into the query and output side and attend in latent
    space, so the cache is read once per step regardless of head count (the decode path).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moeray import kernels
from moeray.model.config import ModelArgs
from moeray.model.layers import Linear, RMSNorm
from moeray.model.rope import apply_rotary


class AttentionBackend(Protocol):
    """Computes attention outputs [T, H, dv] for T flat tokens of one layer."""

    def __call__(self, attn: "MultiHeadLatentAttention", q_nope: torch.Tensor, q_pe: torch.Tensor,
                 latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor: ...


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = args.num_attention_heads
        self.nope_dim, self.rope_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = args.v_head_dim, args.kv_lora_rank
        self.rope_interleave = args.rope_interleave
        self.q_lora_rank = args.q_lora_rank
        self.softmax_scale = args.softmax_scale
        d, h, bias = args.hidden_size, args.num_attention_heads, args.attention_bias

        if args.q_lora_rank is None:
            self.q_proj = Linear(d, h * args.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(d, args.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = Linear(args.q_lora_rank, h * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, args.kv_lora_rank + args.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = Linear(args.kv_lora_rank, h * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = Linear(h * args.v_head_dim, d, bias=bias)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x [T, D] -> q_nope [T, H, dn], q_pe [T, H, dr], latent [T, r], k_pe [T, dr]."""
        cos, sin = rope
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin, self.rope_interleave)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rotary(k_pe, cos, sin, self.rope_interleave)
        return q_nope, q_pe, latent, k_pe

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attention: AttentionBackend) -> torch.Tensor:
        out = attention(self, *self.project(x, rope))  # [T, H, dv]
        return self.o_proj(out.flatten(1))

    # ---- the two attention computations ----------------------------------------------------
    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk [H, dn, r] (latent -> key) and W_uv [H, dv, r]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    def expand_qkv(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                   pad_values: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k [..., H, dn + dr] and v [..., H, dv] from any leading dims; with
        `pad_values`, v is zero-padded to q's width: SDPA's fused (flash) kernel wants values as
        wide as queries and keys, and is much faster than the unfused fallback (callers drop
        the padded output columns again)."""
        kv = self.kv_b_proj(latent).view(*latent.shape[:-1], self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[..., None, :].expand(*k_nope.shape[:-1], -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if pad_values and self.v_dim < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - self.v_dim))
        return q, k, v

    def attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                        k_pe: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Batched attention with keys/values decompressed from the latent.

        q_nope [B, T, H, dn], q_pe [B, T, H, dr], latent [B, S, r], k_pe [B, S, dr];
        mask [B, T, S] (True = may attend) or `causal` when T == S. Returns [B, T, H, dv].
        """
        q, k, v = self.expand_qkv(q_nope, q_pe, latent, k_pe, pad_values=mask is None)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, T|S, d]
            attn_mask=None if mask is None else mask[:, None], is_causal=causal and mask is None,
            scale=self.softmax_scale)
        return out.transpose(1, 2)[..., :self.v_dim]

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                        k_pe: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same attention computed in latent space against the compact cache.

        score(t, s) = q_nope_t . (W_uk latent_s) + q_pe_t . k_pe_s = (W_uk^T q_nope_t) . latent_s + ...
        so each query is mapped into the latent once and the per-head keys are never built;
        likewise the output is sum_s p_ts (W_uv latent_s) = W_uv (sum_s p_ts latent_s).
        Shapes as in `attend_expanded`; returns [B, T, H, dv].
        """
        w_uk, w_uv = self._kv_b_weights()
        b, t, h, _ = q_nope.shape
        # Plain batched matmuls rather than einsum: at decode sizes the einsum planning costs more
        # than the arithmetic.
        q_latent = kernels.batched_linear(q_nope.reshape(b * t, h, -1).transpose(0, 1), w_uk.transpose(1, 2))
        # q_latent: [H, B*T, r]
        q_latent = q_latent.view(h, b, t, -1).permute(1, 0, 2, 3).reshape(b, h * t, -1)  # [B, H*T, r]
        q_rope = q_pe.permute(0, 2, 1, 3).reshape(b, h * t, -1)  # [B, H*T, dr]
        scores = torch.baddbmm(torch.bmm(q_rope, k_pe.transpose(1, 2)), q_latent, latent.transpose(1, 2))
        scores = scores.view(b, h, t, -1).float() * self.softmax_scale  # [B, H, T, S]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        out_latent = torch.bmm(probs.view(b, h * t, -1), latent)  # [B, H*T, r]
        out_latent = out_latent.view(b, h, t, -1).permute(1, 0, 2, 3).reshape(h, b * t, -1)  # [H, B*T, r]
        out = kernels.batched_linear(out_latent, w_uv)  # [H, B*T, dv]
        return out.view(h, b, t, -1).permute(1, 2, 0, 3)


class DenseCausalAttention:
    """Backend for a rectangular batch without a cache: each row attends causally to itself.

    Tokens arrive flat ([B*S, ...], row-major); the expanded path is used throughout. With
    `segment_ids` [B, S] (packed training rows) a token only sees earlier tokens of its own
    segment, so packed sequences never attend to each other.
    """

    def __init__(self, batch: int, seq_len: int, segment_ids: torch.Tensor | None = None):
        self.batch, self.seq_len = batch, seq_len
        self.mask = None
        if segment_ids is not None:
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=segment_ids.device).tril()
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, S, S]
            self.mask = same & causal

    def __call__(self, attn: MultiHeadLatentAttention, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
        b, s = self.batch, self.seq_len
        out = attn.attend_expanded(q_nope.view(b, s, *q_nope.shape[1:]), q_pe.view(b, s, *q_pe.shape[1:]),
                                   latent.view(b, s, -1), k_pe.view(b, s, -1), mask=self.mask,
                                   causal=self.mask is None)
        return out.reshape(b * s, *out.shape[2:])


class VarlenCausalAttention:
    """Backend for concatenated sequences without padding (training): tokens arrive flat [N, ...],
    sequence i being the next `lengths[i]` tokens, and each attends causally within itself.

    Keys and values are decompressed for all N tokens at once; then each sequence's queries,
    keys and values (contiguous slices) go through the fused causal kernel on their own, so no
    compute is spent on padding (a padded batch pays for longest**2 per sequence) and every
    per-token op before and after runs on real tokens only.
    """

    def __init__(self, lengths: list[int]):
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one token, got lengths {lengths}")
        self.lengths = list(lengths)

    def __call__(self, attn: MultiHeadLatentAttention, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
        q, k, v = attn.expand_qkv(q_nope, q_pe, latent, k_pe, pad_values=True)  # each [N, H, dq]
        # Per sequence by split (not slicing: each slice's backward would clear a full-size gradient).
        pieces = [t.transpose(0, 1).split(self.lengths, dim=1) for t in (q, k, v)]  # each [H, n_i, dq]
        outs = [F.scaled_dot_product_attention(qi[None], ki[None], vi[None], is_causal=True,
                                               scale=attn.softmax_scale)[0]  # [H, n_i, dq]
                for qi, ki, vi in zip(*pieces)]
        return torch.cat(outs, dim=1).transpose(0, 1)[..., :attn.v_dim]  # [N, H, dv]
