"""Block manager: allocation, prefix sharing by content hash, reference counts, LRU eviction."""

import pytest

from moeray.engine.block_manager import BlockManager
from moeray.engine.params import SamplingParams
from moeray.engine.sequence import Sequence

PARAMS = SamplingParams(max_tokens=4)


def seq(tokens, arrival=0):
    return Sequence("r", 0, list(tokens), len(tokens), PARAMS, arrival)


def admit(bm, s):
    """Prefix lookup + capacity for the whole prompt, then mark it computed and committed."""
    bm.allocate_prefix(s)
    assert bm.ensure_capacity(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def test_blocks_cover_tokens_and_usage_is_reported():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    admit(bm, s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    usage = bm.usage()
    assert (usage.used_blocks, usage.num_blocks) == (3, 8) and usage.usage == pytest.approx(3 / 8)
    bm.free(s)
    assert bm.usage().used_blocks == 0 and bm.num_free_blocks == 8


def test_shared_prefix_reuses_full_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    admit(bm, first)
    second = seq([1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97])
    bm.allocate_prefix(second)
    assert second.block_table == first.block_table[:2]
    assert second.num_computed_tokens == second.num_cached_tokens == 8
    assert bm.blocks[first.block_table[0]].ref_count == 2
    # A different first block breaks the chain even if the second block's tokens match.
    third = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate_prefix(third)
    assert third.block_table == [] and third.num_computed_tokens == 0


def test_identical_prompt_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = seq(range(8))
    admit(bm, first)
    again = seq(range(8))
    bm.allocate_prefix(again)
    # Both blocks are cached, but the last token must be computed to get logits.
    assert again.num_computed_tokens == 4 and len(again.block_table) == 1


def test_freed_cached_blocks_survive_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])  # 2 full blocks + 1 partial
    admit(bm, a)
    bm.free(a)
    assert bm.usage().cached_free_blocks == 2 and bm.num_free_blocks == 4
    b = seq([1, 2, 3, 4, 7, 7, 7])
    bm.allocate_prefix(b)
    assert b.num_cached_tokens == 4  # both cached blocks found again after a freed them
    bm.free(b)
    # Fill the cache with unrelated tokens: the cached blocks are evicted, tail block first.
    c = seq([9] * 6)
    bm.allocate_prefix(c)
    assert bm.ensure_capacity(c, 6)
    assert bm.usage().cached_free_blocks == 1
    d = seq([1, 2, 3, 4, 8])
    bm.allocate_prefix(d)
    assert d.num_cached_tokens == 2  # the head block [1, 2] survived, the tail [3, 4] did not


def test_capacity_failure_allocates_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(12))
    assert not bm.ensure_capacity(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_fork_shares_full_blocks_and_copies_partial_tail():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq(range(6))
    admit(bm, parent)
    child = seq(range(6))
    copy = bm.fork(parent, child)
    assert child.block_table[0] == parent.block_table[0]
    assert copy == (parent.block_table[1], child.block_table[1]) and child.block_table[1] != parent.block_table[1]
    assert bm.blocks[parent.block_table[0]].ref_count == 2
    bm.free(parent)
    bm.free(child)
    assert bm.usage().used_blocks == 0
