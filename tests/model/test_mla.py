"""The absorbed (latent-space) attention equals the expanded one."""

import pytest
import torch

import moeray.model
from moeray.model import ModelArgs


def _inputs(model, tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, model.args.hidden_size, generator=gen)
    positions = torch.arange(tokens)
    attn = model.model.layers[0].self_attn
    return attn, attn.project(x, model.rotary(positions))


def test_absorbed_equals_expanded_causal():
    model = moeray.model.build(ModelArgs.preset("tiny"), seed=1)
    attn, (q_nope, q_pe, latent, k_pe) = _inputs(model, 19)
    mask = torch.ones(19, 19, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        expanded = attn.attend_expanded(q_nope[None], q_pe[None], latent[None], k_pe[None], causal=True)
        absorbed = attn.attend_absorbed(q_nope[None], q_pe[None], latent[None], k_pe[None], mask=mask)
    assert expanded.shape == (1, 19, 4, 32)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-4)


def test_absorbed_decode_against_a_prefix_with_padding():
    """Decode-shaped: one query per sequence against cached keys of different lengths."""
    model = moeray.model.build(ModelArgs.preset("tiny"), seed=2)
    attn, (q_nope, q_pe, latent, k_pe) = _inputs(model, 24)
    lengths = [24, 9]
    # Batch of two sequences sharing the same keys buffer, the second only sees 9 of them.
    mask = torch.zeros(2, 1, 24, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, 0, :n] = True
    q_idx = torch.tensor([23, 8])
    with torch.no_grad():
        absorbed = attn.attend_absorbed(q_nope[q_idx, None], q_pe[q_idx, None], latent.expand(2, -1, -1),
                                        k_pe.expand(2, -1, -1), mask=mask)
        for b, n in enumerate(lengths):
            full = attn.attend_expanded(q_nope[None, :n], q_pe[None, :n], latent[None, :n], k_pe[None, :n],
                                        causal=True)
            torch.testing.assert_close(absorbed[b, 0], full[0, n - 1], atol=1e-5, rtol=1e-4)


def test_prefill_chunk_after_prefix_equals_full_prefill():
    model = moeray.model.build(ModelArgs.preset("tiny"), seed=3)
    attn, (q_nope, q_pe, latent, k_pe) = _inputs(model, 30)
    start = 17
    chunk = torch.arange(start, 30)
    mask = (torch.arange(30)[None, :] <= chunk[:, None])[None]  # [1, 13, 30]
    with torch.no_grad():
        full = attn.attend_expanded(q_nope[None], q_pe[None], latent[None], k_pe[None], causal=True)
        part = attn.attend_expanded(q_nope[None, start:], q_pe[None, start:], latent[None], k_pe[None], mask=mask)
    torch.testing.assert_close(part[0], full[0, start:], atol=1e-5, rtol=1e-4)


def test_packed_rows_do_not_attend_across_sequences():
    """Two sequences packed in one row give the same logits as each on its own."""
    model = moeray.model.build(ModelArgs.preset("tiny"), seed=4)
    a, b = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([20, 21, 22])
    packed = torch.cat([a, b])[None]
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    segments = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2]])
    with torch.no_grad():
        logits = model(packed, position_ids=positions, segment_ids=segments)
        torch.testing.assert_close(logits[0, :5], model(a[None])[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[0, 5:], model(b[None])[0], atol=1e-5, rtol=1e-4)


def test_padding_free_sequences_match_each_sequence_alone_in_values_and_gradients():
    """Sequences concatenated without padding (`lengths`) give each sequence's own logits, the
    head runs only at `logits_at`, and gradients equal those of separate forwards."""
    seqs = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([20]), torch.tensor([20, 21, 22])]
    flat = torch.cat(seqs)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    at = torch.tensor([0, 4, 5, 8])
    model = moeray.model.build(ModelArgs.preset("tiny"), seed=4)
    logits = model(flat, positions, lengths=[5, 1, 3], logits_at=at)
    alone = torch.cat([model(s[None])[0] for s in seqs])
    torch.testing.assert_close(logits, alone[at], atol=1e-5, rtol=1e-4)
    logits.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = torch.cat([model(s[None])[0] for s in seqs])
    alone[at].square().sum().backward()
    for name, param in model.named_parameters():
        if param.grad is not None:  # float32 sums in another order: compare relative to the norm
            assert (grads[name] - param.grad).norm() <= 1e-5 * param.grad.norm() + 1e-7, name
    with pytest.raises(ValueError, match="sum\\(lengths\\) = 8"):
        model(flat, positions, lengths=[5, 3])
