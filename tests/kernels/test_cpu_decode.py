"""The CPU decode kernels (weight-streaming GEMV, per-head GEMV, few-pair experts) equal torch."""

import os
import shutil

import pytest
import torch

from moeray import kernels
from moeray.kernels import cpu

HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None or shutil.which("gcc") is not None


def test_the_kernels_build_wherever_there_is_a_compiler():
    """Every other test here skips without the library, so a source that stops compiling must
    fail here rather than skip everything (the engine would quietly fall back to torch)."""
    if not HAS_COMPILER or os.environ.get("MOERAY_DISABLE_CPU_KERNELS") == "1":
        pytest.skip("no C compiler on PATH, or the kernels are switched off")
    assert cpu.library() is not None, cpu.unavailable_reason()


needs_kernels = pytest.mark.skipif(cpu.library() is None, reason=f"no CPU kernels: {cpu.unavailable_reason()}")


def column_major(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


@needs_kernels
@pytest.mark.parametrize("rows,cols", [(1536, 384), (64, 256), (300, 70), (7, 33), (256, 64)])
@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_linear_equals_torch_for_both_layouts_and_odd_sizes(rows, cols, layout, tokens):
    gen = torch.Generator().manual_seed(rows * cols)
    weight = torch.randn(rows, cols, generator=gen)
    weight = column_major(weight) if layout == "column" else weight
    x = torch.randn(tokens, cols, generator=gen)
    torch.testing.assert_close(kernels.linear(x, weight), x @ weight.t(), atol=1e-4, rtol=1e-4)


@needs_kernels
def test_column_major_product_does_not_depend_on_the_thread_count():
    """The inner dimension is cut into fixed slices whose partial sums add in a fixed order."""
    gen = torch.Generator().manual_seed(3)
    weight, x = column_major(torch.randn(1536, 384, generator=gen)), torch.randn(2, 384, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernels.linear(x, weight)
        torch.set_num_threads(max(2, threads))
        together = kernels.linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, together)


@needs_kernels
@pytest.mark.parametrize("layout", ["row", "column"])
def test_per_head_projections_of_kv_b_proj_equal_torch(layout):
    """The absorbed decode's W_uk / W_uv slices: strided views of one [H*(dn+dv), r] weight."""
    heads, nope, v, rank = 16, 64, 48, 256
    weight = torch.randn(heads * (nope + v), rank)
    weight = column_major(weight) if layout == "column" else weight
    per_head = weight.view(heads, nope + v, rank)
    w_uk, w_uv = per_head[:, :nope], per_head[:, nope:]
    q = torch.randn(heads, 1, nope)
    out_latent = torch.randn(heads, 2, rank)
    torch.testing.assert_close(kernels.batched_linear(q, w_uk.transpose(1, 2)), torch.bmm(q, w_uk),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernels.batched_linear(out_latent, w_uv), torch.bmm(out_latent, w_uv.transpose(1, 2)),
                               atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("lengths", [[1], [37], [5, 130, 64]])
def test_latent_decode_over_scattered_cache_slots_equals_the_absorbed_torch_path(lengths):
    from moeray.model import ModelArgs
    from moeray.model.mla import MultiHeadLatentAttention

    args = ModelArgs.preset("small")
    attn = MultiHeadLatentAttention(args, 0)
    torch.nn.init.normal_(attn.kv_b_proj.weight, std=0.05)
    gen = torch.Generator().manual_seed(len(lengths))
    b, h, r, dr = len(lengths), attn.num_heads, attn.kv_lora_rank, attn.rope_dim
    layer = torch.randn(600, r + dr, generator=gen)
    longest = max(lengths)
    slots = torch.zeros(b, longest, dtype=torch.long)
    for i, n in enumerate(lengths):
        slots[i, :n] = torch.randperm(600, generator=gen)[:n]
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])[:, None]  # [B, 1, S]
    q_nope = torch.randn(b, h, attn.nope_dim, generator=gen)
    q_pe = torch.randn(b, h, dr, generator=gen)
    with torch.no_grad():
        keys = layer[slots]  # [B, S, r + dr]
        expected = attn.attend_absorbed(q_nope[:, None], q_pe[:, None], keys[..., :r], keys[..., r:], mask=mask)[:, 0]
        got = kernels.cpu_latent_decode(q_nope, q_pe, attn.kv_b_proj.weight, layer, slots,
                                        mask[:, 0].sum(-1), attn.softmax_scale)
    assert got is not None
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_other_builds_of_the_kernels_equal_torch(kernel_variant):
    """512-bit vectors and the portable build: products in both layouts, the per-head products,
    the fused latent decode and the bandwidth probe."""
    for rows, cols in [(1536, 384), (300, 70), (7, 33)]:
        for layout in ("row", "column"):
            test_linear_equals_torch_for_both_layouts_and_odd_sizes(rows, cols, layout, 3)
    for layout in ("row", "column"):
        test_per_head_projections_of_kv_b_proj_equal_torch(layout)
    test_latent_decode_over_scattered_cache_slots_equals_the_absorbed_torch_path([5, 130, 64])
    data = torch.arange(1000, dtype=torch.float32)
    for wide in (0, 1):
        assert kernel_variant.moeray_stream_sum(data.data_ptr(), data.numel(), wide) == data.sum().item()
