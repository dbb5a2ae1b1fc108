"""The fused MoE kernels equal the grouped torch path (`expert_pairs_forward` with the kernels
switched off) over odd shapes: partial blocks, empty experts, one token, top-k > 1, an expert
spanning several row blocks, pairs in any order, tokens without pairs; with FP8 experts
(dequantised in the kernel) against the torch path over the dequantised weights, with partial
scale blocks on every edge and scale blocks that do not divide the intermediate size."""

import pytest
import torch

from moeray.kernels.policy import KernelPolicy, using
from moeray.kernels.fp8 import ExpertScales
from moeray.kernels.triton.fused_moe import fused_expert_pairs, moe_align, scale_block_supported
from moeray.model.moe import expert_pairs_forward


@pytest.fixture
def torch_reference():
    with using(KernelPolicy.torch_only()):
        yield expert_pairs_forward


def _experts(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) * hidden ** -0.5
    # down_proj column-major per expert, as RoutedExperts stores it: [E, D, I] over [E, I, D] memory.
    down = (torch.randn(num_experts, intermediate, hidden, generator=gen) * intermediate ** -0.5).transpose(1, 2)
    return gate_up.to(device, dtype), down.to(device, dtype)


# (tokens, hidden, intermediate, experts, top_k, experts actually used, block_m)
CASES = {
    "one-token-top1": (1, 32, 16, 4, 1, 4, 16),
    "partial-blocks-empty-experts": (7, 40, 24, 6, 2, 3, 16),
    "expert-over-several-blocks": (37, 48, 40, 5, 3, 5, 16),
    "odd-everything": (13, 72, 56, 9, 4, 7, 32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_moe_matches_torch(device, torch_reference, case, dtype):
    tokens, hidden, intermediate, num_experts, top_k, used, block_m = CASES[case]
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    gate_up, down = _experts(num_experts, hidden, intermediate, dtype, device, seed=1)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    # Distinct experts per token drawn from the first `used`: the rest receive nothing.
    expert_ids = torch.stack([torch.randperm(used, generator=gen)[:top_k] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, top_k, generator=gen).to(device)
    token_of_pair = torch.arange(tokens, device=device).repeat_interleave(top_k)
    args = (x, token_of_pair, expert_ids.flatten(), weights.flatten(), gate_up, down)

    got = fused_expert_pairs(*args, block_m=block_m, block_n=16, block_k=16)
    want = torch_reference(*args)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_shard_like_pairs_in_any_order(device, torch_reference):
    """An expert shard receives a shuffled subset of pairs; tokens without pairs get zeros."""
    gen = torch.Generator().manual_seed(5)
    gate_up, down = _experts(4, 24, 20, torch.float32, device, seed=2)
    x = torch.randn(9, 24, generator=gen).to(device)
    token_of_pair = torch.tensor([8, 2, 2, 5, 0, 8, 5], device=device)
    expert_of_pair = torch.tensor([3, 1, 0, 3, 3, 0, 1], device=device)
    weight_of_pair = torch.rand(7, generator=gen).to(device)
    args = (x, token_of_pair, expert_of_pair, weight_of_pair, gate_up, down)
    got = fused_expert_pairs(*args, block_m=16, block_n=16, block_k=16)
    torch.testing.assert_close(got, torch_reference(*args), atol=1e-5, rtol=1e-4)
    assert got[[1, 3, 4, 6, 7]].abs().max() == 0


def test_no_pairs_gives_zeros(device):
    gate_up, down = _experts(3, 16, 16, torch.float32, device, seed=3)
    x = torch.randn(2, 16, device=device)
    empty = torch.empty(0, dtype=torch.long, device=device)
    got = fused_expert_pairs(x, empty, empty, empty.float(), gate_up, down)
    assert got.shape == (2, 16) and got.abs().max() == 0


def test_moe_align_groups_and_pads(device):
    experts = torch.tensor([2, 0, 2, 2, 4, 0, 2], device=device)
    padded, expert_of_block = moe_align(experts, num_experts=5, block_m=2)
    # Expert 0: pairs 1, 5 (one block); expert 2: 0, 2, 3, 6 (two blocks); expert 4: pair 4 + padding.
    # 9 blocks bound the worst case (ceil(7 / 2) + min(7, 5)); the unused ones are marked -1.
    assert expert_of_block.tolist() == [0, 2, 2, 4] + [-1] * 5
    assert padded.tolist()[:8] == [1, 5, 0, 2, 3, 6, 4, 7]
    assert (padded[8:] == 7).all()


def _fp8_experts(num_experts: int, hidden: int, intermediate: int, block: tuple[int, int], device: str):
    """FP8 experts in RoutedExperts' layout with random positive block scales; gate and up are
    scaled separately (gate's block rows, then up's), as the checkpoint stores them."""
    gen = torch.Generator().manual_seed(4)
    bn, bk = block
    q = lambda *shape: (torch.randn(*shape, generator=gen) * 16).to(torch.float8_e4m3fn)
    s = lambda *shape: torch.rand(*shape, generator=gen) * 0.01 + 1e-3
    gate_up = q(num_experts, 2 * intermediate, hidden)
    down = q(num_experts, intermediate, hidden).transpose(1, 2)  # column-major per expert
    scales = ExpertScales(s(num_experts, 2 * -(-intermediate // bn), -(-hidden // bk)),
                          s(num_experts, -(-hidden // bn), -(-intermediate // bk)), block)
    return gate_up.to(device), down.to(device), ExpertScales(scales.gate_up.to(device), scales.down.to(device), block)


# (tokens, hidden, intermediate, experts, top_k, scale block, block_m)
FP8_CASES = {
    "v3-blocks-partial-edges": (5, 144, 72, 4, 2, (128, 128), 16),
    "small-blocks-not-dividing-I": (11, 80, 40, 6, 3, (16, 32), 16),
    "one-token": (1, 64, 48, 3, 1, (32, 16), 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(FP8_CASES))
def test_fp8_experts_match_torch_over_dequantised_weights(device, torch_reference, case, dtype):
    tokens, hidden, intermediate, num_experts, top_k, block, block_m = FP8_CASES[case]
    gate_up, down, scales = _fp8_experts(num_experts, hidden, intermediate, block, device)
    gen = torch.Generator().manual_seed(sorted(FP8_CASES).index(case))
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    expert_ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, top_k, generator=gen).to(device)
    token_of_pair = torch.arange(tokens, device=device).repeat_interleave(top_k)
    pairs = (x, token_of_pair, expert_ids.flatten(), weights.flatten())

    got = fused_expert_pairs(*pairs, gate_up, down, block_m=block_m, block_n=16, block_k=64, scales=scales)
    # The FP8 torch path, and the plain one over weights dequantised up front: the same numbers.
    want = torch_reference(*pairs, gate_up, down, scales)
    whole = [scales.dequantize(e, gate_up, down, torch.float32) for e in range(num_experts)]
    plain = torch_reference(x.float(), *pairs[1:], torch.stack([g for g, _ in whole]), torch.stack([d for _, d in whole]))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=3e-2)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(want.float(), plain, **tol)


def test_fp8_scale_blocks_the_kernel_cannot_tile(device):
    assert scale_block_supported((128, 128)) and scale_block_supported((16, 48))
    assert not scale_block_supported((16, 24))
    gate_up, down, scales = _fp8_experts(2, 48, 16, (16, 24), device)
    x = torch.randn(1, 48, device=device)
    one = torch.zeros(1, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="scale blocks of 24 columns"):
        fused_expert_pairs(x, one, one, one.float(), gate_up, down, scales=scales)
