"""GET /metrics on the session's live server: the values move as requests are made, and promtool accepts it."""

from __future__ import annotations

import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import __version__
from tests.servers import ServerProcess, jpeg_bytes
from tests.tools import require_tool

MODEL = "edaformer-t"


class Snapshot:
    """The samples of one scrape; `value(name, **labels)` sums the samples whose labels include `labels`."""

    def __init__(self, server: ServerProcess) -> None:
        response = httpx.get(f"{server.base_url}/metrics", timeout=30)
        response.raise_for_status()
        self.text = response.text
        self.content_type = response.headers["content-type"]
        self.samples = [sample for family in text_string_to_metric_families(self.text) for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def series(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def segment(server: ServerProcess, image: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/segment", content=image, params=params,
                      headers={"Content-Type": "image/jpeg"}, timeout=120)


def test_request_metrics_move_with_requests(live_server: ServerProcess) -> None:
    image = jpeg_bytes(height=90, width=120, seed=501)
    before = Snapshot(live_server)
    computed = segment(live_server, image, latency_budget_ms=60_000)
    assert computed.status_code == 200, computed.text
    point = computed.headers["X-Segserve-Point"]
    outcome = "met" if computed.headers["X-Segserve-Budget-Met"] == "true" else "missed"
    after = Snapshot(live_server)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("segserve_requests_total", route="/v1/segment", status="200", model=MODEL) == 1
    assert moved("segserve_request_duration_seconds_count", model=MODEL, point=point) == 1
    assert moved("segserve_request_duration_seconds_sum", model=MODEL, point=point) > 0
    assert moved("segserve_queue_wait_seconds_count", model=MODEL, point=point) == 1
    assert moved("segserve_compute_seconds_count", model=MODEL, point=point) == 1
    assert moved("segserve_batch_size_count", model=MODEL, point=point) == 1
    assert moved("segserve_batch_size_sum", model=MODEL, point=point) >= 1
    assert moved("segserve_point_chosen_total", model=MODEL, point=point, reason="budget") == 1
    assert moved("segserve_delivered_quality_count", task="ade20k") == 1
    assert moved("segserve_delivered_quality_sum", task="ade20k") == pytest.approx(
        float(computed.headers["X-Segserve-Quality"]), abs=0.01)
    assert moved("segserve_budget_outcomes_total", model=MODEL, outcome=outcome) == 1
    assert moved("segserve_cache_requests_total", backend="memory", result="miss") == 1
    assert moved("segserve_stage_seconds_count", stage="encode") == 1
    assert moved("segserve_stage_seconds_count") >= 4  # decode, preprocess, forward, postprocess too

    # The same image again: a cache hit, counted as one; no batch, queue or compute.
    assert segment(live_server, image).headers["X-Segserve-Cache"] == "hit"
    again = Snapshot(live_server)
    assert again.value("segserve_cache_requests_total", backend="memory", result="hit") - after.value(
        "segserve_cache_requests_total", backend="memory", result="hit") == 1
    assert again.value("segserve_request_duration_seconds_count", model=MODEL, point=point) - after.value(
        "segserve_request_duration_seconds_count", model=MODEL, point=point) == 1
    assert again.value("segserve_point_chosen_total", model=MODEL, point=point, reason="cache") - after.value(
        "segserve_point_chosen_total", model=MODEL, point=point, reason="cache") == 1
    assert again.value("segserve_batch_size_count") == after.value("segserve_batch_size_count")
    assert again.value("segserve_compute_seconds_count") == after.value("segserve_compute_seconds_count")

    # Failures are counted by their status code (and the model asked for; none on /v1/segment).
    assert segment(live_server, b"not an image").status_code == 400
    assert Snapshot(live_server).value("segserve_requests_total", route="/v1/segment", status="400",
                                       model="") == before.value("segserve_requests_total", route="/v1/segment",
                                                                 status="400", model="") + 1


def test_calibrated_latency_per_point_and_batch_size(live_server: ServerProcess) -> None:
    snapshot = Snapshot(live_server)
    points = [p["name"] for p in httpx.get(f"{live_server.base_url}/v1/models", timeout=30).json()
              ["models"][0]["points"]]
    assert len(points) == 18  # 6 levels x 3 scales
    for point in points:
        for batch_size in ("1", "4"):  # the smallest and largest of the test servers' calibration batch sizes
            assert snapshot.value("segserve_calibrated_latency_seconds", model=MODEL, point=point,
                                  batch_size=batch_size) > 0, (point, batch_size)


def test_info_and_state_gauges(live_server: ServerProcess) -> None:
    snapshot = Snapshot(live_server)
    (build,) = snapshot.series("segserve_build_info")
    assert build["version"] == __version__ and {"python", "torch", "onnxruntime"} <= build.keys()
    assert snapshot.value("segserve_build_info") == 1
    (model,) = snapshot.series("segserve_model_info")
    assert model == {"model": MODEL, "architecture": MODEL, "weights": "random", "task": "ade20k", "classes": "150",
                     "backend": "torch", "device": "cpu"}
    assert snapshot.value("segserve_model_info") == 1
    assert snapshot.value("segserve_ready") == 1
    assert snapshot.value("segserve_workers_alive") == 1
    assert snapshot.value("segserve_queue_depth") == 0
    assert snapshot.series("segserve_inflight_requests") == [{}]
    # Every family is declared and prefixed, and latency histograms run from 1 ms to 30 s.
    assert all(sample.name.startswith("segserve_") for sample in snapshot.samples)
    buckets = {labels["le"] for labels in snapshot.series("segserve_request_duration_seconds_bucket")}
    assert {"0.001", "30.0", "+Inf"} <= buckets


def test_promtool_accepts_the_exposition(live_server: ServerProcess) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    assert segment(live_server, jpeg_bytes(height=64, width=64, seed=502), latency_budget_ms=60_000).status_code == 200
    snapshot = Snapshot(live_server)
    assert snapshot.content_type.startswith("text/plain; version=")  # the Prometheus text format
    checked = subprocess.run([promtool, "check", "metrics"], input=snapshot.text.encode(), capture_output=True,
                             timeout=60)
    report = (checked.stdout + checked.stderr).decode(errors="replace")
    assert checked.returncode == 0 and not report.strip(), report
