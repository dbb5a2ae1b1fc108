"""FP8 e4m3 block-scaled GEMM: y = x @ (W_q * scale)^T, dequantising inside the kernel.

Contract: `fp8_block_linear(x, weight, scale_inv, block)` takes x [M, K] (bf16/fp16/fp32),
weight [N, K] float8_e4m3fn and scale_inv [ceil(N / bn), ceil(K / bk)] float32 (the DeepSeek-V3
checkpoint layout, block = (bn, bk) = (128, 128)), and returns y [M, N] in x's dtype. Edge blocks
may be partial. Its torch reference is `moeray.kernels.fp8.fp8_block_linear_reference`
(dequantise, then `F.linear`).

Why the scale is applied to the partial product: within one K tile every column n shares one
scale, scale_inv[n // bn, k // bk], so sum_k x_k * (q_nk * s) = s * sum_k x_k * q_nk. The kernel
multiplies the raw FP8 values (exact in bf16: e4m3 has 3 mantissa bits) and scales the [BM, BN]
product once per tile rather than every [BK, BN] weight tile; the weight crosses memory once, at
one byte per number, with no bf16 copy anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.triton import dot_dtype, dot_precision


@triton.jit
def _fp8_block_gemm_kernel(
        x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk, scale_ptr, stride_sn, stride_sk,
        y_ptr, stride_ym, stride_yn, M, N, K,
        SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    scale_row = scale_ptr + (cols // SCALE_N) * stride_sn  # [BN]: each column's scale row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_tile = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
        w_tile = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None] * stride_wk,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BN]
        # BLOCK_K divides SCALE_K (checked by the launcher): the tile lies in one scale column.
        scale = tl.load(scale_row + (k0 // SCALE_K) * stride_sk, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.dot(x_tile, w_tile, input_precision=PRECISION) * scale[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int] = (128, 128), block_m: int | None = None, block_n: int = 64,
                     block_k: int = 64) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    scale_n, scale_k = block
    if weight.dtype != torch.float8_e4m3fn or weight.shape[1] != k:
        raise ValueError(f"weight must be float8_e4m3fn [N, {k}], got {weight.dtype} {tuple(weight.shape)}")
    expected = (triton.cdiv(n, scale_n), triton.cdiv(k, scale_k))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {n}x{k} "
                         f"with {scale_n}x{scale_k} blocks (expected {expected})")
    block_k = min(block_k, scale_k)
    if scale_k % block_k:
        raise ValueError(f"block_k {block_k} must divide the scale block {scale_k}")
    # Decode (a few rows) wastes most of a 64-row tile; 16 is tl.dot's minimum.
    block_m = block_m or (16 if m <= 16 else 64)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _fp8_block_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, x.stride(0), x.stride(1), weight, weight.stride(0), weight.stride(1),
        scale_inv, scale_inv.stride(0), scale_inv.stride(1), y, y.stride(0), y.stride(1), m, n, k,
        SCALE_N=scale_n, SCALE_K=scale_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype))
    return y
