"""Constrained decoding in the engine (xgrammar): every kind of grammar, and grammars alongside
everything else a request can do: n > 1, stop strings, max_tokens, logprobs, prefix caching,
chunked prefill, preemption by recompute, LoRA adapters, expert shards, batch mates without one."""

import json
import re

import jsonschema
import pytest

from moeray import LLM, SamplingParams
from moeray.engine import InvalidRequestError
from moeray.engine.params import GrammarSpec

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
SCHEMA = GrammarSpec("json_schema", json.dumps(PERSON))
PROMPTS = [[5, 9, 17, 33, 2, 8], [7, 3, 11], [40, 41, 42, 43, 44, 45, 46, 47]]


def sampled(**changes) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.9, "seed": 3, "max_tokens": 80, "structured": SCHEMA, **changes})


def assert_person(text: str) -> bool:
    jsonschema.validate(json.loads(text), PERSON)
    return True


@pytest.fixture(scope="module")
def llm(hf_folder):
    return LLM(hf_folder[0], block_size=4, max_model_len=256, max_num_batched_tokens=64)


@pytest.mark.parametrize("spec, check", [
    (SCHEMA, assert_person),
    (GrammarSpec("json_object"), lambda text: isinstance(json.loads(text), dict)),
    (GrammarSpec("regex", r"[a-c]{2}-\d{3}"), lambda text: re.fullmatch(r"[a-c]{2}-\d{3}", text)),
    (GrammarSpec("choice", json.dumps(["red", "green", "blue"])), lambda text: text in ("red", "green", "blue")),
    (GrammarSpec("grammar", 'root ::= "x" [0-9]+ "y"'), lambda text: re.fullmatch(r"x[0-9]+y", text)),
], ids=["json_schema", "json_object", "regex", "choice", "grammar"])
def test_every_kind_of_grammar_constrains_sampled_and_greedy_output(llm, spec, check):
    """A random model under a grammar ends where the grammar can (EOS is allowed only there), or
    runs into max_tokens inside an unbounded part (a free-form JSON object's keys)."""
    outputs = [result.outputs[0] for params in (sampled(structured=spec, max_tokens=120),
                                                sampled(structured=spec, temperature=0, max_tokens=120))
               for result in llm.generate(PROMPTS, params)]
    finished = [out for out in outputs if out.finish_reason == "stop"]
    assert len(finished) >= len(outputs) // 2, [out.text for out in outputs]
    for out in finished:
        assert check(out.text), out.text


def test_n_completions_each_follow_the_grammar_and_differ(llm):
    result = llm.generate(PROMPTS[:1], sampled(n=4))[0]
    for out in result.outputs:
        assert_person(out.text)
    assert len({out.text for out in result.outputs}) > 1


def test_max_tokens_cuts_with_length_and_the_cut_text_is_a_prefix_the_grammar_allows(llm):
    out = llm.generate(PROMPTS[:1], sampled(max_tokens=5))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert '{"name":"'.startswith(out.text)  # the only way the schema lets it begin


def test_a_stop_string_still_ends_a_constrained_output(llm):
    out = llm.generate(PROMPTS[:1], sampled(structured=GrammarSpec("choice", json.dumps(["alpha beta"])),
                                            stop=[" beta"]))[0].outputs[0]
    assert out.text == "alpha" and out.finish_reason == "stop"


def test_logprobs_are_the_raw_models_and_the_sampled_token_is_allowed(llm):
    unconstrained = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=1, logprobs=3))[0]
    constrained = llm.generate(PROMPTS[:1], sampled(temperature=0, max_tokens=1, logprobs=3))[0].outputs[0]
    first = constrained.logprobs[0]
    assert constrained.token_ids == [first.token_id] and llm.tokenizer.decode(constrained.token_ids) == "{"
    # The alternatives are the model's own top tokens, not the grammar's: logprobs are unmasked.
    assert first.top == unconstrained.outputs[0].logprobs[0].top


def test_batch_mates_without_a_grammar_are_untouched(llm):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, plain)]
    mixed = llm.generate(PROMPTS + PROMPTS, [plain] * 3 + [sampled(temperature=0)] * 3)
    assert [r.outputs[0].token_ids for r in mixed[:3]] == alone
    for result in mixed[3:]:
        assert_person(result.outputs[0].text)


@pytest.mark.parametrize("options", [
    {"enable_prefix_caching": True, "block_size": 4},
    {"max_num_batched_tokens": 8, "block_size": 4},  # chunked prefill
    {"num_cache_blocks": 20, "block_size": 4, "enable_prefix_caching": False},  # preemption by recompute
], ids=["prefix-caching", "chunked-prefill", "preemption"])
def test_greedy_constrained_output_is_the_same_whatever_the_cache_does(hf_folder, options):
    reference = LLM(hf_folder[0], max_model_len=256, block_size=4)
    shared = [5, 9, 17, 33, 2, 8, 8, 40, 41, 42, 43, 44, 45, 46, 47, 48]
    prompts = [shared + [i, i + 1] for i in range(6)]
    params = sampled(temperature=0, max_tokens=60)
    expected = [r.outputs[0].text for r in reference.generate(prompts, params)]
    llm = LLM(hf_folder[0], max_model_len=256, **options)
    llm.generate(prompts[:1], params)  # a first wave, whose blocks the prefix cache can share
    results = llm.generate(prompts, params)
    assert [r.outputs[0].text for r in results] == expected
    for text in expected:
        assert_person(text)
    if "num_cache_blocks" in options:
        assert llm.engine.stats().preemptions_total > 0
    if options.get("enable_prefix_caching"):
        assert max(r.num_cached_tokens for r in results) >= 16


def test_a_lora_adapter_request_is_constrained_too(hf_folder, tmp_path):
    import moeray.model
    from moeray.engine import Engine, EngineConfig
    from moeray.model.lora import merged_variant
    from moeray.model.tokenizer import Tokenizer
    from support import write_random_adapter

    write_random_adapter(hf_folder[0], tmp_path, seed=4)
    base = moeray.model.load(hf_folder[0])
    engine = Engine(base, Tokenizer.from_pretrained(hf_folder[0]), EngineConfig(max_model_len=128, block_size=4),
                    adapters={"tuned": merged_variant(base, tmp_path)})
    texts = {}
    for request_id, adapter in (("base", None), ("tuned", "tuned")):
        engine.add_request(request_id, PROMPTS[0], sampled(temperature=0), adapter)
        texts[request_id] = ""
    while engine.has_unfinished:
        for out in engine.step():
            texts[out.request_id] += "".join(o.text for o in out.outputs)
    for text in texts.values():
        assert_person(text)
    assert texts["base"] != texts["tuned"]


@pytest.mark.slow
def test_expert_shards_give_the_same_constrained_output(ray_session, hf_folder):
    from moeray.actors.dispatch import start_expert_parallel

    params = sampled(temperature=0, max_tokens=60)
    expected = [r.outputs[0].text for r in LLM(hf_folder[0], max_model_len=256).generate(PROMPTS, params)]
    router, backend = start_expert_parallel(str(hf_folder[0]), 2, name="structured", num_cpus=0.5)
    try:
        sharded = LLM(hf_folder[0], max_model_len=256, experts=backend)
        assert [r.outputs[0].text for r in sharded.generate(PROMPTS, params)] == expected
    finally:
        ray_session.get(router.shutdown.remote())


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec("json_schema", '{"type": "foo"}'), "not a valid JSON schema"),
    (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
    (GrammarSpec("json_schema", json.dumps({"type": "array", "uniqueItems": True})), "/uniqueItems"),
    (GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"x": {"not": {"type": "string"}}}})),
     "/properties/x/not"),
    (GrammarSpec("regex", "(unclosed"), "parenthesis is not closed"),
    (GrammarSpec("grammar", "root ::= "), "EBNF parser error"),
    (GrammarSpec("regex", "(x", param="structured_outputs"), "structured_outputs"),
])
def test_a_bad_grammar_is_refused_naming_its_parameter(llm, spec, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as err:
        llm.generate(PROMPTS[:1], sampled(structured=spec))
    assert err.value.param == spec.param and f"{spec.param}: " in str(err.value)
    assert "/project/cpp" not in str(err.value)


def test_an_unknown_kind_is_refused():
    with pytest.raises(InvalidRequestError, match="unknown kind of structured output 'xml'"):
        GrammarSpec("xml")


def test_a_compile_over_the_time_limit_is_refused_and_the_engine_serves_on(hf_folder):
    import threading

    llm = LLM(hf_folder[0], max_model_len=256, grammar_compile_timeout_s=0.5)
    grammars, release = llm.engine.grammars, threading.Event()
    compile_for_real = grammars._compile
    grammars._compile = lambda spec: (release.wait(), compile_for_real(spec))[1]  # a compile that hangs
    try:
        with pytest.raises(InvalidRequestError, match="took longer than 0.5 s") as err:
            llm.generate(PROMPTS[:1], sampled())
        assert err.value.param == "response_format"
        assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3))[0].outputs[0].token_ids
    finally:
        release.set()
