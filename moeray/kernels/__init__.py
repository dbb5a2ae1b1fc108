"""Kernels behind the model's hot operations, chosen by device, dtype and shape.

Contract: every function here computes exactly what its torch reference computes (tests compare
them); the choice of implementation never changes results beyond float rounding.
- `linear(x, weight)`: x [M, in] @ weight[out, in]^T. On CPU in float32 with M <= 4 (decode), a
  weight-streaming matrix-vector kernel (row- or column-major weights); otherwise
  `torch.nn.functional.linear`.
- `batched_linear(x, weight)`: the same per attention head, [B, M, in] x [B, out, in]^T.
  (The engine's whole decode steps on CPU run in the native decoder, `moeray.kernels.cpu.decoder`,
  which packs its own copy of the weights; the kernels here serve the torch path.)
- `fused_expert_pairs(x, token_of_pair, expert_of_pair, weight_of_pair, gate_up, down, scales)`:
  weighted SwiGLU experts; on CUDA (see `use_triton`) without autograd, the Triton fused MoE
  (with `scales`, FP8 experts dequantised in the kernel, for scale blocks whose column count is a
  multiple of 16); on CPU in float32 for a few pairs, one fused C call; else None (the caller runs
  the grouped torch path).
- `paged_latent_decode(...)`: absorbed MLA decode over the paged latent cache; Triton only (the
  engine calls it when `use_triton` holds).
- `cpu_latent_decode(...)`: the whole absorbed decode (per-head projections, scores, softmax,
  values) over the paged cache in one C call, on CPU in float32 for up to `MAX_CPU_DECODE_SEQS`
  sequences; else None (the engine runs its torch path).
- `fp8_block_linear(x, weight, scale_inv, block)`: x @ W^T with W float8 e4m3 plus block scales;
  the Triton kernel on CUDA, the dequantise-then-`F.linear` reference elsewhere.
`use_triton(device)`: True when `device` is CUDA, triton is importable, the kernels are enabled
and the environment does not say `MOERAY_KERNELS=torch` (accepted values: `auto`, the default,
and `torch`; anything else is an error naming the variable). CPU tensors never take a Triton
path, and triton is imported only when one is taken. The active `KernelPolicy`
(`moeray.kernels.policy.using(...)`; the engine applies its config's) can switch the C and the
Triton kernels off: `using(KernelPolicy.torch_only())` forces the torch reference everywhere.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from moeray.kernels import cpu, policy
from moeray.kernels.fp8 import ExpertScales, fp8_block_linear_reference

MAX_DECODE_TOKENS = 4  # beyond this GEMM reuses each weight enough that MKL/oneDNN wins
MAX_FUSED_PAIRS = 32

def cpu_kernels_enabled() -> bool:
    """The C kernels may run: allowed by the active policy and built (or buildable)."""
    return policy.active().cpu_ops and cpu.library() is not None


KERNELS_ENV = "MOERAY_KERNELS"
KERNEL_CHOICES = ("auto", "torch")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_setting() -> str:
    """The `MOERAY_KERNELS` setting, read on every call so a process can be switched in tests."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in KERNEL_CHOICES:
        raise ValueError(f"environment variable {KERNELS_ENV}={value!r} is not one of {', '.join(KERNEL_CHOICES)}")
    return value


def use_triton(device: torch.device | str) -> bool:
    # The device test comes first: a CPU call costs one comparison and reads no environment.
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cuda":
        return False
    return policy.active().triton and kernels_setting() != "torch" and triton_importable()


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """The Triton kernels have no backward: training keeps the differentiable torch path."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _cpu_fp32(*tensors: torch.Tensor) -> bool:
    return policy.active().cpu_ops and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _layout(weight: torch.Tensor) -> tuple[int, int] | None:
    """(column_major, leading stride) when the kernel can read `weight` [out, in] directly."""
    if weight.stride(1) == 1:
        return 0, weight.stride(0)
    if weight.stride(0) == 1:
        return 1, weight.stride(1)
    return None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if (x.dim() == 2 and x.shape[0] <= MAX_DECODE_TOKENS and _cpu_fp32(x, weight)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        lib, layout = cpu.library(), _layout(weight)
        if lib is not None and layout is not None:
            x = x.contiguous()
            out = torch.empty(x.shape[0], weight.shape[0])
            lib.moeray_gemv(weight.data_ptr(), weight.shape[0], weight.shape[1], layout[1], layout[0],
                            x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), x.shape[0])
            return out
    return F.linear(x, weight)


def batched_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, M, in] times weight [B, out, in]^T -> [B, M, out] (per-head projections of MLA)."""
    if (x.shape[1] <= MAX_DECODE_TOKENS and _cpu_fp32(x, weight)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        lib, layout = cpu.library(), _layout(weight[0])
        if lib is not None and layout is not None:
            x = x.contiguous()
            out = torch.empty(x.shape[0], x.shape[1], weight.shape[1])
            lib.moeray_gemv_batched(weight.data_ptr(), weight.stride(0), weight.shape[1], weight.shape[2], layout[1],
                                    layout[0], x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(), out.stride(0),
                                    out.stride(1), x.shape[1], x.shape[0])
            return out
    return torch.matmul(x, weight.transpose(1, 2))


MAX_CPU_DECODE_SEQS = 8  # beyond this the batched torch path reuses each head's weights better


def cpu_latent_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, layer: torch.Tensor,
                      decode_slots: torch.Tensor, lengths: torch.Tensor, softmax_scale: float) -> torch.Tensor | None:
    """q_nope [B, H, dn], q_pe [B, H, dr], kv_b_weight [H*(dn+dv), r] (row-major), layer
    [slots, r + dr], decode_slots [B, S_max] (the first lengths[b] of row b are real) ->
    [B, H, dv], or None where the C kernel does not apply."""
    b, h, dn = q_nope.shape
    r = kv_b_weight.shape[1]
    if not (b <= MAX_CPU_DECODE_SEQS and _cpu_fp32(q_nope, q_pe, kv_b_weight, layer)
            and not _needs_grad(q_nope, q_pe, kv_b_weight) and kv_b_weight.is_contiguous()
            and layer.is_contiguous() and layer.shape[1] == r + q_pe.shape[2]):
        return None
    lib = cpu.library()
    if lib is None:
        return None
    dv = kv_b_weight.shape[0] // h - dn
    q_nope, q_pe = q_nope.contiguous(), q_pe.contiguous()
    slots = decode_slots.contiguous()
    lengths = lengths.to(torch.long).contiguous()
    out = torch.empty(b, h, dv)
    lib.moeray_mla_decode(q_nope.data_ptr(), q_pe.data_ptr(), kv_b_weight.data_ptr(), layer.data_ptr(),
                          slots.data_ptr(), slots.stride(0), lengths.data_ptr(), out.data_ptr(), b, h, dn,
                          q_pe.shape[2], dv, r, softmax_scale)
    return out


def fused_expert_pairs(x: torch.Tensor, token_of_pair: torch.Tensor, expert_of_pair: torch.Tensor,
                       weight_of_pair: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                       scales: ExpertScales | None = None) -> torch.Tensor | None:
    """The fused path over (token, expert, weight) pairs, or None when none applies."""
    if use_triton(x.device) and not _needs_grad(x, gate_up, down):
        from moeray.kernels.triton import fused_moe

        if scales is None or fused_moe.scale_block_supported(scales.block):
            return fused_moe.fused_expert_pairs(x, token_of_pair, expert_of_pair, weight_of_pair, gate_up, down,
                                                scales=scales)
        return None
    if (scales is not None or expert_of_pair.numel() > MAX_FUSED_PAIRS or not _cpu_fp32(x, gate_up, down)
            or not (gate_up.is_contiguous() and down.transpose(1, 2).is_contiguous())
            or (torch.is_grad_enabled() and (x.requires_grad or gate_up.requires_grad))):
        return None
    lib = cpu.library()
    if lib is None:
        return None
    x = x.contiguous()
    tokens = token_of_pair.to(torch.long).contiguous()
    experts = expert_of_pair.to(torch.long).contiguous()
    pair_weights = weight_of_pair.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    lib.moeray_moe_pairs(x.data_ptr(), x.shape[1], tokens.data_ptr(), experts.data_ptr(), pair_weights.data_ptr(),
                         experts.numel(), gate_up.data_ptr(), down.data_ptr(), down.shape[2], out.data_ptr(),
                         x.shape[0])
    return out


def paged_latent_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                        softmax_scale: float, max_seq_len: int | None = None) -> torch.Tensor:
    """out_latent [B, H, r] of the absorbed decode; see `moeray.kernels.triton.mla_decode`."""
    from moeray.kernels.triton import mla_decode

    return mla_decode.paged_latent_decode(q_latent, q_rope, cache, block_tables, seq_lens, block_size,
                                          softmax_scale, max_seq_len=max_seq_len)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """x [M, K] @ dequant(weight [N, K] float8_e4m3fn, scale_inv)^T -> [M, N] in x's dtype."""
    if use_triton(x.device) and not _needs_grad(x):
        from moeray.kernels.triton import fp8_gemm

        return fp8_gemm.fp8_block_linear(x, weight, scale_inv, block)
    return fp8_block_linear_reference(x, weight, scale_inv, block)


def stream_read_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second of a streaming read with all threads (the roofline's memory ceiling).

    The best of torch's sum and the C probe (when built) with the kernels' vectors and with
    512-bit loads, each over ordinary memory and over huge pages (where the packed decode weights
    live), so the ceiling is never understated.
    """
    import time

    lib = cpu.library()
    best = 0.0
    for data in (torch.ones(num_bytes // 4), cpu.huge_page_floats(num_bytes // 4).fill_(1.0)):
        probes = [data.sum]
        if lib is not None:
            probes += [lambda wide=wide: lib.moeray_stream_sum(data.data_ptr(), data.numel(), wide) for wide in (0, 1)]
        for probe in probes:
            probe()
            for _ in range(repeats):
                start = time.perf_counter()
                probe()
                best = max(best, num_bytes / (time.perf_counter() - start))
        del data, probes
    return best
