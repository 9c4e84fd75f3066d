"""Unit tests for service/cache: key, value format, the in-memory LRU, and build_cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from service.cache import (
    CachedResult,
    CacheKey,
    CorruptValueError,
    DisabledCache,
    MemoryCache,
    RedisCache,
    build_cache,
    deserialize_result,
    serialize_result,
)
from service.cache.memory import entry_size
from service.metrics import Metrics
from service.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the caches are asyncio code (redis.asyncio); never run them under trio


def make_key(image: bytes = b"image-bytes", **overrides: object) -> CacheKey:
    options: dict = {"model": "edaformer-t", "checkpoint": "sha:abc", "output_format": "png",
                     "output_size": (512, 683)}
    options.update(overrides)
    return CacheKey.for_image(image, **options)


def make_result(rank: int, body: bytes = b"", level: str | None = None) -> CachedResult:
    return CachedResult(
        body=body or f"mask@{rank}".encode(), content_type="image/png", level=level or f"level-{rank}",
        level_rank=rank, meta={"height": 512, "exact": True},
    )


def lookups(metrics: Metrics, backend: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "segserve_cache_requests_total", {"backend": backend, "result": result}
    )
    return value or 0.0


# --- key and value format --------------------------------------------------------------------------


def test_key_hashes_the_image_and_every_option():
    key = make_key()
    assert key.image_sha256 == hashlib.sha256(b"image-bytes").hexdigest()
    assert key.digest() == make_key().digest()
    assert len(key.digest()) == 64
    variants = [
        make_key(b"other-image"), make_key(model="edaformer-b"), make_key(checkpoint="sha:def"),
        make_key(output_format="rle"), make_key(output_size=(683, 512)), make_key(options="cityscapes"),
    ]
    digests = {key.digest()} | {variant.digest() for variant in variants}
    assert len(digests) == 1 + len(variants)


def test_value_round_trip_without_pickle():
    result = CachedResult(b"\x00\x89PNG body", "image/png", "isr-1", 1, {"a": "x", "b": 2, "c": 1.5, "d": False})
    data = serialize_result(result)
    header_length = int.from_bytes(data[:4], "big")
    assert json.loads(data[4 : 4 + header_length])["level"] == "isr-1"  # a JSON header, readable anywhere
    assert data.endswith(result.body)
    assert deserialize_result(data) == result


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        b"\x00\x00\x00\xffshort",
        b"\x00\x00\x00\x03abcbody",
        (7).to_bytes(4, "big") + b'{"v":1}',
        (2).to_bytes(4, "big") + b"[]",
    ],
)
def test_corrupt_values_are_rejected(data):
    with pytest.raises(CorruptValueError):
        deserialize_result(data)


def raw_value(header: dict, body: bytes = b"body") -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(4, "big") + encoded + body


VALID_HEADER = {"version": 1, "content_type": "image/png", "level": "full", "level_rank": 0, "meta": {}}


def test_a_hand_built_value_is_accepted():
    assert deserialize_result(raw_value(VALID_HEADER)) == CachedResult(b"body", "image/png", "full", 0, {})


@pytest.mark.parametrize(
    "field, value",
    [("version", 99), ("level_rank", "0"), ("level_rank", True), ("meta", {"x": [1]}), ("content_type", None)],
)
def test_values_with_wrong_header_fields_are_rejected(field, value):
    with pytest.raises(CorruptValueError):
        deserialize_result(raw_value({**VALID_HEADER, field: value}))


# --- MemoryCache -----------------------------------------------------------------------------------


async def test_hit_after_put_and_counters():
    metrics = Metrics()
    cache = MemoryCache(1 << 20, metrics)
    assert await cache.get(make_key(), max_rank=0) is None
    await cache.put(make_key(), make_result(0))
    assert await cache.get(make_key(), max_rank=0) == make_result(0)
    assert lookups(metrics, "memory", "hit") == 1
    assert lookups(metrics, "memory", "miss") == 1


async def test_better_result_answers_cheaper_request_never_the_reverse():
    metrics = Metrics()
    cache = MemoryCache(1 << 20, metrics)
    await cache.put(make_key(), make_result(1))
    assert await cache.get(make_key(), max_rank=0) is None  # wants full quality; only rank 1 stored
    assert (await cache.get(make_key(), max_rank=1)).level_rank == 1
    assert (await cache.get(make_key(), max_rank=3)).level_rank == 1  # planned cheaper; better is fine
    assert (lookups(metrics, "memory", "hit"), lookups(metrics, "memory", "miss")) == (2, 1)


async def test_put_never_downgrades_but_upgrades():
    cache = MemoryCache(1 << 20, Metrics())
    await cache.put(make_key(), make_result(2))
    await cache.put(make_key(), make_result(0))  # better: replaces
    await cache.put(make_key(), make_result(3))  # worse: ignored
    stored = await cache.get(make_key(), max_rank=5)
    assert (stored.level_rank, stored.body) == (0, b"mask@0")
    assert len(cache) == 1
    assert cache.total_bytes == entry_size(make_key().digest(), make_result(0))


async def test_same_rank_put_refreshes_the_value():
    cache = MemoryCache(1 << 20, Metrics())
    await cache.put(make_key(), make_result(1, body=b"old"))
    await cache.put(make_key(), make_result(1, body=b"new"))
    assert (await cache.get(make_key(), max_rank=1)).body == b"new"


async def test_lru_eviction_by_bytes():
    one_entry = entry_size(make_key(b"a").digest(), make_result(0, body=b"x" * 1000))
    cache = MemoryCache(3 * one_entry, Metrics())
    for name in (b"a", b"b", b"c"):
        await cache.put(make_key(name), make_result(0, body=b"x" * 1000))
    assert await cache.get(make_key(b"a"), max_rank=0) is not None  # "a" is now the most recent
    await cache.put(make_key(b"d"), make_result(0, body=b"x" * 1000))
    assert await cache.get(make_key(b"b"), max_rank=0) is None  # least recently used went first
    for name in (b"a", b"c", b"d"):
        assert await cache.get(make_key(name), max_rank=0) is not None
    assert cache.total_bytes == 3 * one_entry

    await cache.put(make_key(b"big"), make_result(0, body=b"x" * 2500))  # needs two slots
    assert len(cache) == 1
    assert cache.total_bytes <= cache.max_bytes


async def test_item_larger_than_the_bound_is_not_stored_and_evicts_nothing():
    cache = MemoryCache(4096, Metrics())
    await cache.put(make_key(b"small"), make_result(0, body=b"s" * 100))
    await cache.put(make_key(b"huge"), make_result(0, body=b"h" * 5000))
    assert await cache.get(make_key(b"huge"), max_rank=0) is None
    assert await cache.get(make_key(b"small"), max_rank=0) is not None


async def test_stored_meta_is_a_copy():
    cache = MemoryCache(1 << 20, Metrics())
    result = make_result(0)
    await cache.put(make_key(), result)
    result.meta["height"] = -1
    assert (await cache.get(make_key(), max_rank=0)).meta["height"] == 512


def test_memory_cache_needs_a_positive_bound():
    with pytest.raises(ValueError):
        MemoryCache(0, Metrics())


# --- build_cache -----------------------------------------------------------------------------------


async def test_build_cache_picks_the_backend_from_settings():
    metrics = Metrics()
    memory = build_cache(Settings(cache_bytes=1 << 20), metrics)
    assert isinstance(memory, MemoryCache)
    assert (memory.name, memory.max_bytes, memory.healthy) == ("memory", 1 << 20, True)

    redis_cache = build_cache(
        Settings(redis_url="redis://127.0.0.1:1/0", cache_ttl_s=60, cache_key_prefix="t:",
                 cache_max_value_bytes=1234, redis_timeout_s=0.2),
        metrics,
    )
    assert isinstance(redis_cache, RedisCache)
    assert (redis_cache.ttl_s, redis_cache.key_prefix, redis_cache.max_value_bytes, redis_cache.timeout_s) == (
        60, "t:", 1234, 0.2,
    )
    await redis_cache.close()  # built lazily: no connection was made


async def test_disabled_cache_always_misses_and_counts_nothing():
    metrics = Metrics()
    cache = build_cache(Settings(cache_bytes=0), metrics)
    assert isinstance(cache, DisabledCache)
    await cache.put(make_key(), make_result(0))
    assert await cache.get(make_key(), max_rank=10) is None
    assert lookups(metrics, "disabled", "miss") == 0
    await cache.close()


def test_cached_result_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_result(0).level_rank = 5  # type: ignore[misc]
