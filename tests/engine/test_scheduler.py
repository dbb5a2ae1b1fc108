"""Scheduler: decodes first, chunked prefill under the token budget, preemption of the newest."""

import subprocess
import sys

from moeray.engine.block_manager import BlockManager
from moeray.engine.params import SamplingParams
from moeray.engine.scheduler import Scheduler, SchedulerConfig
from moeray.engine.sequence import Sequence

PARAMS = SamplingParams(max_tokens=100)


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, chunked=True, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(budget, max_seqs, chunked), bm)


def new_seq(n, arrival, first=0):
    return Sequence(f"r{arrival}", 0, list(range(first, first + n)), n, PARAMS, arrival)


def run_step(sched):
    out = sched.schedule()
    sched.complete(out.chunks)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.token_ids.append(7)  # a sampled token
    return out


def test_engine_bookkeeping_imports_no_torch():
    code = ("import sys, moeray.engine.scheduler, moeray.engine.block_manager, moeray.engine.sequence; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_long_prompt_is_chunked_and_decodes_go_first():
    sched = make(budget=16)
    short = new_seq(3, 0)
    sched.add(short)
    run_step(sched)  # short prefilled, now decoding
    long = new_seq(40, 1, first=100)
    sched.add(long)
    sizes = []
    for _ in range(3):
        out = run_step(sched)
        assert out.chunks[0].seq is short and out.chunks[0].num_tokens == 1  # decode first, every step
        sizes.append(out.chunks[1].num_tokens)
        assert out.num_tokens <= 16
    assert sizes == [15, 15, 10]
    assert long.num_output_tokens == 1  # sampled only when the last chunk finished the prompt


def test_without_chunking_a_prompt_waits_for_a_full_budget():
    sched = make(budget=16, chunked=False)
    sched.add(new_seq(10, 0))
    sched.add(new_seq(10, 1, first=50))
    out = run_step(sched)
    assert [c.num_tokens for c in out.chunks] == [10]  # the second does not fit in the 6 left


def test_max_num_seqs_limits_admission():
    sched = make(max_seqs=2, budget=100)
    for i in range(4):
        sched.add(new_seq(3, i, first=10 * i))
    out = run_step(sched)
    assert len(out.chunks) == 2 and len(sched.waiting) == 2


def test_preempts_newest_when_blocks_run_out_and_recomputes_it():
    sched = make(num_blocks=4, block_size=4, budget=64, prefix=False)
    old, new = new_seq(7, 0), new_seq(7, 1, first=20)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # prompts computed: 2 blocks each, 8 tokens after sampling
    run_step(sched)  # decode of token 8 still fits in 2 blocks
    out = run_step(sched)  # token 9 needs a third block each: none free
    assert out.preempted == [new]
    assert [c.seq for c in out.chunks] == [old]
    assert new.num_computed_tokens == 0 and new.block_table == [] and sched.waiting[0] is new
    # Once old finishes, new is recomputed from scratch, prompt and generated token alike.
    sched.finish(old, "stop")
    out = run_step(sched)
    assert out.chunks[0].seq is new and out.chunks[0].start == 0 and out.chunks[0].num_tokens == 9


def test_abort_frees_blocks():
    sched = make()
    seq = new_seq(10, 0)
    sched.add(seq)
    run_step(sched)
    assert sched.block_manager.usage().used_blocks == 3
    assert sched.abort("r0") == [seq]
    assert sched.block_manager.usage().used_blocks == 0 and not sched.has_unfinished
