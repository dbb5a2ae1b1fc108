"""A fine-tuning job whose data, checkpoints and output all live in S3 (moto over HTTP)."""

import json

import boto3
import pytest

from moeray.jobs.export import export, trained_model
from moeray.jobs.spec import parse_spec
from moeray.jobs.trainer import prepare, run
from moeray.storage import StorageError, download_dir, upload_dir
from moeray import LLM, SamplingParams
from support import moeray_greedy, write_hf_model_folder

pytestmark = pytest.mark.slow


def test_sft_job_reads_and_writes_s3(ray_session, s3_server, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="moeray-jobs")
    base = tmp_path / "base"
    write_hf_model_folder(base, "v3", seed=8)
    upload_dir(base, "s3://moeray-jobs/models/base")
    rows = [{"messages": [{"role": "user", "content": f"n={i}"}, {"role": "assistant", "content": str(i % 5)}]}
            for i in range(24)]
    s3.put_object(Bucket="moeray-jobs", Key="data/train.jsonl", Body="\n".join(json.dumps(r) for r in rows))
    spec = parse_spec({
        "name": "s3-sft", "base_model": "s3://moeray-jobs/models/base", "method": "sft",
        "output": "s3://moeray-jobs/outputs/s3-sft",
        "data": {"train": "s3://moeray-jobs/data/train.jsonl"},
        "train": {"max_steps": 4, "per_device_batch_size": 4, "max_length": 32, "learning_rate": 1e-3},
        "checkpoint": {"storage": "s3://moeray-jobs/checkpoints", "every_steps": 2, "keep": 1}})
    result = run(spec)
    assert result.metrics["step"] == 4
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="moeray-jobs", Prefix="checkpoints/s3-sft")["Contents"]]
    checkpoints = {k.rsplit("/", 1)[0] for k in keys if k.endswith("/state.pt")}
    assert len(checkpoints) == spec.checkpoint.keep == 1, checkpoints  # steps 2 and 4 written, the newest kept
    with result.checkpoint.as_directory() as folder:
        trained = trained_model(spec, folder)
        export(spec, folder)
    local = download_dir("s3://moeray-jobs/outputs/s3-sft", tmp_path / "served")
    out = LLM(local, max_model_len=64).generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6,
                                                                            ignore_eos=True))
    assert out[0].outputs[0].token_ids == moeray_greedy(trained, [1, 2, 3], 6)


def test_unreachable_storage_fails_before_training(s3_server, tmp_path):
    base = tmp_path / "base"
    write_hf_model_folder(base, "v3", seed=8)
    (tmp_path / "train.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    spec = parse_spec({"name": "x", "base_model": str(base), "method": "sft", "output": str(tmp_path / "o"),
                                   "data": {"train": str(tmp_path / "train.jsonl")},
                                   "checkpoint": {"storage": "s3://no-such-bucket/ckpt"}})
    with pytest.raises(StorageError, match="s3://no-such-bucket/ckpt is not reachable"):
        prepare(spec)
