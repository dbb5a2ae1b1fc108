"""The paged MLA decode kernel equals latent-space attention over gathered keys: variable
lengths (down to one key), scattered block tables, heads not filling a head block, latent and
rope widths that are not powers of two, long contexts over several splits; and the engine's
decode through it equals its torch decode path."""

import pytest
import torch

import moeray.model
from moeray import kernels
from moeray.engine.attention import AttentionMetadata, StepAttention
from moeray.engine.cache import LatentCache
from moeray.kernels.triton.mla_decode import paged_latent_decode
from moeray.model import ModelArgs


def _paged_problem(lengths, heads, latent_dim, rope_dim, block_size, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-max(lengths) // block_size)
    num_blocks = len(lengths) * blocks_per_seq + 3
    cache = torch.randn(num_blocks * block_size, latent_dim + rope_dim, generator=gen)  # [slots, r + dr]
    # Blocks handed out in a scrambled order, as a block manager does after some churn.
    block_tables = torch.randperm(num_blocks, generator=gen)[:len(lengths) * blocks_per_seq].view(len(lengths), -1)
    q_latent = torch.randn(len(lengths), heads, latent_dim, generator=gen)
    q_rope = torch.randn(len(lengths), heads, rope_dim, generator=gen)
    return [t.to(device, dtype) for t in (q_latent, q_rope, cache)] + [block_tables.to(device)]


def _reference(q_latent, q_rope, cache, block_tables, lengths, block_size, scale):
    """Gather each sequence's keys and attend in float32: the absorbed form's middle."""
    latent_dim = q_latent.shape[-1]
    outs = []
    for b, n in enumerate(lengths):
        pos = torch.arange(n, device=cache.device)
        keys = cache[block_tables[b, pos // block_size] * block_size + pos % block_size].float()  # [n, r + dr]
        scores = (q_latent[b].float() @ keys[:, :latent_dim].T + q_rope[b].float() @ keys[:, latent_dim:].T) * scale
        outs.append(scores.softmax(dim=-1) @ keys[:, :latent_dim])  # [H, r]
    return torch.stack(outs)


# (sequence lengths, heads, latent_dim, rope_dim, block_size, num_splits)
CASES = {
    "one-sequence-one-key": ([1], 3, 24, 8, 4, None),
    "mixed-lengths-default-splits": ([1, 37, 90], 5, 24, 8, 4, None),
    "mixed-lengths-one-split": ([5, 37, 90], 5, 24, 8, 4, 1),
    "splits-past-short-sequences": ([3, 70, 200], 2, 40, 16, 16, 7),
    "long-context-many-splits": ([700], 17, 32, 16, 16, 9),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_paged_decode_matches_reference(device, case, dtype):
    lengths, heads, latent_dim, rope_dim, block_size, splits = CASES[case]
    q_latent, q_rope, cache, block_tables = _paged_problem(lengths, heads, latent_dim, rope_dim, block_size,
                                                           dtype, device)
    scale = latent_dim ** -0.5
    seq_lens = torch.tensor(lengths, device=device)
    got = paged_latent_decode(q_latent, q_rope, cache, block_tables, seq_lens, block_size, scale,
                              num_splits=splits, block_n=16)
    want = _reference(q_latent, q_rope, cache, block_tables, lengths, block_size, scale)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert got.dtype == dtype and got.shape == (len(lengths), heads, latent_dim)
    torch.testing.assert_close(got.float(), want, **tol)


def test_engine_decode_through_the_kernel_equals_torch_path(device, monkeypatch):
    """StepAttention's decode rows through the Triton path equal its torch path, on metadata laid
    out as the runner lays it out (padded slot lists and a mask, not block tables)."""
    args = ModelArgs()
    model = moeray.model.build(args, seed=3).to(device)
    attn = model.model.layers[1].self_attn
    block_size, lengths = 4, [1, 9, 22]
    cache = LatentCache(args, num_blocks=24, block_size=block_size, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(4)
    cache.layers[attn.layer_idx].copy_(torch.randn(cache.layers[attn.layer_idx].shape, generator=gen))
    tables = [[5, 0], [11, 2, 7], [1, 3, 19, 23, 8, 14]]
    slots = [[table[p // block_size] * block_size + p % block_size for p in range(n)] for table, n in
             zip(tables, lengths)]
    longest = max(lengths)
    decode_slots = torch.tensor([s + [0] * (longest - len(s)) for s in slots], device=device)
    decode_mask = (torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None]
    # The step writes each decode token's new latent at its last slot.
    meta = AttentionMetadata(torch.tensor([s[-1] for s in slots], device=device), len(lengths), decode_slots,
                             decode_mask, [])
    heads, dn, dr, r = args.num_attention_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.kv_lora_rank
    q_nope = torch.randn(3, heads, dn, generator=gen).to(device)
    q_pe = torch.randn(3, heads, dr, generator=gen).to(device)
    latent, k_pe = torch.randn(3, r, generator=gen).to(device), torch.randn(3, dr, generator=gen).to(device)
    with torch.no_grad():
        monkeypatch.setattr(kernels, "use_triton", lambda _: False)
        want = StepAttention(cache, meta)(attn, q_nope, q_pe, latent, k_pe)
        monkeypatch.setattr(kernels, "use_triton", lambda _: True)
        calls, kernel = [], kernels.paged_latent_decode
        monkeypatch.setattr(kernels, "paged_latent_decode", lambda *a, **kw: calls.append(a[3]) or kernel(*a, **kw))
        got = StepAttention(cache, meta)(attn, q_nope, q_pe, latent, k_pe)
    # The block tables the engine derived from its slot lists (padding reads block 0, masked).
    assert calls[0].tolist() == [[5, 0, 0, 0, 0, 0], [11, 2, 7, 0, 0, 0], tables[2]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
