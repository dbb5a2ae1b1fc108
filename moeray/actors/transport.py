"""How a model replica's token groups reach the expert shards: two transports, one interface.

Contract: `transport.exchange(layout, layer, works)` sends every `ShardWork` (the rows of x a
shard needs plus its (token, slot, weight) pairs) to its shard and returns {shard: output rows};
`start` / `finish` are its two halves, so the caller can compute something else (the other
micro-batch's attention) while the shards work.
A shard that cannot answer raises `ShardFailed` naming it; a shard that no longer holds the
caller's slot layout raises `ShardFailed(stale=True)`.
- `RayTransport`: one actor call per shard (any topology, tensors through the object store).
- `CollectiveTransport`: torch.distributed groups formed by the replica (rank 0) and its shards
  (ranks 1..N), with point-to-point messages: per shard and layer a fixed header, then one packed
  float32 payload (x, then token, slot and weight of each pair), answered by the output rows and
  a status; each shard runs a receive loop on a thread.
  - On CPU everything travels on one gloo group and the status rides at the end of the reply:
    three messages per shard and layer, since on a few busy cores each message costs a thread
    wake-up.
  - When the replica and every shard hold a GPU, payloads and replies travel GPU to GPU on an
    NCCL group (the data plane), while headers and statuses stay on the gloo group (the control
    plane). A shard sends its status only once its reply has arrived, so the replica waits on
    gloo, which notices a dead peer, and never blocks on an NCCL receive that cannot complete.
  On a broken group (a shard died) it hands over to `RayTransport` for good: the groups cannot
  lose a member (an NCCL group is aborted so its pending receives are released).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

logger = logging.getLogger(__name__)

HEADER_FIELDS = 5  # op, layout, layer, unique tokens U, pairs P
OP_COMPUTE, OP_STOP = 1, 0
STATUS_OK, STATUS_STALE, STATUS_ERROR = 0, 1, 2


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
    device = torch.device("cpu")  # tensors travel through the object store

    def __init__(self, shards: list, device: str = "cpu"):
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


def rendezvous_store(host: str, port: int, world: int, is_master: bool) -> dist.TCPStore:
    """The key-value store a replica's groups meet through. The master (the replica) binds port 0
    and its store's `.port` is what the shards are told: a port chosen in advance could be
    taken by the time the store binds it."""
    return dist.TCPStore(host, 0 if is_master else port, world, is_master=is_master,
                         timeout=datetime.timedelta(seconds=120), wait_for_workers=False)


def open_groups(store: dist.TCPStore, rank: int, world: int, timeout_s: float, data_plane: str = "gloo"):
    """The (control, data) groups of one replica and its shards, outside any global default group.
    The control group is gloo; the data group is the same group, or an NCCL group on the current
    CUDA device when `data_plane` is "nccl"."""
    control = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=timeout_s))
    if data_plane == "gloo":
        return control, control
    if data_plane != "nccl":
        raise ValueError(f"unknown data plane {data_plane!r}; choose gloo or nccl")
    if not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise RuntimeError("the nccl data plane needs a CUDA device and a torch build with NCCL")
    options = dist.ProcessGroupNCCL.Options()
    # The gloo waits guard every NCCL one and run one after another: the NCCL watchdog (which
    # ends the process) must only fire long after all of them would have.
    options._timeout = datetime.timedelta(seconds=timeout_s * (2 * world + 2))
    return control, dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, world, options)


def data_plane_for(replica_device: str, shard_devices: list[str]) -> str:
    """NCCL when the replica and every shard compute on CUDA (and torch has NCCL), else gloo."""
    on_gpus = torch.device(replica_device).type == "cuda" and all(d == "cuda" for d in shard_devices)
    return "nccl" if on_gpus and dist.is_nccl_available() else "gloo"


def _shares_a_gpu(replica_device: str, shard_uuids: list[str]) -> bool:
    """True when two ranks would sit on one physical GPU (fractional GPUs): NCCL refuses that."""
    mine = str(torch.cuda.get_device_properties(torch.device(replica_device)).uuid)
    return mine in shard_uuids or len(set(shard_uuids)) < len(shard_uuids)


class CollectiveTransport:
    name = "collective"

    def __init__(self, shards: list, device: str = "cpu", host: str | None = None, timeout_s: float = 30.0):
        self.shards = shards
        self.fallback = RayTransport(shards)
        self.broken = False
        self.data_plane = data_plane_for(device, ray.get([s.device_type.remote() for s in shards]))
        if self.data_plane == "nccl" and _shares_a_gpu(device, ray.get([s.device_uuid.remote() for s in shards])):
            logger.warning("the replica and its shards do not each have a GPU of their own; NCCL needs that, "
                           "so expert payloads go over gloo")
            self.data_plane = "gloo"
        self.device = torch.device(device) if self.data_plane == "nccl" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        host = host or ray.util.get_node_ip_address()
        world = len(shards) + 1
        store = rendezvous_store(host, 0, world, is_master=True)
        joins = [s.join_collective.remote(host, store.port, i + 1, world, timeout_s, self.data_plane)
                 for i, s in enumerate(shards)]
        self.group, self.data = open_groups(store, 0, world, timeout_s, self.data_plane)
        ray.get(joins)
        logger.info("collective expert transport: %d shards, data plane %s", len(shards), self.data_plane)

    def start(self, layout: int, layer: int, works: list[ShardWork]):
        """Post the sends and the receives; nothing waits here (the shards start computing)."""
        if self.broken:
            return ("ray", self.fallback.start(layout, layer, works))
        split = self.data is not self.group  # NCCL data plane: statuses travel on their own
        try:
            control, data, replies, statuses = [], [], {}, {}
            for w in works:  # every send first: on NCCL a receive queued before a send delays it
                dst = w.shard + 1
                header = torch.tensor([OP_COMPUTE, layout, layer, w.x.shape[0], w.token_of_pair.numel()])
                control.append(self.group.send([header], dst, 0))
                data.append(self.data.send([pack_work(w.x, w.token_of_pair, w.slot_of_pair, w.weight_of_pair)],
                                           dst, 0))
            for w in works:
                dst = w.shard + 1
                rows = w.x.shape[0] * w.x.shape[1]
                replies[w.shard] = torch.empty(rows if split else rows + 1, device=self.device)
                data.append(self.data.recv([replies[w.shard]], dst, 1))
                if split:
                    statuses[w.shard] = torch.empty(1, dtype=torch.long)
                    control.append(self.group.recv([statuses[w.shard]], dst, 1))
        except RuntimeError as err:
            return self._break(err, layout, layer, works)
        return ("collective", (control + data, replies, statuses, (layout, layer, works)))

    def _break(self, err, layout, layer, works):
        logger.warning("collective expert transport broken (%s); continuing over Ray actor calls", err)
        self.broken = True  # a member died: the groups are unusable from now on
        if self.data is not self.group:
            # Release what is still posted on NCCL, here and in the live shards, before their
            # streams are needed for the actor-call path.
            self.data.abort()
            for shard in self.shards:
                shard.leave_collective.remote()
        return ("ray", self.fallback.start(layout, layer, works))

    def finish(self, pending) -> dict[int, torch.Tensor]:
        kind, state = pending
        if kind == "ray":
            return self.fallback.finish(state)
        handles, replies, statuses, request = state
        try:
            # Gloo raises when a peer dies. The control handles come first: on the NCCL data plane
            # a shard sends its status only once its reply has arrived, so the NCCL waits after
            # them cannot hang on a dead shard.
            for handle in handles:
                handle.wait()
        except RuntimeError as err:
            return self.fallback.finish(self._break(err, *request)[1])
        if statuses:
            codes = {shard: int(status) for shard, status in statuses.items()}
        else:
            codes = {shard: int(reply[-1]) for shard, reply in replies.items()}
            replies = {shard: reply[:-1] for shard, reply in replies.items()}
        if errors := sorted(shard for shard, code in codes.items() if code == STATUS_ERROR):
            raise RuntimeError(f"expert shards {errors} failed computing layer {request[1]} (see their logs)")
        if any(code == STATUS_STALE for code in codes.values()):
            raise ShardFailed(set(), stale=True)
        works = {w.shard: w for w in request[2]}
        return {shard: reply.view(works[shard].x.shape).to(works[shard].x.dtype) for shard, reply in replies.items()}

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
    Token and slot indices are small integers (< 2**24), exact in float32. Built on x's device."""
    pairs = [t.to(x.device, torch.float32) for t in (token_of_pair, slot_of_pair, weight_of_pair)]
    return torch.cat((x.float().reshape(-1), *pairs))


def unpack_work(payload: torch.Tensor, num_tokens: int, num_pairs: int, hidden_size: int):
    """The inverse of `pack_work`: (x [U, D], token_of_pair [P], slot_of_pair [P], weight_of_pair [P])."""
    x, tokens, slots, weights = payload.split([num_tokens * hidden_size, num_pairs, num_pairs, num_pairs])
    return x.view(num_tokens, hidden_size), tokens.long(), slots.long(), weights


IDLE_WAIT = datetime.timedelta(days=365)  # a shard waits for work however long the replica idles


def serve_collective(control: dist.ProcessGroup, data: dist.ProcessGroup, compute, hidden_size: int,
                     device: torch.device) -> None:
    """The shard side: receive work from rank 0, compute, send the output back, until OP_STOP.
    `compute(layout, layer, x, token_of_pair, slot_of_pair, weight_of_pair)` returns rows on
    `device` (the data plane's); a KeyError from it means a stale slot layout (status 1), any
    other error is reported as status 2 (the replica raises it rather than waiting)."""
    split = data is not control
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device is per thread
    header = torch.empty(HEADER_FIELDS, dtype=torch.long)
    while True:
        try:
            # Not the group timeout: an idle replica is not a dead one. A dead one still raises.
            control.recv([header], 0, 0).wait(IDLE_WAIT)
        except RuntimeError:
            if split:
                data.abort()  # the replica is gone: release anything still posted on NCCL
            return
        op, layout, layer, num_tokens, num_pairs = header.tolist()
        if op == OP_STOP:
            return
        payload = torch.empty(num_tokens * hidden_size + 3 * num_pairs, device=device)
        data.recv([payload], 0, 0).wait()
        rows = num_tokens * hidden_size
        reply = torch.empty(rows if split else rows + 1, device=device)
        try:
            reply[:rows] = compute(layout, layer, *unpack_work(payload, num_tokens, num_pairs, hidden_size)).reshape(-1)
            status = STATUS_OK
        except KeyError:  # StaleLayoutError: tell the replica to refresh its placement
            reply.zero_()
            status = STATUS_STALE
        except Exception:
            logger.exception("expert shard failed computing layer %d", layer)
            reply.zero_()
            status = STATUS_ERROR
        if not split:
            reply[-1] = status
            control.send([reply], 0, 1).wait()
            continue
        data.send([reply], 0, 1).wait()
        torch.cuda.current_stream(device).synchronize()  # the reply has reached the replica
        control.send([torch.tensor([status])], 0, 1).wait()


TRANSPORT_TYPES = {RayTransport.name: RayTransport, CollectiveTransport.name: CollectiveTransport}
