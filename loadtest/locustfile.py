"""Interactive runs with Locust, using the same request mix as `python -m loadtest run`.

    .venv/bin/pip install -e '.[loadtest]'
    segserve serve &                                   # or any server on this machine
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080

Settings come from the environment (Locust owns the command line):

- LOADTEST_BUDGET_MS="LOW,HIGH"  budgets drawn uniformly per request (default 100,300)
- LOADTEST_SIZES="256x341:0.4,480x640:0.2,..."  image sizes and weights
- LOADTEST_REPEAT_SHARE=0.2  share of requests re-sending an image from a small hot set
- LOADTEST_WAIT_S=1.0  mean think time per user; exponential, so many users give Poisson-like arrivals

Locust users are closed loop (each waits for its answer), so a slow server receives less load: use
`python -m loadtest run` for open-loop figures. A request counts as a failure when the server misses
its budget (as the client saw it), so Locust's failure ratio is one minus budget attainment.

As the load generator, this file refuses any target that is not on this machine.
"""

from __future__ import annotations

import os
import random
import time

from locust import HttpUser, events, task

from loadtest.generator import require_loopback
from loadtest.scenarios import DEFAULT_SIZES, RequestFactory, Scenario, parse_sizes


def _scenario() -> Scenario:
    low, high = (float(v) for v in os.environ.get("LOADTEST_BUDGET_MS", "100,300").split(","))
    sizes = parse_sizes(os.environ["LOADTEST_SIZES"]) if os.environ.get("LOADTEST_SIZES") else dict(DEFAULT_SIZES)
    return Scenario(sizes=sizes, repeat_share=float(os.environ.get("LOADTEST_REPEAT_SHARE", "0.2")),
                    budget_low_ms=low, budget_high_ms=high, seed=random.randrange(1 << 30))


@events.test_start.add_listener
def _check_host(environment, **kwargs) -> None:  # type: ignore[no-untyped-def]
    require_loopback(environment.host or "")


class SegmentUser(HttpUser):
    mean_wait_s = float(os.environ.get("LOADTEST_WAIT_S", "1.0"))
    factory: RequestFactory | None = None  # shared by every user of this process: built once

    def wait_time(self) -> float:
        return random.expovariate(1 / self.mean_wait_s) if self.mean_wait_s > 0 else 0.0

    def on_start(self) -> None:
        require_loopback(self.host or "")
        if SegmentUser.factory is None:
            SegmentUser.factory = RequestFactory(_scenario())

    @task
    def segment(self) -> None:
        assert SegmentUser.factory is not None
        spec = SegmentUser.factory.one()
        started = time.perf_counter()
        with self.client.post("/v1/segment", data=spec.image, params={"latency_budget_ms": f"{spec.budget_ms:.0f}"},
                              headers={"Content-Type": "image/jpeg"}, name="/v1/segment", catch_response=True) as r:
            elapsed_ms = (time.perf_counter() - started) * 1e3  # the whole answer is in by now
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
            elif elapsed_ms > spec.budget_ms:
                r.failure(f"budget missed at point {r.headers.get('X-Segserve-Point')}")
            else:
                r.success()
