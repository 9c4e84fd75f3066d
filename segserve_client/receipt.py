"""The receipt of a request, as the client sees it: one typed `Receipt` from either transport.

It mirrors the server's receipt (`service/receipt.py`). Over HTTP the headers carry most of it
(`X-Segserve-*`); the fields they do not carry (`knob`, `knob_value`, `task`, `height`, `width`) are None there,
except that `budget_ms` is filled from the request. The JSON formats (`json`, `rle`) and gRPC carry all of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

HEADER_PREFIX = "x-segserve-"
# Receipt headers with a field of their own; any other X-Segserve-* header is a per-image statistic.
_KNOWN_HEADERS = {
    "model", "point", "level", "scale", "quality", "quality-source", "queue-ms", "compute-ms", "total-ms",
    "predicted-ms", "batch-size", "cache", "plan", "budget-met",
}


@dataclass(frozen=True)
class Receipt:
    """What ran for a request, what it cost, and whether its budget was met."""

    model: str  # the served model that computed the mask
    point: str  # model/level@scale[:precision]
    level: str  # the knob level's name
    scale: float  # input scale (1 = the dataset's reference scale)
    quality: float  # the point's quality value (mIoU points)
    quality_source: str  # "measured", "measured-agreement", "prior" or "prior-unknown"
    cache: str  # "hit" or "miss"
    queue_ms: float
    compute_ms: float
    total_ms: float
    predicted_ms: float
    batch_size: int  # 0 on a cache hit
    plan_reason: str  # "budget", "quality", "default", "explicit", "fallback", "cache" (maybe with a suffix)
    budget_ms: float | None = None
    budget_met: bool | None = None  # None when the request had no budget
    knob: str | None = None  # not in HTTP headers
    knob_value: str | None = None
    task: str | None = None
    height: int | None = None
    width: int | None = None
    stats: dict[str, list[float]] = field(default_factory=dict)  # e.g. {"kept_fraction": [...]} (DoViT)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], budget_ms: float | None = None) -> Receipt | None:
        """From an HTTP answer's headers; None when they hold no receipt (not a segserve answer)."""
        h = {k.lower(): v for k, v in headers.items()}
        if HEADER_PREFIX + "model" not in h:
            return None

        def text(name: str) -> str:
            return h.get(HEADER_PREFIX + name, "")

        def number(name: str) -> float:
            try:
                return float(h.get(HEADER_PREFIX + name, "nan"))
            except ValueError:
                return float("nan")

        met = text("budget-met")
        stats = {}
        for key, value in h.items():
            if key.startswith(HEADER_PREFIX) and key[len(HEADER_PREFIX):] not in _KNOWN_HEADERS:
                try:
                    stats[key[len(HEADER_PREFIX):].replace("-", "_")] = [float(v) for v in value.split(",") if v]
                except ValueError:
                    continue  # a header from a newer server that is not a statistic
        batch = text("batch-size")
        return cls(
            model=text("model"), point=text("point"), level=text("level"), scale=number("scale"),
            quality=number("quality"), quality_source=text("quality-source"), cache=text("cache"),
            queue_ms=number("queue-ms"), compute_ms=number("compute-ms"), total_ms=number("total-ms"),
            predicted_ms=number("predicted-ms"), batch_size=int(batch) if batch.isdigit() else 0,
            plan_reason=text("plan"), budget_ms=budget_ms,
            budget_met=None if not met else met == "true", stats=stats,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Receipt:
        """From the server's JSON receipt (`format=json`/`rle` bodies: the `receipt` object)."""
        return cls(
            model=str(data.get("model", "")), point=str(data.get("point", "")), level=str(data.get("level", "")),
            scale=float(data.get("scale", "nan")), quality=float(data.get("quality", "nan")),
            quality_source=str(data.get("quality_source", "")), cache=str(data.get("cache", "")),
            queue_ms=float(data.get("queue_ms", "nan")), compute_ms=float(data.get("compute_ms", "nan")),
            total_ms=float(data.get("total_ms", "nan")), predicted_ms=float(data.get("predicted_ms", "nan")),
            batch_size=int(data.get("batch_size", 0)), plan_reason=str(data.get("plan_reason", "")),
            budget_ms=None if data.get("budget_ms") is None else float(data["budget_ms"]),
            budget_met=data.get("budget_met"), knob=data.get("knob"), knob_value=data.get("knob_value"),
            task=data.get("task"), height=data.get("height"), width=data.get("width"),
            stats={k: [float(v) for v in vs] for k, vs in (data.get("stats") or {}).items()},
        )

    @classmethod
    def from_message(cls, message: Any) -> Receipt:
        """From the gRPC `segserve.v1.Receipt` message."""
        return cls(
            model=message.model, point=message.point, level=message.level, scale=message.scale,
            quality=message.quality, quality_source=message.quality_source, cache=message.cache,
            queue_ms=message.queue_ms, compute_ms=message.compute_ms, total_ms=message.total_ms,
            predicted_ms=message.predicted_ms, batch_size=message.batch_size, plan_reason=message.plan_reason,
            budget_ms=message.budget_ms if message.HasField("budget_ms") else None,
            budget_met=message.budget_met if message.HasField("budget_met") else None,
            knob=message.knob, knob_value=message.knob_value, task=message.task, height=message.height,
            width=message.width, stats={k: list(v.values) for k, v in message.stats.items()},
        )
