"""Losing a whole node, not one process: what happens on a GPU cluster when a machine goes.

The scenario runs in its own process (`node_failure_scenario.py`), which starts a multi-node
Ray cluster on this machine; the session's Ray stays untouched."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCENARIO = Path(__file__).with_name("node_failure_scenario.py")


def test_a_node_holding_a_shard_dies_mid_stream_and_nothing_changes(tmp_path):
    log = tmp_path / "scenario.log"
    with open(log, "w") as output:
        done = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path / "result.json")], stdout=output,
                              stderr=subprocess.STDOUT, timeout=400)
    assert done.returncode == 0, log.read_text()[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    before, after = result["shard_nodes_before"], result["shard_nodes_after"]

    assert len(set(before)) == 2 and set(before) <= set(result["worker_nodes"])  # SPREAD: a node each
    assert result["router_node"] == result["head_node"]  # with the replica that made it, not with a shard
    assert result["removed"] and before[1] not in result["alive_nodes"]
    assert result["tokens_equal"], "the streams' tokens changed when the node died"
    assert after[0] == before[0] and after[1] != before[1] and after[1] in result["alive_nodes"]
    health = result["health"]
    assert health["dead"] == [] and health["missing_experts"] == 0 and health["restarts"] == [0, 1]
    assert result["after_equal"] and all(result["work_per_shard_after"])  # the moved shard serves again
