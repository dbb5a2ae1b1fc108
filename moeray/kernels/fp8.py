"""FP8 e4m3 weights with block scales, kept in FP8 in memory (DeepSeek-V3 checkpoints).

Contract:
- `dequantize_blocks(weight, scale_inv, block, dtype)`: W = q * scale_inv[i // bn, j // bk] with
  partial edge blocks; the same arithmetic as the checkpoint reader's dequantisation.
- `quantize_blocks(weight, block)`: the inverse, per-block absmax quantisation as V3 ships its
  weights: (q float8_e4m3fn, scale_inv float32) with dequantize_blocks(q, scale_inv) ~ weight.
- `fp8_block_linear_reference(x, weight, scale_inv, block)`: the torch reference of the FP8 GEMM
  (dequantise to x's dtype, then `F.linear`); what the CPU runs.
- `Fp8Linear(in_features, out_features, block)`: a Linear whose `weight` [out, in] is
  float8_e4m3fn and `weight_scale_inv` [ceil(out / bn), ceil(in / bk)] float32, the Hugging Face
  names, so a V3 checkpoint's tensors load into it as they are. Its forward goes through
  `moeray.kernels.fp8_block_linear`: the Triton kernel on CUDA (no bf16 copy of the weight, ever),
  the reference elsewhere (a transient dequantised copy per call: correct, not fast).
- `ExpertScales(gate_up, down, block)`: the block scales of FP8 routed experts stored grouped as
  `RoutedExperts` stores them (gate_up [E, 2I, D], down [E, D, I] float8_e4m3fn). The checkpoint
  scales gate and up separately, so gate_up's scale holds gate's ceil(I / bn) block rows, then
  up's: row r of gate_up has scale row (r // I) * ceil(I / bn) + (r % I) // bn (plain r // bn
  when bn divides I, as in V3). `dequantize(expert, gate_up, down, dtype)` gives one expert's
  weights in `dtype` (the torch reference of the fused MoE with FP8 experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = weight.shape
    bn, bk = block
    scales = scale_inv.float().repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]  # [rows, cols]
    return (weight.float() * scales).to(dtype)


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    bn, bk = block
    nr, nc = -(-rows // bn), -(-cols // bk)
    padded = weight.float().new_zeros(nr * bn, nc * bk)
    padded[:rows, :cols] = weight
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    scale_inv = padded.view(nr, bn, nc, bk).abs().amax(dim=(1, 3)).clamp(min=1e-12) / fp8_max  # [nr, nc]
    scales = scale_inv.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    return (weight.float() / scales).to(torch.float8_e4m3fn), scale_inv


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


@dataclass(frozen=True)
class ExpertScales:
    gate_up: torch.Tensor  # [E, 2 * ceil(I / bn), ceil(D / bk)]: gate's block rows, then up's
    down: torch.Tensor  # [E, ceil(D / bn), ceil(I / bk)]
    block: tuple[int, int]

    def dequantize(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `expert`'s (gate_up [2I, D], down [D, I]) in `dtype` from the FP8 grouped tensors."""
        intermediate = gate_up.shape[1] // 2
        gate_rows = self.gate_up.shape[1] // 2
        halves = [dequantize_blocks(gate_up[expert, part * intermediate:(part + 1) * intermediate],
                                    self.gate_up[expert, part * gate_rows:(part + 1) * gate_rows], self.block, dtype)
                  for part in (0, 1)]
        return torch.cat(halves), dequantize_blocks(down[expert], self.down[expert], self.block, dtype)
