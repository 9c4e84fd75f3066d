"""Planner and batching through a real server: budgets choose points, refusals happen before compute.

"Not computed" is checked on the server's own counters: `segserve_batch_size_sum` counts every request
that went through the model, so a refused request must leave it unchanged (cache hits never reach it,
and every image here is distinct so neither the cache nor single-flight merges requests).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ServerProcess, jpeg_bytes

_seeds = iter(range(10_000, 1_000_000))
_seed_lock = threading.Lock()


def fresh_image(height: int = 120, width: int = 160) -> bytes:
    """A JPEG never sent before in this session (so never a cache hit)."""
    with _seed_lock:
        seed = next(_seeds)
    return jpeg_bytes(height, width, seed=seed)


def post(server: ServerProcess, image: bytes, timeout: float = 120, **params: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/segment", content=image, params=params,
                      headers={"Content-Type": "image/jpeg"}, timeout=timeout)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def computed(server: ServerProcess) -> float:
    """Requests that went through the model so far."""
    return metric(server, "segserve_batch_size_sum")


def ladder(server: ServerProcess) -> list[str]:
    """The default task's ladder: point names, best first."""
    listing = httpx.get(f"{server.base_url}/v1/models").json()
    return listing["tasks"][listing["default_task"]]["ladder"]


def qualities(server: ServerProcess) -> dict[str, float]:
    listing = httpx.get(f"{server.base_url}/v1/models").json()
    return {p["name"]: p["quality"] for model in listing["models"] for p in model["points"]}


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval_s)


def burst_client() -> httpx.Client:
    """One shared client, so that concurrent requests leave together (not one client set-up after another)."""
    return httpx.Client(timeout=120, headers={"Content-Type": "image/jpeg"}, limits=httpx.Limits(max_connections=32))


def occupy(server: ServerProcess, client: httpx.Client, pool: ThreadPoolExecutor, count: int, point: str,
           queued: int) -> list:
    """Keep the single worker busy: `count` concurrent requests at `point` on a larger image (128x512 network
    input at scale 1); returns once at least `queued` of them wait in the queue behind a running batch.

    They carry a 1 ms budget, so their (missed) budget deadlines are earlier than any later request's
    deadline: the scheduler, earliest deadline first, runs all of them before anything sent afterwards.
    """
    images = [fresh_image(120, 480) for _ in range(count)]
    url, params = f"{server.base_url}/v1/segment", {"point": point, "latency_budget_ms": 1}
    futures = [pool.submit(client.post, url, content=image, params=params) for image in images]
    wait_for(lambda: metric(server, "segserve_queue_depth") >= queued, 120, 0.01)
    return futures


# ----- the planner -----

def test_larger_budgets_never_choose_a_worse_point(live_server) -> None:
    names = ladder(live_server)
    quality = qualities(live_server)
    budgets, delivered = [], []
    budget = 1.0
    before_first = ladder_latencies(live_server)
    while budget <= 600_000:  # the default max_budget_ms
        response = post(live_server, fresh_image(), latency_budget_ms=budget)
        assert response.status_code == 200, response.text
        budgets.append(budget)
        delivered.append(response.headers["X-Segserve-Point"])
        budget *= 3
    pairs = list(zip(budgets, delivered, strict=True))
    # The profile keeps learning from every batch, so neighbouring knob levels (a few percent apart on these tiny
    # inputs) may trade places between requests; input scales (2-4x apart in cost) may not.
    scales = [float(name.rsplit("@", 1)[1]) for name in delivered]
    assert all(a <= b for a, b in itertools.pairwise(scales)), f"(budget ms, point): {pairs}"
    assert_fastest(before_first, delivered[0])  # 1 ms: nothing fits, the point predicted fastest runs
    assert delivered[-1] == names[0]  # ten minutes: the best point
    assert quality[delivered[0]] < quality[delivered[-1]]


def ladder_latencies(server: ServerProcess) -> dict[str, float]:
    """The ladder's points and their batch-1 latency (ms) at the calibration size, as the server predicts now."""
    listing = httpx.get(f"{server.base_url}/v1/models").json()
    return {p["name"]: p["latency_ms"]["1"] for m in listing["models"] for p in m["points"] if p["on_ladder"]}


def assert_fastest(latency: dict[str, float], point: str, tolerance: float = 1.25) -> None:
    """`point` was on the ladder and, by the server's profile just before the request, within `tolerance` of its
    fastest point.

    Which scale is fastest on these tiny inputs is the profile's call, not a fixed fact: per-layer overheads
    dominate at 64x80, and on a busy machine calibration may even find a 0.5-scale point no faster than one at
    full scale (then it is off the ladder). The profile is read before the request because the request's own
    batch then refines its point's latency. The listing is at the calibration size, a few pixels from the test
    images, hence the tolerance.
    """
    assert point in latency, f"{point} is not on the ladder {sorted(latency)}"
    assert latency[point] <= tolerance * min(latency.values()), f"{point} vs the ladder's latencies {latency}"


def test_a_tight_budget_is_reported_missed_and_a_loose_one_met(live_server) -> None:
    tight = post(live_server, fresh_image(), latency_budget_ms=1)
    assert tight.headers["X-Segserve-Budget-Met"] == "false"
    assert tight.headers["X-Segserve-Plan"] == "fallback"
    loose = post(live_server, fresh_image(), latency_budget_ms=600_000)
    assert loose.headers["X-Segserve-Budget-Met"] == "true"
    assert ladder(live_server).index(tight.headers["X-Segserve-Point"]) > ladder(live_server).index(
        loose.headers["X-Segserve-Point"])


@pytest.mark.parametrize(("quality", "budget_ms", "expected"), [
    ("fast", None, -1),  # the cheapest quality
    ("best", None, 0),  # the best point
    (None, 600_000, 0),  # a huge budget alone: the best point ...
    ("balanced", 600_000, "cap"),  # ... capped by quality value
    ("0.8", 600_000, "cap"),
    ("best", 1, "fastest"),  # quality is a cap, not a floor: an impossible budget still goes to the fastest
])
def test_quality_caps_the_point_by_quality_value(live_server, quality, budget_ms, expected) -> None:
    def expectation(names: list[str]) -> int | str:
        """The ladder index the planner must choose, from one listing of the ladder."""
        if expected != "cap":
            return expected
        values = qualities(live_server)
        number = {"balanced": 0.5}.get(quality) or float(quality)
        low, high = values[names[-1]], values[names[0]]
        index = next(i for i, name in enumerate(names) if values[name] <= low + number * (high - low) + 1e-9)
        assert 0 < index < len(names) - 1  # a real cap, strictly inside the ladder
        return index

    params = {key: value for key, value in (("quality", quality), ("latency_budget_ms", budget_ms)) if value}
    before = ladder(live_server)
    latency = ladder_latencies(live_server)
    response = post(live_server, fresh_image(), **params)
    assert response.status_code == 200, response.text
    point = response.headers["X-Segserve-Point"]
    if expected == "fastest":  # neighbouring levels at the smallest scale may trade places as the profile learns
        assert response.headers["X-Segserve-Plan"] == "fallback"
        assert_fastest(latency, point)
        return
    # The ladder is recomputed as the profile learns (every 2 s at most), and the cap is relative to its cheapest
    # point: the request was planned on the ladder listed just before it or on the one just after.
    after = ladder(live_server)
    assert point in {before[expectation(before)], after[expectation(after)]}, (point, before, after)


# ----- refusals before compute -----

def test_strict_refuses_an_infeasible_budget_without_computing(live_server) -> None:
    rejected = metric(live_server, "segserve_rejected_total", reason="infeasible")
    batches = metric(live_server, "segserve_batch_size_count")
    response = post(live_server, fresh_image(), latency_budget_ms=1, strict="true")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "budget_infeasible"
    assert "1 ms" in error["message"]
    assert metric(live_server, "segserve_rejected_total", reason="infeasible") == rejected + 1
    assert metric(live_server, "segserve_batch_size_count") == batches
    # strict with a budget that fits is served as usual
    assert post(live_server, fresh_image(), latency_budget_ms=600_000, strict="true").status_code == 200


def test_an_expired_request_gets_504_and_is_never_computed(live_server) -> None:
    names = ladder(live_server)
    expired = metric(live_server, "segserve_rejected_total", reason="deadline_expired")
    done_before = computed(live_server)
    with burst_client() as client, ThreadPoolExecutor(12) as pool:
        occupiers = occupy(live_server, client, pool, 12, names[0], queued=4)
        started = time.monotonic()
        response = post(live_server, fresh_image(), point=names[-1], timeout_ms=50)
        elapsed = time.monotonic() - started
        results = [future.result() for future in occupiers]
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_expired"
    assert elapsed < 5  # answered at its deadline, not after the work ahead of it
    assert all(r.status_code == 200 for r in results), [r.status_code for r in results]
    assert metric(live_server, "segserve_rejected_total", reason="deadline_expired") == expired + 1
    assert computed(live_server) == done_before + len(occupiers)


def test_a_client_that_goes_away_is_not_computed(live_server) -> None:
    names = ladder(live_server)
    gone = metric(live_server, "segserve_rejected_total", reason="client_gone")
    done_before = computed(live_server)
    with burst_client() as client, ThreadPoolExecutor(16) as pool:
        occupiers = occupy(live_server, client, pool, 16, names[0], queued=8)
        with pytest.raises(httpx.TimeoutException):
            # Gives up and hangs up while at least two batches are still ahead of it (its deadline is the latest).
            post(live_server, fresh_image(), timeout=0.4, point=names[-1])
        results = [future.result() for future in occupiers]
    assert all(r.status_code == 200 for r in results)
    wait_for(lambda: metric(live_server, "segserve_rejected_total", reason="client_gone") == gone + 1, 10)
    assert computed(live_server) == done_before + len(occupiers)
    assert post(live_server, fresh_image(), point=names[-1]).status_code == 200
    assert httpx.get(f"{live_server.base_url}/readyz").status_code == 200


# ----- batching -----

def test_concurrent_requests_at_one_point_are_batched(live_server) -> None:
    point = ladder(live_server)[2]
    images = [fresh_image() for _ in range(8)]
    url = f"{live_server.base_url}/v1/segment"
    with burst_client() as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda image: client.post(url, content=image, params={"point": point}), images))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    sizes = [int(r.headers["X-Segserve-Batch-Size"]) for r in responses]
    assert all(r.headers["X-Segserve-Point"] == point for r in responses)
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 4  # the server's max batch size (tests.servers.FAST_SETTINGS)


@pytest.fixture(scope="module")
def tiny_queue_server() -> Iterator[ServerProcess]:
    env = {
        "SEGSERVE_MAX_QUEUE_SIZE": "2",
        "SEGSERVE_WORKERS": "1",
        "SEGSERVE_MAX_BATCH_SIZE": "1",
        "SEGSERVE_LEVELS": "1111-111",
        "SEGSERVE_SCALES": "1",
        "SEGSERVE_CALIBRATION_BATCH_SIZES": "1",
    }
    with ServerProcess(env=env) as server:
        yield server


def test_a_full_queue_answers_429_and_the_server_stays_healthy(tiny_queue_server) -> None:
    server = tiny_queue_server
    images = [fresh_image(120, 480) for _ in range(12)]
    url = f"{server.base_url}/v1/segment"
    with burst_client() as client, ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda image: client.post(url, content=image), images))
    statuses = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert refused and len(refused) < len(responses), statuses
    assert set(statuses) == {200, 429}, statuses
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
    assert metric(server, "segserve_rejected_total", reason="queue_full") == len(refused)
    assert computed(server) == len(responses) - len(refused)
    assert httpx.get(f"{server.base_url}/readyz").status_code == 200
    assert post(server, fresh_image()).status_code == 200
