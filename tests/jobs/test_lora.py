"""LoRA adapters: a fresh adapter is a no-op, only adapters train, PEFT-format save/load, merge."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeray.model
from moeray.model.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, LoraLinear, apply_lora,
                              load_adapter, lora_state_dict, merge_lora, save_adapter)
from moeray.model import ModelArgs
from moeray.model.checkpoint import save_checkpoint
from moeray.model.layers import Linear

# Attention, a dense MLP (layer 0), shared experts (MoE layers) and the head are all covered.
TARGETS = ["q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "lm_head"]
RANK, ALPHA = 4, 8.0


def base_model():
    return moeray.model.build(ModelArgs.preset("tiny"), seed=0)


def input_ids():
    return torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids())


def perturb_adapters(model, seed: int = 2):
    """Give every lora_B non-zero values so the adapter actually changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.weight.normal_(0.0, 0.05, generator=gen)


def adapted_model():
    model = base_model()
    apply_lora(model, TARGETS, RANK, ALPHA, dropout=0.0)
    perturb_adapters(model)
    return model


def test_fresh_adapter_changes_nothing_and_only_lora_trains():
    reference = logits(base_model())
    model = base_model()
    wrapped = apply_lora(model, TARGETS, RANK, ALPHA, dropout=0.1)

    assert "model.layers.0.self_attn.q_a_proj" in wrapped
    assert "model.layers.0.mlp.gate_proj" in wrapped
    assert "model.layers.1.mlp.shared_experts.up_proj" in wrapped
    assert "lm_head" in wrapped
    assert torch.equal(logits(model), reference)  # lora_B starts at zero

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * len(wrapped)

    perturb_adapters(model)
    assert not torch.allclose(logits(model), reference)


def test_wrapped_layer_exposes_base_weight_without_registering_it_twice():
    model = base_model()
    apply_lora(model, ["kv_b_proj"], RANK, ALPHA)
    layer = model.model.layers[0].self_attn.kv_b_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, Linear)
    assert layer.weight is layer.base_layer.weight and layer.bias is None
    names = {name for name, _ in model.named_parameters() if "layers.0.self_attn.kv_b_proj" in name}
    assert names == {f"model.layers.0.self_attn.kv_b_proj.{n}.weight" for n in ("base_layer", "lora_A", "lora_B")}


def test_same_seed_gives_same_adapter():
    first, second = base_model(), base_model()
    apply_lora(first, ["o_proj"], RANK, ALPHA, seed=5)
    apply_lora(second, ["o_proj"], RANK, ALPHA, seed=5)
    for (key, a), b in zip(lora_state_dict(first).items(), lora_state_dict(second).values()):
        assert torch.equal(a, b), key


def test_sgd_step_changes_only_lora_weights():
    model = base_model().train()
    apply_lora(model, TARGETS, RANK, ALPHA, dropout=0.1)
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(input_ids())
    loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).mean()
    loss.backward()
    optimizer.step()

    for name, p in model.named_parameters():
        if name in frozen_before:
            assert p.grad is None, name
            assert torch.equal(p, frozen_before[name]), name
    # With lora_B at zero only B receives a gradient on the first step (dA = B^T ... = 0).
    changed = [name for name, p in model.named_parameters() if name in lora_before
               and not torch.equal(p, lora_before[name])]
    assert changed and all(".lora_B." in name for name in changed)


def test_save_and_load_adapter_round_trip(tmp_path):
    model = adapted_model()
    expected = logits(model)
    save_adapter(model, tmp_path, "deepseek-ai/tiny", RANK, ALPHA, 0.05, TARGETS)

    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["lora_dropout"] == 0.05
    assert config["target_modules"] == TARGETS and config["base_model_name_or_path"] == "deepseek-ai/tiny"
    assert config["bias"] == "none" and config["use_dora"] is False and config["modules_to_save"] is None

    saved = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight" in saved
    assert "base_model.model.lm_head.lora_B.weight" in saved
    hidden = ModelArgs.preset("tiny").hidden_size
    assert saved["base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight"].shape == (RANK, hidden)

    fresh = base_model()
    loaded_config = load_adapter(fresh, tmp_path)
    assert loaded_config["r"] == RANK
    assert torch.equal(logits(fresh), expected)


def test_merge_matches_adapter_and_round_trips_as_plain_checkpoint(tmp_path):
    model = adapted_model()
    expected = logits(model)
    merge_lora(model)

    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert isinstance(model.lm_head, Linear)
    assert not any("lora_" in name for name in model.state_dict())
    merged = logits(model)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)

    save_checkpoint(model, tmp_path, model.args)
    reloaded = moeray.model.load(tmp_path, progress=False)
    torch.testing.assert_close(logits(reloaded), merged, rtol=0, atol=0)


def test_unknown_target_module_is_named():
    model = base_model()
    with pytest.raises(ValueError, match=r"target_modules \['foo'\] match no module.*q_a_proj"):
        apply_lora(model, ["q_a_proj", "foo"], RANK, ALPHA)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing half-applied


def test_wrong_shape_tensor_names_tensor_and_file(tmp_path):
    save_adapter(adapted_model(), tmp_path, "tiny", RANK, ALPHA, 0.0, TARGETS)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    tensors[key] = torch.zeros(RANK + 1, tensors[key].shape[1])
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS)

    model = base_model()
    reference = logits(model)
    with pytest.raises(AdapterError, match=rf"{key} in .*{ADAPTER_WEIGHTS} has shape \(5, "):
        load_adapter(model, tmp_path)
    # A failed load leaves the model untouched, trainable again.
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model), reference)


def test_tensor_for_unwrapped_module_is_named(tmp_path):
    save_adapter(adapted_model(), tmp_path, "tiny", RANK, ALPHA, 0.0, TARGETS)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["q_a_proj"]}))
    with pytest.raises(AdapterError, match=r"tensor base_model\.model\.\S+ in \S+ does not match"):
        load_adapter(base_model(), tmp_path)


def test_missing_config_names_path(tmp_path):
    with pytest.raises(AdapterError, match=str(tmp_path / ADAPTER_CONFIG)):
        load_adapter(base_model(), tmp_path)


REMOVE = object()  # marks a key to delete from the written config


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"r": REMOVE}, "missing key 'r'"),
])
def test_bad_config_is_named(tmp_path, change, message):
    save_adapter(adapted_model(), tmp_path, "tiny", RANK, ALPHA, 0.0, TARGETS)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not REMOVE}
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=rf"{ADAPTER_CONFIG}: {message}"):
        load_adapter(base_model(), tmp_path)


def test_save_refuses_config_that_contradicts_weights(tmp_path):
    with pytest.raises(ValueError, match="rank 4, alpha 8.0; save_adapter was told rank 8"):
        save_adapter(adapted_model(), tmp_path, "tiny", 8, ALPHA, 0.0, TARGETS)


ATTENTION_TARGETS = ["q_a_proj", "kv_b_proj", "o_proj", "lm_head"]


def _peft_logits(tmp_path, targets: list[str], dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(moeray's logits with an adapter on `targets`, PEFT's logits with the saved adapter on the
    transformers model of the same weights)."""
    import peft
    import transformers

    save_checkpoint(base_model(), tmp_path / "base", ModelArgs.preset("tiny"))
    model = base_model()
    apply_lora(model, targets, RANK, ALPHA, dropout=0.0)
    perturb_adapters(model)
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), RANK, ALPHA, dropout, targets)
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert config.r == RANK and config.lora_alpha == ALPHA and set(config.target_modules) == set(targets)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    with torch.no_grad():
        return logits(model.eval()), reference(input_ids()).logits


def test_peft_reads_the_adapter(tmp_path):
    """PEFT itself loads the folder onto the transformers model of the same weights and agrees."""
    ours, theirs = _peft_logits(tmp_path, ATTENTION_TARGETS, dropout=0.05)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(base_model()), theirs, atol=1e-3)  # the adapter really applied


def test_peft_reads_an_adapter_on_mlp_projections(tmp_path):
    """Adapters on the dense MLP and the shared experts (moeray does not adapt routed experts) load in
    PEFT >= 0.22; earlier releases mapped these names onto the fused routed-expert parameters only."""
    ours, theirs = _peft_logits(tmp_path, ["gate_proj", "up_proj", "down_proj"], dropout=0.0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
