"""The real Ray Serve app over HTTP on 127.0.0.1, driven by the official openai client."""

import re
import time

import httpx
import openai
import pytest
import torch

from support import API_KEY, moeray_greedy
from moeray import LLM, SamplingParams

pytestmark = pytest.mark.slow
MODEL = "tiny-moe"
ADAPTER = "tiny-moe-lora"


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(model_folder):
    return LLM(model_folder, max_model_len=256)


def test_list_models(client):
    assert [m.id for m in client.models.list()] == [MODEL, ADAPTER]


def test_lora_adapter_is_selected_by_model_and_equals_the_in_memory_model(client, lora_adapter, model_folder):
    from moeray.model.tokenizer import Tokenizer

    prompt = [5, 9, 17, 33, 2, 8, 8, 40, 41]
    greedy = {"max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    tuned = client.completions.create(model=ADAPTER, prompt=prompt, **greedy)
    assert tuned.model == ADAPTER
    expected = moeray_greedy(lora_adapter[1], prompt, 8)  # the unmerged adapter, full forward passes
    assert tuned.choices[0].text == Tokenizer.from_pretrained(model_folder).decode(expected)
    base = client.completions.create(model=MODEL, prompt=prompt, **greedy)
    assert base.choices[0].text != tuned.choices[0].text  # the adapter really changes the output

    stream = client.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "hi"}],
                                            stream=True, **greedy)
    chunks = list(stream)
    assert chunks and all(chunk.model == ADAPTER for chunk in chunks)


def test_chat_greedy_equals_offline_engine(client, offline):
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True})
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    choice = response.choices[0]
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_completion_greedy_equals_offline_engine(client, offline):
    response = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10, temperature=0)
    expected = offline.generate(["def add(a, b):"], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason


def test_chat_streaming_matches_non_streaming_and_reports_usage(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=15,
                  temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15


def test_raw_sse_ends_with_done(served):
    body = {"model": MODEL, "prompt": "x = ", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_n2_completions_with_seed_are_reproducible(client):
    kwargs = dict(model=MODEL, prompt="import os\n", max_tokens=12, temperature=1.0, n=2, seed=7,
                  extra_body={"ignore_eos": True})
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert len(texts) == 2 and texts[0] != texts[1]
    assert first.usage.completion_tokens == 24


def test_streaming_n2_chat_indexes(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, n=2, temperature=0.8, seed=3, stream=True,
                                                 extra_body={"ignore_eos": True}))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_stop_string(client):
    base = client.completions.create(model=MODEL, prompt="for i in", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[5:8]
    cut = base.find(stop)
    stopped = client.completions.create(model=MODEL, prompt="for i in", max_tokens=20, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert stopped.text == base[:cut] and stopped.finish_reason == "stop"


def test_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top token
    legacy = client.completions.create(model=MODEL, prompt="a", max_tokens=3, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    assert len(legacy.choices[0].logprobs.tokens) == 3 and len(legacy.choices[0].logprobs.top_logprobs[0]) == 2


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(client, offline):
    """`echo` + `logprobs` on /v1/completions (what lm-eval's log-likelihood tasks send): every
    prompt token's log-probability given the ones before it, as the model's own forward gives."""
    prompt = "def add(a, b): return a + b"
    choice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                       logprobs=2).choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    logprobs = choice.logprobs
    ids = offline.tokenizer.encode(prompt)
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    with torch.no_grad():
        logits = offline.engine.model(torch.tensor([ids]))[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:len(ids)]), expected, atol=1e-4, rtol=0)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs[1:])  # a dict: equal token texts merge
    for offset, token in zip(logprobs.text_offset, logprobs.tokens):  # offsets index the echoed text
        assert choice.text[offset:offset + len(token)] == token
    tokens = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True,
                                       logprobs=0).choices[0].logprobs
    assert tokens.token_logprobs[:len(ids)] == logprobs.token_logprobs[:len(ids)]  # token-id prompts alike
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed.startswith(prompt)


def test_penalties_top_k_and_min_p_reach_the_sampler(client, offline):
    """Seeded sampling with every sampling extra: the served text is the offline engine's, and
    different from the same request without the extras (so they were not dropped)."""
    common = dict(temperature=0.9, seed=11, max_tokens=16)
    extras = dict(presence_penalty=0.5, frequency_penalty=0.7)
    vllm_extras = dict(top_k=5, min_p=0.05, repetition_penalty=1.3)
    served = client.completions.create(model=MODEL, prompt="def add(a, b):", **common, **extras,
                                       extra_body={**vllm_extras, "ignore_eos": True}).choices[0].text
    expected = offline.generate(["def add(a, b):"], SamplingParams(**common, **extras, **vllm_extras,
                                                                   ignore_eos=True))[0].outputs[0].text
    plain = client.completions.create(model=MODEL, prompt="def add(a, b):", **common,
                                      extra_body={"ignore_eos": True}).choices[0].text
    assert served == expected and served != plain


def test_unknown_fields_are_ignored(client):
    response = client.completions.create(model=MODEL, prompt="a", max_tokens=2,
                                         extra_body={"some_future_field": {"x": 1}, "ignore_eos": True})
    assert response.usage.completion_tokens == 2


# ---- errors ----------------------------------------------------------------------------------------
def error_of(exc_info) -> dict:
    return exc_info.value.response.json()["error"]


def test_invalid_parameter_is_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert error_of(err)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", top_p=0)
    assert error_of(err)["param"] == "top_p"


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=5)
    assert error_of(err)["param"] == "prompt" and "context length" in error_of(err)["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 400}])
    assert error_of(err)["param"] == "messages"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-17", prompt="hi")
    assert error_of(err)["code"] == "model_not_found" and error_of(err)["param"] == "model"


def test_missing_or_wrong_api_key_is_401(served):
    bad = openai.OpenAI(base_url=f"{served}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert error_of(err)["code"] == "invalid_api_key"
    # No Authorization header at all (the openai client always sends one).
    response = httpx.post(f"{served}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    # Health and metrics stay open for probes and scrapers.
    assert httpx.get(f"{served}/health", timeout=30).status_code == 200


def test_malformed_json_is_400(served):
    response = httpx.post(f"{served}/v1/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_metrics_after_traffic(served, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(f"{served}/metrics", timeout=30).text
    assert metric(text, "moeray_generation_tokens_total") >= 3
    assert metric(text, "moeray_prompt_tokens_total") >= 1
    assert metric(text, "moeray_time_to_first_token_seconds_count") >= 1
    assert metric(text, "moeray_e2e_request_latency_seconds_count") >= 1
    assert "moeray_time_per_output_token_seconds_bucket" in text
    assert metric(text, "moeray_num_requests_running") == 0
    assert "moeray_cache_usage_ratio" in text and "moeray_num_requests_waiting" in text
    routed = [float(v) for v in re.findall(r'^moeray_expert_routed_tokens_total{expert="\d+",layer="\d+"} (\S+)$',
                                           text, re.MULTILINE)]
    assert routed and sum(routed) > 0


def test_twenty_cut_streams_free_the_cache(served):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "print(", "max_tokens": 200, "stream": True, "ignore_eos": True}
    for _ in range(20):
        with httpx.stream("POST", f"{served}/v1/completions", json=body, headers=headers, timeout=60) as response:
            for i, _line in enumerate(response.iter_lines()):
                if i >= 3:
                    break  # leave after a few chunks: the connection closes
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{served}/metrics", timeout=30).text
        if metric(text, "moeray_num_requests_running") == 0 and metric(text, "moeray_cache_usage_ratio") == 0:
            return
        time.sleep(0.5)
    pytest.fail(f"cache not freed after disconnects:\n{text}")
