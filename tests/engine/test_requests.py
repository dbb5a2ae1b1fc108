"""Per-request behaviour through the whole engine: seeds, n > 1, stops, logprobs, validation."""

import pytest
import torch

from moeray import LLM, SamplingParams
from moeray.engine import InvalidRequestError


@pytest.fixture(scope="module")
def llm(hf_folder):
    return LLM(hf_folder[0], block_size=4, max_model_len=256, max_num_batched_tokens=64)


def tokens(result, i=0):
    return result.outputs[i].token_ids


def test_seeded_sampling_is_independent_of_batch_mates(llm, prompts):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompts[1]], seeded)[0]
    noise = [SamplingParams(temperature=1.3, top_k=5, max_tokens=15, ignore_eos=True),
             SamplingParams(temperature=0.5, seed=9, max_tokens=25, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=3)]
    crowded = llm.generate([prompts[0], prompts[2], prompts[1], prompts[4]], [noise[0], noise[1], seeded, noise[2]])
    assert tokens(crowded[2]) == tokens(alone)
    other_seed = llm.generate([prompts[1]], SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=20,
                                                           ignore_eos=True))[0]
    assert tokens(other_seed) != tokens(alone)


def test_n_completions_share_the_prompt_and_differ(llm, prompts):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    before = llm.engine.stats().prompt_tokens_total
    result = llm.generate([prompts[5]], params)[0]
    # The 64-token prompt was computed once for all three completions.
    assert llm.engine.stats().prompt_tokens_total - before == len(prompts[5])
    outs = [tokens(result, i) for i in range(3)]
    assert len({tuple(o) for o in outs}) == 3 and all(len(o) == 12 for o in outs)
    again = llm.generate([prompts[5]], params)[0]
    assert [tokens(again, i) for i in range(3)] == outs


def test_greedy_n_completions_are_identical(llm, prompts):
    result = llm.generate([prompts[2]], SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True))[0]
    single = llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert tokens(result, 0) == tokens(result, 1) == tokens(single)


def test_logprobs_are_the_models_log_softmax(llm, hf_folder, prompts):
    _, reference = hf_folder
    prompt = prompts[1]
    result = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    out = result.outputs[0]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    expected = logits.log_softmax(-1)
    for step, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[step]
        assert lp.logprob == pytest.approx(expected[step, lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == expected[step].topk(3).indices.tolist()


def test_stop_string_across_tokens_is_excluded(llm, prompts):
    base = llm.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    # A stop string spanning the boundary between the 5th and 6th generated tokens' text.
    text5 = llm.tokenizer.decode(base.token_ids[:5])
    text6 = llm.tokenizer.decode(base.token_ids[:6])
    assert len(text6) > len(text5) >= 1
    stop = text5[-1:] + text6[len(text5):][:2]
    cut = base.text.find(stop)
    stopped = llm.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                        stop=["@@never@@", stop]))[0].outputs[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == base.text[:cut] and stop not in stopped.text


def test_stop_token_ids_and_eos(llm, prompts):
    base = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_token = base.token_ids[3]
    first = base.token_ids.index(stop_token)
    out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_token]))[0]
    assert out.outputs[0].finish_reason == "stop" and tokens(out) == base.token_ids[:first + 1]


def test_max_tokens_gives_length(llm, prompts):
    out = llm.generate([prompts[0]], SamplingParams(temperature=0.7, max_tokens=7, ignore_eos=True, seed=0))[0]
    assert out.outputs[0].finish_reason == "length" and len(tokens(out)) == 7


def test_text_is_the_incremental_decode_even_for_multibyte(llm, prompts):
    # High temperature over a byte-level vocabulary produces broken-up multi-byte characters.
    params = SamplingParams(temperature=2.0, max_tokens=60, seed=3, ignore_eos=True)
    for result in llm.generate(prompts[:3], params):
        out = result.outputs[0]
        assert out.text == llm.tokenizer.decode(out.token_ids)


@pytest.mark.parametrize("prompt, params, param", [
    ([1] * 256, SamplingParams(max_tokens=1), "prompt"),
    ([1] * 200, SamplingParams(max_tokens=100), "max_tokens"),
    ([1, 2, 99999], SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ("", SamplingParams(), "prompt"),
    ([1, 2], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
])
def test_invalid_requests_name_the_parameter(llm, prompt, params, param):
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([prompt], params)
    assert err.value.param == param


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("top_k", -3), ("min_p", 2),
                                          ("presence_penalty", 3), ("n", 0), ("max_tokens", 0), ("logprobs", 50),
                                          ("repetition_penalty", 0)])
def test_bad_sampling_values(field, value):
    with pytest.raises(InvalidRequestError, match=field) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


def test_one_bad_request_stops_nothing_else(llm, prompts):
    engine = llm.engine
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = tokens(llm.generate([prompts[4]], good)[0])
    engine.add_request("good", prompts[4], good)
    out = [t for delta in engine.step() for t in delta.outputs[0].token_ids]
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", [1] * 300, good)
    while engine.has_unfinished:
        for delta in engine.step():
            out += delta.outputs[0].token_ids
    assert out == expected


def test_invalid_prompt_in_a_batch_does_no_work(llm, prompts):
    before = llm.engine.stats().prompt_tokens_total
    with pytest.raises(InvalidRequestError, match="prompt 1"):
        llm.generate([prompts[0], [1] * 300], SamplingParams(max_tokens=2))
    assert llm.engine.stats().prompt_tokens_total == before and not llm.engine.has_unfinished


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "Hello there"}]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    chat = llm.chat(messages, greedy)[0]
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat.prompt_token_ids == ids
    assert tokens(chat) == tokens(llm.generate([ids], greedy)[0])


def test_cache_reports_mla_bytes_per_token(llm):
    args = llm.engine.args
    # tiny test model: 3 layers x (24 latent + 8 rope) x 4 bytes vs 4 heads x (24 + 12) per-head K/V.
    assert llm.engine.cache.bytes_per_token == 3 * (24 + 8) * 4
    from moeray.engine.cache import full_kv_bytes_per_token
    assert full_kv_bytes_per_token(args, torch.float32) == 3 * 4 * (24 + 12) * 4
