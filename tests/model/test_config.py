import json

import pytest

from moeray.model import ConfigError, ModelArgs


def test_small_preset_is_about_280m_parameters():
    small = ModelArgs.preset("small")
    assert 270e6 < small.num_parameters() < 290e6
    assert (small.hidden_size, small.num_hidden_layers, small.n_routed_experts) == (1024, 8, 32)


def test_reference_presets_match_published_sizes():
    assert round(ModelArgs.preset("v3-671b").num_parameters() / 1e9) == 671
    assert round(ModelArgs.preset("v2-lite").num_parameters() / 1e9, 1) == 15.7
    assert ModelArgs.preset("v3-671b").cache_numbers_per_token() == 576


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        ModelArgs.preset("huge")


def test_hf_round_trip():
    for name in ("tiny", "small", "v2-lite", "v3-671b"):
        args = ModelArgs.preset(name)
        assert ModelArgs.from_hf_config(json.loads(json.dumps(args.to_hf_config()))) == args


def test_legacy_rope_scaling_equals_rope_parameters():
    base = ModelArgs.preset("tiny").to_hf_config()
    del base["rope_parameters"]
    yarn = {"factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0,
            "beta_fast": 32, "beta_slow": 1}
    legacy = ModelArgs.from_hf_config({**base, "rope_theta": 10000, "rope_scaling": {"type": "yarn", **yarn}})
    modern = ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000, **yarn}})
    assert legacy == modern and legacy.rope_yarn.factor == 40
    # mscale_all_dim feeds the softmax correction: 0.1 * ln(40) + 1 squared.
    assert legacy.softmax_scale == pytest.approx(48 ** -0.5 * (0.1 * 3.6888794541 + 1) ** 2)


def test_v2_defaults_to_softmax_greedy():
    config = ModelArgs.preset("tiny").to_hf_config()
    for key in ("scoring_func", "topk_method", "norm_topk_prob", "n_group", "topk_group"):
        config.pop(key)
    config["model_type"] = "deepseek_v2"
    args = ModelArgs.from_hf_config(config)
    assert (args.scoring_func, args.topk_method, args.norm_topk_prob) == ("softmax", "greedy", False)


@pytest.mark.parametrize("change, key", [
    ({"some_new_knob": 3}, "some_new_knob"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"topk_method": "random"}, "topk_method"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"rope_parameters": {"rope_type": "dynamic"}}, "rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2, "wobble": 1}}, "rope_parameters.wobble"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method"),
    ({"model_type": "llama"}, "model_type"),
])
def test_bad_values_name_the_key(change, key):
    config = {**ModelArgs.preset("tiny").to_hf_config(), **change}
    with pytest.raises(ConfigError, match=f"'{key}'"):
        ModelArgs.from_hf_config(config)


def test_malformed_config_file_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 64,\n  "vocab_size": ,\n}')
    with pytest.raises(ConfigError, match=r"config\.json:3"):
        ModelArgs.from_file(path)


def test_mla_cache_is_much_smaller_than_full_kv():
    v3 = ModelArgs.preset("v3-671b")
    # 576 numbers vs 128 heads * (192 + 128): a 71x smaller cache.
    assert v3.full_kv_numbers_per_token() / v3.cache_numbers_per_token() > 70
