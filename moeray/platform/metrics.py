"""Prometheus metrics of the OpenAI endpoint.

Contract: request-level metrics (time to first token, time per output token, end-to-end latency,
prompt and generated token counts) are measured where the client sees them, in the HTTP layer.
Replica-level state (running and waiting requests, cache usage, tokens routed per expert) comes
from the stats snapshot each replica attaches to a finished request (and to explicit stats
calls); the exporter sums the latest snapshot of every replica heard from recently. Each app
owns its registry, so several apps in one process never collide.

This is the app's own `/metrics`, which answers from whichever HTTP replica gets the scrape.
On a cluster, Prometheus scrapes Ray's metrics agent on every node instead (ray_metrics.py):
`ServingMetrics(cluster=True)` also records every request observation there.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STALE_AFTER_S = 300.0
# Totals in a replica's stats snapshot, exported as counters here and by ray_metrics.py:
# (stats key, series, help).
REPLICA_TOTALS = (
    ("cached_prompt_tokens_total", "moeray_prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache"),
    ("preemptions_total", "moeray_preemptions", "Sequences preempted for cache space"),
    ("spec_draft_tokens", "moeray_spec_decode_draft_tokens", "Speculative drafts proposed"),
    ("spec_accepted_tokens", "moeray_spec_decode_accepted_tokens", "Speculative drafts accepted"),
    ("spec_verify_steps", "moeray_spec_decode_verify_steps", "Verifications (a sequence's drafts checked in one step)"),
    ("grammar_compiles_total", "moeray_grammar_compiles", "Grammars compiled (cache misses)"),
    ("grammar_compile_seconds_total", "moeray_grammar_compile_seconds", "Time spent compiling grammars"),
    ("lora_loads_total", "moeray_lora_adapter_loads", "LoRA adapters loaded at runtime"),
    ("lora_evictions_total", "moeray_lora_adapter_evictions", "LoRA adapters evicted for max_loras"),
)


class _ReplicaCollector:
    """Exposes the sum over replicas of their latest stats snapshots."""

    def __init__(self):
        self.snapshots: dict[str, tuple[float, dict[str, Any]]] = {}

    def update(self, stats: dict[str, Any] | None) -> None:
        if stats:
            self.snapshots[stats["replica_id"]] = (time.monotonic(), stats)

    def _live(self) -> list[dict[str, Any]]:
        cutoff = time.monotonic() - STALE_AFTER_S
        return [stats for seen, stats in self.snapshots.values() if seen >= cutoff]

    def collect(self):
        live = self._live()
        running = GaugeMetricFamily("moeray_num_requests_running", "Sequences running in the engines")
        waiting = GaugeMetricFamily("moeray_num_requests_waiting", "Sequences waiting for a slot in the engines")
        cache = GaugeMetricFamily("moeray_cache_usage_ratio", "Used share of the latent cache, averaged over replicas")
        replicas = GaugeMetricFamily("moeray_replicas_reporting", "Model replicas with recent stats")
        running.add_metric([], sum(s["num_running"] for s in live))
        waiting.add_metric([], sum(s["num_waiting"] for s in live))
        cache.add_metric([], sum(s["cache_usage"] for s in live) / len(live) if live else 0.0)
        replicas.add_metric([], len(live))
        routed = CounterMetricFamily("moeray_expert_routed_tokens", "Tokens routed to each expert",
                                     labels=["layer", "expert"])
        totals: dict[tuple[str, str], int] = {}
        for stats in live:
            for layer, counts in stats.get("routed_tokens", {}).items():
                for expert, count in enumerate(counts):
                    key = (str(layer), str(expert))
                    totals[key] = totals.get(key, 0) + count
        for key, value in sorted(totals.items(), key=lambda kv: (int(kv[0][0]), int(kv[0][1]))):
            routed.add_metric(list(key), value)
        return [running, waiting, cache, replicas, routed, *self._totals(live)]

    @staticmethod
    def _totals(live: list[dict[str, Any]]) -> list:
        families = []
        for key, name, help_text in REPLICA_TOTALS:
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], sum(s.get(key, 0) for s in live))
            families.append(family)
        drafts = sum(s.get("spec_draft_tokens", 0) for s in live)
        accepted = sum(s.get("spec_accepted_tokens", 0) for s in live)
        steps = sum(s.get("spec_verify_steps", 0) for s in live)
        rate = GaugeMetricFamily("moeray_spec_decode_acceptance_rate", "Accepted share of speculative drafts")
        rate.add_metric([], accepted / drafts if drafts else 0.0)
        length = GaugeMetricFamily("moeray_spec_decode_mean_accepted_length",
                                   "Tokens emitted per verification (accepted drafts plus the sampled one)")
        length.add_metric([], (accepted + steps) / steps if steps else 0.0)
        prompt = sum(s.get("prompt_tokens_total", 0) for s in live)
        hits = GaugeMetricFamily("moeray_prefix_cache_hit_rate", "Share of prompt tokens served by the prefix cache")
        hits.add_metric([], sum(s.get("cached_prompt_tokens_total", 0) for s in live) / prompt if prompt else 0.0)
        return [*families, rate, length, hits]


class ServingMetrics:
    def __init__(self, cluster: bool = False):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("moeray_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("moeray_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=PER_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("moeray_e2e_request_latency_seconds", "End-to-end request latency", ["model"],
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("moeray_prompt_tokens", "Prompt tokens processed", ["model"],
                                     registry=self.registry)
        self.generation_tokens = Counter("moeray_generation_tokens", "Tokens generated", ["model"],
                                         registry=self.registry)
        self.requests = Counter("moeray_requests", "Finished requests by outcome", ["model", "outcome"],
                                registry=self.registry)
        self.queue = Histogram("moeray_request_queue_time_seconds",
                               "Time from a request's arrival in the engine to its first scheduled step", ["model"],
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self.finish_reasons = Counter("moeray_request_finish_reasons", "Finished choices by finish reason",
                                      ["model", "finish_reason"], registry=self.registry)
        self.replicas = _ReplicaCollector()
        self.registry.register(self.replicas)
        self.cluster = None
        if cluster:
            from moeray.platform.ray_metrics import RequestSeries

            self.cluster = RequestSeries()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Timestamps of one request, turned into histogram observations when it ends; each goes to
    the app's registry and, on a cluster, to Ray's metrics agent."""

    def __init__(self, metrics: ServingMetrics, model: str):
        self.metrics, self.model = metrics, model
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.tokens = 0
        self.queue_times: dict[int, float] = {}  # per prompt: a completions request may carry several
        self.finish_reasons: list[str] = []

    def on_tokens(self, count: int) -> None:
        if count and self.first_token is None:
            self.first_token = time.perf_counter()
            self._observe("ttft", self.first_token - self.start)
        self.tokens += count

    def on_queue_time(self, prompt_index: int, seconds: float | None) -> None:
        if seconds is not None:
            self.queue_times[prompt_index] = seconds

    def on_finish_reason(self, reason: str | None) -> None:
        if reason is not None:
            self.finish_reasons.append(reason)

    def _observe(self, histogram: str, value: float) -> None:
        getattr(self.metrics, histogram).labels(self.model).observe(value)
        if self.metrics.cluster is not None:
            getattr(self.metrics.cluster, histogram).observe(value, tags={"model": self.model})

    def _count(self, counter: str, value: float, **labels: str) -> None:
        getattr(self.metrics, counter).labels(self.model, *labels.values()).inc(value)
        if self.metrics.cluster is not None and value > 0:
            getattr(self.metrics.cluster, counter).inc(value, tags={"model": self.model, **labels})

    def finish(self, prompt_tokens: int, outcome: str) -> None:
        end = time.perf_counter()
        self._observe("e2e", end - self.start)
        for seconds in self.queue_times.values():
            self._observe("queue", seconds)
        self._count("prompt_tokens", prompt_tokens)
        self._count("generation_tokens", self.tokens)
        self._count("requests", 1, outcome=outcome)
        for reason in self.finish_reasons:
            self._count("finish_reasons", 1, finish_reason=reason)
        if self.first_token is not None and self.tokens > 1:
            self._observe("tpot", (end - self.first_token) / (self.tokens - 1))
