"""Redis result cache shared by all replicas. Fail-open: Redis trouble never fails a request.

Each entry is a hash `{rank, value}` under `prefix + key digest`, with a TTL set on every store. Two small
Lua scripts keep the quality rules atomic on the server: a lookup only transfers the value when its rank
is good enough, and a store never overwrites a better (lower-rank) result, even when two replicas race.

When Redis errs or times out, the operation is counted in `segserve_cache_errors_total`, `get` answers
None and `put` does nothing; for the next `backoff_s` seconds the cache does not contact Redis at all
(a dead Redis would otherwise add a connect attempt to every request), then it tries again by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.cache.base import (
    CachedResult,
    CacheKey,
    CorruptValueError,
    CountingCache,
    deserialize_result,
    serialize_result,
)
from service.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS[1] = entry; ARGV[1] = the worst rank the request accepts. Returns the value, or nil.
_GET_SCRIPT = """
local rank = redis.call('HGET', KEYS[1], 'rank')
if (not rank) or tonumber(rank) > tonumber(ARGV[1]) then
  return false
end
return redis.call('HGET', KEYS[1], 'value')
"""

# KEYS[1] = entry; ARGV = value, rank, ttl seconds. Returns 1 when stored, 0 when a better one is kept.
_PUT_SCRIPT = """
local stored = redis.call('HGET', KEYS[1], 'rank')
if stored and tonumber(stored) < tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'rank', ARGV[2], 'value', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# Errors that mean "Redis is unreachable or too slow", as opposed to a bad reply for one key.
_OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError)
# A command may take a few round trips (connect, client info, NOSCRIPT then the script); this many
# socket timeouts bound the whole operation, so a hung Redis cannot hold a request for long.
_ROUND_TRIPS_PER_OPERATION = 4


class RedisCache(CountingCache):
    """Quality-aware result cache in Redis, shared by every replica pointing at the same server."""

    name = "redis"

    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        ttl_s: int = 3600,
        key_prefix: str = "segserve:",
        max_value_bytes: int = 8 * 1024 * 1024,
        timeout_s: float = 0.05,
        backoff_s: float = 1.0,
    ) -> None:
        super().__init__(metrics)
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1 second, got {ttl_s}")
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self.max_value_bytes = max_value_bytes
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One immediate retry on a connection error only: it replaces a pooled connection that died
            # with a restarted server. No retry on timeouts, which would double the worst-case latency.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        self._get_script = self._client.register_script(_GET_SCRIPT)
        self._put_script = self._client.register_script(_PUT_SCRIPT)
        self._skip_until = 0.0  # monotonic time before which Redis is not contacted
        self._failing = False

    @property
    def healthy(self) -> bool:
        """False from a failed operation until the next one that succeeds."""
        return not self._failing

    def _key(self, key: CacheKey) -> str:
        return self.key_prefix + key.digest()

    async def get(self, key: CacheKey, max_rank: int) -> CachedResult | None:
        value = await self._call("get", lambda: self._get_script(keys=[self._key(key)], args=[max_rank]))
        result = None
        if value is not None:
            try:
                result = deserialize_result(value)
            except CorruptValueError as error:
                log.warning("cache value at %s is corrupt, ignored: %s", self._key(key), error)
                self._count_error("decode")
        self._count_lookup(hit=result is not None)
        return result

    async def put(self, key: CacheKey, result: CachedResult) -> None:
        value = serialize_result(result)
        if len(value) > self.max_value_bytes:
            return  # large masks would crowd out many small ones and slow every replica's lookup
        arguments = [value, result.level_rank, self.ttl_s]
        await self._call("put", lambda: self._put_script(keys=[self._key(key)], args=arguments))

    async def _call(self, operation: str, command: Callable[[], Awaitable[T]]) -> T | None:
        """Run one Redis command, failing open: None on any error, and nothing at all while backing off."""
        if time.monotonic() < self._skip_until:
            return None
        try:
            reply = await asyncio.wait_for(command(), self.timeout_s * _ROUND_TRIPS_PER_OPERATION)
        except _OUTAGE_ERRORS as error:
            self._on_outage(operation, error)
            return None
        except RedisError as error:  # e.g. a key holding another type: this key's problem, not an outage
            log.warning("redis cache %s failed: %s", operation, error)
            self._count_error(operation)
            return None
        if self._failing:
            log.info("redis cache reachable again")
            self._failing = False
        return reply

    def _on_outage(self, operation: str, error: BaseException) -> None:
        self._count_error(operation)
        self._skip_until = time.monotonic() + self.backoff_s
        if not self._failing:  # log the start of an outage, not every failed call in it
            log.warning("redis cache %s failed (%r); uncached for %.1f s", operation, error, self.backoff_s)
        self._failing = True

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError) as error:
            log.debug("closing the redis cache client failed: %s", error)

