"""Rotary position embedding with YaRN context extension.

Contract: `RotaryEmbedding(args)(positions)` returns `(cos, sin)` of shape [T, rope_dim / 2] in
float32, already multiplied by YaRN's attention factor; `apply_rotary(x, cos, sin, interleaved)`
rotates the last dimension of `x` ([T, ..., rope_dim]). The softmax-side mscale correction
lives in `ModelArgs.softmax_scale`, next to the attention that uses it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeray.model.config import ModelArgs, YarnScaling, yarn_mscale


def _yarn_inv_freq(dim: int, base: float, yarn: YarnScaling) -> torch.Tensor:
    """Blend interpolated and extrapolated frequencies with YaRN's linear ramp over dimensions."""

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength completes `num_rotations` turns over the original context.
        return (dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (yarn.factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp  # high-frequency dims keep their original rotation
    return interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated


class RotaryEmbedding(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, yarn = args.qk_rope_head_dim, args.rope_yarn
        if yarn is None:
            inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
            self.attention_factor = 1.0
        else:
            inv_freq = _yarn_inv_freq(dim, args.rope_theta, yarn)
            if yarn.attention_factor is not None:
                self.attention_factor = yarn.attention_factor
            elif yarn.mscale and yarn.mscale_all_dim:
                self.attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
            else:
                self.attention_factor = yarn_mscale(yarn.factor)
        # A plain attribute, not a buffer: it is derived from the config, never loaded, and must
        # survive models built on the meta device and materialised by the checkpoint loader.
        self._inv_freq = {inv_freq.device: inv_freq}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = next(iter(self._inv_freq.values())).to(device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq(positions.device)  # [T, dim/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate pairs of the last dim of x [T, ..., D] by cos/sin [T, D/2].

    Interleaved checkpoints pair (x0, x1), (x2, x3), ...; the others pair x_i with x_{i+D/2}.
    Either way the result is laid out as [rotated firsts | rotated seconds]: queries and keys
    get the same permutation, so their dot products are unchanged.
    """
    if interleaved:
        first, second = x[..., 0::2], x[..., 1::2]
    else:
        first, second = x.chunk(2, dim=-1)
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
