"""SIGTERM under load: readiness turns 503, new work is refused, accepted work completes, the process exits."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.servers import ServerProcess, jpeg_bytes


def _post(base_url: str, image: bytes) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/segment", content=image, headers={"Content-Type": "image/jpeg"},
                      params={"level": "1111-111"}, timeout=120)


def _queued(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    inflight = [line for line in text.splitlines() if line.startswith("segserve_inflight_requests ")]
    return float(inflight[0].split()[1]) if inflight else 0.0


def test_sigterm_drains_accepted_work_and_refuses_new_work() -> None:
    server = ServerProcess(env={"SEGSERVE_WORKERS": "1", "SEGSERVE_MAX_BATCH_SIZE": "1",
                                "SEGSERVE_SHUTDOWN_GRACE_S": "60"})
    server.start()
    try:
        # Larger images than the fast default so that the work outlasts the signal.
        images = [jpeg_bytes(480, 640, seed=seed) for seed in range(6)]
        with ThreadPoolExecutor(len(images)) as pool:
            futures = [pool.submit(_post, server.base_url, image) for image in images]
            deadline = time.monotonic() + 30
            while _queued(server.base_url) < len(images) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _queued(server.base_url) == len(images), "the requests were not all accepted before SIGTERM"

            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = httpx.get(f"{server.base_url}/readyz", timeout=5)
            assert ready.status_code == 503 and ready.json()["draining"] is True
            refused = _post(server.base_url, jpeg_bytes(seed=99))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"  # the documented code, not not_ready

            responses = [future.result() for future in futures]
        assert [r.status_code for r in responses] == [200] * len(images), [r.text[:200] for r in responses]
        assert server.process.wait(timeout=60) == 0
    finally:
        server.terminate(signal.SIGKILL)
