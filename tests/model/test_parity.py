"""moeray's logits equal transformers' DeepseekV2/V3 on random tiny checkpoints (float32)."""

from __future__ import annotations

import pytest
import torch

import moeray.model
from support import write_hf_checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

VARIANTS = {
    "v3-grouped-sigmoid": ("v3", {}),
    "v3-no-q-lora-yarn-halves": ("v3", {"q_lora_rank": None, "rope_interleave": False,
                                        "rope_parameters": {**YARN, "rope_theta": 10000.0}}),
    "v3-two-dense-layers-yarn": ("v3", {"first_k_dense_replace": 2, "num_hidden_layers": 4,
                                        "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                            "rope_theta": 50000.0}}),
    "v3-ungrouped-unnormalised": ("v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False,
                                         "num_experts_per_tok": 3}),
    "v2-lite-softmax-greedy": ("v2", {"q_lora_rank": None}),
    "v2-group-limited-yarn": ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                     "routed_scaling_factor": 1.5,
                                     "rope_parameters": {**YARN, "rope_theta": 10000.0}}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    kind, overrides = VARIANTS[variant]
    reference = write_hf_checkpoint(tmp_path, kind, seed=len(variant), **overrides)
    model = moeray.model.load(tmp_path)

    input_ids = torch.randint(0, reference.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = model(input_ids)
    # A meaningful comparison needs logits well away from zero.
    assert expected.std() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_yarn_changes_the_model(tmp_path):
    """Guard: the YaRN variants really exercise YaRN (their logits differ from plain RoPE)."""
    plain = write_hf_checkpoint(tmp_path / "plain", "v3", seed=3)
    scaled = write_hf_checkpoint(tmp_path / "yarn", "v3", seed=3, rope_parameters={**YARN, "rope_theta": 10000.0})
    ids = torch.arange(60)[None] % 200
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, scaled(ids).logits, atol=1e-3)
        ours = moeray.model.load(tmp_path / "yarn")(ids)
    torch.testing.assert_close(ours, scaled(ids).logits, atol=1e-4, rtol=1e-4)
