"""The native decode stack (one C call per step, token ids to logits) computes what the model's
torch path computes."""

import pytest
import torch

import moeray.model
from moeray import kernels
from moeray.engine.attention import AttentionMetadata, StepAttention
from moeray.engine.cache import LatentCache
from moeray.engine.native_decode import MAX_TOKENS, NativeDecoder
from moeray.kernels import cpu
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
    # inner sizes above 512: row-major projections (the down projections are column-major anyway);
    # 10 heads: the attention's head groups of 8 and 2, over a latent of 520 (not a vector multiple)
    "wide": dict(hidden_size=576, intermediate_size=1100, moe_intermediate_size=600, num_hidden_layers=2,
                 q_lora_rank=520, kv_lora_rank=520, num_attention_heads=10),
}
BLOCK = 4


def build(flavour: str, seed: int = 0, prepare: bool = True):
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
    if prepare:
        kernels.prepare_for_decode(model)
    return model, args


def decode_step(args: ModelArgs, lengths: list[int], seed: int = 0):
    """A cache whose earlier keys are random, and the metadata of one decode per sequence: sequence
    b owns blocks b * 16 ..., its new token sits at position lengths[b] - 1."""
    gen = torch.Generator().manual_seed(seed)
    cache = LatentCache(args, num_blocks=16 * len(lengths), block_size=BLOCK, dtype=torch.float32)
    for layer in cache.layers:
        layer.copy_(torch.randn(layer.shape, generator=gen))
    slots = [[b * 16 * BLOCK + p for p in range(n)] for b, n in enumerate(lengths)]
    longest = max(lengths)
    decode_slots = torch.tensor([s + [0] * (longest - len(s)) for s in slots])
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])[:, None, :]
    meta = AttentionMetadata(torch.tensor([s[-1] for s in slots]), len(lengths), decode_slots, mask, [])
    token_ids = torch.randint(2, args.vocab_size, (len(lengths),), generator=gen)
    positions = torch.tensor(lengths) - 1
    return cache, meta, token_ids, positions, slots


def native_step(native, token_ids, positions, slots):
    return native.step(token_ids.tolist(), positions.tolist(), slots)


def routed_counts(model) -> list[list[int]]:
    return [layer.mlp.routed_tokens.tolist() for layer in model.model.layers if hasattr(layer.mlp, "routed_tokens")
            and layer.mlp.routed_tokens is not None]


def torch_path(model, cache, meta, token_ids, positions):
    kernels.set_enabled(False)
    try:
        with torch.inference_mode():
            return model.logits(model.forward_tokens(token_ids, positions, StepAttention(cache, meta)))
    finally:
        kernels.set_enabled(True)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("lengths", [[1], [9], [3, 17, 1, 30]])
def test_native_step_equals_the_torch_path_in_states_cache_and_routing(flavour, lengths):
    check_step(*build(flavour), lengths)


def test_weights_left_row_major_are_read_as_they_are():
    """Without prepare_for_decode every weight stays row-major: short rows and the down
    projections, which the FFN jobs then read in strided slices."""
    check_step(*build("wide", prepare=False), [3, 17])
    check_step(*build("v3", prepare=False), [9])


def check_step(model, args, lengths):
    cache, meta, token_ids, positions, slots = decode_step(args, lengths)
    reference_cache = decode_step(args, lengths)[0]
    native = NativeDecoder.build(model, cache)
    assert native is not None
    before = routed_counts(model)

    logits = native_step(native, token_ids, positions, slots)
    native_counts = routed_counts(model)
    expected = torch_path(model, reference_cache, meta, token_ids, positions)

    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)
    for written, reference in zip(cache.layers, reference_cache.layers):
        torch.testing.assert_close(written, reference, atol=1e-5, rtol=1e-5)
    # Each path counted the step's routed tokens once, to the same experts.
    step_native = [[a - b for a, b in zip(n, o)] for n, o in zip(native_counts, before)]
    step_torch = [[a - b for a, b in zip(t, n)] for t, n in zip(routed_counts(model), native_counts)]
    assert step_native == step_torch
    assert all(sum(layer) == len(lengths) * args.num_experts_per_tok for layer in step_native)


@pytest.mark.parametrize("flavour", ["v3", "wide"])
def test_other_builds_of_the_kernels_run_the_same_step(flavour, kernel_variant):
    """512-bit vectors and the portable build (see tests/conftest.py) against the torch path."""
    test_native_step_equals_the_torch_path_in_states_cache_and_routing(flavour, [3, 17, 1, 30])


def test_native_step_does_not_depend_on_the_thread_count():
    model, args = build("v3")
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            cache, _, token_ids, positions, slots = decode_step(args, [5, 12, 2])
            results.append(native_step(NativeDecoder.build(model, cache), token_ids, positions, slots))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_steps_the_native_decoder_does_not_take():
    assert NativeDecoder.takes(MAX_TOKENS)
    assert not NativeDecoder.takes(MAX_TOKENS + 1)  # too many decodes: the batched torch path wins
    assert not NativeDecoder.takes(0)
    kernels.set_enabled(False)
    try:
        assert not NativeDecoder.takes(1)
    finally:
        kernels.set_enabled(True)


def test_models_it_does_not_implement_are_not_bound():
    args = ModelArgs(attention_bias=True)
    model = moeray.model.build(args)
    assert NativeDecoder.build(model, LatentCache(args, 4, BLOCK, torch.float32)) is None
    model = moeray.model.build(ModelArgs(), dtype=torch.bfloat16)
    assert NativeDecoder.build(model, LatentCache(ModelArgs(), 4, BLOCK, torch.bfloat16)) is None
