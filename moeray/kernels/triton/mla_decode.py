"""MLA decode attention in latent space, read straight from the paged latent cache.

Contract: `paged_latent_decode(q_latent, q_rope, cache, block_tables, seq_lens, block_size,
softmax_scale)` returns out_latent [B, H, r] in q_latent's dtype, where for sequence b and head h
    score_s = softmax_scale * (q_latent[b, h] . latent_s + q_rope[b, h] . rope_s)
    out_latent[b, h] = sum_s softmax(score)_s * latent_s      over its seq_lens[b] keys.
cache [slots, r + dr] is one layer of `moeray.engine.cache.LatentCache` (a row per token slot:
latent then rope key); key position p of sequence b lives in slot
block_tables[b, p // block_size] * block_size + p % block_size. q_latent [B, H, r] is the query
already folded through W_uk (the absorbed form); the caller applies W_uv to the result. This is
the middle of `MultiHeadLatentAttention.attend_absorbed`, its torch reference.

Why this shape of kernel: every head of a sequence reads the same keys (one latent per token,
no per-head keys), so one program takes BLOCK_H heads and reads each cache tile once for all of
them. A long context is split into `num_splits` ranges handled by separate programs (split-K,
"flash decoding"), so a small batch still fills the GPU; each writes its partial output, already
normalised, and its log-sum-exp, and `_combine_splits_kernel` merges them. Softmax runs in base 2
(exp2 is the native instruction), the scale folded with log2(e).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.triton import dot_dtype, dot_precision

LOG2E = 1.4426950408889634


@triton.jit
def _split_attention_kernel(
        q_latent_ptr, stride_qlb, stride_qlh, q_rope_ptr, stride_qrb, stride_qrh,
        cache_ptr, stride_cs,  # cache [slots, r + dr]
        block_tables_ptr, stride_btb, seq_lens_ptr,
        partial_out_ptr, stride_pob, stride_poh, stride_pos,  # [B, H, splits, r] float32
        partial_lse_ptr, stride_plb, stride_plh,  # [B, H, splits] float32, base 2
        num_heads, latent_dim, rope_dim, tokens_per_split, scale_log2,
        PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)  # B * H * splits * r may pass 2^31
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    head_ok = heads < num_heads
    lat_cols = tl.arange(0, BLOCK_R)
    lat_ok = lat_cols < latent_dim
    rope_cols = tl.arange(0, BLOCK_DR)
    rope_ok = rope_cols < rope_dim
    q_lat = tl.load(q_latent_ptr + seq * stride_qlb + heads[:, None] * stride_qlh + lat_cols[None, :],
                    mask=head_ok[:, None] & lat_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BH, BR]
    q_rope = tl.load(q_rope_ptr + seq * stride_qrb + heads[:, None] * stride_qrh + rope_cols[None, :],
                     mask=head_ok[:, None] & rope_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BH, BDR]

    running_max = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        block_id = tl.load(block_tables_ptr + seq * stride_btb + pos // PAGE, mask=pos_ok, other=0)
        slot = block_id.to(tl.int64) * PAGE + pos % PAGE
        row = cache_ptr + slot[:, None] * stride_cs
        latent = tl.load(row + lat_cols[None, :], mask=pos_ok[:, None] & lat_ok[None, :],
                         other=0.0).to(DOT_DTYPE)  # [BN, BR]
        rope = tl.load(row + latent_dim + rope_cols[None, :], mask=pos_ok[:, None] & rope_ok[None, :],
                       other=0.0).to(DOT_DTYPE)  # [BN, BDR]
        scores = tl.dot(q_lat, tl.trans(latent), input_precision=PRECISION)
        scores += tl.dot(q_rope, tl.trans(rope), input_precision=PRECISION)  # [BH, BN]
        scores = tl.where(pos_ok[None, :], scores * scale_log2, float("-inf"))
        # Online softmax: every tile holds a real key (n0 < end), so new_max is finite.
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(DOT_DTYPE), latent, input_precision=PRECISION)
        running_max = new_max

    # A split past the end of a short sequence saw no key: weight zero in the combine.
    seen = running_sum > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, running_sum, 1.0)[:, None], 0.0)
    lse = tl.where(seen, running_max + tl.log2(tl.where(seen, running_sum, 1.0)), float("-inf"))
    tl.store(partial_out_ptr + seq * stride_pob + heads[:, None] * stride_poh + split * stride_pos
             + lat_cols[None, :], out, mask=head_ok[:, None] & lat_ok[None, :])
    tl.store(partial_lse_ptr + seq * stride_plb + heads * stride_plh + split, lse, mask=head_ok)


@triton.jit
def _combine_splits_kernel(
        partial_out_ptr, stride_pob, stride_poh, stride_pos, partial_lse_ptr, stride_plb, stride_plh,
        out_ptr, stride_ob, stride_oh, num_splits, latent_dim,
        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    seq, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    lse = tl.load(partial_lse_ptr + seq * stride_plb + head * stride_plh + splits,
                  mask=splits < num_splits, other=float("-inf"))  # [BS]
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # no key at all: output zeros, not NaN
    weights = tl.exp2(lse - top)  # exp2(-inf) = 0 for empty splits
    total = tl.sum(weights, axis=0)
    cols = tl.arange(0, BLOCK_R)
    col_ok = cols < latent_dim
    partial = tl.load(partial_out_ptr + seq * stride_pob + head * stride_poh + splits[:, None] * stride_pos
                      + cols[None, :], mask=(splits[:, None] < num_splits) & col_ok[None, :], other=0.0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def choose_num_splits(batch: int, head_blocks: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits for about two programs per multiprocessor, never a split under one tile."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: a few splits, so the combine is exercised
    wanted = triton.cdiv(target, batch * head_blocks)
    return max(1, min(wanted, triton.cdiv(max_seq_len, block_n), 64))


def paged_latent_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                        softmax_scale: float, max_seq_len: int | None = None, num_splits: int | None = None,
                        block_h: int = 16, block_n: int = 32) -> torch.Tensor:
    """See the module docstring. max_seq_len bounds seq_lens (block_tables' capacity when None);
    it sizes the splits on the host, so no length is read back from the device."""
    batch, num_heads, latent_dim = q_latent.shape
    rope_dim = q_rope.shape[-1]
    if cache.shape[1] != latent_dim + rope_dim or cache.stride(1) != 1:
        raise ValueError(f"cache rows must be contiguous latent + rope ({latent_dim} + {rope_dim}), "
                         f"got shape {tuple(cache.shape)} strides {cache.stride()}")
    q_latent = q_latent.contiguous() if q_latent.stride(-1) != 1 else q_latent
    q_rope = q_rope.contiguous() if q_rope.stride(-1) != 1 else q_rope
    block_tables = block_tables.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32).contiguous()
    max_seq_len = max_seq_len or block_tables.shape[1] * block_size
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = choose_num_splits(batch, head_blocks, max_seq_len, block_n, q_latent.device)
    # Whole tiles per split; recount, since rounding up may leave fewer splits needed.
    tokens_per_split = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_seq_len, tokens_per_split)

    block_r = triton.next_power_of_2(latent_dim)
    partial_out = torch.empty(batch, num_heads, num_splits, latent_dim, dtype=torch.float32,
                              device=q_latent.device)  # [B, H, splits, r]
    partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q_latent.device)
    _split_attention_kernel[(batch, head_blocks, num_splits)](
        q_latent, q_latent.stride(0), q_latent.stride(1), q_rope, q_rope.stride(0), q_rope.stride(1),
        cache, cache.stride(0), block_tables, block_tables.stride(0), seq_lens,
        partial_out, *partial_out.stride()[:3], partial_lse, *partial_lse.stride()[:2],
        num_heads, latent_dim, rope_dim, tokens_per_split, softmax_scale * LOG2E,
        PAGE=block_size, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=block_r,
        BLOCK_DR=max(16, triton.next_power_of_2(rope_dim)),  # tl.dot needs K >= 16
        DOT_DTYPE=dot_dtype(cache.dtype), PRECISION=dot_precision(cache.dtype))

    out = torch.empty(batch, num_heads, latent_dim, dtype=q_latent.dtype, device=q_latent.device)
    _combine_splits_kernel[(batch, num_heads)](
        partial_out, *partial_out.stride()[:3], partial_lse, *partial_lse.stride()[:2],
        out, out.stride(0), out.stride(1), num_splits, latent_dim,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_R=block_r)
    return out
