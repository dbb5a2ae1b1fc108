"""The multi-token-prediction objective in pretraining and SFT: the loss against the paper's
equations per example (packing never lets a depth look across examples), and real jobs on Ray
Train with packing, LoRA and FSDP that log it and export the trained MTP layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import (
    encoded_rows,
    make_spec,
    method_loss,
    sft_rows,
    transcribed_mtp_logits,
    write_jsonl,
)

import moeray.model
from moeray.jobs.data import IGNORE_INDEX, flatten
from moeray.jobs.export import export, starting_model, trained_model
from moeray.jobs.trainer import run
from moeray.model.tokenizer import Tokenizer

MTP = {"depth": 2, "loss_weight": 0.5}


def history_of(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "ckpt" / name / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def test_the_mtp_loss_is_each_depths_cross_entropy_within_each_packed_example(tmp_path, base):
    spec = make_spec(tmp_path, base, sft={"packing": True}, mtp=MTP, init="random")
    model = starting_model(spec, base)
    assert model.mtp_depth == 2
    rows = encoded_rows(spec, sft_rows(12), Tokenizer.from_pretrained(base), held_out=None)
    assert any(len(set(row["segment_ids"])) > 1 for row in rows)  # several examples share a row
    loss, metrics = method_loss(model, spec, rows)

    batch = flatten(rows)
    without_mtp, _ = method_loss(model, make_spec(tmp_path, base, sft={"packing": True}), rows)
    # Each example alone, through the transcription: depth k's row i predicts token i + k + 1.
    logits, labels = {1: [], 2: []}, {1: [], 2: []}
    start = 0
    for n in batch.lengths:
        tokens, next_labels = batch.input_ids[start:start + n], batch.next_labels[start:start + n]
        for k, out in enumerate(transcribed_mtp_logits(model, tokens, 2), start=1):
            target = next_labels[k:]  # label of token i + k + 1 for rows i = 0 .. n - k - 1
            logits[k].append(out[target != IGNORE_INDEX])
            labels[k].append(target[target != IGNORE_INDEX])
        start += n
    expected = {k: F.cross_entropy(torch.cat(logits[k]), torch.cat(labels[k])).item() for k in (1, 2)}
    assert metrics["mtp_loss_1"] == pytest.approx(expected[1], rel=1e-5)
    assert metrics["mtp_loss_2"] == pytest.approx(expected[2], rel=1e-5)
    assert metrics["lm_loss"] == pytest.approx(float(without_mtp), rel=1e-6)
    assert float(loss) == pytest.approx(metrics["lm_loss"] + 0.5 * (expected[1] + expected[2]) / 2, rel=1e-5)


def test_gradients_reach_the_mtp_layers_and_the_main_model(tmp_path, base):
    spec = make_spec(tmp_path, base, mtp={"depth": 1})
    model = starting_model(spec, base).train()
    rows = encoded_rows(spec, sft_rows(8), Tokenizer.from_pretrained(base), held_out=None)
    loss, _ = method_loss(model, spec, rows)
    loss.backward()
    layer = model.model.mtp_layers[0]
    for param in (layer.eh_proj.weight, layer.enorm.weight, layer.self_attn.kv_a_proj_with_mqa.weight,
                  model.model.embed_tokens.weight, model.lm_head.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_an_adapter_export_cannot_carry_mtp_layers_trained_from_scratch(tmp_path, base):
    spec = make_spec(tmp_path, base, mtp={"depth": 1}, lora={"rank": 4}, output_format="adapter")
    with pytest.raises(ValueError, match="output_format: merged"):
        starting_model(spec, base)


@pytest.mark.slow
def test_sft_with_mtp_packing_and_lora_logs_the_loss_and_exports_the_mtp_layers(ray_session, tmp_path, base):
    write_jsonl(tmp_path / "train.jsonl", sft_rows())
    spec = make_spec(tmp_path, base, name="job-mtp-sft", sft={"packing": True}, lora={"rank": 4}, mtp=MTP,
                     train={"max_steps": 12}, checkpoint={"every_steps": 12}, eval={"every_steps": 4})
    result = run(spec)
    history = history_of(tmp_path, "job-mtp-sft")
    assert all({"mtp_loss", "mtp_loss_1", "mtp_loss_2", "lm_loss"} <= set(row) for row in history)
    assert history[-1]["mtp_loss"] < history[0]["mtp_loss"]
    assert history[-1]["eval_mtp_loss"] < history[3]["eval_mtp_loss"]
    with result.checkpoint.as_directory() as folder:
        trained = trained_model(spec, folder)
        out = export(spec, folder)
    assert json.loads((Path(out) / "config.json").read_text())["num_nextn_predict_layers"] == 2
    served = moeray.model.load(out, mtp_depth=2)
    for depth in range(2):  # the MTP layers trained in full beside the LoRA adapters, and saved
        torch.testing.assert_close(served.model.mtp_layers[depth].eh_proj.weight,
                                   trained.model.mtp_layers[depth].eh_proj.weight)
    untrained = starting_model(spec, base)
    assert not torch.equal(served.model.mtp_layers[0].eh_proj.weight, untrained.model.mtp_layers[0].eh_proj.weight)


@pytest.mark.slow
def test_pretraining_with_mtp_on_two_fsdp_workers_checkpoints_whole_mtp_layers(ray_session, tmp_path, base):
    lines = [f"def f{i}(x):\n    return x + {i}\n" for i in range(60)]
    write_jsonl(tmp_path / "train.jsonl", [{"text": line} for line in lines])
    spec = make_spec(tmp_path, base, name="job-mtp-fsdp", method="pretrain", init="random", mtp={"depth": 1},
                     scaling={"num_workers": 2, "strategy": "fsdp"}, train={"max_steps": 6, "max_length": 32},
                     checkpoint={"every_steps": 6}, eval={"every_steps": 3})
    result = run(spec)
    history = history_of(tmp_path, "job-mtp-fsdp")
    assert [row["step"] for row in history] == list(range(1, 7))
    assert history[-1]["mtp_loss"] < history[0]["mtp_loss"]
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", weights_only=False)
    whole = starting_model(spec, base).state_dict()
    mtp_names = [name for name in state["model"] if name.startswith("model.mtp_layers.0.")]
    assert mtp_names
    for name in mtp_names:  # whole tensors, not one worker's shard
        assert tuple(state["model"][name].shape) == tuple(whole[name].shape), name
