"""Result cache: in-memory LRU by default, Redis when configured, or nothing (see `build_cache`)."""

from __future__ import annotations

from service.cache.base import (
    CachedResult,
    CacheKey,
    CorruptValueError,
    DisabledCache,
    ResultCache,
    deserialize_result,
    serialize_result,
)
from service.cache.memory import MemoryCache
from service.cache.redis_cache import RedisCache
from service.cache.singleflight import SingleFlight
from service.metrics import Metrics
from service.settings import Settings

__all__ = [
    "CacheKey",
    "CachedResult",
    "CorruptValueError",
    "DisabledCache",
    "MemoryCache",
    "RedisCache",
    "ResultCache",
    "SingleFlight",
    "build_cache",
    "deserialize_result",
    "serialize_result",
]


def build_cache(settings: Settings, metrics: Metrics) -> ResultCache:
    """RedisCache when `settings.redis_url` is set, else an in-memory LRU of `cache_bytes`
    (0 = no caching at all)."""
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            metrics,
            ttl_s=settings.cache_ttl_s,
            key_prefix=settings.cache_key_prefix,
            max_value_bytes=settings.cache_max_value_bytes,
            timeout_s=settings.redis_timeout_s,
        )
    if settings.cache_bytes == 0:
        return DisabledCache()
    return MemoryCache(settings.cache_bytes, metrics)
