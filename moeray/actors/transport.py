"""How a model replica's token groups reach the expert shards: two transports, one interface.

Contract: `transport.exchange(layout, layer, works)` sends every `ShardWork` (the rows of x a
shard needs plus its (token, slot, weight) pairs) to its shard and returns {shard: output rows};
`start` / `finish` are its two halves, so the caller can compute something else (the other
micro-batch's attention) while the shards work.
A shard that cannot answer raises `ShardFailed` naming it; a shard that no longer holds the
caller's slot layout raises `ShardFailed(stale=True)`.
- `RayTransport`: one actor call per shard (any topology, tensors through the object store).
- `CollectiveTransport`: a torch.distributed gloo group formed by the replica (rank 0) and its
  shards (ranks 1..N), with point-to-point sends of a fixed header then the tensors; each shard
  runs a receive loop on a thread. On a broken group (a shard died) it hands over to
  `RayTransport` for good: gloo groups cannot lose a member.
"""

from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

logger = logging.getLogger(__name__)

HEADER_FIELDS = 5  # op, layout, layer, unique tokens U, pairs P
OP_COMPUTE, OP_STOP = 1, 0


class ShardFailed(Exception):
    def __init__(self, shards: set[int], stale: bool = False):
        super().__init__(f"expert shards {sorted(shards)} failed" if shards else "stale slot layout")
        self.shards, self.stale = shards, stale


@dataclass
class ShardWork:
    shard: int
    tokens: torch.Tensor  # [U] rows of the layer input this shard needs
    x: torch.Tensor  # [U, D]
    token_of_pair: torch.Tensor  # [P] index into x
    slot_of_pair: torch.Tensor  # [P]
    weight_of_pair: torch.Tensor  # [P]


class RayTransport:
    name = "ray"

    def __init__(self, shards: list):
        self.shards = shards

    def start(self, layout: int, layer: int, works: list[ShardWork]):
        return {w.shard: self.shards[w.shard].compute.remote(layout, layer, w.x, w.token_of_pair, w.slot_of_pair,
                                                             w.weight_of_pair) for w in works}

    def finish(self, refs) -> dict[int, torch.Tensor]:
        results, failed, stale = {}, set(), False
        for shard, ref in refs.items():
            try:
                results[shard] = ray.get(ref)
            except (RayActorError, ActorUnavailableError):
                failed.add(shard)
            except RayTaskError as err:
                if "StaleLayoutError" not in str(err):
                    raise
                stale = True
        if failed or stale:
            raise ShardFailed(failed, stale=not failed)
        return results

    def exchange(self, layout: int, layer: int, works: list[ShardWork]) -> dict[int, torch.Tensor]:
        return self.finish(self.start(layout, layer, works))

    def close(self) -> None:
        pass


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_group(host: str, port: int, rank: int, world: int, timeout_s: float) -> dist.ProcessGroupGloo:
    """A gloo group of its own (no global default group): the replica's and each shard's."""
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=120))
    return dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=timeout_s))


class CollectiveTransport:
    name = "collective"

    def __init__(self, shards: list, host: str | None = None, timeout_s: float = 30.0):
        self.shards = shards
        self.fallback = RayTransport(shards)
        self.broken = False
        host = host or ray.util.get_node_ip_address()
        port = _free_port(host)
        world = len(shards) + 1
        joins = [s.join_collective.remote(host, port, i + 1, world, timeout_s) for i, s in enumerate(shards)]
        self.group = open_group(host, port, 0, world, timeout_s)
        ray.get(joins)

    def start(self, layout: int, layer: int, works: list[ShardWork]):
        """Post the sends and the receives; nothing waits here (the shards start computing)."""
        if self.broken:
            return ("ray", self.fallback.start(layout, layer, works))
        try:
            handles = []
            for w in works:
                dst = w.shard + 1
                header = torch.tensor([OP_COMPUTE, layout, layer, w.x.shape[0], w.token_of_pair.numel()])
                for tensor in (header, w.x.float().contiguous(), w.token_of_pair.long(), w.slot_of_pair.long(),
                               w.weight_of_pair.float()):
                    handles.append(self.group.send([tensor], dst, 0))
            outputs = {w.shard: torch.empty(w.x.shape[0], w.x.shape[1]) for w in works}
            status = {w.shard: torch.empty(1, dtype=torch.long) for w in works}
            for w in works:  # the status says whether the output that follows is valid
                handles.append(self.group.recv([status[w.shard]], w.shard + 1, 1))
                handles.append(self.group.recv([outputs[w.shard]], w.shard + 1, 1))
        except RuntimeError as err:
            return self._break(err, layout, layer, works)
        return ("collective", (handles, outputs, status, (layout, layer, works)))

    def _break(self, err, layout, layer, works):
        logger.warning("collective expert transport broken (%s); continuing over Ray actor calls", err)
        self.broken = True  # a member died: the group is unusable from now on
        return ("ray", self.fallback.start(layout, layer, works))

    def finish(self, pending) -> dict[int, torch.Tensor]:
        kind, state = pending
        if kind == "ray":
            return self.fallback.finish(state)
        handles, outputs, status, request = state
        try:
            for handle in handles:
                handle.wait()
        except RuntimeError as err:
            return self.fallback.finish(self._break(err, *request)[1])
        if any(int(s) != 0 for s in status.values()):
            raise ShardFailed(set(), stale=True)
        dtype = request[2][0].x.dtype
        return {shard: out.to(dtype) for shard, out in outputs.items()}

    def exchange(self, layout: int, layer: int, works: list[ShardWork]) -> dict[int, torch.Tensor]:
        return self.finish(self.start(layout, layer, works))

    def close(self) -> None:
        if not self.broken:
            stop = torch.tensor([OP_STOP, 0, 0, 0, 0])
            for i in range(len(self.shards)):
                try:
                    self.group.send([stop], i + 1, 0).wait()
                except RuntimeError:
                    pass


def serve_collective(group: dist.ProcessGroupGloo, compute, hidden_size: int) -> None:
    """The shard side: receive work from rank 0, compute, send the output back, until OP_STOP."""
    header = torch.empty(HEADER_FIELDS, dtype=torch.long)
    while True:
        try:
            group.recv([header], 0, 0).wait()
        except RuntimeError:
            return  # the replica went away
        op, layout, layer, num_tokens, num_pairs = header.tolist()
        if op == OP_STOP:
            return
        x = torch.empty(num_tokens, hidden_size)
        tokens, slots = torch.empty(num_pairs, dtype=torch.long), torch.empty(num_pairs, dtype=torch.long)
        weights = torch.empty(num_pairs)
        for tensor in (x, tokens, slots, weights):
            group.recv([tensor], 0, 0).wait()
        try:
            out, status = compute(layout, layer, x, tokens, slots, weights).float(), 0
        except KeyError:  # StaleLayoutError: tell the replica to refresh its placement
            out, status = torch.zeros(num_tokens, hidden_size), 1
        group.send([torch.tensor([status])], 0, 1).wait()
        group.send([out.contiguous()], 0, 1).wait()


TRANSPORT_TYPES = {RayTransport.name: RayTransport, CollectiveTransport.name: CollectiveTransport}
