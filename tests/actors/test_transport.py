"""The shard side of the collective transport, over a real gloo pair in one process (no Ray)."""

import threading
import time

import torch

from moeray.actors.transport import (OP_COMPUTE, OP_STOP, STATUS_ERROR, STATUS_OK, open_groups, pack_work,
                                     rendezvous_store, serve_collective)

HIDDEN = 4


def test_a_shard_keeps_serving_after_idling_past_the_group_timeout_and_reports_errors():
    master = rendezvous_store("127.0.0.1", 0, 2, is_master=True)
    shard_groups = {}
    joining = threading.Thread(target=lambda: shard_groups.update(
        g=open_groups(rendezvous_store("127.0.0.1", master.port, 2, is_master=False), 1, 2, 2.0)))
    joining.start()
    replica, _ = open_groups(master, 0, 2, 2.0)
    joining.join()

    def compute(layout, layer, x, token_of_pair, slot_of_pair, weight_of_pair):
        if layer == 7:
            raise ValueError("boom")
        return x * 2

    server = threading.Thread(target=serve_collective, args=(*shard_groups["g"], compute, HIDDEN, torch.device("cpu")),
                              daemon=True)
    server.start()
    time.sleep(3)  # longer than the groups' 2 s timeout: an idle replica is not a dead one
    for layer, expected in ((0, STATUS_OK), (7, STATUS_ERROR)):
        replica.send([torch.tensor([OP_COMPUTE, 1, layer, 1, 1])], 1, 0).wait()
        replica.send([pack_work(torch.ones(1, HIDDEN), torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]))],
                     1, 0).wait()
        reply = torch.empty(HIDDEN + 1)
        replica.recv([reply], 1, 1).wait()
        assert int(reply[-1]) == expected
        if expected == STATUS_OK:
            assert reply[:HIDDEN].tolist() == [2.0] * HIDDEN
    replica.send([torch.tensor([OP_STOP, 0, 0, 0, 0])], 1, 0).wait()
    server.join(timeout=10)
    assert not server.is_alive()
