"""The example job specs in examples/jobs/ run with `moeray jobs run` as the README says, on the
session Ray: each as shipped, but for its output and checkpoint paths (a temporary folder) and,
for the 1,500-step pre-training of the default model, its step count."""

import json
from pathlib import Path

import pytest
import yaml

from moeray import LLM, SamplingParams
from moeray.jobs.corpus import replay_rows, write_chat_jsonl, write_stdlib_jsonl
from moeray.jobs.trainer import held_out_threshold, row_hash
from moeray.platform.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run_example(name: str, tmp_path, monkeypatch, capsys, **changes) -> Path:
    spec = yaml.safe_load((REPO / "examples" / "jobs" / name).read_text())
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec["output"] = str(tmp_path / "out")
    spec["checkpoint"]["storage"] = str(tmp_path / "ckpt")
    for section, values in changes.items():
        spec[section] = {**spec[section], **values} if isinstance(values, dict) else values
    (tmp_path / name).write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(REPO)  # the specs' relative paths (the default model, the data) are the repository's
    assert main(["jobs", "run", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    steps = spec["train"]["max_steps"]
    assert f"moeray: job {spec['name']} finished at step {steps}; output in {tmp_path / 'out'}" in out
    return tmp_path / "out"


def greedy(folder: Path) -> list[int]:
    return LLM(folder, max_model_len=128).generate(["def main():"], SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids


def test_sft_tiny_fine_tunes_the_default_model(ray_session, tmp_path, monkeypatch, capsys):
    from moeray.platform.default_model import DEFAULT_MODEL_DIR

    out = run_example("sft-tiny.yaml", tmp_path, monkeypatch, capsys)
    assert len(greedy(out)) == 8 and greedy(out) != greedy(DEFAULT_MODEL_DIR)


def test_pretrain_default_then_sft_default_train_the_default_shape_with_its_mtp_layer(
        ray_session, tmp_path, monkeypatch, capsys):
    """`make default-model`'s steps, a few optimiser steps each: the `default` shape and tokenizer
    (scripts/build_default_model.py), pre-training with MTP, the chat and tool-call fine-tune."""
    import subprocess
    import sys

    import moeray.model

    init = tmp_path / "init"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_default_model.py"), "--out", str(init)], check=True)
    write_stdlib_jsonl(tmp_path / "stdlib.jsonl", limit_bytes=1 << 20)  # `python -m moeray.jobs.corpus`, 1 MB
    pretrained = run_example("pretrain-default.yaml", tmp_path / "pretrain", monkeypatch, capsys, base_model=str(init),
                             data={"train": str(tmp_path / "stdlib.jsonl")}, train={"max_steps": 3})
    assert moeray.model.mtp_depth_of(pretrained) == 1 and len(greedy(pretrained)) == 8
    # Replayed pre-training rows come from its training split only, never from what measures it.
    replay = replay_rows(tmp_path / "stdlib.jsonl", 20, eval_fraction=0.01, seed=0)
    stdlib_rows = [json.loads(line) for line in (tmp_path / "stdlib.jsonl").read_text().splitlines()]
    below = held_out_threshold(stdlib_rows, 0.01, 0)
    held_out = [row for row in stdlib_rows if row_hash(row, 0) < below]
    assert len(replay) == 20 and held_out and not any(row in held_out for row in replay)
    write_chat_jsonl(tmp_path / "chat.jsonl", limit_bytes=1 << 20, tool_rows=100, replay=replay)
    chat = run_example("sft-default.yaml", tmp_path / "sft", monkeypatch, capsys, base_model=str(pretrained),
                       data={"train": str(tmp_path / "chat.jsonl")}, train={"max_steps": 3})
    assert moeray.model.mtp_depth_of(chat) == 1 and len(greedy(chat)) == 8
