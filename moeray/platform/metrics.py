"""Prometheus metrics of the OpenAI endpoint.

Contract: request-level metrics (time to first token, time per output token, end-to-end latency,
prompt and generated token counts) are measured where the client sees them, in the HTTP layer.
Replica-level state (running and waiting requests, cache usage, tokens routed per expert) comes
from the stats snapshot each replica attaches to a finished request (and to explicit stats
calls); the exporter sums the latest snapshot of every replica heard from recently. Each app
owns its registry, so several apps in one process never collide.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STALE_AFTER_S = 300.0


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
        return [running, waiting, cache, replicas, routed, *self._speculative(live)]

    @staticmethod
    def _speculative(live: list[dict[str, Any]]) -> list:
        drafts = sum(s.get("spec_draft_tokens", 0) for s in live)
        accepted = sum(s.get("spec_accepted_tokens", 0) for s in live)
        steps = sum(s.get("spec_verify_steps", 0) for s in live)
        families = []
        for name, help_text, value in (
                ("moeray_spec_decode_draft_tokens", "Speculative drafts proposed", drafts),
                ("moeray_spec_decode_accepted_tokens", "Speculative drafts accepted", accepted),
                ("moeray_spec_decode_verify_steps", "Verifications (a sequence's drafts checked in one step)", steps)):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            families.append(family)
        rate = GaugeMetricFamily("moeray_spec_decode_acceptance_rate", "Accepted share of speculative drafts")
        rate.add_metric([], accepted / drafts if drafts else 0.0)
        length = GaugeMetricFamily("moeray_spec_decode_mean_accepted_length",
                                   "Tokens emitted per verification (accepted drafts plus the sampled one)")
        length.add_metric([], (accepted + steps) / steps if steps else 0.0)
        return [*families, rate, length]


class ServingMetrics:
    def __init__(self):
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
        self.replicas = _ReplicaCollector()
        self.registry.register(self.replicas)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Timestamps of one request, turned into histogram observations when it ends."""

    def __init__(self, metrics: ServingMetrics, model: str):
        self.metrics, self.model = metrics, model
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.tokens = 0

    def on_tokens(self, count: int) -> None:
        if count and self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.ttft.labels(self.model).observe(self.first_token - self.start)
        self.tokens += count

    def finish(self, prompt_tokens: int, outcome: str) -> None:
        end = time.perf_counter()
        m = self.metrics
        m.e2e.labels(self.model).observe(end - self.start)
        m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        m.generation_tokens.labels(self.model).inc(self.tokens)
        m.requests.labels(self.model, outcome).inc()
        if self.first_token is not None and self.tokens > 1:
            m.tpot.labels(self.model).observe((end - self.first_token) / (self.tokens - 1))
