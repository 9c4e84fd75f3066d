"""Every Prometheus metric segserve exports, declared in one place.

Names carry the `segserve_` prefix and their unit (`_seconds`, `_bytes`, `_total`); labels are of low
cardinality (model, point, route, status, outcome; a point is `model/level@scale`, a few dozen per server).
Each runtime owns its own registry, so two service instances can live in one process (tests do that) without
colliding.

The Grafana dashboard, the alert rules and the prometheus-adapter rule in `deploy/` name these
metrics; `tests/deploy/test_promql.py` checks that every name they use is exported here.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# 1 ms to 30 s: segmentation on a CPU spans a few ms (cache hits) to seconds (1024x2048 at full level).
LATENCY_BUCKETS_SECONDS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
QUALITY_BUCKETS = (10, 20, 25, 30, 35, 40, 42.5, 45, 47.5, 50, 52.5, 55, 60, 70, 80, 90, 100)
FRACTION_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metric families, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "segserve_requests", "Requests answered, by route, HTTP-style status code and model.",
            ["route", "status", "model"], registry=r,
        )
        self.request_duration = Histogram(
            "segserve_request_duration_seconds",
            "End-to-end time of a segmentation request inside the server (decode to encoded mask).",
            ["model", "point"], buckets=LATENCY_BUCKETS_SECONDS, registry=r,
        )
        self.queue_wait = Histogram(
            "segserve_queue_wait_seconds", "Time a request waited in its batch queue before compute.",
            ["model", "point"], buckets=LATENCY_BUCKETS_SECONDS, registry=r,
        )
        self.compute = Histogram(
            "segserve_compute_seconds", "Model compute time of the batch a request ran in (preprocess included).",
            ["model", "point"], buckets=LATENCY_BUCKETS_SECONDS, registry=r,
        )
        self.stage = Histogram(
            "segserve_stage_seconds", "Time spent in the CPU stages around the model, per request.",
            ["stage"], buckets=LATENCY_BUCKETS_SECONDS, registry=r,
        )
        self.batch_size = Histogram(
            "segserve_batch_size", "Number of requests per executed batch.",
            ["model", "point"], buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "segserve_queue_depth", "Requests waiting in batch queues (all models).", registry=r,
        )
        self.inflight = Gauge(
            "segserve_inflight_requests", "Segmentation requests being handled right now.", registry=r,
        )
        self.point_chosen = Counter(
            "segserve_point_chosen",
            "Operating point that answered each request, and why (budget, quality, default, explicit, fallback, "
            "cache).",
            ["model", "point", "reason"], registry=r,
        )
        self.delivered_quality = Histogram(
            "segserve_delivered_quality",
            "Quality value (mIoU points, measured or prior) of the point that answered each request.",
            ["task"], buckets=QUALITY_BUCKETS, registry=r,
        )
        self.kept_tokens = Histogram(
            "segserve_kept_token_fraction",
            "Fraction of tokens still computed after each early-exit tap (DoViT), per request.",
            ["model", "tap"], buckets=FRACTION_BUCKETS, registry=r,
        )
        self.budget_outcomes = Counter(
            "segserve_budget_outcomes",
            "Requests that carried a latency budget, by whether the budget was met (met, missed).",
            ["model", "outcome"], registry=r,
        )
        self.rejected = Counter(
            "segserve_rejected",
            "Requests refused before compute (queue_full, infeasible, deadline_expired, client_gone, draining).",
            ["model", "reason"], registry=r,
        )
        self.cache_requests = Counter(
            "segserve_cache_requests", "Result cache lookups by result (hit, miss).",
            ["backend", "result"], registry=r,
        )
        self.cache_errors = Counter(
            "segserve_cache_errors", "Result cache operations that failed (the request was served anyway).",
            ["backend", "operation"], registry=r,
        )
        self.calibrated_latency = Gauge(
            "segserve_calibrated_latency_seconds",
            "Planner's current latency estimate per batch, by point and batch size, at the point's reference shape.",
            ["model", "point", "batch_size"], registry=r,
        )
        self.workers_alive = Gauge(
            "segserve_workers_alive", "Worker threads able to run batches.", registry=r,
        )
        self.worker_failures = Counter(
            "segserve_worker_failures", "Batches that raised inside a worker.", ["model"], registry=r,
        )
        self.ready = Gauge("segserve_ready", "1 when /readyz answers 200, else 0.", registry=r)
        self.build_info = Gauge(
            "segserve_build_info", "Build information (always 1).",
            ["version", "python", "torch", "onnxruntime"], registry=r,
        )
        self.model_info = Gauge(
            "segserve_model_info", "Served model (always 1).",
            ["model", "architecture", "weights", "task", "classes", "backend", "device"], registry=r,
        )

    def set_build_info(self, version: str, torch_version: str, onnxruntime_version: str) -> None:
        self.build_info.labels(version, platform.python_version(), torch_version, onnxruntime_version).set(1)

    def exposition(self) -> bytes:
        """The text exposition format served at `/metrics`."""
        return generate_latest(self.registry)
