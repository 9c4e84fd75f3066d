"""SIGTERM under load: readiness turns 503, new work is refused, accepted work completes, the process exits.

Made independent of the machine's speed (it once failed at load average 10, when the first requests were answered
before the last ones arrived, so "all six in flight at once" was never seen): one worker, batches of 4 and a
10 s batching delay. The first four requests form a full batch and run at once; the last two wait for their batch
to fill up for 10 s, so they are still queued when the signal comes however slow the machine is. The signal is
sent once all six are accepted (in flight or already answered); the drain must answer the queued ones too.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.servers import ServerProcess, jpeg_bytes

REQUESTS = 6
BATCH_DELAY_MS = 10_000  # the largest allowed: how long the last two wait for their batch to fill up


def _post(base_url: str, image: bytes) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/segment", content=image, headers={"Content-Type": "image/jpeg"},
                      params={"level": "1111-111"}, timeout=120)


def _counts(base_url: str) -> tuple[float, float]:
    """(requests in flight, /v1/segment requests answered 200) from the server's metrics."""
    inflight = answered = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("segserve_inflight_requests "):
            inflight = float(line.split()[1])
        elif line.startswith("segserve_requests_total{") and 'route="/v1/segment"' in line and 'status="200"' in line:
            answered += float(line.rsplit(" ", 1)[1])
    return inflight, answered


def test_sigterm_drains_accepted_work_and_refuses_new_work() -> None:
    server = ServerProcess(env={"SEGSERVE_WORKERS": "1", "SEGSERVE_MAX_BATCH_SIZE": "4",
                                "SEGSERVE_MAX_QUEUE_DELAY_MS": str(BATCH_DELAY_MS),
                                "SEGSERVE_SHUTDOWN_GRACE_S": "60"})
    server.start()
    try:
        images = [jpeg_bytes(480, 640, seed=seed) for seed in range(REQUESTS)]  # one size: one batch queue
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = [pool.submit(_post, server.base_url, image) for image in images]
            deadline = time.monotonic() + 60
            while sum(_counts(server.base_url)) < REQUESTS and time.monotonic() < deadline:
                time.sleep(0.05)
            inflight, answered = _counts(server.base_url)
            assert inflight + answered == REQUESTS, "the requests were not all accepted before SIGTERM"
            assert inflight >= REQUESTS % 4, "the last batch must still be waiting: the drain has work to do"

            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            ready = httpx.get(f"{server.base_url}/readyz", timeout=5)
            while ready.status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.05)
                ready = httpx.get(f"{server.base_url}/readyz", timeout=5)
            assert ready.status_code == 503 and ready.json()["draining"] is True
            refused = _post(server.base_url, jpeg_bytes(seed=99))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"  # the documented code, not not_ready

            responses = [future.result() for future in futures]
        assert [r.status_code for r in responses] == [200] * REQUESTS, [r.text[:200] for r in responses]
        assert server.process.wait(timeout=60) == 0
    finally:
        server.terminate(signal.SIGKILL)
