"""Router: the named actor that owns expert placement for one deployed model.

Contract:
- Creates the `ExpertShard` actors in a placement group (SPREAD or PACK) with the configured
  resources, restartable (Ray restarts a dead shard, which reloads its slots and re-registers).
- `placement()` returns the current `Placement` (with its version and the shards known dead);
  model replicas cache it and refresh only when the version changes or a shard fails.
- `report_failure(shard, seen_version)` marks a shard dead unless it re-registered after the
  reporter's placement version (the report is then about an incarnation already replaced); its
  experts are then served by their other replicas, if any. `register(shard, pid)` marks it alive
  again. Both bump the version.
- `rebalance()` plans from the shards' per-expert counters (EPLB-style, `placement.rebalance`),
  loads the new slot tables beside the old ones, then publishes the new version: traffic never
  stops. It also runs every `rebalance_interval_s` when that is set.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeray.actors import SHARED_CPU_ENV
from moeray.actors.placement import Placement, imbalance, initial_placement, rebalance
from moeray.actors.shard import ExpertShard
from moeray.model.checkpoint import read_model_args

logger = logging.getLogger(__name__)


@dataclass
class ShardOptions:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    strategy: str = "SPREAD"  # or PACK: how the placement group lays shards over nodes
    dtype: str = "float32"
    fp8: str = "auto"  # FP8 checkpoints: keep | dequantize | auto (keep on GPU shards)

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


class Router:
    def __init__(self, name: str, namespace: str | None, model_path: str, num_shards: int, redundant: int = 0,
                 options: ShardOptions | None = None, rebalance_interval_s: float | None = None):
        options = options or ShardOptions()
        self.name, self.redundant = name, redundant
        self.args = read_model_args(model_path)
        self._lock = threading.RLock()
        self._placement = initial_placement(self.args.moe_layer_indices, self.args.n_routed_experts, num_shards,
                                            redundant)
        self.pids: dict[int, int] = {}
        self.registered_at: dict[int, int] = {}  # shard -> placement version of its latest registration
        self.restarts = [0] * num_shards
        bundle = {"CPU": options.num_cpus} | ({"GPU": options.num_gpus} if options.num_gpus else {})
        self._group = placement_group([bundle] * num_shards, strategy=options.strategy)
        remote = ray.remote(ExpertShard)
        self.shards = [
            remote.options(name=f"{name}-shard-{i}", namespace=namespace, max_restarts=-1, max_task_retries=0,
                           max_concurrency=8, num_cpus=options.num_cpus, num_gpus=options.num_gpus,
                           runtime_env=None if options.num_gpus else {"env_vars": SHARED_CPU_ENV},
                           scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=i),
                           ).remote(i, model_path, self._placement.slots[i], name, namespace, options.dtype,
                                    options.fp8, options.device)
            for i in range(num_shards)]
        self._stop = threading.Event()
        if rebalance_interval_s:
            threading.Thread(target=self._periodic, args=(rebalance_interval_s,), daemon=True).start()

    # ---- placement -------------------------------------------------------------------------------
    def placement(self) -> Placement:
        with self._lock:
            return self._placement

    def version(self) -> int:
        return self._placement.version

    def shard_handles(self) -> list:
        return self.shards

    def slots_of(self, shard: int) -> tuple[int, dict[int, list[int]]]:
        with self._lock:
            return self._placement.layout, self._placement.slots[shard]

    def _publish(self, **changes) -> Placement:
        with self._lock:
            current = self._placement
            fields = dict(version=current.version + 1, num_shards=current.num_shards, num_experts=current.num_experts,
                          layers=current.layers, slots=current.slots, dead=set(current.dead), layout=current.layout)
            fields.update(changes)
            self._placement = Placement(**fields)
            return self._placement

    def report_failure(self, shard: int, seen_version: int) -> Placement:
        """A replica saw `shard` fail while it held placement `seen_version`."""
        with self._lock:
            # Restarted and re-registered after the replica's view: the report is about the old
            # incarnation, and the shard serves again.
            if self.registered_at.get(shard, 0) > seen_version or shard in self._placement.dead:
                return self._placement
            logger.warning("expert shard %d failed; serving its experts from other replicas", shard)
            placement = self._publish(dead=self._placement.dead | {shard})
        # A report can still race a restart the reporter already knew of: whichever comes last,
        # a shard that answers is alive.
        threading.Thread(target=self._confirm_alive, args=(shard,), daemon=True).start()
        return placement

    def _confirm_alive(self, shard: int, within_s: float = 120.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                ray.get(self.shards[shard].pid.remote(), timeout=2)
            except Exception:  # noqa: BLE001 - still down (or restarting)
                time.sleep(0.5)
                continue
            with self._lock:
                if shard in self._placement.dead:
                    self._publish(dead=self._placement.dead - {shard})
            return

    def register(self, shard: int, pid: int) -> None:
        with self._lock:
            if shard in self.pids and self.pids[shard] != pid:
                self.restarts[shard] += 1
            self.pids[shard] = pid
            self.registered_at[shard] = self._publish(dead=self._placement.dead - {shard}).version

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def health(self) -> dict:
        with self._lock:
            placement = self._placement
            return {"version": placement.version, "num_shards": placement.num_shards, "dead": sorted(placement.dead),
                    "missing_experts": len(placement.missing_experts()), "pids": dict(self.pids),
                    "restarts": list(self.restarts)}

    # ---- load balancing -----------------------------------------------------------------------------
    def expert_loads(self) -> dict[int, list[int]]:
        """Tokens per expert since start, summed over live shards."""
        placement = self.placement()
        totals = {layer: [0] * placement.num_experts for layer in placement.layers}
        futures = [s.expert_counts.remote() for i, s in enumerate(self.shards) if i not in placement.dead]
        for counts in ray.get(futures, timeout=60):
            for layer, values in counts.items():
                totals[int(layer)] = [a + b for a, b in zip(totals[int(layer)], values)]
        return totals

    def reset_loads(self) -> None:
        ray.get([s.reset_counts.remote() for i, s in enumerate(self.shards) if i not in self._placement.dead])

    def imbalance(self, loads: dict[int, list[int]] | None = None) -> float:
        loads = loads or self.expert_loads()
        return imbalance(self.placement().shard_loads(loads))

    def rebalance(self) -> dict:
        loads = self.expert_loads()
        with self._lock:
            current = self._placement
            if current.dead:
                return {"skipped": "a shard is down", "version": current.version}
            planned = rebalance(current, loads, self.redundant)
        ray.get([s.prepare.remote(planned.layout, planned.slots[i]) for i, s in enumerate(self.shards)])
        with self._lock:
            before = imbalance(current.shard_loads(loads))
            planned.version = self._placement.version + 1
            self._placement = planned
        after = imbalance(planned.shard_loads(loads))
        # The previous layout stays loaded: replicas still finishing a step with it keep working.
        ray.get([s.retire.remote(current.layout) for s in self.shards])
        logger.info("rebalanced experts: imbalance %.2f -> %.2f (version %d)", before, after, planned.version)
        return {"version": planned.version, "layout": planned.layout, "imbalance_before": before,
                "imbalance_after": after}

    def _periodic(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.rebalance()
            except Exception:  # noqa: BLE001 - keep serving with the old placement
                logger.exception("periodic rebalance failed")

    def shutdown(self) -> None:
        self._stop.set()
        for shard in self.shards:
            ray.kill(shard, no_restart=True)
        ray.util.remove_placement_group(self._group)
