"""How a model replica's token groups reach the expert shards: two transports, one interface.

Contract: `transport.exchange(layout, layer, works)` sends every `ShardWork` (the rows of x a
shard needs plus its (token, slot, weight) pairs) to its shard and returns {shard: output rows};
`start` / `finish` are its two halves, so the caller can compute something else (the other
micro-batch's attention) while the shards work.
A shard that cannot answer raises `ShardFailed` naming it; a shard that no longer holds the
caller's slot layout raises `ShardFailed(stale=True)`.
- `RayTransport`: one actor call per shard (any topology, tensors through the object store).
- `CollectiveTransport`: a torch.distributed gloo group formed by the replica (rank 0) and its
  shards (ranks 1..N), with point-to-point messages: per shard and layer a fixed header, then one
  packed float32 payload (x, then token, slot and weight of each pair), answered by one packed
  reply (the output rows, then a status); each shard runs a receive loop on a thread. Three
  messages per shard and layer, since on a few busy cores each message costs a thread wake-up.
  On a broken group (a shard died) it hands over to `RayTransport` for good: gloo groups cannot
  lose a member.
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
            handles, replies = [], {}
            for w in works:
                dst = w.shard + 1
                header = torch.tensor([OP_COMPUTE, layout, layer, w.x.shape[0], w.token_of_pair.numel()])
                handles.append(self.group.send([header], dst, 0))
                handles.append(self.group.send([pack_work(w.x, w.token_of_pair, w.slot_of_pair,
                                                          w.weight_of_pair)], dst, 0))
                replies[w.shard] = torch.empty(w.x.shape[0] * w.x.shape[1] + 1)  # output rows, then status
                handles.append(self.group.recv([replies[w.shard]], dst, 1))
        except RuntimeError as err:
            return self._break(err, layout, layer, works)
        return ("collective", (handles, replies, (layout, layer, works)))

    def _break(self, err, layout, layer, works):
        logger.warning("collective expert transport broken (%s); continuing over Ray actor calls", err)
        self.broken = True  # a member died: the group is unusable from now on
        return ("ray", self.fallback.start(layout, layer, works))

    def finish(self, pending) -> dict[int, torch.Tensor]:
        kind, state = pending
        if kind == "ray":
            return self.fallback.finish(state)
        handles, replies, request = state
        try:
            for handle in handles:
                handle.wait()
        except RuntimeError as err:
            return self.fallback.finish(self._break(err, *request)[1])
        if any(int(reply[-1]) != 0 for reply in replies.values()):
            raise ShardFailed(set(), stale=True)
        works = {w.shard: w for w in request[2]}
        return {shard: reply[:-1].view(works[shard].x.shape).to(works[shard].x.dtype)
                for shard, reply in replies.items()}

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


def pack_work(x: torch.Tensor, token_of_pair: torch.Tensor, slot_of_pair: torch.Tensor,
              weight_of_pair: torch.Tensor) -> torch.Tensor:
    """One float32 message: x [U, D] flattened, then token, slot and weight of each of the P pairs.
    Token and slot indices are small integers (< 2**24), exact in float32."""
    return torch.cat((x.float().reshape(-1), token_of_pair.float(), slot_of_pair.float(), weight_of_pair.float()))


def unpack_work(payload: torch.Tensor, num_tokens: int, num_pairs: int, hidden_size: int):
    """The inverse of `pack_work`: (x [U, D], token_of_pair [P], slot_of_pair [P], weight_of_pair [P])."""
    x, tokens, slots, weights = payload.split([num_tokens * hidden_size, num_pairs, num_pairs, num_pairs])
    return x.view(num_tokens, hidden_size), tokens.long(), slots.long(), weights


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
        payload = torch.empty(num_tokens * hidden_size + 3 * num_pairs)
        group.recv([payload], 0, 0).wait()
        reply = torch.empty(num_tokens * hidden_size + 1)
        try:
            reply[:-1] = compute(layout, layer, *unpack_work(payload, num_tokens, num_pairs, hidden_size)).reshape(-1)
            reply[-1] = 0
        except KeyError:  # StaleLayoutError: tell the replica to refresh its placement
            reply.zero_()
            reply[-1] = 1
        group.send([reply], 0, 1).wait()


TRANSPORT_TYPES = {RayTransport.name: RayTransport, CollectiveTransport.name: CollectiveTransport}
