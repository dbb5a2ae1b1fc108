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


def _spec(method: str):
    from moeray.jobs.spec import parse_spec

    return parse_spec({"name": "t", "base_model": "unused", "method": method, "output": "unused",
                                   "data": {"train": "unused.jsonl"}, "checkpoint": {"storage": "unused"}})


def test_padding_free_training_losses_equal_the_padded_computation():
    """The trainer runs rows without padding and the head only on labelled positions; the SFT and
    DPO losses equal those of a padded batch through the full head."""
    from moeray.jobs.data import pad_batch
    from support import method_loss

    model = moeray.model.build(ModelArgs.preset("tiny"), seed=3)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in (7, 3, 12):
        ids = torch.randint(3, 200, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    with torch.no_grad():
        padded = pad_batch(rows, pad_id=2)
        expected = sft_loss(model(padded["input_ids"]), padded["labels"])
        loss, metrics = method_loss(model, _spec("sft"), rows)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        assert metrics["tokens"] == int((padded["labels"][:, 1:] != -100).sum())

        pairs = [{"chosen_ids": r["input_ids"], "chosen_mask": [int(t != -100) for t in r["labels"]],
                  "rejected_ids": r["input_ids"][::-1]} for r in rows]
        for pair in pairs:
            pair["rejected_mask"] = [0] * (len(pair["rejected_ids"]) // 2) + [1] * (len(pair["rejected_ids"]) -
                                                                                     len(pair["rejected_ids"]) // 2)
        reference = moeray.model.build(ModelArgs.preset("tiny"), seed=4)
        logps = {}
        for side in ("chosen", "rejected"):
            side_rows = pad_batch([{"input_ids": p[f"{side}_ids"], "labels": p[f"{side}_mask"]} for p in pairs], 2)
            for name, which in (("policy", model), ("reference", reference)):
                logps[name, side] = sequence_logprobs(which(side_rows["input_ids"]), side_rows["input_ids"],
                                                      side_rows["labels"].clamp(min=0))
        expected, _ = dpo_loss(logps["policy", "chosen"], logps["policy", "rejected"], logps["reference", "chosen"],
                               logps["reference", "rejected"])
        loss, _ = method_loss(model, _spec("dpo"), pairs, reference=reference)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_a_packed_row_predicts_nothing_across_its_examples():
    from moeray.jobs.data import flatten, pack

    rows = pack([([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9])], max_length=8)
    batch = flatten(rows)
    assert batch.lengths == [3, 2] and batch.position_ids.tolist() == [0, 1, 2, 0, 1]
    # The last token of the first example has no target: 8 starts another example.
    assert batch.next_labels.tolist() == [6, 7, -100, 9, -100]


def test_flatten_names_rows_whose_fields_differ_in_length():
    import pytest

    from moeray.jobs.data import flatten

    with pytest.raises(ValueError, match=r"input_ids \(3\), labels \(2\)"):
        flatten([{"input_ids": [5, 6, 7], "labels": [6, 7]}])
    with pytest.raises(ValueError, match="at least one row"):
        flatten([])
