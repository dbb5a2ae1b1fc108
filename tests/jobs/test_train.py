"""A tiny fine-tuning run on Ray Train: SFT lowers held-out loss, DPO starts at ln 2, export serves."""

import json
import math

import pytest
import torch

from moeray import LLM, SamplingParams
from moeray.jobs.export import export, trained_model
from moeray.jobs.spec import JobSpec
from moeray.jobs.trainer import _eval_loss, prepare, run
from support import write_hf_model_folder

pytestmark = pytest.mark.slow


def sft_rows(n=48):
    rows = []
    for i in range(n):
        a = i % 7
        rows.append({"messages": [{"role": "user", "content": f"count from {a}"},
                                  {"role": "assistant", "content": " ".join(str(a + k) for k in range(5))}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    write_hf_model_folder(folder, "v3", seed=5)
    return folder


def make_spec(tmp_path, base, method="sft", **changes):
    spec = {"name": f"job-{method}", "base_model": str(base), "method": method, "output": str(tmp_path / "out"),
            "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.25},
            "train": {"learning_rate": 3e-3, "max_steps": 24, "per_device_batch_size": 4, "max_length": 64,
                      "lr_schedule": "constant"},
            "checkpoint": {"storage": str(tmp_path / "ckpt"), "every_steps": 8, "keep": 2},
            "eval": {"every_steps": 8}}
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(spec)


def test_sft_lowers_held_out_loss_and_export_serves_the_same_model(ray_session, tmp_path, base):
    write_jsonl(tmp_path / "train.jsonl", sft_rows())
    spec = make_spec(tmp_path, base)
    data = prepare(spec)
    import moeray.model
    from moeray.model.tokenizer import Tokenizer
    pad = Tokenizer.from_pretrained(base).eos_token_id
    before = _eval_loss(moeray.model.load(base), spec, data.eval, pad)
    result = run(spec, data)
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
