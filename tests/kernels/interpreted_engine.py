"""End to end: greedy generation with every Triton path taken (fused MoE for the routed experts,
paged MLA decode) gives the same tokens as the torch path, prefill chunks and batched decodes
of different lengths included."""

import torch

from moeray import LLM, SamplingParams, kernels
from moeray.kernels.triton import fused_moe
from support import write_hf_model_folder


def test_greedy_tokens_equal_with_triton_paths(device, tmp_path, monkeypatch):
    write_hf_model_folder(tmp_path, "v3", seed=11)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (1, 7, 19)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    # No prefix caching: both runs then compute the same prefill chunks.
    llm = LLM(tmp_path, device=device, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)

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
