"""Fused MoE: weighted SwiGLU experts over (token, expert, weight) pairs in two grouped GEMMs.

Contract: `fused_expert_pairs(x, token_of_pair, expert_of_pair, weight_of_pair, gate_up, down)`
returns sum over pairs p of weight_p * expert_p(x[token_p]) as [T, D] in x's dtype, the value of
`moeray.model.moe.expert_pairs_forward` (its torch reference) up to float rounding.
x [T, D]; the pair tensors [P]; gate_up [E, 2I, D]; down [E, D, I] (any strides: the model
stores it column-major per expert). Tokens without pairs get zeros; experts without pairs cost
nothing but a program that exits at once.

The steps:
1. `moe_align` (torch, no host sync): pairs sorted by expert, each expert's run padded up to a
   multiple of BLOCK_M so that every row block of the grouped GEMM belongs to one expert.
2. `_gate_up_silu_kernel`: per row block, x rows gathered by token, times that expert's gate and
   up rows, silu(gate) * up fused before the store: the [P, 2I] gate/up activations never reach
   memory, only h [padded P, I].
3. `_down_weighted_kernel`: h times the expert's down projection, scaled by each pair's routing
   weight, stored per pair [P, D].
4. `_combine_kernel`: per token, the sum of its pairs' rows in float32 (deterministic, unlike an
   atomic scatter-add, so a re-run step gives the same tokens).
Block sizes are reasonable defaults, not tuned on a GPU yet.

FP8 experts (`scales`, a `moeray.kernels.fp8.ExpertScales`): gate_up and down are float8 e4m3 and
both GEMM kernels dequantise in the kernel, as `fp8_gemm` does: BLOCK_K divides the scale block's
column count, so within one K tile every output column has one scale, and the raw FP8 product
of the tile is scaled once ([BM, BN] multiplies, not [BK, BN]). The weights cross memory at one
byte per number and no full-precision copy exists. `scale_block_supported(block)` says whether a
scale block fits (its column count a multiple of 16, tl.dot's minimum K); V3's 128x128 does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.fp8 import ExpertScales
from moeray.kernels.triton import dot_dtype, dot_precision


def moe_align(expert_of_pair: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group pairs by expert in runs padded to multiples of `block_m`, without a host sync.

    Returns padded_pair_ids [max_blocks * block_m] (int32; the pair index, or P where the row is
    padding) and expert_of_block [max_blocks] (int32; -1 past the last used block). max_blocks is
    an upper bound known on the host: every expert that received pairs wastes at most one partial
    block, and at most min(P, E) experts receive pairs.
    """
    num_pairs, device = expert_of_pair.numel(), expert_of_pair.device
    experts = expert_of_pair.to(torch.int64)
    # scatter_add_ rather than bincount: bincount on CUDA reads the max back to the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, experts, torch.ones_like(experts))  # [E]
    blocks_of_expert = (counts + block_m - 1) // block_m  # [E]
    block_end = blocks_of_expert.cumsum(0)  # [E] one past each expert's last block
    block_start = block_end - blocks_of_expert
    max_blocks = triton.cdiv(num_pairs, block_m) + min(num_pairs, num_experts)

    order = experts.argsort(stable=True)  # [P] pair ids grouped by expert
    sorted_experts = experts[order]
    first_pair_of_expert = counts.cumsum(0) - counts  # [E]
    rank_in_expert = torch.arange(num_pairs, device=device) - first_pair_of_expert[sorted_experts]
    padded_row = block_start[sorted_experts] * block_m + rank_in_expert  # [P]
    padded_pair_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    padded_pair_ids[padded_row] = order.to(torch.int32)

    # Block j belongs to the first expert whose runs end after j (empty experts end where the
    # previous one did, so they are skipped); blocks past the last run get E, marked -1.
    block_ids = torch.arange(max_blocks, device=device)
    expert_of_block = torch.searchsorted(block_end, block_ids, right=True)
    expert_of_block = torch.where(expert_of_block < num_experts, expert_of_block, -1).to(torch.int32)
    return padded_pair_ids, expert_of_block


def scale_block_supported(block: tuple[int, int]) -> bool:
    return block[1] % 16 == 0


def _k_tile(block_k: int, scale_k: int | None) -> int:
    """BLOCK_K: without scales as given; with them a power of two that divides the scale block."""
    if scale_k is None:
        return block_k
    tile = min(block_k, scale_k & -scale_k)  # the largest power of two dividing scale_k
    if tile < 16:
        raise ValueError(f"FP8 scale blocks of {scale_k} columns are not supported by the fused MoE "
                         f"(a multiple of 16 is needed)")
    return tile


@triton.jit
def _gate_up_silu_kernel(
        x_ptr, stride_xt, stride_xd,
        w_ptr, stride_we, stride_wn, stride_wk,  # gate_up [E, 2I, D]
        s_ptr, stride_se, stride_sn, stride_sk, up_scale_row,  # FP8 scales [E, 2 * nI, nD] (SCALED)
        h_ptr, stride_hr, stride_hn,  # h [padded rows, I]
        token_of_pair_ptr, padded_pair_ids_ptr, expert_of_block_ptr,
        num_pairs, hidden, intermediate,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SCALED: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(expert_of_block_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(padded_pair_ids_ptr + rows)
    real = pair < num_pairs
    token = tl.load(token_of_pair_ptr + pair, mask=real, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of I
    col_ok = cols < intermediate
    w_expert = w_ptr + expert.to(tl.int64) * stride_we

    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x_tile = tl.load(x_ptr + token[:, None] * stride_xt + ks[None, :] * stride_xd,
                         mask=real[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
        w_mask = k_ok[:, None] & col_ok[None, :]
        # Gate rows are 0..I-1 of gate_up, up rows I..2I-1; both read as [BK, BN] (transposed).
        gate_w = tl.load(w_expert + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                         mask=w_mask, other=0.0).to(DOT_DTYPE)
        up_w = tl.load(w_expert + (cols + intermediate)[None, :] * stride_wn + ks[:, None] * stride_wk,
                       mask=w_mask, other=0.0).to(DOT_DTYPE)
        if SCALED:
            # Gate's scale rows come first, up's start at up_scale_row (ceil(I / bn)).
            s_col = s_ptr + expert.to(tl.int64) * stride_se + (k0 // SCALE_K) * stride_sk
            gate_s = tl.load(s_col + (cols // SCALE_N) * stride_sn, mask=col_ok, other=0.0)
            up_s = tl.load(s_col + (up_scale_row + cols // SCALE_N) * stride_sn, mask=col_ok, other=0.0)
            gate += tl.dot(x_tile, gate_w, input_precision=PRECISION) * gate_s[None, :]
            up += tl.dot(x_tile, up_w, input_precision=PRECISION) * up_s[None, :]
        else:
            gate += tl.dot(x_tile, gate_w, input_precision=PRECISION)
            up += tl.dot(x_tile, up_w, input_precision=PRECISION)
    h = gate * tl.sigmoid(gate) * up  # silu(gate) * up
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hr + cols[None, :] * stride_hn,
             h.to(h_ptr.dtype.element_ty), mask=real[:, None] & col_ok[None, :])


@triton.jit
def _down_weighted_kernel(
        h_ptr, stride_hr, stride_hk,  # h [padded rows, I]
        w_ptr, stride_we, stride_wn, stride_wk,  # down [E, D, I]
        s_ptr, stride_se, stride_sn, stride_sk,  # FP8 scales [E, nD, nI] (SCALED)
        out_ptr, stride_op, stride_od,  # per-pair output [P, D]
        weight_of_pair_ptr, padded_pair_ids_ptr, expert_of_block_ptr,
        num_pairs, hidden, intermediate,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SCALED: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(expert_of_block_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(padded_pair_ids_ptr + rows)
    real = pair < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of D
    col_ok = cols < hidden
    w_expert = w_ptr + expert.to(tl.int64) * stride_we

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, intermediate, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < intermediate
        h_tile = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hr + ks[None, :] * stride_hk,
                         mask=real[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
        w_tile = tl.load(w_expert + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BN]
        if SCALED:
            scale = tl.load(s_ptr + expert.to(tl.int64) * stride_se + (cols // SCALE_N) * stride_sn
                            + (k0 // SCALE_K) * stride_sk, mask=col_ok, other=0.0)
            acc += tl.dot(h_tile, w_tile, input_precision=PRECISION) * scale[None, :]
        else:
            acc += tl.dot(h_tile, w_tile, input_precision=PRECISION)
    routing_weight = tl.load(weight_of_pair_ptr + pair, mask=real, other=0.0).to(tl.float32)
    acc = acc * routing_weight[:, None]
    tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_op + cols[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=real[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(pair_out_ptr, stride_pp, stride_pd, pairs_by_token_ptr, first_pair_of_token_ptr,
                    out_ptr, stride_ot, stride_od, hidden, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < hidden
    first = tl.load(first_pair_of_token_ptr + token)
    last = tl.load(first_pair_of_token_ptr + token + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(first, last):  # a token's pairs, in pair order
        pair = tl.load(pairs_by_token_ptr + i).to(tl.int64)
        acc += tl.load(pair_out_ptr + pair * stride_pp + cols * stride_pd, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=col_ok)


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """16-row blocks when experts see few pairs each (decode), 64 when they see many (prefill):
    a tall block wastes its padding rows on a small batch but reuses each weight tile more."""
    return 16 if num_pairs <= 16 * num_experts else 64


def _scale_args(scale: torch.Tensor | None, weight: torch.Tensor) -> tuple:
    """Pointer and strides of a scale tensor; without scales the weight and zero strides stand
    in (the kernels never read them: SCALED is a compile-time False)."""
    return (weight, 0, 0, 0) if scale is None else (scale, *scale.stride())


def fused_expert_pairs(x: torch.Tensor, token_of_pair: torch.Tensor, expert_of_pair: torch.Tensor,
                       weight_of_pair: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                       block_m: int | None = None, block_n: int = 64, block_k: int = 64,
                       scales: ExpertScales | None = None) -> torch.Tensor:
    num_tokens, hidden = x.shape
    num_experts, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    num_pairs = expert_of_pair.numel()
    out = torch.zeros_like(x)
    if num_pairs == 0:
        return out
    block_m = block_m or default_block_m(num_pairs, num_experts)
    scale_n, scale_k = (1, 1) if scales is None else scales.block
    block_k = _k_tile(block_k, None if scales is None else scale_k)
    scaled = dict(SCALED=scales is not None, SCALE_N=scale_n, SCALE_K=scale_k)
    padded_pair_ids, expert_of_block = moe_align(expert_of_pair, num_experts, block_m)
    tokens = token_of_pair.to(torch.int32).contiguous()
    dot, precision = dot_dtype(x.dtype), dot_precision(x.dtype)

    h = torch.empty(padded_pair_ids.numel(), intermediate, dtype=x.dtype, device=x.device)  # [padded P, I]
    grid = (expert_of_block.numel(), triton.cdiv(intermediate, block_n))
    _gate_up_silu_kernel[grid](
        x, x.stride(0), x.stride(1), gate_up, *gate_up.stride(),
        *_scale_args(None if scales is None else scales.gate_up, gate_up), -(-intermediate // scale_n),
        h, h.stride(0), h.stride(1), tokens, padded_pair_ids, expert_of_block, num_pairs, hidden, intermediate,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **scaled, DOT_DTYPE=dot, PRECISION=precision)

    pair_out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [P, D]
    grid = (expert_of_block.numel(), triton.cdiv(hidden, block_n))
    _down_weighted_kernel[grid](
        h, h.stride(0), h.stride(1), down, *down.stride(), *_scale_args(None if scales is None else scales.down, down),
        pair_out, pair_out.stride(0), pair_out.stride(1),
        weight_of_pair.to(torch.float32).contiguous(), padded_pair_ids, expert_of_block,
        num_pairs, hidden, intermediate,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **scaled, DOT_DTYPE=dot, PRECISION=precision)

    # Token-major CSR of the pairs for the combine: pairs_by_token[first[t]:first[t + 1]].
    token_ids = token_of_pair.to(torch.int64)
    pairs_by_token = token_ids.argsort(stable=True).to(torch.int32)  # [P]
    pairs_per_token = torch.zeros(num_tokens, dtype=torch.int64, device=x.device).scatter_add_(
        0, token_ids, torch.ones_like(token_ids))
    first_pair_of_token = torch.zeros(num_tokens + 1, dtype=torch.int32, device=x.device)
    first_pair_of_token[1:] = pairs_per_token.cumsum(0)
    block_d = 128
    _combine_kernel[(num_tokens, triton.cdiv(hidden, block_d))](
        pair_out, pair_out.stride(0), pair_out.stride(1), pairs_by_token, first_pair_of_token,
        out, out.stride(0), out.stride(1), hidden, BLOCK_D=block_d)
    return out
