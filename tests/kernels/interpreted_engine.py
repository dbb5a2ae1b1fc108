"""End to end: greedy generation with every Triton path taken (fused MoE for the routed experts,
paged MLA decode) gives the same tokens as the torch path, prefill chunks and batched decodes
of different lengths included; likewise for an FP8 checkpoint served in FP8 (the block-scaled
GEMM for the projections, the fused MoE dequantising FP8 experts)."""

import json

import torch
from safetensors.torch import load_file, save_file

import moeray.model
from moeray import LLM, SamplingParams, kernels
from moeray.kernels.fp8 import quantize_blocks
from moeray.kernels.policy import KernelPolicy
from moeray.kernels.triton import fp8_gemm, fused_moe
from moeray.model.checkpoint import save_checkpoint
from support import write_hf_model_folder, write_tiny_tokenizer


def test_greedy_tokens_equal_with_triton_paths(device, tmp_path, monkeypatch):
    write_hf_model_folder(tmp_path, "v3", seed=11)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (1, 7, 19)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    # No prefix caching: both runs then compute the same prefill chunks. Under the interpreter the
    # tensors are on the CPU, where decodes would go to the native decoder: keep them on torch's path.
    llm = LLM(tmp_path, device=device, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False,
              kernels=KernelPolicy(native_decoder=False))

    monkeypatch.setattr(kernels, "use_triton", lambda _: False)
    want = [r.outputs[0].token_ids for r in llm.generate(prompts, greedy)]
    calls = {"moe": 0, "decode": 0}
    monkeypatch.setattr(kernels, "use_triton", lambda _: True)
    monkeypatch.setattr(fused_moe, "fused_expert_pairs", _counting(fused_moe.fused_expert_pairs, calls, "moe"))
    monkeypatch.setattr(kernels, "paged_latent_decode", _counting(kernels.paged_latent_decode, calls, "decode"))
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, greedy)]
    assert got == want
    assert calls["moe"] > 0 and calls["decode"] > 0


def _counting(fn, calls, key):
    def counted(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)
    return counted


def test_fp8_model_greedy_tokens_equal_with_triton_paths(device, tmp_path, monkeypatch):
    source, folder = tmp_path / "hf", tmp_path / "fp8"
    write_hf_model_folder(source, "v3", seed=12)
    model = moeray.model.load(source)
    save_checkpoint(model, folder, model.args)  # per-expert names, as V3 ships them
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n, t in tensors.items() if t.dim() == 2 and "proj" in n]:
        tensors[name], tensors[name + "_scale_inv"] = quantize_blocks(tensors[name], (128, 128))
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    write_tiny_tokenizer(folder)

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (1, 9)]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(folder, device=device, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False,
              fp8="keep")
    assert llm.engine.model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn

    monkeypatch.setattr(kernels, "use_triton", lambda _: False)
    want = [r.outputs[0].token_ids for r in llm.generate(prompts, greedy)]
    calls = {"moe": 0, "gemm": 0}
    monkeypatch.setattr(kernels, "use_triton", lambda _: True)
    monkeypatch.setattr(fused_moe, "fused_expert_pairs", _counting(fused_moe.fused_expert_pairs, calls, "moe"))
    monkeypatch.setattr(fp8_gemm, "fp8_block_linear", _counting(fp8_gemm.fp8_block_linear, calls, "gemm"))
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, greedy)]
    assert got == want
    assert calls["moe"] > 0 and calls["gemm"] > 0
