"""One segment call, transport-neutral, checked on the client before anything is sent."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from segserve_client.images import ImageInput, encode_image

FORMATS = ("png", "color", "rle", "json", "overlay")


@dataclass(frozen=True)
class SegmentCall:
    image: bytes
    content_type: str
    budget_ms: float | None = None
    quality: str | float | None = None
    model: str | None = None
    task: str | None = None
    point: str | None = None
    level: str | None = None
    timeout_ms: float | None = None
    format: str = "png"
    strict: bool = False

    def with_timeout(self, timeout_ms: float | None) -> SegmentCall:
        return replace(self, timeout_ms=timeout_ms)


def _ms(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive number of milliseconds, got {value!r}")
    return number


def make_call(image: ImageInput, *, budget_ms: float | None, quality: str | float | None, model: str | None,
              task: str | None, point: str | None, level: str | None, timeout_ms: float | None, format: str,
              strict: bool) -> SegmentCall:
    """Encode the image and check the parameters the client can check itself (the server checks the rest)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if isinstance(quality, float | int) and not isinstance(quality, bool) and not 0 <= quality <= 1:
        raise ValueError(f"quality must be 'fast', 'balanced', 'best' or a number in [0, 1], got {quality!r}")
    data, content_type = encode_image(image)
    return SegmentCall(image=data, content_type=content_type, budget_ms=_ms("budget_ms", budget_ms),
                       quality=quality, model=model or None, task=task or None, point=point or None,
                       level=level or None, timeout_ms=_ms("timeout_ms", timeout_ms), format=format,
                       strict=bool(strict))
