"""Serving metrics with ``ray.util.metrics``: replicas aggregate in Ray's Prometheus endpoint.

Locally, Ray exports them on the metrics port of the node (``ray_flywheel_*`` series; see the
README's Serving section); in Kubernetes the chart annotates the Ray pods for scraping.
"""

from __future__ import annotations

import collections
from typing import Any

LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class IngressMetrics:
    """What the HTTP ingress counts: requests, latency, cache outcomes, single-flight waits, version."""

    def __init__(self) -> None:
        """Register the metrics (inside a replica: Ray's metrics agent must be up)."""
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "flywheel_requests_total",
            description="HTTP requests by route and status.",
            tag_keys=("route", "status"),
        )
        self.latency = Histogram(
            "flywheel_request_latency_ms",
            description="HTTP request latency in milliseconds.",
            boundaries=LATENCY_MS_BOUNDARIES,
            tag_keys=("route",),
        )
        self.cache = Counter(
            "flywheel_cache_requests_total",
            description="Completion requests by cache outcome (hit, miss, coalesced, bypass).",
            tag_keys=("outcome",),
        )
        self.single_flight_waits = Counter(
            "flywheel_single_flight_waits_total",
            description="Requests that waited for an identical request's generation instead of generating.",
        )
        self.served_version = Gauge(
            "flywheel_served_model_version",
            description="Registry version the ingress routes to.",
            tag_keys=("model",),
        )
        self.reloads = Counter(
            "flywheel_model_reloads_total",
            description="Model reload attempts by result.",
            tag_keys=("result",),
        )
        self.counts: collections.Counter[str] = collections.Counter()  # the same, for /admin/stats

    def request(self, route: str, status: int, latency_ms: float) -> None:
        """Count one answered request."""
        self.requests.inc(1, tags={"route": route, "status": str(status)})
        self.latency.observe(latency_ms, tags={"route": route})
        self.counts[f"requests.{status}"] += 1

    def cache_outcome(self, outcome: str) -> None:
        """Count one completion's cache outcome."""
        self.cache.inc(1, tags={"outcome": outcome})
        self.counts[f"cache.{outcome}"] += 1
        if outcome == "coalesced":
            self.single_flight_waits.inc(1)

    def reload(self, result: str) -> None:
        """Count a reload attempt (changed, unchanged, failed)."""
        self.reloads.inc(1, tags={"result": result})
        self.counts[f"reloads.{result}"] += 1

    def version(self, model: str, version: str | None) -> None:
        """Record the version now served."""
        if version is not None and version.isdigit():
            self.served_version.set(int(version), tags={"model": model})

    def snapshot(self) -> dict[str, Any]:
        """This replica's counts."""
        return dict(self.counts)


class ModelMetrics:
    """What the model deployment counts: batch sizes, generations, load failures, loaded version."""

    def __init__(self) -> None:
        """Register the metrics."""
        from ray.util.metrics import Counter, Gauge, Histogram

        self.batch_size = Histogram(
            "flywheel_batch_size",
            description="Requests per batched generate call.",
            boundaries=BATCH_SIZE_BOUNDARIES,
        )
        self.generations = Counter(
            "flywheel_generations_total", description="Prompts the model generated answers for."
        )
        self.load_failures = Counter(
            "flywheel_model_load_failures_total",
            description="Model loads that failed (the old model kept serving).",
        )
        self.loaded_version = Gauge(
            "flywheel_loaded_model_version",
            description="Registry version a model replica serves.",
            tag_keys=("model",),
        )
