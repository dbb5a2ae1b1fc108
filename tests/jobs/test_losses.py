import math

import torch

import moeray.model
from moeray.jobs.losses import dpo_loss, router_aux_loss, sequence_logprobs, sft_loss, update_routing_bias
from moeray.model import ModelArgs


def test_sft_loss_counts_only_labelled_tokens():
    logits = torch.randn(1, 5, 10)
    labels = torch.tensor([[-100, -100, 3, 4, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, [1, 2]], torch.tensor([3, 4]))
    torch.testing.assert_close(sft_loss(logits, labels), expected)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    lp = torch.tensor([-12.0, -7.5, -30.0])
    loss, metrics = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert loss.item() == math.log(2) or abs(loss.item() - math.log(2)) < 1e-7
    assert metrics["rewards/margin"] == 0.0


def test_dpo_prefers_a_policy_that_moved_toward_chosen():
    ref_c, ref_r = torch.tensor([-10.0]), torch.tensor([-10.0])
    loss, metrics = dpo_loss(ref_c + 2, ref_r - 2, ref_c, ref_r, beta=0.5)
    assert loss.item() < math.log(2) and metrics["rewards/accuracy"] == 1.0
    assert metrics["rewards/chosen"] == 1.0 and metrics["rewards/rejected"] == -1.0


def test_sequence_logprobs_sums_the_masked_response():
    logits = torch.randn(2, 4, 6)
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]])
    lp = logits.log_softmax(-1)
    expected = torch.stack([lp[0, 1, 3] + lp[0, 2, 4], lp[1, 1, 5]])
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask), expected)


def test_balance_terms_from_a_training_forward():
    model = moeray.model.build(ModelArgs.preset("tiny"), seed=0).train()
    model(torch.randint(0, 1024, (2, 16)))
    aux = router_aux_loss(model)
    assert aux.requires_grad and aux.item() > 0
    gate = model.model.layers[1].mlp.gate
    before = gate.e_score_correction_bias.clone()
    update_routing_bias(model, 0.01)
    assert not torch.equal(before, gate.e_score_correction_bias)
