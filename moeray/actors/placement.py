"""Where every routed expert lives: the placement table and the EPLB-style rebalance.

Contract (no torch, no ray): a `Placement` maps each logical expert (layer, expert) to one or
more physical replicas (shard, slot). `slots[shard][layer]` lists the experts a shard holds, in
slot order. `initial_placement` spreads experts evenly over the shards (plus `redundant`
replicas per layer); `rebalance` re-plans from observed per-expert loads: hot experts get the
redundant replicas (each replica takes an equal share of its expert's load), then replicas are
packed heaviest first onto the least loaded shard that does not hold that expert yet, so shard
loads even out. Every new placement carries a higher `version`; a new slot layout also a higher
`layout` (health changes keep the layout, so shards need no reload for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Placement:
    version: int  # bumped by any change: slots, a shard failing or coming back
    num_shards: int
    num_experts: int
    layers: list[int]
    slots: list[dict[int, list[int]]]  # shard -> layer -> experts, in slot order
    dead: set[int] = field(default_factory=set)  # shards that are down right now
    layout: int = 1  # version of `slots` alone: shards key their weight tables by it

    def replicas(self, layer: int, expert: int, live_only: bool = True) -> list[tuple[int, int]]:
        """(shard, slot) of every replica of an expert."""
        found = []
        for shard, layers in enumerate(self.slots):
            if live_only and shard in self.dead:
                continue
            experts = layers.get(layer, [])
            for slot, held in enumerate(experts):
                if held == expert:
                    found.append((shard, slot))
        return found

    def replica_table(self, layer: int) -> list[list[tuple[int, int]]]:
        """expert -> live replicas, for one layer (what the dispatch caches)."""
        table: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        for shard, layers in enumerate(self.slots):
            if shard in self.dead:
                continue
            for slot, expert in enumerate(layers.get(layer, [])):
                table[expert].append((shard, slot))
        return table

    def missing_experts(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs with no live replica."""
        return [(layer, e) for layer in self.layers for e, reps in enumerate(self.replica_table(layer)) if not reps]

    def shard_loads(self, loads: dict[int, list[float]]) -> list[float]:
        """Tokens each shard would serve under `loads`, shared evenly between an expert's replicas."""
        totals = [0.0] * self.num_shards
        for layer in self.layers:
            table = self.replica_table(layer)
            for expert, reps in enumerate(table):
                for shard, _ in reps:
                    totals[shard] += loads.get(layer, [0.0] * self.num_experts)[expert] / len(reps)
        return totals


def imbalance(shard_loads: list[float]) -> float:
    """max / mean tokens per shard (1.0 is perfectly even)."""
    mean = sum(shard_loads) / len(shard_loads)
    return max(shard_loads) / mean if mean else 1.0


def initial_placement(layers: list[int], num_experts: int, num_shards: int, redundant: int = 0) -> Placement:
    uniform = {layer: [1.0] * num_experts for layer in layers}
    placement = _plan(uniform, layers, num_experts, num_shards, redundant, version=1)
    return placement


def rebalance(current: Placement, loads: dict[int, list[float]], redundant: int) -> Placement:
    # A little load on every expert so that unseen experts still get spread, not piled up.
    smoothed = {layer: [v + 1.0 for v in loads.get(layer, [0.0] * current.num_experts)] for layer in current.layers}
    planned = _plan(smoothed, current.layers, current.num_experts, current.num_shards, redundant, current.version + 1)
    planned.layout = current.layout + 1
    return planned


def _plan(loads: dict[int, list[float]], layers: list[int], num_experts: int, num_shards: int, redundant: int,
          version: int) -> Placement:
    if num_shards < 1:
        raise ValueError("need at least one expert shard")
    if redundant < 0 or (redundant and num_shards < 2):
        raise ValueError("redundant experts need at least two shards (a replica on another shard)")
    capacity = -(-(num_experts + redundant) // num_shards)  # slots per shard and layer
    slots: list[dict[int, list[int]]] = [{layer: [] for layer in layers} for _ in range(num_shards)]
    for layer in layers:
        layer_loads = loads[layer]
        copies = [1] * num_experts
        for _ in range(redundant):  # each extra replica goes to the expert with the most load per replica
            hottest = max(range(num_experts), key=lambda e: (layer_loads[e] / copies[e], -e))
            if copies[hottest] >= num_shards:
                break
            copies[hottest] += 1
        items = sorted(((layer_loads[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                       key=lambda item: (-item[0], item[1]))
        shard_load = [0.0] * num_shards
        for load, expert in items:
            candidates = [s for s in range(num_shards)
                          if len(slots[s][layer]) < capacity and expert not in slots[s][layer]]
            if not candidates:  # only shards that already hold this expert have room: use one anyway
                candidates = [s for s in range(num_shards) if len(slots[s][layer]) < capacity]
            shard = min(candidates, key=lambda s: (shard_load[s], len(slots[s][layer]), s))
            slots[shard][layer].append(expert)
            shard_load[shard] += load
        for shard in range(num_shards):
            slots[shard][layer].sort()  # slot order by expert id: stable, readable
    return Placement(version, num_shards, num_experts, list(layers), slots)
