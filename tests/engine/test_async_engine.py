"""The asyncio engine: concurrent streams, abort and disconnect free blocks, no leaks."""

import asyncio
import gc

import pytest

from moeray import LLM, SamplingParams
from moeray.engine import AsyncEngine, InvalidRequestError


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(scope="module")
def async_engine(hf_folder):
    engine = AsyncEngine(LLM(hf_folder[0], block_size=4, num_cache_blocks=512, max_model_len=256).engine)
    yield engine
    engine.shutdown()


async def collect(engine, prompt, params, request_id=None):
    text, tokens, finish = "", [], None
    async for delta in await engine.generate(prompt, params, request_id):
        for part in delta.outputs:
            text += part.text
            tokens += part.token_ids
            finish = part.finish_reason or finish
    return tokens, text, finish


def test_streams_equal_offline_results(async_engine, hf_folder, prompts):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    offline = LLM(hf_folder[0]).generate(prompts, params)

    async def main():
        return await asyncio.gather(*(collect(async_engine, p, params) for p in prompts))

    streamed = asyncio.run(main())
    assert [s[0] for s in streamed] == [r.outputs[0].token_ids for r in offline]
    assert [s[1] for s in streamed] == [r.outputs[0].text for r in offline]
    assert all(s[2] == "length" for s in streamed)


def test_thousand_short_requests_leave_no_blocks_and_no_growth(async_engine, prompts):
    params = SamplingParams(temperature=0.8, max_tokens=4, ignore_eos=True)

    async def wave(count):
        results = await asyncio.gather(*(collect(async_engine, prompts[i % 5][:8], params) for i in range(count)))
        assert all(len(r[0]) == 4 for r in results)

    asyncio.run(wave(200))  # warm-up: allocator pools, cache pages, lazy imports
    gc.collect()
    before = rss_bytes()
    asyncio.run(wave(1000))
    gc.collect()
    growth = rss_bytes() - before
    stats = async_engine.stats()
    assert stats.cache.used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert not async_engine.engine.requests
    assert growth < 20 * 2**20, f"process grew by {growth / 2**20:.1f} MiB over 1000 requests"


def test_disconnect_and_abort_free_blocks(async_engine, prompts):
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)

    async def main():
        stream = await async_engine.generate(prompts[5], params, "cut-me")
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break  # the client goes away
        await stream.aclose()
        other = await async_engine.generate(prompts[4], params, "abort-me")
        first = await other.__anext__()
        async_engine.abort("abort-me")
        for _ in range(100):
            if async_engine.stats().cache.used_blocks == 0 and not async_engine.engine.requests:
                return first
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks still in use: {async_engine.stats().cache}")

    first = asyncio.run(main())
    assert first.request_id == "abort-me"


def test_invalid_request_raises_in_the_caller(async_engine):
    async def main():
        with pytest.raises(InvalidRequestError) as err:
            await async_engine.generate([1] * 300, SamplingParams())
        assert err.value.param == "prompt"
        # The engine keeps serving.
        return await collect(async_engine, [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))

    assert len(asyncio.run(main())[0]) == 2


def test_a_build_function_runs_on_the_engine_thread_and_its_error_reaches_the_caller(hf_folder, prompts):
    import threading

    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return LLM(hf_folder[0], block_size=4, num_cache_blocks=64, max_model_len=128).engine

    engine = AsyncEngine(build)
    try:
        assert built_on == [engine._thread.name] and engine._thread is not threading.current_thread()
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        tokens, _, finish = asyncio.run(collect(engine, prompts[0], params))
        assert len(tokens) == 3 and finish == "length"
    finally:
        engine.shutdown()

    def broken():
        raise FileNotFoundError("no checkpoint at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        AsyncEngine(broken)
