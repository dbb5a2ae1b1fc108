"""LoRA adapters served beside the base model in one engine: each request runs through its own
adapter (kv_b_proj included, which the absorbed decode path reads directly), base and adapter
requests batch together, and the prefix cache never shares latents across adapters."""

import pytest
import torch

import moeray.model
from moeray import SamplingParams
from moeray.engine import Engine, EngineConfig, InvalidRequestError
from moeray.model.lora import AdapterError, merged_variant
from moeray.model.tokenizer import Tokenizer
from support import moeray_greedy, write_random_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 9, 17, 33, 2, 8, 8, 40, 41, 42, 43, 44, 45], [7, 3, 11], [5, 9, 17, 33, 2, 8, 8, 40, 41, 42, 43]]


@pytest.fixture(scope="module")
def setup(hf_folder, tmp_path_factory):
    folder = hf_folder[0]
    adapter_dir = tmp_path_factory.mktemp("adapter")
    reference = write_random_adapter(folder, adapter_dir, seed=4)
    base = moeray.model.load(folder)
    return folder, adapter_dir, reference, base


def _run(engine, requests):
    """requests: [(request id, prompt, adapter)] all queued at once; returns id -> output token ids."""
    for request_id, prompt, adapter in requests:
        engine.add_request(request_id, prompt, GREEDY, adapter)
    outputs = {request_id: [] for request_id, _, _ in requests}
    while engine.has_unfinished:
        for out in engine.step():
            outputs[out.request_id] += out.outputs[0].token_ids if out.outputs else []
    return outputs


def test_merged_variant_shares_untouched_weights_and_leaves_the_base_alone(setup):
    folder, adapter_dir, reference, base = setup
    before = {name: t.clone() for name, t in base.state_dict().items()}
    variant = merged_variant(base, adapter_dir)
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # base values unchanged
    variant_state = variant.state_dict()
    changed = {n for n, t in base.state_dict().items() if variant_state[n].data_ptr() != t.data_ptr()}
    assert changed and all(n.rsplit(".", 2)[-2] in ("q_b_proj", "kv_b_proj", "o_proj", "down_proj") for n in changed)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(variant(ids), reference(ids), rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_each_model_alone(setup):
    folder, adapter_dir, reference, base = setup
    tokenizer = Tokenizer.from_pretrained(folder)
    config = EngineConfig(max_model_len=128, block_size=4, num_cache_blocks=256)
    engine = Engine(base, tokenizer, config, adapters={"tuned": merged_variant(base, adapter_dir)})
    requests = [(f"{kind}-{i}", prompt, adapter) for i, prompt in enumerate(PROMPTS)
                for kind, adapter in (("base", None), ("tuned", "tuned"))]
    outputs = _run(engine, requests)
    for i, prompt in enumerate(PROMPTS):
        assert outputs[f"tuned-{i}"] == moeray_greedy(reference, prompt, 8)
        assert outputs[f"base-{i}"] == moeray_greedy(base, prompt, 8)
    assert outputs["tuned-0"] != outputs["base-0"]  # the adapter really changes the output
    # Prompts 0 and 2 share three full blocks, but only within the same adapter.
    later = _run(engine, [("again-base", PROMPTS[2], None), ("again-tuned", PROMPTS[2], "tuned")])
    assert later["again-base"] == outputs["base-2"] and later["again-tuned"] == outputs["tuned-2"]
    assert engine.stats().cache.usage == 0.0


def test_unknown_adapter_and_mismatched_adapter_are_named(setup, tmp_path):
    folder, adapter_dir, _, base = setup
    engine = Engine(base, Tokenizer.from_pretrained(folder), EngineConfig(max_model_len=64))
    with pytest.raises(InvalidRequestError, match="no adapter named 'absent'") as err:
        engine.add_request("x", [1, 2, 3], GREEDY, "absent")
    assert err.value.param == "model"

    other = moeray.model.build(moeray.model.ModelArgs.preset("tiny"))  # another shape entirely
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        merged_variant(other, adapter_dir)
