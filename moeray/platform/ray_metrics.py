"""moeray's series in Ray's metrics agent: what a cluster's Prometheus scrapes.

Contract:
- Every Ray node's metrics agent serves the series of every process on the node (the chart's
  ServiceMonitor scrapes it: port 8080, `/metrics`), with Ray's `ray_` prefix, which the
  ServiceMonitor's relabelling strips, so dashboards query `moeray_*`. The series are Serve's
  custom metrics (`ray.serve.metrics`), so each carries its `application`, `deployment` and
  `replica` tags.
- `RequestSeries()` is the request side, recorded where the client sees it (the OpenAI layer):
  TTFT, TPOT, end-to-end latency and queue time histograms, prompt and generated tokens,
  requests by outcome, finished choices by finish reason. `metrics.RequestTimer` feeds it
  beside the app's own `/metrics`.
- `ReplicaExporter(stats, interval_s)` is the engine side, in each model replica: a thread
  that every `interval_s` turns the replica's stats snapshot (`ReplicaStats.as_dict()`) into
  gauges (running, waiting, cache usage, prefix-cache hit rate, shard health) and counter
  increments (the snapshot's totals less the last ones sent): prefix-cache hits, preemptions, speculative drafts and acceptances, grammar compiles and their seconds, tokens
  routed to each expert with the shard that holds it.
A series the app's own `/metrics` (metrics.py) also renders has the same name there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from moeray.platform.metrics import LATENCY_BUCKETS, PER_TOKEN_BUCKETS, REPLICA_TOTALS

_GAUGES = (
    ("num_running", "moeray_num_requests_running", "Sequences running in the engine"),
    ("num_waiting", "moeray_num_requests_waiting", "Sequences waiting for a slot in the engine"),
    ("cache_usage", "moeray_cache_usage_ratio", "Used share of the latent cache"),
)


class RequestSeries:
    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        def histogram(name: str, help_text: str, buckets) -> Histogram:
            return Histogram(name, description=help_text, boundaries=list(buckets), tag_keys=("model",))

        self.ttft = histogram("moeray_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS)
        self.tpot = histogram("moeray_time_per_output_token_seconds", "Time per output token after the first",
                              PER_TOKEN_BUCKETS)
        self.e2e = histogram("moeray_e2e_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS)
        self.queue = histogram("moeray_request_queue_time_seconds",
                               "Time from a request's arrival in the engine to its first scheduled step",
                               LATENCY_BUCKETS)
        self.prompt_tokens = Counter("moeray_prompt_tokens", description="Prompt tokens processed",
                                     tag_keys=("model",))
        self.generation_tokens = Counter("moeray_generation_tokens", description="Tokens generated",
                                         tag_keys=("model",))
        self.requests = Counter("moeray_requests", description="Finished requests by outcome",
                                tag_keys=("model", "outcome"))
        self.finish_reasons = Counter("moeray_request_finish_reasons", description="Finished choices by finish reason",
                                      tag_keys=("model", "finish_reason"))


class ReplicaExporter:
    """See the module docstring. `stats` is called on the exporter's thread."""

    def __init__(self, stats: Callable[[], dict[str, Any]], interval_s: float = 2.0):
        from ray.serve.metrics import Counter, Gauge

        self._stats, self._interval_s = stats, interval_s
        self._counters = {key: Counter(name, description=help_text) for key, name, help_text in REPLICA_TOTALS}
        self._gauges = {key: Gauge(name, description=help_text) for key, name, help_text in _GAUGES}
        self._hit_rate = Gauge("moeray_prefix_cache_hit_rate",
                               description="Share of prompt tokens served by the prefix cache, since start")
        self._routed = Counter("moeray_expert_routed_tokens", description="Tokens routed to each expert",
                               tag_keys=("layer", "expert", "shard"))
        self._shard_healthy = Gauge("moeray_expert_shard_healthy", description="1 while an ExpertShard answers",
                                    tag_keys=("shard",))
        self._sent: dict[Any, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moeray-metrics", daemon=True)
        self._thread.start()

    def _increment(self, counter, key, total: float, tags: dict[str, str] | None = None) -> None:
        # Counters take increments; a total below the last one sent (an engine restarted) starts over.
        delta = total - self._sent.get(key, 0)
        if delta < 0:
            delta = total
        if delta:
            counter.inc(delta, tags=tags)
        self._sent[key] = total

    def export(self, stats: dict[str, Any]) -> None:
        for key, gauge in self._gauges.items():
            gauge.set(stats.get(key, 0))
        for key, counter in self._counters.items():
            self._increment(counter, key, stats.get(key, 0))
        prompt = stats.get("prompt_tokens_total", 0)
        self._hit_rate.set(stats.get("cached_prompt_tokens_total", 0) / prompt if prompt else 0.0)
        shard_of = stats.get("expert_shards", {})  # layer -> expert -> shard, with expert shards
        for layer, counts in stats.get("routed_tokens", {}).items():
            shards = shard_of.get(layer, [])
            for expert, count in enumerate(counts):
                shard = str(shards[expert]) if expert < len(shards) else "local"
                self._increment(self._routed, ("routed", layer, expert, shard), count,
                                {"layer": str(layer), "expert": str(expert), "shard": shard})
        for shard, healthy in stats.get("shard_health", {}).items():
            self._shard_healthy.set(1.0 if healthy else 0.0, tags={"shard": str(shard)})

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.export(self._stats())
            except Exception:  # noqa: BLE001 - a failed snapshot skips one export, never the replica
                continue

    def stop(self) -> None:
        self._stop.set()
