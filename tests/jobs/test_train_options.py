"""Training paths the other job tests do not take: two DDP workers, and the MoE options (router
aux loss, aux-loss-free bias updates, a frozen router) through the real trainer on Ray Train."""

import json

import pytest
import torch

import moeray.model
from moeray import LLM, SamplingParams
from moeray.jobs.export import export, trained_model
from moeray.jobs.losses import router_aux_loss
from moeray.jobs.trainer import run
from moeray.model.moe import MoE
from moeray.model.tokenizer import Tokenizer
from support import encoded_rows, make_spec, method_loss, moeray_greedy, sft_rows, write_jsonl

pytestmark = pytest.mark.slow


def gate_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def routing_biases(model) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}


def test_two_ddp_workers_train_and_export_the_trained_model(ray_session, tmp_path, base):
    write_jsonl(tmp_path / "train.jsonl", sft_rows())
    spec = make_spec(tmp_path, base, name="job-ddp", scaling={"num_workers": 2, "strategy": "ddp"},
                     train={"max_steps": 8}, checkpoint={"every_steps": 4}, eval={"every_steps": 4})
    result = run(spec)
    history = [json.loads(line) for line in (tmp_path / "ckpt" / "job-ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == list(range(1, 9))
    assert history[-1]["eval_loss"] < history[3]["eval_loss"]
    with result.checkpoint.as_directory() as folder:
        trained = trained_model(spec, folder)
        out = export(spec, folder)
    served = LLM(out, max_model_len=64).generate([[1, 5, 7]], SamplingParams(temperature=0, max_tokens=6,
                                                                             ignore_eos=True))
    assert served[0].outputs[0].token_ids == moeray_greedy(trained, [1, 5, 7], 6)


def test_moe_options_reach_the_trainer(ray_session, tmp_path, base):
    """One step with a frozen router, bias updates and the aux loss: the gate weights stay, every
    router's bias moves by the rate against the load the step saw, and the step's loss is the
    language-model loss plus coef x the aux loss of the same batch."""
    write_jsonl(tmp_path / "train.jsonl", sft_rows())
    rate, coef = 0.01, 1.0
    spec = make_spec(tmp_path, base, name="job-moe", train={"max_steps": 1},
                     moe={"freeze_router": True, "bias_update_rate": rate, "router_aux_loss_coef": coef},
                     checkpoint={"every_steps": 1}, eval={"every_steps": 100})
    # What one worker's first step sees: the first rows of the training side of the split, with the
    # shuffle off (one small file is one block, read in order).
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"shuffle": False})})
    batch = encoded_rows(spec, sft_rows(), Tokenizer.from_pretrained(base))[:spec.train.per_device_batch_size]
    reference = moeray.model.load(base).train()
    with torch.no_grad():
        plain = float(method_loss(reference, spec, batch)[0])
        aux = float(router_aux_loss(reference))
    loads = {f"model.layers.{moe.layer_idx}.mlp.gate.e_score_correction_bias":
             torch.bincount(moe.last_routing[1].flatten(), minlength=moe.gate.num_experts).float()
             for moe in reference.modules() if isinstance(moe, MoE)}

    result = run(spec)
    first = json.loads((tmp_path / "ckpt" / "job-moe" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(plain + coef * aux, rel=1e-4) and aux > 0.1
    with result.checkpoint.as_directory() as folder:
        trained = trained_model(spec, folder)
    untrained = moeray.model.load(base)
    for name, weight in gate_weights(trained).items():
        assert torch.equal(weight, gate_weights(untrained)[name]), f"{name} changed though the router is frozen"
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), untrained.parameters()))
    before, after = routing_biases(untrained), routing_biases(trained)
    assert set(after) == set(loads)
    for name, load in loads.items():
        expected = before[name] + rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(after[name], expected)
        assert after[name][load.argmax()] < before[name][load.argmax()]  # the busiest expert's bias went down
