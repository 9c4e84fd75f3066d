"""Memory bounded by what is in flight: a byte budget over every request being decoded, queued or computed.

Each request is charged, before its image is decoded, for what it will hold at its peak: the decoded pixels
(full size while a non-JPEG decodes, then reduced), the label map at the image's size and the encoded answer.
Past the budget a request is refused at once (429 with Retry-After) instead of risking an out-of-memory kill;
the budget is returned when the request ends, whatever the outcome. After a request that held a lot, freed
memory is handed back to the operating system (glibc keeps freed blocks of big arrays otherwise: measured in
docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Iterator

from models.postprocess import REFERENCE_CHUNK_BYTES
from service.errors import QueueFull
from service.images import ImageHeader, decoded_size

log = logging.getLogger(__name__)
# Trim the heap after a request that held at least this much: small requests reuse the same blocks anyway.
TRIM_AFTER_BYTES = 16 * 1024 * 1024
TRIM_DELAY_S = 0.5  # after the last large request of a burst, once its answer has been sent


def _load_malloc_trim():  # -> Callable[[int], int] | None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_malloc_trim = _load_malloc_trim()


def request_bytes(header: ImageHeader, needed: tuple[int, int] | None) -> int:
    """Peak bytes one request holds (measured: docs/benchmarks.md): the decode (Pillow keeps RGB as 4 bytes a
    pixel and converts with a copy, then the array: ~11 bytes a decoded pixel, at full size while a non-JPEG
    decodes), and at the image's size the label map, the postprocess's running maximum and mask when it falls
    back to the reference and the encoded answer (~10 bytes a pixel), plus one chunk of resized classes."""
    height, width = decoded_size(header, needed)
    decoded = header.pixels if header.format != "JPEG" else height * width
    return 11 * decoded + 10 * header.pixels + REFERENCE_CHUNK_BYTES


class MemoryBudget:
    """Bytes charged by the requests in flight, bounded by `limit` (0 = unbounded)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, amount: int, retry_after_s: float) -> Iterator[None]:
        with self._lock:
            # A request larger than the whole budget still runs when nothing else is in flight (max_pixels bounds
            # it), so that it is refused for load, never for ever.
            if self.limit and self.in_use + amount > self.limit and self.in_use > 0:
                raise QueueFull(
                    f"the server holds {self.in_use / 2**20:.0f} MiB of images in flight; this one needs "
                    f"{amount / 2**20:.0f} MiB more than its budget of {self.limit / 2**20:.0f} MiB allows; "
                    "retry shortly", retry_after_s=retry_after_s, code="memory_budget")
            self.in_use += amount
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= amount
                idle = self.in_use == 0
            if amount >= TRIM_AFTER_BYTES:
                trim()
                if idle:
                    # Once a burst is over, again a moment later: the answers' bytes (the encoded mask, the
                    # response) are freed only after this request's hold ends, and would otherwise stay mapped.
                    self._trim_later()

    def _trim_later(self, delay_s: float = TRIM_DELAY_S) -> None:
        timer = threading.Timer(delay_s, trim)
        timer.daemon = True
        timer.start()


def trim() -> None:
    """Return freed heap memory to the operating system (glibc only; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
