"""Triton kernels for the GPU hot paths. Each has a torch reference that the CPU runs.

Contract:
- `fused_moe.fused_expert_pairs(...)`: weighted SwiGLU routed experts over (token, expert,
  weight) pairs; reference `moeray.model.moe.expert_pairs_forward` on CPU.
- `mla_decode.paged_latent_decode(...)`: the absorbed MLA decode attention read straight from
  the paged latent cache through block tables; reference `MultiHeadLatentAttention.attend_absorbed`.
- `fp8_gemm.fp8_block_linear(...)`: x @ W^T with W in float8 e4m3 and per-block scales,
  dequantised inside the kernel; reference `moeray.kernels.fp8.fp8_block_linear_reference`.
Importing this package imports triton. `moeray.kernels` imports it lazily and only when
`use_triton(device)` holds, so a CPU-only process never loads triton. Tests run every kernel on
CPU tensors through the Triton interpreter (`TRITON_INTERPRET=1`, set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under the Triton interpreter (kernels then run on CPU tensors, in numpy)."""
    return bool(triton.knobs.runtime.interpret)


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype tiles are converted to before `tl.dot` (accumulation is always float32).

    bf16/fp16 tiles feed the tensor cores as they are. The interpreter computes through numpy,
    which has no bf16 arithmetic (a bf16 `tl.dot` there returns garbage), so it gets float32.
    """
    if interpreting() or dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def dot_precision(dtype: torch.dtype) -> str | None:
    """float32 inputs multiply in full precision, as torch does by default (no TF32); other
    dtypes take the backend's default (None), which every backend accepts."""
    return "ieee" if dtype == torch.float32 else None
