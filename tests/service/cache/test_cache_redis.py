"""Integration tests for service/cache/redis_cache.py against a real, private redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from service.cache import CachedResult, CacheKey, RedisCache
from service.metrics import Metrics

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

PREFIX = "test:"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_key(image: bytes = b"image") -> CacheKey:
    return CacheKey.for_image(
        image, model="edaformer-t", checkpoint="sha:abc", output_format="png", output_size=(64, 64)
    )


def make_result(rank: int, body: bytes = b"") -> CachedResult:
    return CachedResult(
        body=body or f"mask@{rank}".encode(), content_type="image/png", level=f"level-{rank}", level_rank=rank,
        meta={"height": 64},
    )


def make_cache(url: str, metrics: Metrics | None = None, **options: object) -> RedisCache:
    settings: dict = {"ttl_s": 60, "key_prefix": PREFIX, "timeout_s": 0.1, "backoff_s": 0.3}
    settings.update(options)
    return RedisCache(url, metrics or Metrics(), **settings)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"backend": "redis", **labels}) or 0.0


async def test_two_replicas_share_results(redis_server):
    replica_a, replica_b = make_cache(redis_server.url), make_cache(redis_server.url)
    try:
        await replica_a.put(make_key(), make_result(1))
        assert await replica_b.get(make_key(), max_rank=1) == make_result(1)
        assert await replica_b.get(make_key(b"other image"), max_rank=1) is None
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_entries_expire_after_the_ttl(redis_server):
    cache = make_cache(redis_server.url, ttl_s=1)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await cache.put(make_key(), make_result(0))
        assert 0 < await raw.ttl(PREFIX + make_key().digest()) <= 1
        assert await cache.get(make_key(), max_rank=0) is not None
        await asyncio.sleep(1.2)
        assert await cache.get(make_key(), max_rank=0) is None
    finally:
        await raw.aclose()
        await cache.close()


async def test_quality_aware_lookup_and_counters(redis_server):
    metrics = Metrics()
    cache = make_cache(redis_server.url, metrics)
    try:
        await cache.put(make_key(), make_result(2))
        assert await cache.get(make_key(), max_rank=1) is None  # request wants better than stored
        assert (await cache.get(make_key(), max_rank=2)).level_rank == 2
        assert (await cache.get(make_key(), max_rank=4)).level_rank == 2  # better than planned: served
        assert sample(metrics, "segserve_cache_requests_total", result="hit") == 2
        assert sample(metrics, "segserve_cache_requests_total", result="miss") == 1
        assert cache.healthy
    finally:
        await cache.close()


async def test_put_never_downgrades_but_upgrades(redis_server):
    cache = make_cache(redis_server.url)
    try:
        await cache.put(make_key(), make_result(2))
        await cache.put(make_key(), make_result(0))
        await cache.put(make_key(), make_result(3))
        stored = await cache.get(make_key(), max_rank=9)
        assert (stored.level_rank, stored.body) == (0, b"mask@0")
    finally:
        await cache.close()


async def test_values_over_the_size_limit_are_skipped(redis_server):
    cache = make_cache(redis_server.url, max_value_bytes=1000)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await cache.put(make_key(b"big"), make_result(0, body=b"x" * 1000))  # + header > 1000
        await cache.put(make_key(b"small"), make_result(0, body=b"x" * 500))
        assert await cache.get(make_key(b"big"), max_rank=0) is None
        assert not await raw.exists(PREFIX + make_key(b"big").digest())
        assert await cache.get(make_key(b"small"), max_rank=0) is not None
    finally:
        await raw.aclose()
        await cache.close()


async def test_corrupt_value_is_a_miss(redis_server):
    metrics = Metrics()
    cache = make_cache(redis_server.url, metrics)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.hset(PREFIX + make_key().digest(), mapping={"rank": 0, "value": b"\x80not a value"})
        assert await cache.get(make_key(), max_rank=0) is None
        assert sample(metrics, "segserve_cache_errors_total", operation="decode") == 1
        assert sample(metrics, "segserve_cache_requests_total", result="miss") == 1
        assert cache.healthy  # one bad value is not an outage
    finally:
        await raw.aclose()
        await cache.close()


async def test_fails_open_while_redis_is_down_and_recovers_by_itself(redis_server):
    metrics = Metrics()
    cache = make_cache(redis_server.url, metrics, timeout_s=0.1, backoff_s=0.3)
    try:
        await cache.put(make_key(), make_result(0))
        assert await cache.get(make_key(), max_rank=0) is not None  # a pooled connection now exists

        redis_server.stop()
        started = time.monotonic()
        assert await cache.get(make_key(), max_rank=0) is None
        await cache.put(make_key(b"while down"), make_result(0))  # must not raise
        assert time.monotonic() - started < 0.5
        assert not cache.healthy
        errors = sample(metrics, "segserve_cache_errors_total", operation="get")
        assert errors == 1

        # Inside the backoff window Redis is not contacted at all: no new error, an instant miss.
        started = time.monotonic()
        for _ in range(50):
            assert await cache.get(make_key(), max_rank=0) is None
        assert time.monotonic() - started < 0.05
        assert sample(metrics, "segserve_cache_errors_total", operation="get") == errors

        redis_server.start()  # same port, empty (no persistence)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            await cache.put(make_key(b"after restart"), make_result(1))
            if await cache.get(make_key(b"after restart"), max_rank=1) is not None:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the cache did not recover after Redis came back")
        assert cache.healthy
    finally:
        await cache.close()


async def test_a_hung_redis_costs_at_most_the_timeout(redis_server):
    metrics = Metrics()
    cache = make_cache(redis_server.url, metrics, timeout_s=0.2)
    try:
        await cache.put(make_key(), make_result(0))
        redis_server.pause()
        started = time.monotonic()
        assert await cache.get(make_key(), max_rank=0) is None
        elapsed = time.monotonic() - started
        # One socket timeout: not forever, and not retried (a retry would take 0.4 s).
        assert 0.19 <= elapsed < 0.35, elapsed
        assert sample(metrics, "segserve_cache_errors_total", operation="get") == 1
        assert not cache.healthy
    finally:
        redis_server.resume()
        await cache.close()


async def test_unreachable_redis_from_the_start(redis_server):
    metrics = Metrics()
    url = redis_server.url
    redis_server.stop()
    cache = make_cache(url, metrics)
    try:
        started = time.monotonic()
        await cache.put(make_key(), make_result(0))
        assert await cache.get(make_key(), max_rank=0) is None
        assert time.monotonic() - started < 0.5
        assert sample(metrics, "segserve_cache_errors_total", operation="put") == 1
        assert sample(metrics, "segserve_cache_requests_total", result="miss") == 1
    finally:
        await cache.close()
