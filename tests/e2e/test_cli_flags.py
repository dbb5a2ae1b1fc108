"""`moeray serve`'s flags on one real process: the model by its Hugging Face id, offline, from a
cache huggingface_hub laid out from a Hub on 127.0.0.1, a LoRA adapter (`--lora`), routed experts in two shards over the collective transport (`--expert-shards`,
`--transport`), API keys (`--api-key`), a settings file (`--config`) and n-gram speculative
decoding (`--speculative`; greedy answers are still the offline engine's, without it)."""

import json
import os
import re
import subprocess
import sys

import httpx
import openai
import pytest

from moeray import LLM, SamplingParams
from fake_hub import FakeHub
from support import ServeProcess, moeray_greedy, write_hf_model_folder, write_random_adapter

pytestmark = pytest.mark.slow
KEY = "sk-flags"
# The JSON form of the flag; the speed gate off, so that drafts depend on the tokens alone.
SPECULATIVE = '{"method": "ngram", "num_speculative_tokens": 3, "adaptive": false}'


def shard_processes() -> int:
    """Processes Ray titled as ExpertShard actors (in any Ray on this machine: only this test's)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                count += b"ray::ExpertShard" in cmdline.read()
        except OSError:
            pass
    return count


def test_serve_flags_on_one_process(ray_session, tmp_path):
    base = tmp_path / "base"
    write_hf_model_folder(base, "v3", seed=5)
    adapter = tmp_path / "adapter"  # a job's adapter export is tests/jobs' subject; here, any adapter
    tuned = write_random_adapter(base, adapter, seed=3)
    (tmp_path / "serve.yaml").write_text("served_model_name: tiny\nengine:\n  max_model_len: 128\n")

    hf_home = tmp_path / "hf"
    with FakeHub("moeray-test/tiny", base) as hub:
        subprocess.run([sys.executable, "-c", "from moeray.hub import hub_snapshot; hub_snapshot('moeray-test/tiny')"],
                       env={**os.environ, "HF_HOME": str(hf_home), "HF_ENDPOINT": hub.url}, check=True, timeout=120)

    server = ServeProcess(["moeray-test/tiny", "--config", str(tmp_path / "serve.yaml"), "--api-key", KEY,
                           "--lora", f"tuned={adapter}", "--expert-shards", "2", "--transport", "collective",
                            "--speculative", SPECULATIVE],
                          tmp_path / "serve.log", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    server.start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        models = {m.id: getattr(m, "parent", None) for m in client.models.list()}
        assert models == {"tiny": None, "tuned": "tiny"}
        prompt = [1, 5, 7, 9]
        greedy = dict(prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        base_text = client.completions.create(model="tiny", **greedy).choices[0].text
        offline = LLM(base, max_model_len=128)
        (offline_base,) = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        assert base_text == offline_base.outputs[0].text
        tuned_text = client.completions.create(model="tuned", **greedy).choices[0].text
        tuned_ids = moeray_greedy(tuned, prompt, 6)
        assert tuned_ids != list(offline_base.outputs[0].token_ids)
        assert tuned_text == offline.tokenizer.decode(tuned_ids)
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401  # no key
        assert shard_processes() == 2
        # A prompt whose greedy continuation repeats itself, so prompt lookup drafts (found offline
        # with the same drafting, which depends on the tokens only).
        drafting = LLM(base, max_model_len=128, speculative=json.loads(SPECULATIVE))
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        candidates = [[5, 6, 7, 8] * 4, [9] * 12, [3, 4] * 8, [11, 12, 13] * 5, [20, 21] * 6]
        drafted = [r for r in drafting.generate(candidates, params) if r.num_draft_tokens > 0]
        assert drafted, "no candidate prompt gets drafts offline"
        expected = max(drafted, key=lambda r: r.num_accepted_tokens)
        answer = client.completions.create(model="tiny", prompt=expected.prompt_token_ids, max_tokens=24,
                                           temperature=0, extra_body={"ignore_eos": True})
        (plain,) = offline.generate([expected.prompt_token_ids], params)
        assert answer.choices[0].text == plain.outputs[0].text == expected.outputs[0].text
        details = answer.usage.completion_tokens_details
        assert details is not None and (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (
            expected.num_accepted_tokens, expected.num_draft_tokens - expected.num_accepted_tokens)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        drafts = re.search(r"^moeray_spec_decode_draft_tokens_total (\S+)$", metrics, re.MULTILINE)
        assert drafts and float(drafts.group(1)) >= 1
        assert "collective expert transport: 2 shards, data plane gloo" in server.log()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
