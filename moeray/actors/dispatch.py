"""The sharded expert backend: a model replica's routed experts, computed on ExpertShard actors.

Contract: `ShardedExperts` is an `ExpertBackend`. For one MoE layer it maps every
(token, expert) pair to a replica of that expert (the only one, or the least loaded so far in
this call when there are several), sends each shard its tokens once (unique rows) with the
pairs' slots and weights over the chosen transport (`transport.py`: Ray actor calls, or
collective groups: gloo, with NCCL for the tensors when replica and shards hold GPUs), and adds
the weighted results back in token order.
- The placement is cached; the hot path never calls the Router per layer. A version probe runs
  at most once per `refresh_interval_s`, without blocking, and a failure refreshes at once.
- A shard that dies mid-layer is reported to the Router and the whole layer is re-run on the
  new placement (other replicas, or the restarted shard once it re-registers). If some expert
  has no live replica for `timeout_s`, `ExpertsUnavailableError` is raised (HTTP 503).
"""

from __future__ import annotations

import logging
import time

import ray
import torch

from moeray.actors.placement import Placement
from moeray.actors.transport import TRANSPORT_TYPES, ShardFailed, ShardWork

logger = logging.getLogger(__name__)


class ExpertsUnavailableError(RuntimeError):
    """Some routed experts have no live shard: requests cannot be served right now."""


class _LayerRoutes:
    """Lookup tensors for one layer: expert -> (shard, slot) of its first live replica."""

    def __init__(self, table: list[list[tuple[int, int]]]):
        self.shard = torch.tensor([reps[0][0] if reps else -1 for reps in table])
        self.slot = torch.tensor([reps[0][1] if reps else -1 for reps in table])
        self.multi = {e: reps for e, reps in enumerate(table) if len(reps) > 1}
        self.missing = [e for e, reps in enumerate(table) if not reps]


class ShardedExperts:
    def __init__(self, router, transport: str = "ray", timeout_s: float = 120.0, refresh_interval_s: float = 1.0,
                 device: str = "cpu"):
        if transport not in TRANSPORT_TYPES:
            raise ValueError(f"unknown expert transport {transport!r}; choose one of {sorted(TRANSPORT_TYPES)}")
        self.router = router
        self.shards = ray.get(router.shard_handles.remote())
        self.transport = TRANSPORT_TYPES[transport](self.shards, device=device)
        self.timeout_s, self.refresh_interval_s = timeout_s, refresh_interval_s
        self._probe = None
        self._last_probe = time.monotonic()
        self._use(ray.get(router.placement.remote()))

    def _use(self, placement: Placement) -> None:
        self.placement = placement
        self.routes = {layer: _LayerRoutes(placement.replica_table(layer)) for layer in placement.layers}

    def _refresh(self) -> None:
        self._use(ray.get(self.router.placement.remote()))

    def _maybe_refresh(self) -> None:
        """Pick up a new placement version without waiting on the Router."""
        if self._probe is not None:
            ready, _ = ray.wait([self._probe], timeout=0)
            if ready:
                version = ray.get(self._probe)
                self._probe = None
                if version != self.placement.version:
                    self._refresh()
        elif time.monotonic() - self._last_probe >= self.refresh_interval_s:
            self._probe = self.router.version.remote()
            self._last_probe = time.monotonic()

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self._maybe_refresh()
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return self._dispatch(layer, x, expert_ids, weights)
            except ShardFailed as failure:
                if not failure.stale:
                    for shard in failure.shards:
                        ray.get(self.router.report_failure.remote(shard, self.placement.version))
                self._refresh()
                self._wait_for_experts(deadline)

    def _wait_for_experts(self, deadline: float) -> None:
        while self.placement.missing_experts():
            if time.monotonic() > deadline:
                missing = self.placement.missing_experts()
                raise ExpertsUnavailableError(f"{len(missing)} routed experts have no live shard "
                                              f"(dead shards: {sorted(self.placement.dead)})")
            time.sleep(0.2)
            self._refresh()

    def _plan(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> list[ShardWork]:
        """Group the layer's (token, expert) pairs by the shard that will compute them."""
        routes = self.routes[layer]
        if routes.missing:
            raise ShardFailed(set(), stale=True)
        num_tokens, top_k = expert_ids.shape
        experts = expert_ids.flatten().cpu()
        token_of_pair = torch.arange(num_tokens).repeat_interleave(top_k)
        weight_of_pair = weights.flatten().cpu()
        shard_of_pair = routes.shard[experts]
        slot_of_pair = routes.slot[experts]
        if routes.multi:
            self._spread_replicas(routes, experts, shard_of_pair, slot_of_pair)
        x_sent = x.to(self.transport.device)  # the host, or the GPU on the NCCL data plane
        works = []
        for shard in shard_of_pair.unique().tolist():
            mask = shard_of_pair == shard
            tokens, local = token_of_pair[mask].unique(return_inverse=True)
            works.append(ShardWork(shard, tokens, x_sent[tokens.to(x_sent.device)], local, slot_of_pair[mask],
                                   weight_of_pair[mask]))
        return works

    def _combine(self, x: torch.Tensor, works: list[ShardWork], results: dict[int, torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=x.dtype, device=self.transport.device)
        for work in works:
            out.index_add_(0, work.tokens.to(out.device), results[work.shard].to(out.device))
        return out.to(x.device)

    def _dispatch(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        works = self._plan(layer, x, expert_ids, weights)
        return self._combine(x, works, self.transport.exchange(self.placement.layout, layer, works))

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> "PendingExperts":
        """Start a layer's expert work without waiting (micro-batch overlap); `.wait()` finishes it."""
        self._maybe_refresh()
        try:
            works = self._plan(layer, x, expert_ids, weights)
            handle = self.transport.start(self.placement.layout, layer, works)
        except ShardFailed:
            works, handle = None, None
        return PendingExperts(self, layer, x, expert_ids, weights, works, handle)

    @staticmethod
    def _spread_replicas(routes: _LayerRoutes, experts, shard_of_pair, slot_of_pair) -> None:
        """Send each pair of a replicated expert to its replica with the fewest pairs so far."""
        load = torch.bincount(shard_of_pair, minlength=int(shard_of_pair.max()) + 1).tolist()
        for p in (experts.unsqueeze(1) == torch.tensor(list(routes.multi))).any(1).nonzero().flatten().tolist():
            replicas = routes.multi[int(experts[p])]
            load[int(shard_of_pair[p])] -= 1
            while len(load) <= max(s for s, _ in replicas):
                load.append(0)
            shard, slot = min(replicas, key=lambda r: load[r[0]])
            load[shard] += 1
            shard_of_pair[p], slot_of_pair[p] = shard, slot

    def health(self) -> dict:
        return ray.get(self.router.health.remote())

    def shard_view(self) -> tuple[dict[int, list[int]], dict[int, bool]]:
        """From this replica's copy of the placement, without asking the Router: layer -> expert ->
        the shard this replica sends it to (-1: none live), and shard -> live."""
        placement = self.placement
        return ({layer: routes.shard.tolist() for layer, routes in self.routes.items()},
                {shard: shard not in placement.dead for shard in range(placement.num_shards)})


class PendingExperts:
    """One micro-batch's routed-expert work in flight; a failure falls back to the retrying path."""

    def __init__(self, backend: ShardedExperts, layer, x, expert_ids, weights, works, handle):
        self.backend, self.layer, self.x, self.expert_ids, self.weights = backend, layer, x, expert_ids, weights
        self.works, self.handle = works, handle

    def wait(self) -> torch.Tensor:
        if self.handle is not None:
            try:
                return self.backend._combine(self.x, self.works, self.backend.transport.finish(self.handle))
            except ShardFailed:
                pass
        return self.backend(self.layer, self.x, self.expert_ids, self.weights)


def start_expert_parallel(model_path: str, num_shards: int, redundant: int = 0, name: str | None = None,
                          namespace: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                          strategy: str = "SPREAD", dtype: str = "float32", rebalance_interval_s: float | None = None,
                          detached: bool = False, transport: str = "ray", fp8: str = "auto", device: str = "cpu"):
    """Create (or join, by name) the Router and its shards; returns (router handle, backend).
    `device` is the calling replica's (the collective transport uses NCCL when it and the
    shards are GPUs)."""
    from moeray.actors.router import Router, ShardOptions

    if not ray.is_initialized():
        ray.init()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = name or f"moeray-router-{abs(hash(str(model_path))) % 10**8}"
    # The Router lives on the node of the replica that creates it: a node that fails then takes
    # the Router with that replica, never with a shard (whose experts the Router must re-place).
    # Not soft: Ray then places a zero-CPU actor anywhere, even when this node would do.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = dict(name=name, namespace=namespace, get_if_exists=True, max_concurrency=16, num_cpus=0,
                   scheduling_strategy=here)
    if detached:
        options["lifetime"] = "detached"
    router = ray.remote(Router).options(**options).remote(
        name, namespace, str(model_path), num_shards, redundant,
        ShardOptions(num_cpus=num_cpus, num_gpus=num_gpus, strategy=strategy, dtype=dtype, fp8=fp8),
        rebalance_interval_s)
    # Shards register from their constructors; wait until all have.
    deadline = time.monotonic() + 300
    while len(ray.get(router.health.remote())["pids"]) < num_shards:
        if time.monotonic() > deadline:
            raise TimeoutError(f"expert shards of {name} did not start")
        time.sleep(0.1)
    return router, ShardedExperts(router, transport, device=device)
