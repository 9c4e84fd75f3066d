"""What every result cache shares: the key, the value, its byte format, and the backend interface.

The cache is quality-aware. A result carries the rank of the ISR level that computed it (0 = full
compute, the best quality; larger = cheaper). A lookup states the worst rank the request would accept
(the rank of the level the planner would pick), so a result computed at a better level also answers a
request planned for a cheaper one, never the reverse; and a store never replaces a better result with
a worse one.
"""

from __future__ import annotations

import abc
import hashlib
import json
import struct
from dataclasses import dataclass, field

from service.metrics import Metrics

MetaValue = str | int | float | bool

# Bumped whenever the key's fields or the value's byte layout change, so old entries simply miss.
KEY_VERSION = "v1"
VALUE_VERSION = 1
_HEADER_LENGTH = struct.Struct(">I")  # 4-byte big-endian length of the JSON header


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the response bytes, apart from the compute level.

    `checkpoint` identifies the weights (e.g. the file's digest, or "random"); `options` holds any other
    output-affecting setting (dataset names and palette, for instance) so two such settings never share
    entries. `output_size` is the (H, W) of the returned mask.
    """

    image_sha256: str
    model: str
    checkpoint: str
    output_format: str
    output_size: tuple[int, int]
    options: str = ""

    @classmethod
    def for_image(
        cls,
        image: bytes | bytearray | memoryview,
        *,
        model: str,
        checkpoint: str,
        output_format: str,
        output_size: tuple[int, int],
        options: str = "",
    ) -> CacheKey:
        """The key of `image` (its bytes are hashed with SHA-256) under the given serving options."""
        return cls(
            image_sha256=hashlib.sha256(image).hexdigest(),
            model=model,
            checkpoint=checkpoint,
            output_format=output_format,
            output_size=(int(output_size[0]), int(output_size[1])),
            options=options,
        )

    def digest(self) -> str:
        """SHA-256 hex of all fields; a JSON list keeps fields apart (no separator can be forged)."""
        fields = [
            KEY_VERSION, self.image_sha256, self.model, self.checkpoint, self.output_format,
            list(self.output_size), self.options,
        ]
        return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """An encoded response and the level that produced it."""

    body: bytes
    content_type: str
    level: str
    level_rank: int  # 0 = full compute (best quality); larger = cheaper
    meta: dict[str, MetaValue] = field(default_factory=dict)

    def answers(self, max_rank: int) -> bool:
        """True when this result is at least as good as a request planned at `max_rank` needs."""
        return self.level_rank <= max_rank


class CorruptValueError(ValueError):
    """Stored bytes that are not a value written by `serialize_result` (the lookup counts as a miss)."""


def serialize_result(result: CachedResult) -> bytes:
    """Bytes layout: 4-byte big-endian header length, JSON header, raw body. No pickle: a value read
    back from a shared store must never be able to run code."""
    header = json.dumps(
        {
            "version": VALUE_VERSION,
            "content_type": result.content_type,
            "level": result.level,
            "level_rank": result.level_rank,
            "meta": result.meta,
        },
        separators=(",", ":"),
    ).encode()
    return _HEADER_LENGTH.pack(len(header)) + header + result.body


def deserialize_result(data: bytes) -> CachedResult:
    """Inverse of `serialize_result`; raises CorruptValueError on anything malformed."""
    if len(data) < _HEADER_LENGTH.size:
        raise CorruptValueError("value shorter than its length prefix")
    (header_length,) = _HEADER_LENGTH.unpack_from(data)
    header_end = _HEADER_LENGTH.size + header_length
    if header_end > len(data):
        raise CorruptValueError("header length runs past the value")
    try:
        header = json.loads(data[_HEADER_LENGTH.size : header_end])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptValueError(f"header is not JSON: {error}") from None
    if not isinstance(header, dict) or header.get("version") != VALUE_VERSION:
        raise CorruptValueError("unknown value version")
    content_type, level, rank, meta = (header.get(k) for k in ("content_type", "level", "level_rank", "meta"))
    valid = (
        isinstance(content_type, str)
        and isinstance(level, str)
        and isinstance(rank, int)
        and not isinstance(rank, bool)
        and isinstance(meta, dict)
        and all(isinstance(value, str | int | float | bool) for value in meta.values())
    )
    if not valid:
        raise CorruptValueError("header fields have the wrong types")
    return CachedResult(
        body=bytes(data[header_end:]), content_type=content_type, level=level, level_rank=rank, meta=meta
    )


class ResultCache(abc.ABC):
    """A result cache backend. Fail-open: `get` and `put` never raise for backend trouble."""

    name: str

    @abc.abstractmethod
    async def get(self, key: CacheKey, max_rank: int) -> CachedResult | None:
        """The stored result for `key` if its level_rank <= max_rank, else None."""

    @abc.abstractmethod
    async def put(self, key: CacheKey, result: CachedResult) -> None:
        """Store `result` unless a better (lower-rank) one is already stored for `key`."""

    async def close(self) -> None:  # noqa: B027 (most backends hold nothing to release)
        """Release connections; the cache is not used afterwards."""

    @property
    def healthy(self) -> bool:
        """False while the backend is known to be failing (the service still answers, uncached)."""
        return True


class DisabledCache(ResultCache):
    """The cache switched off (cache_bytes = 0): every lookup misses, nothing is stored or counted."""

    name = "disabled"

    async def get(self, key: CacheKey, max_rank: int) -> CachedResult | None:
        return None

    async def put(self, key: CacheKey, result: CachedResult) -> None:
        return None


class CountingCache(ResultCache, abc.ABC):
    """Base of the real backends: counts hits, misses and errors under the backend's name."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def _count_lookup(self, hit: bool) -> None:
        self._metrics.cache_requests.labels(self.name, "hit" if hit else "miss").inc()

    def _count_error(self, operation: str) -> None:
        self._metrics.cache_errors.labels(self.name, operation).inc()
