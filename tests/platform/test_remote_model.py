"""A replica whose settings name an s3:// model: weights stream from S3 (moto over HTTP), the
tokenizer files alone are copied locally, and the output equals the local folder's."""

import asyncio

import pytest

from moeray import LLM, SamplingParams
from moeray.platform.default_model import resolve_model
from moeray.platform.serve_app import load_replica_service
from moeray.platform.service import GenerateRequest
from moeray.platform.settings import ServeSettings


async def _greedy_text(service, prompt: str) -> str:
    request = GenerateRequest("remote-1", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), prompt)
    text = ""
    async for chunk in service.generate(request):
        text += "".join(out.text for out in chunk.outputs)
    return text


def test_replica_serves_an_s3_model(s3_server, hf_folder, tmp_path, monkeypatch):
    import boto3

    from moeray.storage import upload_dir

    monkeypatch.setenv("MOERAY_CACHE_DIR", str(tmp_path / "cache"))
    boto3.client("s3").create_bucket(Bucket="served-models")
    uri = "s3://served-models/tiny-v3"
    upload_dir(hf_folder[0], uri)

    service = load_replica_service(ServeSettings(model=uri), "remote")
    try:
        text = asyncio.run(_greedy_text(service, "hello world"))
    finally:
        service.shutdown()
    expected = LLM(hf_folder[0]).generate("hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert text == expected[0].outputs[0].text
    copied = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert "tokenizer.json" in copied and not any(name.endswith(".safetensors") for name in copied)


def test_missing_s3_model_is_named(s3_server):
    with pytest.raises(FileNotFoundError, match="s3://served-models/absent"):
        resolve_model("s3://served-models/absent")
