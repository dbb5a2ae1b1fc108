"""Shared test helpers: tiny random checkpoints written by transformers (the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_V3 = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
    q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=512,
    initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2,
)

TINY_V2 = dict(TINY_V3, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
               routed_scaling_factor=1.0)


def hf_model(kind: str = "v3", seed: int = 0, **overrides):
    """A randomly initialised transformers DeepseekV{2,3}ForCausalLM (float32, eval mode)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    if kind == "v3":
        config = DeepseekV3Config(**{**TINY_V3, **overrides})
        model = DeepseekV3ForCausalLM(config)
    elif kind == "v2":
        config = DeepseekV2Config(**{**TINY_V2, **overrides})
        model = DeepseekV2ForCausalLM(config)
    else:
        raise ValueError(kind)
    return model.float().eval()


def write_hf_checkpoint(folder: Path, kind: str = "v3", seed: int = 0, **overrides):
    """Save a random transformers model in the Hugging Face layout; returns the model."""
    model = hf_model(kind, seed, **overrides)
    if kind == "v3":
        # Non-zero correction bias so the aux-loss-free choice path is exercised.
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.copy_(torch.rand(gate.e_score_correction_bias.shape, generator=gen) * 0.1)
    model.save_pretrained(folder)
    return model
