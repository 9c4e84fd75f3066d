"""Chaos and overload on real servers, bounded and on loopback only: the gaps the rest of the suite leaves.

Covered elsewhere, and not repeated here:
- deadlines under overload (48 requests at once, no 200 past its timeout):
  tests/service/test_hardening.py::test_under_overload_no_answer_comes_after_its_timeout;
- near-limit images at once within the memory budget:
  tests/service/test_hardening.py::test_near_limit_images_at_once_stay_within_the_memory_budget;
- a Redis outage (graceful stop, restart) under one sequential client, and a hung Redis at the cache level:
  tests/service/cache/test_cache_service.py::test_a_redis_outage_fails_no_request_and_the_cache_recovers,
  tests/service/cache/test_cache_redis.py::test_a_hung_redis_costs_at_most_the_timeout;
- SIGTERM under load (every accepted request answered, new ones refused `shutting_down`):
  tests/service/test_shutdown.py;
- a worker's backend crashing mid-batch (only that batch fails, the worker is rebuilt, readiness off when it
  cannot be):
  tests/service/test_app_inprocess.py::test_a_crashing_backend_fails_only_its_batch_and_the_worker_is_rebuilt
  and ::test_a_worker_that_cannot_rebuild_turns_readiness_off.

Here: an open-loop 3x overload (three times the throughput measured just before) that hits the queue, memory and
deadline limits at once; and Redis killed (SIGKILL) and frozen (SIGSTOP) under concurrent load on both transports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from service.grpc.gen import segserve_pb2, segserve_pb2_grpc
from tests.servers import ServerProcess, free_port, jpeg_bytes
from tests.service.cache.test_cache_service import redis_env
from tests.service.test_hardening import SERVER_TOLERANCE_S, SLACK, memory_mb, png, structured

FULL_POINT = "edaformer-t/1111-111@1"
MEMORY_BUDGET = 192 * 2**20  # 11 small requests at once (16 MiB each, mostly the postprocess chunk)
REQUEST_TIMEOUT_S = 5.0  # the bound of a request that names no timeout
HUGE_SIDE = 3000  # 9 MP: 21 bytes a pixel and the 16 MiB postprocess chunk, 205 MiB charged, over the budget
OVERLOAD = 3.0
MAX_REQUESTS = 240


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def reset_peak_memory(pid: int) -> None:
    """Start VmHWM again from the current resident size (Linux: clear_refs 5), so the peak is this test's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


# ----- 3x overload: queue, memory and deadlines at once -----

@dataclass
class Sent:
    kind: str
    timeout_s: float  # the request's bound: its timeout_ms, else the server's request_timeout_s
    status: int = 0  # 0: no answer at all (a transport error), which must never happen
    code: str = ""
    total_s: float = 0.0  # the server's own X-Segserve-Total-Ms


@pytest.fixture(scope="module")
def overload_server():
    env = {"SEGSERVE_WORKERS": "1", "SEGSERVE_MAX_BATCH_SIZE": "4", "SEGSERVE_MAX_QUEUE_SIZE": "4",
           "SEGSERVE_MAX_INFLIGHT_BYTES": str(MEMORY_BUDGET), "SEGSERVE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
           "SEGSERVE_CACHE_BYTES": "0",  # every request computes
           "SEGSERVE_LEVELS": "1111-111,2222-222", "SEGSERVE_SCALES": "1", "SEGSERVE_CALIBRATION_BATCH_SIZES": "1,4"}
    with ServerProcess(env=env) as server:
        yield server


def measured_throughput(server: ServerProcess, image: bytes) -> tuple[float, float]:
    """(requests a second with 4 clients at once, seconds of one request alone) at the full point."""
    def one(_: int) -> float:
        started = time.monotonic()
        response = httpx.post(f"{server.base_url}/v1/segment", content=image, params={"point": FULL_POINT},
                              headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200, response.text
        return time.monotonic() - started

    alone = sorted(one(i) for i in range(3))[1]
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: [one(0) for _ in range(3)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 12 / (time.monotonic() - started), alone


async def open_loop(server: ServerProcess, rate: float, count: int, small: list[bytes], medium: list[bytes],
                    huge: bytes, alone_s: float) -> list[Sent]:
    """`count` requests sent on a fixed schedule (`rate` a second) whatever the answers. Mix: small JPEGs at the
    full point with a tight timeout, budgeted ones with a looser timeout, some with no timeout (bounded by
    request_timeout_s), medium PNGs, and once the server is loaded an image larger than the whole memory budget
    (refused while anything else is in flight: always, under this load)."""
    tight_ms = max(100.0, 1500 * alone_s)
    loose_ms = max(300.0, 6000 * alone_s)
    sent: list[Sent] = []

    async def send(client: httpx.AsyncClient, at: float, index: int) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        slot = index % 10
        data, content_type, params = small[index % len(small)], "image/jpeg", {}
        if index % 20 == 19:
            kind, data, content_type, params = "huge", huge, "image/png", {"timeout_ms": "2000"}
        elif slot == 4:
            kind, data, content_type = "png", medium[index % len(medium)], "image/png"
        elif slot < 6:
            kind, params = "tight", {"point": FULL_POINT, "timeout_ms": f"{tight_ms:.0f}"}
        elif slot < 8:
            kind, params = "budget", {"latency_budget_ms": f"{tight_ms:.0f}", "timeout_ms": f"{loose_ms:.0f}"}
        else:
            kind = "untimed"
        record = Sent(kind, float(params["timeout_ms"]) / 1e3 if "timeout_ms" in params else REQUEST_TIMEOUT_S)
        sent.append(record)
        try:
            answer = await client.post("/v1/segment", content=data, params=params,
                                       headers={"Content-Type": content_type})
        except httpx.HTTPError:
            return  # status 0: no answer, a failure
        record.status = answer.status_code
        if answer.status_code == 200:
            record.total_s = float(answer.headers["X-Segserve-Total-Ms"]) / 1e3
        else:
            record.code = answer.json()["error"]["code"]

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
        start = time.monotonic()
        await asyncio.gather(*(send(client, start + index / rate, index) for index in range(count)))
    return sent


def test_3x_overload_hits_every_limit_answers_in_time_and_recovers(overload_server: ServerProcess) -> None:
    server = overload_server
    assert server.process is not None
    small = [jpeg_bytes(120, 160, seed=9000 + i) for i in range(16)]
    medium = [png(structured(480, 640, seed=seed)) for seed in range(2)]
    huge = png(np.zeros((HUGE_SIDE, HUGE_SIDE, 3), np.uint8))  # a few KB of file, 205 MiB of work
    capacity, alone_s = measured_throughput(server, small[0])
    rate = OVERLOAD * capacity
    count = min(MAX_REQUESTS, max(80, round(rate * 8)))  # about 8 s of it

    baseline, _ = memory_mb(server.process.pid)
    reset_peak_memory(server.process.pid)
    sent = asyncio.run(open_loop(server, rate, count, small, medium, huge, alone_s))
    _, peak = memory_mb(server.process.pid)

    statuses = {record.status for record in sent}
    codes = {record.code for record in sent if record.code}
    summary = f"{capacity:.1f}/s x {OVERLOAD:g}, alone {alone_s * 1e3:.0f} ms: " + repr(
        sorted((r.kind, r.status, r.code) for r in sent if r.status != 200))
    assert statuses <= {200, 429, 503, 504}, summary  # 0: no answer; 500: a failure
    # Every limit was hit in the same run, and useful work went on.
    assert {"queue_full", "memory_budget", "deadline_expired"} <= codes, summary
    assert 200 in statuses, summary
    # No answer later than its bound (the server's own clock, from arrival).
    late = [(r.kind, r.timeout_s, r.total_s) for r in sent if r.status == 200
            and r.total_s > r.timeout_s + SERVER_TOLERANCE_S]
    assert not late, late
    # The images in flight stayed within their budget (plus the network and Python's own buffers).
    assert peak - baseline <= MEMORY_BUDGET + SLACK, (baseline / 2**20, peak / 2**20)

    # Recovery: the queue drains by itself, memory is handed back, and a plain request is served.
    assert wait_for(lambda: metric(server, "segserve_inflight_requests") == 0
                    and metric(server, "segserve_queue_depth") == 0, 60)
    resident, _ = memory_mb(server.process.pid)
    assert resident - baseline <= MEMORY_BUDGET / 2, (baseline / 2**20, resident / 2**20)
    after = httpx.post(f"{server.base_url}/v1/segment", content=small[1], headers={"Content-Type": "image/jpeg"},
                       timeout=60)
    assert after.status_code == 200, after.text
    assert httpx.get(f"{server.base_url}/readyz").status_code == 200


# ----- Redis killed and frozen under load, both transports -----

@dataclass
class Answer:
    sent: float
    done: float
    transport: str
    ok: bool
    cache: str


@pytest.mark.redis
def test_redis_killed_and_frozen_under_load_fails_nothing_and_hits_resume(redis_server) -> None:
    images = [jpeg_bytes(height=80, width=112, seed=seed) for seed in range(9100, 9104)]
    answers: list[Answer] = []
    stop = threading.Event()

    def http_client(server: ServerProcess, offset: int) -> None:
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            index = offset
            while not stop.is_set():
                sent = time.monotonic()
                response = http.post("/v1/segment", content=images[index % len(images)],
                                     headers={"Content-Type": "image/jpeg"})
                answers.append(Answer(sent, time.monotonic(), "http", response.status_code == 200,
                                      response.headers.get("X-Segserve-Cache", "")))
                index += 1

    def grpc_client(server: ServerProcess) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = segserve_pb2_grpc.SegmentationStub(channel)
            index = 0
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    reply = stub.Segment(segserve_pb2.SegmentRequest(image=images[index % len(images)]), timeout=120)
                    answers.append(Answer(sent, time.monotonic(), "grpc", True, reply.receipt.cache))
                except grpc.RpcError:
                    answers.append(Answer(sent, time.monotonic(), "grpc", False, ""))
                index += 1

    def hit_after(moment: float) -> Callable[[], bool]:
        return lambda: any(a.cache == "hit" and a.sent > moment for a in answers)

    def answered_after(moment: float, count: int) -> Callable[[], bool]:
        return lambda: sum(a.sent > moment for a in answers) >= count

    with ServerProcess(env=redis_env(redis_server.url), grpc_port=free_port()) as server:
        clients = [threading.Thread(target=http_client, args=(server, offset), daemon=True) for offset in range(3)]
        clients.append(threading.Thread(target=grpc_client, args=(server,), daemon=True))
        for client in clients:
            client.start()
        try:
            assert wait_for(hit_after(0), 120)
            # SIGKILL: no goodbye, connections reset mid-command. The fixture stops gracefully only.
            os.kill(redis_server._process.pid, signal.SIGKILL)
            killed = time.monotonic()
            assert wait_for(answered_after(killed, 3 * len(images)), 120)
            redis_server.stop()  # reaps the killed process
            restarted = time.monotonic()
            redis_server.start()
            assert wait_for(hit_after(restarted), 60)  # the cache comes back by itself
            # Frozen (SIGSTOP): connections stay open, nothing answers; each cache call costs its timeout.
            redis_server.pause()
            frozen = time.monotonic()
            assert wait_for(answered_after(frozen, 2 * len(images)), 120)
            redis_server.resume()
            thawed = time.monotonic()
            assert wait_for(hit_after(thawed), 60)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=120)
        assert answers and all(a.ok for a in answers), [a for a in answers if not a.ok]
        assert {a.transport for a in answers} == {"http", "grpc"}
        down = [a for a in answers if a.sent > killed and a.done < restarted]
        assert len(down) >= 3 * len(images) and all(a.cache == "miss" for a in down), down
        assert metric(server, "segserve_cache_errors_total") >= 1
