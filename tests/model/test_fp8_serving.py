"""An FP8 checkpoint served as FP8: `load(fp8="keep")` holds float8 weights and their block scales
(no full-precision copy), computes what the dequantised model computes, and serves through the
engine with the same greedy tokens. The reference path dequantises blockwise with the checkpoint
reader's arithmetic, so on CPU in float32 the two models agree to float rounding."""


import pytest
import torch
from safetensors.torch import load_file

import moeray.model
from moeray import LLM, SamplingParams
from moeray.kernels.fp8 import Fp8Linear, quantize_blocks
from moeray.model import ModelArgs
from moeray.model.checkpoint import save_checkpoint
from moeray.model.layers import Linear
from support import quantize_checkpoint, write_tiny_tokenizer

BLOCKS = [(128, 128), (16, 24)]


@pytest.fixture(scope="module", params=BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def fp8_folder(request, tmp_path_factory):
    args = ModelArgs.preset("tiny")
    folder = tmp_path_factory.mktemp("fp8")
    save_checkpoint(moeray.model.build(args, seed=3), folder, args)
    quantize_checkpoint(folder, request.param)
    write_tiny_tokenizer(folder)
    return folder, request.param


@pytest.fixture(scope="module")
def models(fp8_folder):
    folder, _ = fp8_folder
    return moeray.model.load(folder, fp8="keep"), moeray.model.load(folder, fp8="dequantize")


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_fp8_layers_hold_float8_weights_and_no_copy(fp8_folder, models):
    _, block = fp8_folder
    kept, dequantized = models
    fp8_layers = {n: m for n, m in kept.named_modules() if isinstance(m, Fp8Linear)}
    # Every projection but kv_b_proj (read directly by absorbed MLA); lm_head is not FP8 in V3.
    assert len(fp8_layers) == 3 * 4 + 3 + 2 * 3  # attention, dense MLP, shared experts
    assert all(layer.weight.dtype == torch.float8_e4m3fn and layer.block == block for layer in fp8_layers.values())
    for layer in kept.model.layers:
        assert type(layer.self_attn.kv_b_proj) is Linear and layer.self_attn.kv_b_proj.weight.dtype == torch.float32
    experts = kept.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
    assert experts.down_proj.stride(1) == 1  # still column-major per expert

    # Parameter bytes: each FP8 number costs 1 byte instead of 4, plus its float32 scales; nothing else.
    fp8_numbers = sum(p.numel() for p in kept.parameters() if p.dtype == torch.float8_e4m3fn)
    scale_bytes = sum(p.numel() * 4 for n, p in kept.named_parameters() if n.endswith("_scale_inv"))
    assert _bytes(kept) == _bytes(dequantized) - 3 * fp8_numbers + scale_bytes
    assert _bytes(kept) < 0.45 * _bytes(dequantized)
    # No module keeps a dequantised tensor as a plain attribute either.
    assert not any(isinstance(v, torch.Tensor) for m in kept.modules() for v in vars(m).values())


def test_logits_equal_the_dequantized_model(models):
    kept, dequantized = models
    ids = torch.randint(0, 1024, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), dequantized(ids), rtol=1e-5, atol=1e-5)


def test_auto_keeps_fp8_only_on_cuda(fp8_folder):
    folder, _ = fp8_folder
    auto = moeray.model.load(folder)  # CPU: today's dequantised model
    assert not any(isinstance(m, Fp8Linear) for m in auto.modules())
    assert auto.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32
    with pytest.raises(ValueError, match="fp8 must be one of auto, keep, dequantize"):
        moeray.model.load(folder, fp8="yes")


def test_engine_greedy_output_equals_dequantized_model(fp8_folder):
    folder, _ = fp8_folder
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (1, 6, 17)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    options = dict(block_size=4, max_num_batched_tokens=16, max_model_len=64, max_num_seqs=4)

    def tokens(fp8: str):
        llm = LLM(folder, fp8=fp8, **options)  # the engine option, as the serve settings pass it
        fp8_layers = sum(isinstance(m, Fp8Linear) for m in llm.engine.model.modules())
        return [r.outputs[0].token_ids for r in llm.generate(prompts, greedy)], fp8_layers

    want, none = tokens("dequantize")
    got, some = tokens("keep")
    assert none == 0 and some > 0
    assert got == want




def test_quantize_blocks_inverts_dequantize_with_partial_edges():
    from moeray.kernels.fp8 import dequantize_blocks

    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(2)) * 3
    q, scale_inv = quantize_blocks(weight, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2)
    assert (dequantize_blocks(q, scale_inv) - weight).abs().max() < 0.07 * weight.abs().max()


def test_saved_fp8_model_reloads_as_the_same_checkpoint(fp8_folder, models, tmp_path):
    folder, _ = fp8_folder
    kept, _ = models
    save_checkpoint(kept, tmp_path / "again", kept.args)
    again = load_file(tmp_path / "again" / "model.safetensors")
    original = load_file(folder / "model.safetensors")
    # Hugging Face names, expert scales split per expert; kv_b_proj was held (and is saved) dequantised.
    kv_b_scales = {n for n in original if n.endswith("kv_b_proj.weight_scale_inv")}
    assert len(kv_b_scales) == 3 and sorted(again) == sorted(set(original) - kv_b_scales)
    for name in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.2.self_attn.o_proj.weight"):
        assert again[name].dtype == torch.float8_e4m3fn
        assert torch.equal(again[name].view(torch.uint8), original[name].view(torch.uint8))
        assert torch.equal(again[name + "_scale_inv"], original[name + "_scale_inv"])
