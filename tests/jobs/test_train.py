"""A tiny fine-tuning run on Ray Train: SFT lowers held-out loss, DPO starts at ln 2, export serves."""

import json
import math
from pathlib import Path

import pytest
import torch

import moeray.model
from moeray import LLM, SamplingParams
from moeray.jobs.export import export, trained_model
from moeray.jobs.trainer import prepare, run
from moeray.model.tokenizer import Tokenizer
from support import (encoded_rows, make_spec, method_loss, moeray_greedy, run_and_kill_workers, sft_rows,
                     write_hf_model_folder, write_jsonl)

pytestmark = pytest.mark.slow


def test_sft_lowers_held_out_loss_and_export_serves_the_same_model(ray_session, tmp_path, base):
    write_jsonl(tmp_path / "train.jsonl", sft_rows())
    spec = make_spec(tmp_path, base)
    held_out = encoded_rows(spec, sft_rows(), Tokenizer.from_pretrained(base), held_out=True)
    with torch.no_grad():
        before = float(method_loss(moeray.model.load(base), spec, held_out)[0])
    result = run(spec)
    assert result.metrics["step"] == 24
    assert result.metrics["eval_loss"] < before * 0.8
    with result.checkpoint.as_directory() as folder:
        model = trained_model(spec, folder)
        out = export(spec, folder)
    prompt = [1, 5, 7, 9]
    with torch.no_grad():
        expected = []
        ids = list(prompt)
        for _ in range(6):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            expected.append(nxt)
            ids.append(nxt)
    served = LLM(out, max_model_len=128).generate([prompt], SamplingParams(temperature=0, max_tokens=6,
                                                                          ignore_eos=True))[0].outputs[0]
    assert served.token_ids == expected


def test_pretraining_from_scratch_learns_text_and_exports_a_servable_model(ray_session, tmp_path, base):
    lines = [f"def f{i}(x):\n    return x + {i}\n" for i in range(60)]
    write_jsonl(tmp_path / "train.jsonl", [{"text": line} for line in lines])
    spec = make_spec(tmp_path, base, name="job-pretrain", method="pretrain", init="random",
                     train={"max_steps": 30, "learning_rate": 1e-2, "max_length": 32},
                     checkpoint={"every_steps": 30}, eval={"every_steps": 10})
    result = run(spec)
    history = [json.loads(line) for line in (tmp_path / "ckpt" / "job-pretrain" / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval_loss"] for row in history if row.get("eval_loss") is not None]
    assert evals[-1] < evals[0] * 0.7
    untrained = moeray.model.build(moeray.model.ModelArgs.from_file(base / "config.json"), seed=0)
    with result.checkpoint.as_directory() as folder:
        trained = trained_model(spec, folder)
        out = export(spec, folder)
    assert not torch.equal(trained.lm_head.weight, moeray.model.load(base).lm_head.weight)  # not the base weights
    assert not torch.equal(trained.lm_head.weight, untrained.lm_head.weight)  # and trained
    served = LLM(out, max_model_len=64).generate([[1, 5, 7]], SamplingParams(temperature=0, max_tokens=4,
                                                                             ignore_eos=True))
    assert served[0].outputs[0].token_ids == moeray_greedy(trained, [1, 5, 7], 4)


def test_malformed_row_stops_before_training(tmp_path, base):
    spec = make_spec(tmp_path, base)
    (tmp_path / "train.jsonl").write_text(json.dumps(sft_rows(1)[0]) + '\n{not json}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: invalid JSON"):
        prepare(spec)
    (tmp_path / "train.jsonl").write_text(json.dumps(sft_rows(1)[0]) + '\n{"messages": []}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: messages"):
        prepare(spec)


def test_dpo_starts_at_ln2_and_learns_preferences(ray_session, tmp_path, base):
    rows = [{"prompt": f"count from {i % 5}", "chosen": " ".join(str(i % 5 + k) for k in range(3)),
             "rejected": "no"} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    spec = make_spec(tmp_path, base, method="dpo",
                     train={"max_steps": 16, "learning_rate": 1e-3},
                     lora={"rank": 8, "alpha": 16, "target_modules": ["q_b_proj", "o_proj", "down_proj"]},
                     output_format="adapter")
    result = run(spec)
    history = [json.loads(line) for line in (tmp_path / "ckpt" / spec.name / "metrics.jsonl").read_text().splitlines()]
    assert abs(history[0]["loss"] - math.log(2)) < 1e-5
    assert result.metrics["rewards/accuracy"] >= 0.75
    # The exported PEFT adapter, served beside its base model, answers as the trained model does.
    from moeray.engine import Engine, EngineConfig
    from moeray.model.lora import merged_variant
    from moeray.model.tokenizer import Tokenizer

    with result.checkpoint.as_directory() as folder:
        trained = trained_model(spec, folder)
        adapter = export(spec, folder)
    served_base = moeray.model.load(base)
    engine = Engine(served_base, Tokenizer.from_pretrained(base), EngineConfig(max_model_len=64),
                    adapters={"dpo": merged_variant(served_base, adapter)})
    engine.add_request("r", [1, 5, 7, 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), "dpo")
    tokens = []
    while engine.has_unfinished:
        tokens += [t for out in engine.step() for o in out.outputs for t in o.token_ids]
    assert tokens == moeray_greedy(trained, [1, 5, 7, 9], 6)


def test_same_job_again_resumes_from_its_last_complete_checkpoint(ray_session, tmp_path, base):
    write_jsonl(tmp_path / "train.jsonl", sft_rows())
    first = run(make_spec(tmp_path, base, train={"max_steps": 8}))
    assert first.metrics["step"] == 8
    # A newer checkpoint folder that was never finished (a worker died while writing it): Ray
    # Train records a checkpoint only once it is whole, so resuming must not pick this one.
    partial = tmp_path / "ckpt" / "job-sft" / "checkpoint_2099-01-01_00-00-00.000000"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"truncated")
    second = run(make_spec(tmp_path, base, train={"max_steps": 12}))
    assert second.metrics["step"] == 12
    steps = [json.loads(line)["step"] for line in (tmp_path / "ckpt" / "job-sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # 1..8, then 9..12: continued, not started over


def test_killed_worker_resumes_from_last_checkpoint(ray_session, tmp_path, base):
    write_jsonl(tmp_path / "train.jsonl", sft_rows(96))
    # Killed at step 12 (after the checkpoints of steps 5 and 10), then 18 steps more to the end.
    spec = make_spec(tmp_path, base, name="job-killed", train={"max_steps": 30},
                     checkpoint={"every_steps": 5}, eval={"every_steps": 100})
    metrics = tmp_path / "ckpt" / "job-killed" / "metrics.jsonl"
    result, killed_at = run_and_kill_workers(run, spec, metrics, after_lines=12)
    assert killed_at is not None and result.metrics["step"] == 30
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] > 1 and (steps[restart] - 1) % 5 == 0  # continued after a checkpoint, not from 0
    assert steps[-1] == 30
    # The final checkpoint's own record is the continued curve: each step once, no gap.
    with result.checkpoint.as_directory() as folder:
        history = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in history] == list(range(1, 31))
        assert (Path(folder) / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_fsdp_on_two_cpu_workers_trains_checkpoints_whole_weights_and_resumes(ray_session, tmp_path, base):
    write_jsonl(tmp_path / "train.jsonl", sft_rows())
    scaling = {"num_workers": 2, "strategy": "fsdp"}
    first = run(make_spec(tmp_path, base, name="job-fsdp", scaling=scaling, train={"max_steps": 6},
                          checkpoint={"every_steps": 3}, eval={"every_steps": 3}))
    history = [json.loads(line) for line in (tmp_path / "ckpt" / "job-fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["eval_loss"] < history[2]["eval_loss"]
    with first.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", weights_only=False)
    reference = moeray.model.load(base).state_dict()
    for name, tensor in state["model"].items():  # whole tensors, not one worker's shard
        assert tuple(tensor.shape) == tuple(reference[name].shape), name
    second = run(make_spec(tmp_path, base, name="job-fsdp", scaling=scaling, train={"max_steps": 9},
                           checkpoint={"every_steps": 3}, eval={"every_steps": 3}))
    with second.checkpoint.as_directory() as folder:
        steps = [json.loads(line)["step"] for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 10))  # resumed at 7 with its optimizer state, not restarted
        trained = trained_model(make_spec(tmp_path, base, name="job-fsdp"), folder)
        out = export(make_spec(tmp_path, base, name="job-fsdp"), folder)
    kept = sorted(p.name for p in (tmp_path / "ckpt" / "job-fsdp").glob("checkpoint_*") if (p / "state.pt").exists())
    assert len(kept) == 2, kept  # steps 3, 6 and 9 were written; keep: 2
    served = LLM(out, max_model_len=64).generate([[1, 5, 7]], SamplingParams(temperature=0, max_tokens=6,
                                                                             ignore_eos=True))
    assert served[0].outputs[0].token_ids == moeray_greedy(trained, [1, 5, 7], 6)


def test_tokenizer_that_does_not_match_the_model_fails_before_training(tmp_path):
    base = tmp_path / "small-vocab"
    write_hf_model_folder(base, "v3", seed=1, vocab_size=256)  # the tiny tokenizer has ~400 tokens
    write_jsonl(tmp_path / "train.jsonl", sft_rows(4))
    with pytest.raises(ValueError, match="tokenizer and model do not match"):
        prepare(make_spec(tmp_path, base))
