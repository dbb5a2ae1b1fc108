"""Checkpoint folders: sharded, FP8 block-quantised, MTP layers, subsets, and clear errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeray.model
from moeray.model import CheckpointError, ModelArgs
from moeray.model.checkpoint import CheckpointReader, dequantize_fp8_blocks, save_checkpoint

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]):
    """Per-block absmax quantisation, as DeepSeek-V3 ships its weights."""
    rows, cols = weight.shape
    br, bc = block
    scale = torch.empty(math.ceil(rows / br), math.ceil(cols / bc))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def reference_dequant(q, scale, block):
    out = torch.empty(q.shape)
    br, bc = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = q[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float() * scale[i, j]
    return out


@pytest.fixture
def tiny(tmp_path):
    args = ModelArgs.preset("tiny")
    model = moeray.model.build(args, seed=7)
    folder = tmp_path / "tiny"
    save_checkpoint(model, folder, args)
    return args, model, folder


def test_dequantize_matches_block_formula_with_partial_edges():
    w = torch.randn(300, 200) * 3
    q, s = quantize_fp8_blocks(w, (128, 128))
    assert s.shape == (3, 2)
    torch.testing.assert_close(dequantize_fp8_blocks(q, s, (128, 128)), reference_dequant(q, s, (128, 128)),
                               rtol=0, atol=0)
    # FP8 keeps ~2 significant digits: the dequantised weights are close to the originals.
    assert (dequantize_fp8_blocks(q, s, (128, 128)) - w).abs().max() < 0.07 * w.abs().max()


def test_dequantize_rejects_wrong_scale_shape():
    q, s = quantize_fp8_blocks(torch.randn(130, 64), (128, 128))
    with pytest.raises(CheckpointError, match="scale shape"):
        dequantize_fp8_blocks(q, s[:1], (128, 128))


def _quantized_checkpoint(folder, out, block):
    """Quantise every 2-D projection weight of `folder` to FP8 in `out` (the test's own converter)."""
    tensors = load_file(folder / "model.safetensors")
    quantized = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and "proj" in name:
            q, s = quantize_fp8_blocks(tensor, block)
            quantized[name], quantized[name + "_scale_inv"] = q, s
        else:
            quantized[name] = tensor
    out.mkdir()
    save_file(quantized, out / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(config))
    return quantized


@pytest.mark.parametrize("block", [(128, 128), (16, 24)])
def test_fp8_checkpoint_loads_dequantized(tiny, tmp_path, block):
    args, model, folder = tiny
    quantized = _quantized_checkpoint(folder, tmp_path / "fp8", block)
    loaded = moeray.model.load(tmp_path / "fp8")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    expected = reference_dequant(quantized[name], quantized[name + "_scale_inv"], block)
    torch.testing.assert_close(loaded.state_dict()[name], expected, rtol=0, atol=0)
    expert = reference_dequant(quantized["model.layers.1.mlp.experts.3.up_proj.weight"],
                               quantized["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"], block)
    half = args.moe_intermediate_size
    torch.testing.assert_close(loaded.model.layers[1].mlp.experts.gate_up_proj[3, half:], expert, rtol=0, atol=0)
    # bf16 output dtype straight from FP8.
    assert moeray.model.load(tmp_path / "fp8", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_fp8_weight_without_scale_is_named(tiny, tmp_path):
    _, _, folder = tiny
    _quantized_checkpoint(folder, tmp_path / "fp8", (128, 128))
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight .*model\.safetensors"):
        moeray.model.load(tmp_path / "fp8")


def test_sharded_checkpoint_round_trip(tiny, tmp_path):
    args, model, _ = tiny
    save_checkpoint(model, tmp_path / "sharded", args, max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = moeray.model.load(tmp_path / "sharded")
    ids = torch.randint(0, args.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_bf16_load_keeps_router_in_float32(tiny):
    _, _, folder = tiny
    model = moeray.model.load(folder, dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 1024)


def test_mtp_layer_is_skipped_and_reported(tiny, capsys):
    args, model, folder = tiny
    tensors = load_file(folder / "model.safetensors")
    mtp = {f"model.layers.{args.num_hidden_layers}.{k[len('model.layers.1.'):]}": v.clone()
           for k, v in tensors.items() if k.startswith("model.layers.1.")}
    mtp[f"model.layers.{args.num_hidden_layers}.eh_proj.weight"] = torch.zeros(4, 4)
    save_file({**tensors, **mtp}, folder / "model.safetensors")
    moeray.model.load(folder)
    assert f"skipped {len(mtp)} tensors of layers >= {args.num_hidden_layers}" in capsys.readouterr().err


def test_missing_tensor_is_named(tiny):
    _, _, folder = tiny
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        moeray.model.load(folder)


def test_unexpected_and_misshaped_tensors_name_tensor_and_file(tiny):
    _, _, folder = tiny
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "model.layers.0.self_attn.rogue.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.rogue\.weight in .*model\.safetensors"):
        moeray.model.load(folder)
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight in .*model\.safetensors has shape \(7,\), the model expects \(128,\)"):
        moeray.model.load(folder)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        moeray.model.load(tmp_path)


def test_reader_loads_single_experts_from_both_layouts(tiny, tmp_path):
    args, model, folder = tiny
    experts = model.model.layers[2].mlp.experts
    gate_up, down = CheckpointReader(folder).routed_expert(2, 9)
    torch.testing.assert_close(gate_up, experts.gate_up_proj[9], rtol=0, atol=0)
    torch.testing.assert_close(down, experts.down_proj[9], rtol=0, atol=0)

    grouped = tmp_path / "grouped"
    grouped.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, grouped / "model.safetensors")
    (grouped / "config.json").write_text((folder / "config.json").read_text())
    gate_up, down = CheckpointReader(grouped).routed_expert(2, 9)
    torch.testing.assert_close(gate_up, experts.gate_up_proj[9], rtol=0, atol=0)
    # The grouped (transformers-5 in-memory) layout also loads as a whole model.
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(moeray.model.load(grouped)(ids), model(ids))
