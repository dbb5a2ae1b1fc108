"""GPU kernels against their torch reference paths and the device's measured peaks.

For each Triton kernel on DeepSeek-V3 shapes (one layer, bf16): its time, the torch reference
path's time on the same inputs, and the achieved bandwidth (memory-bound cases: decode) or
FLOP/s (compute-bound cases: prefill) as a fraction of this device's peak, measured in the same
run: peak copy bandwidth from a large device-to-device copy (bytes read + written), peak matmul
FLOP/s from a large bf16 matmul.

    .venv/bin/python bench/kernels.py                 # V3 shapes: needs ~30 GB of GPU memory
    .venv/bin/python bench/kernels.py --experts 64    # fewer routed experts for smaller GPUs

Prints the JSON record and a readable table (bench/common.py `report`). Without a CUDA device
(or without triton) it measures nothing, says so on stderr and exits with status 2, so that no
script mistakes "not run" for a result: GPU figures need a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import torch

from common import report
from moeray.kernels.policy import KernelPolicy, using
from moeray import kernels
from moeray.kernels.fp8 import dequantize_blocks
from moeray.model.moe import expert_pairs_forward

UNAVAILABLE = 2


@dataclass
class V3Shapes:
    hidden: int = 7168
    moe_intermediate: int = 2048
    routed_experts: int = 256
    top_k: int = 8
    heads: int = 128
    kv_lora_rank: int = 512
    rope_dim: int = 64
    block_size: int = 16  # the engine's default cache block
    fp8_out: int = 18432  # the dense MLP's gate/up rows
    fp8_in: int = 7168


def gpu_time(fn, warmup: int = 3, repeats: int = 20) -> float:
    """Median seconds of fn() on the current CUDA stream (CUDA events, so no host overhead)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_copy_bandwidth(device, num_bytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = gpu_time(lambda: dst.copy_(src), repeats=10)
    return 2 * num_bytes / seconds


def peak_matmul_flops(device, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n ** 3 / gpu_time(lambda: a @ b, repeats=10)


def torch_reference(fn):
    """fn run with the Triton kernels switched off: the path a CPU (or MOERAY_KERNELS=torch) takes."""
    def run():
        with using(KernelPolicy.torch_only()):
            return fn()
    return run


# ---- the kernels' workloads ------------------------------------------------------------------
def fused_moe_case(shapes: V3Shapes, tokens: int, device, timer):
    gen = torch.Generator(device=device).manual_seed(0)
    e, d, i, k = shapes.routed_experts, shapes.hidden, shapes.moe_intermediate, shapes.top_k
    gate_up = torch.empty(e, 2 * i, d, dtype=torch.bfloat16, device=device).normal_(0, d ** -0.5, generator=gen)
    down = torch.empty(e, i, d, dtype=torch.bfloat16, device=device).normal_(0, i ** -0.5,
                                                                             generator=gen).transpose(1, 2)
    x = torch.randn(tokens, d, dtype=torch.bfloat16, device=device, generator=gen)
    expert_ids = torch.rand(tokens, e, device=device, generator=gen).topk(k, dim=-1).indices  # distinct per token
    weights = torch.rand(tokens, k, device=device, generator=gen)
    token_of_pair = torch.arange(tokens, device=device).repeat_interleave(k)
    args = (x, token_of_pair, expert_ids.flatten(), weights.flatten(), gate_up, down)
    with torch.no_grad():
        kernel_s = timer(lambda: expert_pairs_forward(*args))
        reference_s = timer(torch_reference(lambda: expert_pairs_forward(*args)))
    experts_hit = int(expert_ids.unique().numel())
    weight_bytes = experts_hit * 3 * d * i * 2
    flops = tokens * k * 3 * 2 * d * i
    return kernel_s, reference_s, weight_bytes, flops


def mla_decode_case(shapes: V3Shapes, batch: int, context: int, device, timer):
    gen = torch.Generator(device=device).manual_seed(1)
    r, dr, bs, h = shapes.kv_lora_rank, shapes.rope_dim, shapes.block_size, shapes.heads
    blocks_per_seq = -(-context // bs)
    cache = torch.randn(batch * blocks_per_seq * bs, r + dr, dtype=torch.bfloat16, device=device, generator=gen)
    block_tables = torch.randperm(batch * blocks_per_seq, device=device, generator=gen).view(batch, -1)
    seq_lens = torch.full((batch,), context, device=device)
    q_latent = torch.randn(batch, h, r, dtype=torch.bfloat16, device=device, generator=gen)
    q_rope = torch.randn(batch, h, dr, dtype=torch.bfloat16, device=device, generator=gen)
    scale = (128 + dr) ** -0.5
    # The engine's torch path: gather every key through the slot lists, attend in latent space.
    pos = torch.arange(blocks_per_seq * bs, device=device)
    slots = block_tables[:, pos // bs] * bs + pos % bs  # [B, S]
    mask = (pos[None, :] < seq_lens[:, None])[:, None]  # [B, 1, S]

    def reference():
        keys = cache.index_select(0, slots.flatten()).view(*slots.shape, -1)  # [B, S, r + dr]
        scores = torch.baddbmm(torch.bmm(q_rope, keys[..., r:].transpose(1, 2)), q_latent,
                               keys[..., :r].transpose(1, 2)).float() * scale  # [B, H, S]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(cache.dtype)
        return torch.bmm(probs, keys[..., :r])  # [B, H, r]

    with torch.no_grad():
        kernel_s = timer(lambda: kernels.paged_latent_decode(q_latent, q_rope, cache, block_tables, seq_lens, bs,
                                                             scale, max_seq_len=context))
        reference_s = timer(reference)
    cache_bytes = batch * context * (r + dr) * 2
    flops = batch * h * context * 2 * (2 * r + dr)
    return kernel_s, reference_s, cache_bytes, flops


def fp8_gemm_case(shapes: V3Shapes, rows: int, device, timer):
    gen = torch.Generator(device=device).manual_seed(2)
    n, k = shapes.fp8_out, shapes.fp8_in
    weight = torch.randn(n, k, device=device, generator=gen).mul_(8).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(-(-n // 128), -(-k // 128), device=device, generator=gen) * 1e-2
    x = torch.randn(rows, k, dtype=torch.bfloat16, device=device, generator=gen)
    dequantized = dequantize_blocks(weight, scale_inv, dtype=torch.bfloat16)  # what serving without FP8 holds
    with torch.no_grad():
        kernel_s = timer(lambda: kernels.fp8_block_linear(x, weight, scale_inv))
        reference_s = timer(torch_reference(lambda: kernels.fp8_block_linear(x, weight, scale_inv)))
        bf16_s = timer(lambda: torch.nn.functional.linear(x, dequantized))
    weight_bytes = n * k + scale_inv.numel() * 4
    flops = 2 * rows * n * k
    return kernel_s, reference_s, bf16_s, weight_bytes, flops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=V3Shapes.routed_experts,
                        help="routed experts in the MoE layer (V3: 256, ~23 GB of bf16 weights)")
    opts = parser.parse_args()
    if not torch.cuda.is_available() or not kernels.triton_importable():
        missing = "no CUDA device" if not torch.cuda.is_available() else "triton is not installed"
        print(f"bench/kernels.py: {missing} here; GPU kernel figures need a GPU with triton. Nothing was measured.",
              file=sys.stderr)
        return UNAVAILABLE
    device = torch.device("cuda")
    if not kernels.use_triton(device):
        print(f"bench/kernels.py: the Triton kernels are switched off ({kernels.KERNELS_ENV}="
              f"{kernels.kernels_setting()}); unset it to measure them.", file=sys.stderr)
        return UNAVAILABLE
    shapes = V3Shapes(routed_experts=opts.experts)
    gpu = torch.cuda.get_device_name(device)
    bandwidth, flops_peak = peak_copy_bandwidth(device), peak_matmul_flops(device)

    results = {"gpu": gpu, "peak_copy_GB_s": round(bandwidth / 1e9, 1),
               "peak_bf16_matmul_TFLOP_s": round(flops_peak / 1e12, 1), "kernels": {}}
    rows = [("device", gpu, "", ""),
            ("peak copy bandwidth", f"{bandwidth / 1e9:.0f} GB/s", "", ""),
            ("peak bf16 matmul", f"{flops_peak / 1e12:.0f} TFLOP/s", "", "")]

    def add(name: str, kernel_s: float, reference_s: float, amount: float, unit: str, peak: float):
        rate = amount / kernel_s
        results["kernels"][name] = {"kernel_us": round(kernel_s * 1e6, 1), "torch_us": round(reference_s * 1e6, 1),
                                    "speedup": round(reference_s / kernel_s, 2),
                                    f"achieved_{unit}": round(rate / 1e9 if unit == "GB_s" else rate / 1e12, 2),
                                    "fraction_of_peak": round(rate / peak, 3)}
        shown = f"{rate / 1e9:.0f} GB/s" if unit == "GB_s" else f"{rate / 1e12:.0f} TFLOP/s"
        rows.append((f"{name} time", f"{kernel_s * 1e6:.1f} us", f"{reference_s * 1e6:.1f} us",
                     f"{reference_s / kernel_s:.2f}x"))
        rows.append((f"{name} achieved", shown, "", f"{rate / peak:.0%} of peak"))

    for tokens in (1, 64):
        kernel_s, reference_s, weight_bytes, _ = fused_moe_case(shapes, tokens, device, gpu_time)
        add(f"fused MoE decode T={tokens}", kernel_s, reference_s, weight_bytes, "GB_s", bandwidth)
    kernel_s, reference_s, _, flops = fused_moe_case(shapes, 4096, device, gpu_time)
    add("fused MoE prefill T=4096", kernel_s, reference_s, flops, "TFLOP_s", flops_peak)
    torch.cuda.empty_cache()

    for batch, context in ((32, 4096), (1, 32768)):
        kernel_s, reference_s, cache_bytes, _ = mla_decode_case(shapes, batch, context, device, gpu_time)
        add(f"MLA decode B={batch} ctx={context}", kernel_s, reference_s, cache_bytes, "GB_s", bandwidth)

    for rows_m in (4, 4096):
        kernel_s, reference_s, bf16_s, weight_bytes, flops = fp8_gemm_case(shapes, rows_m, device, gpu_time)
        if rows_m <= 16:
            add(f"FP8 GEMM M={rows_m}", kernel_s, reference_s, weight_bytes, "GB_s", bandwidth)
        else:
            add(f"FP8 GEMM M={rows_m}", kernel_s, reference_s, flops, "TFLOP_s", flops_peak)
        results["kernels"][f"FP8 GEMM M={rows_m}"]["bf16_copy_us"] = round(bf16_s * 1e6, 1)
        rows.append((f"FP8 GEMM M={rows_m} vs bf16 copy", f"{kernel_s * 1e6:.1f} us", f"{bf16_s * 1e6:.1f} us",
                     f"{bf16_s / kernel_s:.2f}x"))

    report("kernels", results, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
