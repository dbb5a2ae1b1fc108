"""FP8 e4m3 weights with block scales, kept in FP8 in memory (DeepSeek-V3 checkpoints).

Contract:
- `dequantize_blocks(weight, scale_inv, block, dtype)`: W = q * scale_inv[i // bn, j // bk] with
  partial edge blocks; the same arithmetic as the checkpoint reader's dequantisation.
- `fp8_block_linear_reference(x, weight, scale_inv, block)`: the torch reference of the FP8 GEMM
  (dequantise to x's dtype, then `F.linear`); what the CPU runs.
- `Fp8Linear(in_features, out_features, block)`: a Linear whose `weight` [out, in] is
  float8_e4m3fn and `weight_scale_inv` [ceil(out / bn), ceil(in / bk)] float32, the Hugging Face
  names, so a V3 checkpoint's tensors load into it as they are. Its forward goes through
  `moeray.kernels.fp8_block_linear`: the Triton kernel on CUDA (no bf16 copy of the weight, ever),
  the reference elsewhere (a transient dequantised copy per call: correct, not fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = weight.shape
    bn, bk = block
    scales = scale_inv.float().repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]  # [rows, cols]
    return (weight.float() * scales).to(dtype)


def fp8_block_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                               block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    return F.linear(x, dequantize_blocks(weight, scale_inv, block, x.dtype))


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128),
                 bias: bool = False, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        bn, bk = block
        # Parameters without gradients rather than buffers: they are weights, and state-dict names
        # and `model.parameters()` placement must treat them as such.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.ones(-(-out_features // bn), -(-in_features // bk), dtype=torch.float32, device=device),
            requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from moeray import kernels

        flat = x.reshape(-1, self.in_features)  # [M, in]; any leading dims
        out = kernels.fp8_block_linear(flat, self.weight, self.weight_scale_inv, self.block)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks={self.block}"
