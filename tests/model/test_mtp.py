"""The multi-token-prediction module: its forward against a transcription of DeepSeek-V3's
equations (section 2.2; transformers has no MTP to compare with), and its checkpoint tensors
under V3's names, FP8 included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from support import quantize_checkpoint, transcribed_mtp_logits, write_tiny_tokenizer

import moeray.model
from moeray.model import CheckpointError, ModelArgs, save_checkpoint
from moeray.model.mla import DenseCausalAttention

DEPTH = 2


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(num_nextn_predict_layers=DEPTH)
    torch.manual_seed(0)
    built = moeray.model.build(args, seed=3, mtp_depth=DEPTH)
    with torch.no_grad():  # norms away from 1 so that a missing or swapped norm shows
        for name, param in built.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return built


@torch.no_grad()
def test_the_forward_equals_the_papers_equations(model):
    tokens = torch.randint(3, model.args.vocab_size, (17,), generator=torch.Generator().manual_seed(1))
    expected = transcribed_mtp_logits(model, tokens, DEPTH)
    n = tokens.numel()
    hidden = model.forward_tokens(tokens, torch.arange(n), DenseCausalAttention(1, n))
    for depth in range(DEPTH):
        length = n - depth - 1
        hidden, head_input = model.mtp_forward(depth, hidden[:length], tokens[depth + 1:], torch.arange(depth + 1, n),
                                               DenseCausalAttention(1, length))
        logits = model.logits(head_input)
        assert logits.shape == (length, model.args.vocab_size)
        torch.testing.assert_close(logits, expected[depth], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_main_model_is_the_same_with_or_without_mtp_layers(model, tmp_path):
    save_checkpoint(model, tmp_path, model.args)
    without = moeray.model.load(tmp_path)
    tokens = torch.randint(3, model.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(without(tokens), model(tokens))
    assert not hasattr(without.model, "mtp_layers")


@torch.no_grad()
def test_a_checkpoint_keeps_the_mtp_weights_under_v3s_names(model, tmp_path):
    save_checkpoint(model, tmp_path, model.args)
    n = model.args.num_hidden_layers
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        names = set(saved.keys())
        # V3's layout: each MTP layer carries copies of the embedding and the head.
        torch.testing.assert_close(saved.get_tensor(f"model.layers.{n}.embed_tokens.weight"),
                                   model.model.embed_tokens.weight)
        torch.testing.assert_close(saved.get_tensor(f"model.layers.{n + 1}.shared_head.head.weight"),
                                   model.lm_head.weight)
    for depth in range(DEPTH):
        for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight", "mlp.experts.0.down_proj.weight",
                     "input_layernorm.weight"):
            assert f"model.layers.{n + depth}.{part}" in names
    assert not any("mtp_layers" in name for name in names)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == DEPTH

    loaded = moeray.model.load(tmp_path, mtp_depth=DEPTH)
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, original[name], msg=name)
    assert len(loaded.model.mtp_layers) == DEPTH


def test_loading_mtp_from_a_checkpoint_without_it_names_the_checkpoint(tmp_path):
    args = ModelArgs()
    save_checkpoint(moeray.model.build(args), tmp_path, args)
    assert moeray.model.mtp_depth_of(tmp_path) == 0
    with pytest.raises(CheckpointError, match="holds 0 multi-token-prediction layers"):
        moeray.model.load(tmp_path, mtp_depth=1)


@torch.no_grad()
def test_fp8_mtp_layers_load_dequantised_and_kept(model, tmp_path):
    save_checkpoint(model, tmp_path, model.args)
    write_tiny_tokenizer(tmp_path)
    quantize_checkpoint(tmp_path, (16, 16))
    n = model.args.num_hidden_layers
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert saved.get_tensor(f"model.layers.{n}.eh_proj.weight").dtype == torch.float8_e4m3fn
    dequantised = moeray.model.load(tmp_path, mtp_depth=DEPTH, fp8="dequantize")
    original = model.model.mtp_layers[0].eh_proj.weight
    torch.testing.assert_close(dequantised.model.mtp_layers[0].eh_proj.weight, original, atol=0.1 * original.abs().max(),
                               rtol=0.1)
    kept = moeray.model.load(tmp_path, mtp_depth=DEPTH, fp8="keep")
    assert kept.model.mtp_layers[0].eh_proj.weight.dtype == torch.float8_e4m3fn
    assert kept.model.mtp_layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
