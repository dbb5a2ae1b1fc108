"""Gate variants and the grouped expert computation against plain per-token references."""

import pytest
import torch
import torch.nn.functional as F

from moeray.model import ModelArgs
from moeray.model.moe import MoE, TopkGate, grouped_expert_forward


def _naive_experts(x, ids, weights, gate_up, down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = F.linear(x[t], gate_up[e]).chunk(2)
            out[t] += weights[t, j] * F.linear(F.silu(gate) * up, down[e])
    return out


def test_grouped_experts_equal_naive_loop_with_empty_experts():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=gen)
    gate_up, down = torch.randn(6, 2 * 8, 16, generator=gen), torch.randn(6, 16, 8, generator=gen)
    ids = torch.tensor([[0, 3], [3, 0], [5, 3], [0, 5], [3, 5], [0, 3], [5, 0]])  # experts 1, 2, 4 empty
    weights = torch.rand(7, 2, generator=gen)
    torch.testing.assert_close(grouped_expert_forward(x, ids, weights, gate_up, down),
                               _naive_experts(x, ids, weights, gate_up, down), atol=1e-5, rtol=1e-5)


def test_single_token():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, generator=gen)
    gate_up, down = torch.randn(4, 16, 16, generator=gen), torch.randn(4, 16, 8, generator=gen)
    ids, weights = torch.tensor([[2, 1]]), torch.tensor([[0.7, 0.3]])
    torch.testing.assert_close(grouped_expert_forward(x, ids, weights, gate_up, down),
                               _naive_experts(x, ids, weights, gate_up, down), atol=1e-5, rtol=1e-5)


def _gate(**changes) -> TopkGate:
    gate = TopkGate(ModelArgs(**{**dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2), **changes}))
    with torch.no_grad():
        gate.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    return gate


def test_noaux_tc_picks_only_from_the_best_groups_and_bias_moves_choice_not_weight():
    gate = _gate()
    x = torch.randn(50, 128, generator=torch.Generator().manual_seed(3))
    weights, ids = gate(x)
    groups = ids // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))  # norm_topk_prob, scaling 1.0

    with torch.no_grad():
        gate.e_score_correction_bias.fill_(-10.0)
        gate.e_score_correction_bias[[1, 2, 3, 5]] = 10.0  # forces the choice to these experts
    weights, ids = gate(x)
    assert sorted(ids[0].tolist()) == [1, 2, 3, 5]
    scores = gate.scores(x)[:, [1, 2, 3, 5]]
    torch.testing.assert_close(weights.sort(-1).values, (scores / scores.sum(-1, keepdim=True)).sort(-1).values)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_softmax_gate_weights_are_top_probabilities(method):
    gate = _gate(scoring_func="softmax", topk_method=method, norm_topk_prob=False, routed_scaling_factor=2.0)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(4))
    weights, ids = gate(x)
    probs = gate.scores(x)
    torch.testing.assert_close(weights, 2.0 * probs.gather(1, ids))
    if method == "greedy":
        torch.testing.assert_close(weights.sort(-1).values, 2.0 * probs.topk(4).values.sort(-1).values)


def test_moe_uses_the_given_expert_backend():
    args = ModelArgs()
    moe = MoE(args, layer_idx=1)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(5, args.hidden_size)
    calls = []

    def backend(layer_idx, tokens, expert_ids, weights):
        calls.append((layer_idx, tokens.shape, expert_ids.shape))
        return moe.experts(tokens, expert_ids, weights)

    torch.testing.assert_close(moe(x, backend), moe(x))
    assert calls == [(1, (5, args.hidden_size), (5, args.num_experts_per_tok))]
