"""The result cache through real `segserve serve` processes: Redis shared by replicas, outages, TTL, quality,
single-flight, and the in-memory default.

Redis tests start their own private `redis-server` (the `redis_server` fixture: a failure in CI when it is
missing). Their servers calibrate little (two levels, batch size 1): they only need to answer, not plan well.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import redis

from tests.servers import ServerProcess, jpeg_bytes

FULL, CHEAPEST = "1111-111", "2222-222"
PREFIX = "segserve-test:"


def redis_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "SEGSERVE_REDIS_URL": url,
        "SEGSERVE_CACHE_KEY_PREFIX": PREFIX,
        "SEGSERVE_REDIS_TIMEOUT_S": "0.5",  # fail-open stays fast (a stopped Redis refuses at once) on a busy CI box
        "SEGSERVE_LEVELS": f"{FULL},{CHEAPEST}",  # quality=fast plans the cheapest, quality=best the full level
        "SEGSERVE_SCALES": "1",  # (one scale, so that the cheapest point is the cheapest level)
        "SEGSERVE_CALIBRATION_BATCH_SIZES": "1",
        **extra,
    }


def post(server: ServerProcess, image: bytes, **params: object) -> httpx.Response:
    response = httpx.post(f"{server.base_url}/v1/segment", content=image, params=params,
                          headers={"Content-Type": "image/jpeg"}, timeout=120)
    assert response.status_code == 200, response.text
    return response


def cache_of(response: httpx.Response) -> tuple[str, str]:
    return response.headers["X-Segserve-Cache"], response.headers["X-Segserve-Level"]


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`, from the server's /metrics."""
    total = 0.0
    for line in httpx.get(f"{server.base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            total += float(value)
    return total


# ----- Redis -----

@pytest.mark.redis
def test_replicas_share_results_and_better_levels_answer_cheaper_requests(redis_server) -> None:
    with ServerProcess(env=redis_env(redis_server.url)) as first, \
            ServerProcess(env=redis_env(redis_server.url)) as second:
        image = jpeg_bytes(height=96, width=128, seed=401)
        computed = post(first, image)
        assert cache_of(computed) == ("miss", FULL)
        shared = post(second, image)
        assert cache_of(shared) == ("hit", FULL)
        assert shared.content == computed.content
        assert shared.headers["X-Segserve-Batch-Size"] == "0"
        assert metric(second, "segserve_cache_requests_total", backend="redis", result="hit") >= 1

        # Quality-aware: computed at the full level, it answers a request planned for the cheapest one ...
        image = jpeg_bytes(height=96, width=128, seed=402)
        assert cache_of(post(first, image, level=FULL)) == ("miss", FULL)
        assert cache_of(post(second, image, quality="fast")) == ("hit", FULL)
        # ... never the reverse: a cheap result does not answer a request for the best quality.
        image = jpeg_bytes(height=96, width=128, seed=403)
        assert cache_of(post(first, image, quality="fast")) == ("miss", CHEAPEST)
        assert cache_of(post(second, image, quality="best")) == ("miss", FULL)
        # The better result replaced the cheap one, for both replicas.
        assert cache_of(post(first, image, quality="fast")) == ("hit", FULL)


@dataclass
class Answer:
    sent: float
    done: float
    status: int
    cache: str


@pytest.mark.redis
def test_a_redis_outage_fails_no_request_and_the_cache_recovers(redis_server) -> None:
    images = [jpeg_bytes(height=80, width=112, seed=seed) for seed in (411, 412, 413)]
    answers: list[Answer] = []
    stop = threading.Event()

    def client(server: ServerProcess) -> None:
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            index = 0
            while not stop.is_set():
                sent = time.monotonic()
                response = http.post("/v1/segment", content=images[index % len(images)],
                                     headers={"Content-Type": "image/jpeg"})
                answers.append(Answer(sent, time.monotonic(), response.status_code,
                                      response.headers.get("X-Segserve-Cache", "")))
                index += 1

    def wait_for(condition, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return False

    with ServerProcess(env=redis_env(redis_server.url)) as server:
        worker = threading.Thread(target=client, args=(server,), daemon=True)
        worker.start()
        try:
            # Redis works: the images come back as hits on their second round.
            assert wait_for(lambda: any(a.cache == "hit" for a in answers), 120), answers
            redis_server.stop()
            stopped = time.monotonic()
            assert wait_for(lambda: sum(a.sent > stopped for a in answers) >= 2 * len(images), 120), answers
            restarted = time.monotonic()
            redis_server.start()
            # Back by itself (after its short backoff): a repeated image is a hit again.
            assert wait_for(lambda: any(a.cache == "hit" and a.sent > restarted for a in answers), 60), answers
        finally:
            stop.set()
            worker.join(timeout=120)
        assert answers and all(a.status == 200 for a in answers), [a for a in answers if a.status != 200]
        during = [a for a in answers if a.sent > stopped and a.done < restarted]
        assert len(during) >= 2 * len(images) and all(a.cache == "miss" for a in during), during
        assert metric(server, "segserve_cache_errors_total", backend="redis") >= 1


@pytest.mark.redis
def test_entries_expire_after_the_ttl(redis_server) -> None:
    with ServerProcess(env=redis_env(redis_server.url, SEGSERVE_CACHE_TTL_S="1")) as server:
        image = jpeg_bytes(height=64, width=96, seed=421)
        assert cache_of(post(server, image))[0] == "miss"
        client = redis.Redis.from_url(redis_server.url)
        try:
            (key,) = client.keys(PREFIX + "*")
            assert 0 < client.pttl(key) <= 1000  # stored with the 1 s TTL
        finally:
            client.close()
        assert cache_of(post(server, image))[0] == "hit"
        time.sleep(1.5)
        assert cache_of(post(server, image))[0] == "miss"


# ----- the in-memory default (the session's live server) -----

def test_the_in_memory_cache_is_the_default_and_hits(live_server) -> None:
    before = metric(live_server, "segserve_cache_requests_total", backend="memory", result="hit")
    image = jpeg_bytes(height=72, width=100, seed=431)
    computed = post(live_server, image)
    assert cache_of(computed)[0] == "miss"
    again = post(live_server, image)
    assert cache_of(again) == ("hit", computed.headers["X-Segserve-Level"])
    assert again.content == computed.content
    assert metric(live_server, "segserve_cache_requests_total", backend="memory", result="hit") == before + 1


def test_simultaneous_identical_requests_are_computed_once(live_server) -> None:
    """N identical requests at once cost one forward pass.

    Each answer is either a `hit` (it arrived after the result was cached: batch size 0, no queue or compute
    time) or a `miss` that shared the one computation in flight: every such receipt carries that batch's
    level, batch size (1), queue and compute times, identically.
    """
    clients = 6
    image = jpeg_bytes(height=88, width=120, seed=441)
    batches_before = metric(live_server, "segserve_batch_size_count")
    barrier = threading.Barrier(clients)

    def send(_: int) -> httpx.Response:
        barrier.wait(timeout=30)
        return post(live_server, image)

    with ThreadPoolExecutor(clients) as pool:
        responses = list(pool.map(send, range(clients)))
    assert metric(live_server, "segserve_batch_size_count") == batches_before + 1
    assert len({response.content for response in responses}) == 1
    misses = [r.headers for r in responses if r.headers["X-Segserve-Cache"] == "miss"]
    hits = [r.headers for r in responses if r.headers["X-Segserve-Cache"] == "hit"]
    assert len(misses) >= 2 and len(misses) + len(hits) == clients  # at least one request joined the flight
    shared = {(h["X-Segserve-Level"], h["X-Segserve-Batch-Size"], h["X-Segserve-Queue-Ms"], h["X-Segserve-Compute-Ms"])
              for h in misses}
    assert len(shared) == 1 and next(iter(shared))[1] == "1", shared
    assert all((h["X-Segserve-Batch-Size"], h["X-Segserve-Compute-Ms"]) == ("0", "0.000") for h in hits)
