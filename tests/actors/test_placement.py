"""Placement planning (pure Python): even spread, redundant replicas, EPLB-style rebalance."""

import pytest

from moeray.actors.placement import imbalance, initial_placement, rebalance


def test_initial_placement_spreads_every_expert_once():
    placement = initial_placement([1, 2], num_experts=16, num_shards=4)
    for layer in (1, 2):
        held = sorted(e for shard in placement.slots for e in shard[layer])
        assert held == list(range(16))
        assert all(len(shard[layer]) == 4 for shard in placement.slots)
    assert placement.version == 1 and not placement.missing_experts()


def test_redundant_replicas_live_on_other_shards():
    placement = initial_placement([1], num_experts=8, num_shards=2, redundant=4)
    replicated = [e for e in range(8) if len(placement.replicas(1, e)) == 2]
    assert len(replicated) == 4
    for expert in replicated:
        shards = [s for s, _ in placement.replicas(1, expert)]
        assert len(set(shards)) == 2


def test_dead_shard_experts_fall_back_to_replicas():
    placement = initial_placement([1], num_experts=4, num_shards=2, redundant=4)
    placement.dead = {0}
    assert not placement.missing_experts()  # everything has a copy on shard 1
    lonely = initial_placement([1], num_experts=4, num_shards=2)
    lonely.dead = {1}
    assert len(lonely.missing_experts()) == 2


def test_rebalance_evens_a_skewed_load():
    placement = initial_placement([3], num_experts=8, num_shards=2)
    loads = {3: [400, 1, 300, 1, 200, 1, 100, 1]}  # the even experts, all on shard 0 at first
    before = imbalance(placement.shard_loads(loads))
    planned = rebalance(placement, loads, redundant=2)
    after = imbalance(planned.shard_loads(loads))
    assert before > 1.9 and after < 1.1
    assert planned.version == placement.version + 1 and planned.layout == placement.layout + 1
    assert len(planned.replicas(3, 0)) == 2  # the hottest expert got a second replica


def test_redundancy_needs_two_shards():
    with pytest.raises(ValueError, match="redundant"):
        initial_placement([1], num_experts=4, num_shards=1, redundant=1)
