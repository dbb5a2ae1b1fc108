"""`build_engine` is the one builder: two engines built from the same checkpoint and options give
identical outputs (tokens and log-probabilities), native decoder and all."""

from moeray import LLM, SamplingParams
from moeray.engine.build import build_engine
from moeray.engine.config import EngineConfig
from moeray.kernels import cpu


def test_building_the_engine_twice_gives_identical_outputs(hf_folder, prompts):
    folder, _ = hf_folder
    params = [SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=8, logprobs=2, ignore_eos=True)]
    runs = []
    for _ in range(2):
        llm = LLM(folder, max_model_len=256, block_size=4)
        assert (llm.engine.runner.native is not None) == (cpu.library() is not None)
        results = llm.generate(prompts * 2, [params[0]] * len(prompts) + [params[1]] * len(prompts))
        runs.append([(r.outputs[0].token_ids, [(e.token_id, e.logprob) for e in r.outputs[0].logprobs])
                     for r in results])
    assert runs[0] == runs[1]


def test_llm_and_build_engine_are_the_same_engine(hf_folder, prompts):
    folder, _ = hf_folder
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    offline = [r.outputs[0].token_ids for r in LLM(folder, max_model_len=256).generate(prompts, greedy)]
    engine = build_engine(folder, EngineConfig(max_model_len=256))
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy)
    tokens: dict[str, list[int]] = {}
    while engine.requests:
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == offline
