"""Prometheus sees moeray's series where the chart tells it to look: the app runs on the session
Ray (a model replica with two expert shards behind the OpenAI ingress), the rendered
ServiceMonitor names a port and a path, and that port and path on the Ray node (its metrics
agent) carry `moeray_*` series from the model replica, named as the ServiceMonitor relabels
them. Every query of the chart's Grafana dashboard names only series found in that scrape."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from support import API_KEY, write_hf_model_folder

pytestmark = pytest.mark.slow
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ", re.M)


@pytest.fixture(scope="module")
def chart(render):
    manifests = render(set_values=("serviceMonitor.enabled=true", "grafanaDashboard.enabled=true"))
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def scrape_target(chart) -> tuple[int, str, list[dict]]:
    """(container port, path, metric relabelings) that the ServiceMonitor's endpoint resolves to."""
    (monitor,) = [m for (kind, _), m in chart.items() if kind == "ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    wanted = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [m for (kind, _), m in chart.items()
                  if kind == "Service" and wanted.items() <= m["metadata"]["labels"].items()]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    (rayservice,) = [m for (kind, _), m in chart.items() if kind == "RayService"]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    container_ports = {p["containerPort"]: p["name"] for c in head["template"]["spec"]["containers"]
                       for p in c.get("ports", [])}
    assert container_ports.get(port["targetPort"]) == "metrics"
    # Ray's metrics agent listens on the head's (and every worker's) metrics-export-port.
    assert head["rayStartParams"]["metrics-export-port"] == str(port["targetPort"])
    return port["targetPort"], endpoint.get("path", "/metrics"), endpoint.get("metricRelabelings", [])


def relabel(name: str, relabelings: list[dict]) -> str:
    for rule in relabelings:
        if rule.get("sourceLabels") == ["__name__"] and rule.get("targetLabel") == "__name__":
            match = re.fullmatch(rule["regex"], name)
            if match:
                name = match.expand(rule["replacement"].replace("$", "\\"))
    return name


def test_the_service_monitor_scrapes_moeray_series_from_the_model_replica(chart, ray_context, deployed,
                                                                          tmp_path_factory):
    chart_port, path, relabelings = scrape_target(chart)
    assert chart_port == 8080
    folder = tmp_path_factory.mktemp("scraped-model")
    write_hf_model_folder(folder, "v3", seed=21)
    base = deployed({"model": str(folder), "served_model_name": "tiny-moe", "api_keys": [API_KEY],
                   "expert_parallel": {"shards": 2, "shard_cpus": 0.5},
                   # A cache of 80 tokens: three 60-token requests at once must preempt.
                   "engine": {"max_model_len": 64, "block_size": 4, "num_cache_blocks": 20}},
                    "/scraped", "scraped")

    def complete(prompt: list[int], max_tokens: int) -> None:
        response = httpx.post(f"{base}/v1/completions", headers=HEADERS, timeout=120,
                              json={"model": "tiny-moe", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
        assert response.status_code == 200, response.text

    complete(list(range(3, 27)), 4)
    complete(list(range(3, 27)), 4)  # the same prompt again: its blocks come from the prefix cache
    crowd = [threading.Thread(target=complete, args=(list(range(100 + 30 * i, 124 + 30 * i)), 36)) for i in range(3)]
    for thread in crowd:
        thread.start()
    for thread in crowd:
        thread.join(timeout=120)

    # On this machine Ray's agent listens on the port Ray chose, not the chart's 8080.
    url = f"http://127.0.0.1:{ray_context.address_info['metrics_export_port']}{path}"
    needed = {"moeray_time_to_first_token_seconds_bucket", "moeray_num_requests_running",
              "moeray_expert_routed_tokens_total", "moeray_prefix_cache_hit_tokens_total",
              "moeray_expert_shard_healthy", "moeray_request_finish_reasons_total", "moeray_preemptions_total"}
    deadline, found = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        found = {}
        for name, labels in SERIES.findall(text):
            renamed = relabel(name, relabelings)
            if renamed.startswith("moeray_") and 'application="scraped"' in labels:
                found.setdefault(renamed, []).append(labels)
        if needed <= set(found):
            break
        time.sleep(1)
    assert needed <= set(found), f"missing {sorted(needed - set(found))}; found {sorted(found)}"
    assert all('deployment="model"' in labels for labels in found["moeray_num_requests_running"])
    assert all('deployment="openai"' in labels for labels in found["moeray_time_to_first_token_seconds_bucket"])
    assert {re.search(r'shard="(\w+)"', labels).group(1)
            for labels in found["moeray_expert_routed_tokens_total"]} == {"0", "1"}
    assert len(found["moeray_expert_shard_healthy"]) == 2

    (configmap,) = [m for (kind, _), m in chart.items() if kind == "ConfigMap" and "dashboard" in m["metadata"]["name"]]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["moeray-serving.json"])
    queried = {(panel["title"], name) for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bmoeray_\w+", target["expr"])}
    assert len(dashboard["panels"]) >= 7 and queried
    unknown = {(title, name) for title, name in queried
               if name not in found and f"{name}_bucket" not in found}  # histogram_quantile reads _bucket
    assert not unknown, f"dashboard queries name series the app does not export: {sorted(unknown)}"
