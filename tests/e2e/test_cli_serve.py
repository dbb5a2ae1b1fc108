"""`moeray serve` with no model serves the embedded default model (what `make serve` runs)."""

import subprocess
import sys
import time

import httpx
import openai
import pytest

from support import unused_port

pytestmark = pytest.mark.slow


def test_cli_serves_the_default_model(tmp_path):
    port = unused_port()
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "moeray.platform.cli", "serve", "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("moeray serve did not come up:\n" + (tmp_path / "serve.log").read_text())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["moeray-default"]
        reply = client.chat.completions.create(model="moeray-default", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
