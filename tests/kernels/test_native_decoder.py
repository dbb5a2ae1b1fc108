"""The native decoder (one C call per step, token ids to logits, any number of sequences)
computes what the model's torch path computes, whatever the batch and the thread count."""

import random

import pytest
import torch

from moeray.kernels.policy import KernelPolicy, using
import moeray.model
from moeray.engine.attention import AttentionMetadata, StepAttention
from moeray.engine.cache import LatentCache
from moeray.kernels import cpu
from moeray.kernels.cpu import decoder
from moeray.model import ModelArgs

pytestmark = pytest.mark.skipif(cpu.library() is None, reason=f"no CPU kernels: {cpu.unavailable_reason()}")

FLAVOURS = {
    # the default: q LoRA, sigmoid scores, noaux_tc group routing, interleaved rope, a shared expert
    "v3": {},
    # DeepSeek-V2-Lite's kind: plain q_proj, softmax, greedy top-k, halves rope, no normalisation
    "v2": dict(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
               norm_topk_prob=False, rope_interleave=False, routed_scaling_factor=1.5),
    "group-limited-no-shared": dict(scoring_func="softmax", topk_method="group_limited_greedy",
                                    n_shared_experts=0, num_hidden_layers=2),
    # sizes that are not multiples of a panel's 32 rows; 10 heads: the attention's head groups of 8 and 2, over a latent of 520 (not a vector multiple)
    "wide": dict(hidden_size=576, intermediate_size=1100, moe_intermediate_size=600, num_hidden_layers=2,
                 q_lora_rank=520, kv_lora_rank=520, num_attention_heads=10),
}
BLOCK = 4


BLOCKS_PER_SEQ = 16  # sequence b owns cache blocks b * 16 ... (up to 64 positions)


def build(flavour: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    args = ModelArgs(**FLAVOURS[flavour])
    model = moeray.model.build(args, seed=seed)
    with torch.no_grad():  # larger weights than the default 0.02 so routing and attention are not flat
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(4)
        for layer in model.model.layers:
            bias = getattr(layer.mlp, "gate", None) and layer.mlp.gate.e_score_correction_bias
            if bias is not None:
                bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    model = model.to(dtype)
    for layer in model.model.layers:  # routers stay float32 in a bfloat16 model, as moeray.model.load keeps them
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.float()
    return model, args


def decode_step(args: ModelArgs, lengths: list[int], seed: int = 0, dtype: torch.dtype = torch.float32):
    """A cache whose earlier keys are random, and one decode per sequence: sequence b's new token
    sits at position lengths[b] - 1. Returns (cache, torch metadata, token ids, positions, tables)."""
    gen = torch.Generator().manual_seed(seed)
    cache = LatentCache(args, num_blocks=BLOCKS_PER_SEQ * len(lengths), block_size=BLOCK, dtype=dtype)
    for layer in cache.layers:
        layer.copy_(torch.randn(layer.shape, generator=gen))
    tables = [[b * BLOCKS_PER_SEQ + i for i in range(BLOCKS_PER_SEQ)] for b in range(len(lengths))]
    slots = [[b * BLOCKS_PER_SEQ * BLOCK + p for p in range(n)] for b, n in enumerate(lengths)]
    longest = max(lengths)
    decode_slots = torch.tensor([s + [0] * (longest - len(s)) for s in slots])
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])[:, None, :]
    meta = AttentionMetadata(torch.tensor([s[-1] for s in slots]), len(lengths), decode_slots, mask, [])
    token_ids = torch.randint(2, args.vocab_size, (len(lengths),), generator=gen)
    positions = torch.tensor(lengths) - 1
    return cache, meta, token_ids, positions, tables


def native_step(native, token_ids, positions, tables):
    return native.step(token_ids.tolist(), positions.tolist(), list(range(len(tables))), tables, BLOCK)


def routed_counts(model) -> list[list[int]]:
    return [layer.mlp.routed_tokens.tolist() for layer in model.model.layers if hasattr(layer.mlp, "routed_tokens")
            and layer.mlp.routed_tokens is not None]


def torch_path(model, cache, meta, token_ids, positions):
    with using(KernelPolicy.torch_only()), torch.inference_mode():
        return model.logits(model.forward_tokens(token_ids, positions, StepAttention(cache, meta))).float()


def lengths_of(batch: int) -> list[int]:
    rng = random.Random(batch)
    return [rng.randint(1, 4 * BLOCKS_PER_SEQ) for _ in range(batch)]


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("lengths", [[1], [9], [3, 17, 1, 30]])
def test_native_step_equals_the_torch_path_in_states_cache_and_routing(flavour, lengths):
    check_step(*build(flavour), lengths)


@pytest.mark.parametrize("batch", [1, 3, 8, 17, 64])
def test_every_batch_size_equals_the_torch_path(batch):
    check_step(*build("v3"), lengths_of(batch))


def check_step(model, args, lengths, atol=1e-4):
    cache, meta, token_ids, positions, tables = decode_step(args, lengths)
    reference_cache = decode_step(args, lengths)[0]
    native = decoder.prepare(model, cache)
    assert native is not None
    before = routed_counts(model)

    logits = native_step(native, token_ids, positions, tables)
    native_counts = routed_counts(model)
    expected = torch_path(model, reference_cache, meta, token_ids, positions)

    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    for written, reference in zip(cache.layers, reference_cache.layers):
        torch.testing.assert_close(written, reference, atol=1e-5, rtol=1e-5)
    # Each path counted the step's routed tokens once, to the same experts.
    step_native = [[a - b for a, b in zip(n, o)] for n, o in zip(native_counts, before)]
    step_torch = [[a - b for a, b in zip(t, n)] for t, n in zip(routed_counts(model), native_counts)]
    assert step_native == step_torch
    assert all(sum(layer) == len(lengths) * args.num_experts_per_tok for layer in step_native)


@pytest.mark.parametrize("flavour", ["v3", "wide"])
def test_other_builds_of_the_kernels_run_the_same_step(flavour, kernel_variant):
    """512-bit vectors and the portable build (see tests/conftest.py; the portable one also takes
    the bfloat16 path without AVX512_BF16) against the torch path."""
    check_step(*build(flavour), [3, 17, 1, 30])
    check_bf16_step(*build(flavour, dtype=torch.bfloat16), [3, 17, 1, 30])


def test_a_sequence_gets_the_same_logits_alone_and_in_any_batch():
    model, args = build("v3")
    lengths = lengths_of(17)
    cache, _, token_ids, positions, tables = decode_step(args, lengths)
    native = decoder.prepare(model, cache)
    together = native_step(native, token_ids, positions, tables)
    for b in range(len(lengths)):
        alone = native.step([token_ids[b].item()], [positions[b].item()], [0], [tables[b]], BLOCK)
        assert torch.equal(alone[0], together[b])


def test_native_step_does_not_depend_on_the_thread_count():
    model, args = build("v3")
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(2, threads), 3):
            torch.set_num_threads(count)
            cache, _, token_ids, positions, tables = decode_step(args, lengths_of(8))
            results.append(native_step(decoder.prepare(model, cache), token_ids, positions, tables))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


BF16_TOLERANCE = 0.1  # on logits of magnitude ~3: bf16 rounds every input and weight to 8 bits


def check_bf16_step(model, args, lengths):
    cache, meta, token_ids, positions, tables = decode_step(args, lengths, dtype=torch.bfloat16)
    reference_cache = decode_step(args, lengths, dtype=torch.bfloat16)[0]
    native = decoder.prepare(model, cache)
    assert native is not None
    logits = native_step(native, token_ids, positions, tables)
    expected = torch_path(model, reference_cache, meta, token_ids, positions)
    assert (logits - expected).abs().max().item() < BF16_TOLERANCE * expected.abs().max().item()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.75


@pytest.mark.parametrize("flavour", ["v2", "v3"])
def test_bf16_native_step_is_close_to_torch_bf16(flavour):
    check_bf16_step(*build(flavour, dtype=torch.bfloat16), lengths_of(8))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_adapter_maps_every_weight(flavour):
    model, _ = build(flavour)
    mapped = decoder.decoder_weights(model).names
    every = {name for name, _ in model.named_parameters()}
    assert every <= mapped
    model.model.layers[0].self_attn.register_parameter("new_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(decoder.NotApplicable, match="model.layers.0.self_attn.new_scale"):
        decoder.decoder_weights(model)


def test_refresh_copies_changed_weights_in():
    model, args = build("v3")
    cache, meta, token_ids, positions, tables = decode_step(args, [5, 9])
    native = decoder.prepare(model, cache)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.9)
    native.refresh(model)
    logits = native_step(native, token_ids, positions, tables)
    expected = torch_path(model, decode_step(args, [5, 9])[0], meta, token_ids, positions)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_models_it_does_not_implement_are_not_prepared():
    args = ModelArgs(attention_bias=True)
    model = moeray.model.build(args)
    assert decoder.prepare(model, LatentCache(args, 4, BLOCK, torch.float32)) is None
    model = moeray.model.build(ModelArgs(), dtype=torch.float16)
    assert decoder.prepare(model, LatentCache(ModelArgs(), 4, BLOCK, torch.float16)) is None
