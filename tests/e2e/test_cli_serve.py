"""`moeray serve` as a user runs it: the embedded default model (what `make serve` runs) writing
Python-looking code and calling a tool, and bad models or settings failing fast, in one line,
before Ray starts."""

import json
import os
import subprocess
import sys
import time

import openai
import psutil
import pytest

from support import ServeProcess

pytestmark = pytest.mark.slow


def test_cli_serves_the_default_model(tmp_path):
    server = ServeProcess([], tmp_path / "serve.log").start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["moeray-default"]
        reply = client.chat.completions.create(model="moeray-default", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8)
        assert reply.choices[0].finish_reason in ("stop", "length")
        # What the README shows a newcomer: code for a signature, indented like Python.
        code = client.chat.completions.create(model="moeray-default", max_tokens=48, temperature=0,
                                              messages=[{"role": "user", "content": "def fib(n):"}]
                                              ).choices[0].message.content
        assert "\n    " in code and ("return" in code or "def " in code or '"""' in code), code
        # And a tool call for a weather question, parsed out of DeepSeek-V3's markup.
        weather = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                                    "parameters": {"type": "object", "required": ["city"],
                                                                   "properties": {"city": {"type": "string"}}}}}
        answer = client.chat.completions.create(model="moeray-default", tools=[weather], tool_choice="auto",
                                                messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
                                                max_tokens=64, temperature=0).choices[0]
        assert answer.finish_reason == "tool_calls", answer
        (call,) = answer.message.tool_calls
        assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    finally:
        assert server.stop() == 0, server.log()
    assert "drained in" in server.log()


def test_cli_serves_streams_behind_haproxy_and_drains(tmp_path):
    server = ServeProcess(["--proxy", "haproxy"], tmp_path / "serve.log").start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="moeray-default", prompt="def fib(n):", max_tokens=16,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
        assert chunks[-1].finish_reason == "length" and len(chunks) >= 2
        # HAProxy answered on the port, not Serve's Python proxy.
        assert any(p.info["name"] == "haproxy" for p in psutil.process_iter(["name"])), server.log()
    finally:
        assert server.stop() == 0, server.log()
    assert "drained in" in server.log()


def test_haproxy_on_an_existing_cluster_is_refused_in_one_line():
    code, lines, _ = _serve("--proxy", "haproxy", "--address", "127.0.0.1:1")
    assert code == 2 and len(lines) == 1 and "RAY_SERVE_ENABLE_HA_PROXY=1" in lines[0], lines


def _serve(*args: str) -> tuple[int, list[str], float]:
    started = time.monotonic()
    # An S3 endpoint that refuses connections, whatever this session's moto server is.
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "moeray.platform.cli", "serve", *args], capture_output=True,
                            text=True, timeout=120, env=env)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, lines, time.monotonic() - started


def _checkpoint_without(tmp_path, *missing: str):
    from moeray.platform.default_model import DEFAULT_MODEL_DIR

    folder = tmp_path / "model"
    folder.mkdir()
    for source in DEFAULT_MODEL_DIR.iterdir():
        if source.name not in missing:
            (folder / source.name).write_bytes(source.read_bytes())
    return folder


def _with_config(tmp_path, **changes):
    folder = _checkpoint_without(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _settings_file(tmp_path):
    (tmp_path / "serve.yaml").write_text("port: 9000\nengine:\n  max_num_seqs: 0\n")
    return tmp_path / "serve.yaml"


# case -> (the CLI's arguments, made in a fresh folder; what its one line must say)
BAD_INPUTS = {
    "no-model": (lambda tmp: ["/nonexistent"], lambda tmp: "model '/nonexistent': no config.json there"),
    "no-tokenizer": (lambda tmp: [str(_checkpoint_without(tmp, "tokenizer.json"))],
                     lambda tmp: "tokenizer file not found"),
    "bad-config-key": (lambda tmp: [str(_with_config(tmp, hidden_act="gelu"))], lambda tmp: "config key 'hidden_act'"),
    "mismatched-tokenizer": (lambda tmp: [str(_with_config(tmp, vocab_size=256))],
                             lambda tmp: "tokenizer and model do not match"),
    "bad-setting": (lambda tmp: ["--expert-shards", "100"], lambda tmp: "setting 'expert_parallel.shards'"),
    "unreachable-s3": (lambda tmp: ["s3://moeray-nowhere/model"],
                       lambda tmp: "s3://moeray-nowhere/model is not reachable"),
    "bad-adapter": (lambda tmp: ["--lora", f"sql={tmp}"], lambda tmp: "setting 'lora_adapters.sql'"),
    "yaml-line": (lambda tmp: ["--config", str(_settings_file(tmp))], lambda tmp: f"{tmp / 'serve.yaml'}:3"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_model_or_setting_is_one_line_with_status_2_within_seconds(tmp_path, case):
    make_args, expected = BAD_INPUTS[case]
    code, lines, seconds = _serve(*make_args(tmp_path))
    assert code == 2 and len(lines) == 1 and expected(tmp_path) in lines[0], lines
    assert lines[0].startswith("moeray: ") and "Traceback" not in lines[0]
    assert seconds < 10, f"took {seconds:.1f} s"  # a couple of seconds here; slack for a loaded CI machine


def test_a_replica_that_cannot_start_is_reported_in_one_line_and_not_retried(tmp_path):
    """config.json and the tokenizer pass the checks before Ray starts; the weights are missing,
    which only the replica finds out."""
    folder = _checkpoint_without(tmp_path, "model.safetensors")
    code, lines, seconds = _serve(str(folder))
    failures = [line for line in lines if line.startswith("moeray: the model replica failed to start")]
    assert code == 2 and len(failures) == 1, "\n".join(lines[-20:])
    assert "no *.safetensors files" in failures[0] and "Traceback" not in failures[0]
    assert "Retrying 2 more time" not in "\n".join(lines)  # stopped at the first failure
