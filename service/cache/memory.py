"""In-process LRU result cache, bounded in bytes (the default backend).

Used from one asyncio event loop: no method awaits between reading and updating the dict, so no lock is
needed. Each replica has its own copy; use Redis to share results between replicas.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

from service.cache.base import CachedResult, CacheKey, CountingCache
from service.metrics import Metrics

# Rough per-entry bookkeeping (dict slot, key string, dataclass, bytes object headers) on top of the
# body and header text, so many tiny entries cannot exceed the bound unnoticed.
ENTRY_OVERHEAD_BYTES = 256


def entry_size(key_digest: str, result: CachedResult) -> int:
    """Bytes an entry is charged against the bound: body, header fields and a fixed overhead."""
    header = len(result.content_type) + len(result.level) + len(json.dumps(result.meta))
    return len(result.body) + header + len(key_digest) + ENTRY_OVERHEAD_BYTES


class MemoryCache(CountingCache):
    """Least-recently-used eviction once the total charged bytes would pass `max_bytes`."""

    name = "memory"

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        super().__init__(metrics)
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes} (use DisabledCache for none)")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[CachedResult, int]] = OrderedDict()  # oldest use first
        self._total_bytes = 0

    @property
    def total_bytes(self) -> int:
        """Bytes currently charged against the bound."""
        return self._total_bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: CacheKey, max_rank: int) -> CachedResult | None:
        digest = key.digest()
        entry = self._entries.get(digest)
        if entry is None or not entry[0].answers(max_rank):
            self._count_lookup(hit=False)
            return None
        self._entries.move_to_end(digest)
        self._count_lookup(hit=True)
        return entry[0]

    async def put(self, key: CacheKey, result: CachedResult) -> None:
        digest = key.digest()
        stored = self._entries.get(digest)
        if stored is not None and stored[0].level_rank < result.level_rank:
            self._entries.move_to_end(digest)  # the better result is still in demand
            return
        size = entry_size(digest, result)
        if size > self.max_bytes:
            return  # would evict everything else and still not fit
        if stored is not None:
            self._remove(digest)
        # Copy meta so a caller mutating its dict later cannot change what we serve.
        self._entries[digest] = (dataclasses.replace(result, meta=dict(result.meta)), size)
        self._total_bytes += size
        while self._total_bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, digest: str) -> None:
        _, size = self._entries.pop(digest)
        self._total_bytes -= size

    async def close(self) -> None:
        self._entries.clear()
        self._total_bytes = 0
