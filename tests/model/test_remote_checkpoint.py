"""Checkpoints under s3:// URIs, read over HTTP from a real S3 protocol server (moto): tensor by
tensor with byte-range requests, so a reader fetches only what it uses."""

import math

import pytest
import torch
from safetensors.torch import save_file

import moeray.model
from moeray.model import CheckpointError, ConfigError, DeepseekForCausalLM, ModelArgs
from moeray.model.checkpoint import (CheckpointReader, is_routed_expert, load_weights, read_model_args,
                                     save_checkpoint)
from moeray.storage import upload_dir

BUCKET = "remote-checkpoints"


@pytest.fixture(scope="module")
def uploaded(s3_server, tmp_path_factory):
    """The tiny preset in three layouts, locally and on S3: {layout: (local folder, s3 uri)}, model."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    args = ModelArgs.preset("tiny")
    model = moeray.model.build(args, seed=3)
    root = tmp_path_factory.mktemp("remote")
    per_expert, sharded, grouped = root / "per-expert", root / "sharded", root / "grouped"
    save_checkpoint(model, per_expert, args)
    save_checkpoint(model, sharded, args, max_shard_bytes=1 << 20)
    grouped.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, grouped / "model.safetensors")
    (grouped / "config.json").write_text((per_expert / "config.json").read_text())
    folders = {}
    for folder in (per_expert, sharded, grouped):
        uri = f"s3://{BUCKET}/models/{folder.name}"
        upload_dir(folder, uri)
        folders[folder.name] = (folder, uri)
    return folders, model


def _file_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize("layout", ["per-expert", "sharded", "grouped"])
def test_remote_reader_equals_local_reader(uploaded, layout):
    folder, uri = uploaded[0][layout]
    local, remote = CheckpointReader(folder), CheckpointReader(uri)
    assert remote.names() == local.names()
    for name in local.names():
        assert remote.shape(name) == local.shape(name)
        torch.testing.assert_close(remote.get(name), local.get(name), rtol=0, atol=0)
    for layer, expert in ((1, 0), (2, 9), (2, 15)):
        for got, want in zip(remote.routed_expert(layer, expert), local.routed_expert(layer, expert), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert read_model_args(uri) == read_model_args(folder)


@pytest.mark.parametrize("layout", ["per-expert", "grouped"])
def test_one_expert_costs_only_its_own_bytes(uploaded, layout):
    _, uri = uploaded[0][layout]
    reader = CheckpointReader(uri)
    before = reader.bytes_read
    gate_up, down = reader.routed_expert(2, 5)
    assert reader.bytes_read - before == (gate_up.numel() + down.numel()) * gate_up.element_size()


def test_model_loads_from_s3_and_skips_routed_experts_when_asked(uploaded):
    (folder, uri), model = uploaded[0]["sharded"], uploaded[1]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(moeray.model.load(uri)(ids), model(ids), rtol=0, atol=0)

    # The replica of an expert-parallel deployment: everything but the routed experts.
    args = read_model_args(uri)
    with torch.device("meta"):
        without_experts = DeepseekForCausalLM(args, local_experts=False)
    reader = CheckpointReader(uri)
    load_weights(without_experts.to_empty(device="cpu"), reader, args.num_hidden_layers, skip=is_routed_expert)
    expert_bytes = sum(4 * math.prod(reader.shape(n)) for n in reader.names() if is_routed_expert(n))
    header_allowance = 64 * 1024
    assert reader.bytes_read <= _file_bytes(folder) - expert_bytes + header_allowance


def test_missing_remote_checkpoint_is_named(uploaded):
    with pytest.raises(CheckpointError, match=f"s3://{BUCKET}/models/absent"):
        CheckpointReader(f"s3://{BUCKET}/models/absent")
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key="models/no-config/README.md", Body=b"weights elsewhere")
    with pytest.raises(CheckpointError, match=f"s3://{BUCKET}/models/no-config/config.json not found"):
        moeray.model.load(f"s3://{BUCKET}/models/no-config")


def test_remote_config_errors_name_the_uri_and_line(uploaded, s3_server):
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key="models/broken/config.json", Body=b'{\n "model_type": ,\n}')
    with pytest.raises(ConfigError, match=rf"s3://{BUCKET}/models/broken/config.json:2"):
        read_model_args(f"s3://{BUCKET}/models/broken")
