"""The FP8 block-scaled GEMM equals dequantise-then-matmul (the torch reference, and the
checkpoint reader's dequantisation) with partial edge blocks on both N and K, one row, and
non-128 scale blocks; `Fp8Linear` loads V3-named tensors and runs through it."""

import pytest
import torch

from moeray import kernels
from moeray.kernels.fp8 import Fp8Linear, dequantize_blocks, fp8_block_linear_reference
from moeray.kernels.triton.fp8_gemm import fp8_block_linear
from moeray.model.checkpoint import dequantize_fp8_blocks


def _quantized(n, k, block, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 8).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) * 0.01 + 1e-3
    return weight.to(device), scale_inv.to(device)


# (rows M, out N, in K, scale block)
CASES = {
    "one-row-partial-edges": (1, 200, 150, (128, 128)),
    "decode-rows": (3, 130, 260, (128, 128)),
    "prefill-rows-odd": (45, 70, 96, (32, 32)),
    "rectangular-scale-blocks": (17, 50, 80, (16, 32)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_gemm_matches_dequantised_matmul(device, case, dtype):
    m, n, k, block = CASES[case]
    weight, scale_inv = _quantized(n, k, block, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = fp8_block_linear(x, weight, scale_inv, block, block_n=32, block_k=32)
    want = x.float() @ dequantize_blocks(weight, scale_inv, block).T
    assert got.dtype == dtype and got.shape == (m, n)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(fp8_block_linear_reference(x, weight, scale_inv, block).float(), want, **tol)


def test_dequantisation_agrees_with_the_checkpoint_reader(device):
    weight, scale_inv = _quantized(200, 150, (128, 128), device)
    torch.testing.assert_close(dequantize_blocks(weight, scale_inv), dequantize_fp8_blocks(weight, scale_inv, (128, 128)))


def test_wrong_scale_shape_names_the_shapes(device):
    weight, scale_inv = _quantized(200, 150, (128, 128), device)
    with pytest.raises(ValueError, match=r"scale_inv shape \(2, 1\).*expected \(2, 2\)"):
        fp8_block_linear(torch.randn(1, 150, device=device), weight, scale_inv[:, :1])


def test_fp8_linear_through_the_kernel(device, monkeypatch):
    weight, scale_inv = _quantized(96, 160, (128, 128), device, seed=2)
    layer = Fp8Linear(160, 96, device=device)
    layer.load_state_dict({"weight": weight, "weight_scale_inv": scale_inv})  # the V3 checkpoint names
    x = torch.randn(2, 5, 160, device=device)
    want = fp8_block_linear_reference(x.view(10, 160), weight, scale_inv).view(2, 5, 96)
    monkeypatch.setattr(kernels, "use_triton", lambda _: True)
    got = layer(x)
    assert layer.weight.dtype == torch.float8_e4m3fn and got.shape == (2, 5, 96)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
