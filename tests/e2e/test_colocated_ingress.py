"""`ingress: colocated`: the OpenAI app inside the model replica (one Ray hop less per token),
over real HTTP with the openai client: same answers as the offline engine, streaming, errors."""

import openai
import pytest

from moeray import LLM, SamplingParams
from support import API_KEY, deploy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def colocated(serve_port, model_folder):
    settings = {"model": str(model_folder), "served_model_name": "tiny-colocated", "api_keys": [API_KEY],
                "ingress": "colocated", "engine": {"max_model_len": 256, "block_size": 4, "num_cache_blocks": 512}}
    base = deploy(settings, "/colocated", serve_port, "colocated")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    from ray import serve

    serve.delete("colocated")


def test_colocated_app_answers_as_the_offline_engine(colocated, model_folder):
    assert [m.id for m in colocated.models.list()] == ["tiny-colocated"]
    response = colocated.completions.create(model="tiny-colocated", prompt="def add(a, b):", max_tokens=10,
                                            temperature=0)
    expected = LLM(model_folder, max_model_len=256).generate(["def add(a, b):"],
                                                             SamplingParams(temperature=0, max_tokens=10))
    assert response.choices[0].text == expected[0].outputs[0].text
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in colocated.chat.completions.create(
        model="tiny-colocated", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0,
        stream=True))
    whole = colocated.chat.completions.create(model="tiny-colocated", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=8, temperature=0).choices[0].message.content
    assert streamed == whole
    with pytest.raises(openai.NotFoundError):
        colocated.completions.create(model="other", prompt="x", max_tokens=2)
