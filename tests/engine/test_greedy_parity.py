"""Greedy outputs equal transformers' generate, whatever the engine does to batch them."""

import pytest

from moeray import LLM, SamplingParams
from support import hf_greedy, write_hf_model_folder

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

CONFIGS = {
    "default": {},
    "chunked-prefill-small-budget": {"max_num_batched_tokens": 8, "block_size": 4},
    "no-prefix-no-chunking": {"enable_prefix_caching": False, "enable_chunked_prefill": False,
                              "max_num_batched_tokens": 512, "max_model_len": 512},
    "forced-preemption-tiny-cache": {"num_cache_blocks": 24, "block_size": 4, "enable_prefix_caching": False},
}


@pytest.fixture(scope="module")
def expected(hf_folder, prompts):
    _, reference = hf_folder
    return [hf_greedy(reference, p, MAX_TOKENS) for p in prompts]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_matches_transformers(hf_folder, prompts, expected, name):
    llm = LLM(hf_folder[0], **CONFIGS[name])
    results = llm.generate(prompts, GREEDY)
    assert [r.outputs[0].token_ids for r in results] == expected
    assert all(r.outputs[0].finish_reason == "length" for r in results)
    stats = llm.engine.stats()
    if name == "forced-preemption-tiny-cache":
        assert stats.preemptions_total > 0
    assert stats.cache.used_blocks == 0


def test_prefix_caching_hits_and_keeps_outputs(hf_folder, prompts, expected):
    llm = LLM(hf_folder[0], block_size=4)
    shared = prompts[5][:32]
    # Same 32-token prefix, different tails: the second wave reuses the first wave's blocks.
    variants = [shared + p[:7] for p in prompts[:3]]
    first = llm.generate(variants[:1], GREEDY)
    second = llm.generate(variants, GREEDY)
    assert second[0].num_cached_tokens == 36  # all full blocks of the repeated 37-token prompt
    assert second[1].num_cached_tokens == second[2].num_cached_tokens == 32
    assert second[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert [r.outputs[0].token_ids for r in second] == [hf_greedy(hf_folder[1], v, MAX_TOKENS) for v in variants]
    # The original prompts, after all that caching, still match.
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)] == expected


def test_deepseek_v2_checkpoint(tmp_path, prompts):
    reference = write_hf_model_folder(tmp_path, "v2", seed=4, q_lora_rank=None)
    llm = LLM(tmp_path, max_num_batched_tokens=16, block_size=8)
    results = llm.generate(prompts[:4], GREEDY)
    assert [r.outputs[0].token_ids for r in results] == [hf_greedy(reference, p, MAX_TOKENS) for p in prompts[:4]]
