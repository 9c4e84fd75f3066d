"""The receipt of a request: what ran, what it cost, and whether the budget was met; built once per request.

Transports render the same `Receipt`: HTTP as `X-Segserve-*` headers (and inside JSON bodies), gRPC as the
`Receipt` message, the Open Inference Protocol as response parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from service.planner import Plan, PlanReason
from service.points import Point

if TYPE_CHECKING:  # imported for types only: the pipeline imports this module
    from service.batching.scheduler import ItemResult
    from service.cache import CachedResult
    from service.images import ImageHeader
    from service.pipeline import SegmentRequest
    from service.runtime import Runtime


@dataclass
class Receipt:
    model: str  # the served model that computed the mask
    point: str  # model/level@scale[:precision]
    level: str  # the knob level's name
    knob: str  # the knob's keyword ("isr", "pooled_size", "exit_threshold"; "" for knob-less models)
    knob_value: str  # the level as the family writes it ("2211/222", "12", "0.96")
    scale: float
    quality: float  # the point's quality value (mIoU points)
    quality_source: str  # "measured", "measured-agreement", "prior" or "prior-unknown"
    task: str
    cache: str  # "hit" or "miss"
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_size: int  # 0 on a cache hit
    budget_ms: float | None
    budget_met: bool | None
    predicted_ms: float  # the admission forecast (queue + compute + overheads)
    plan_reason: str  # see `PlanReason`
    height: int
    width: int
    stats: dict[str, list[float]] = field(default_factory=dict)  # e.g. DoViT's kept-token fraction per tap

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def headers(self) -> dict[str, str]:
        headers = {
            "X-Segserve-Model": self.model,
            "X-Segserve-Point": self.point,
            "X-Segserve-Level": self.level,
            "X-Segserve-Scale": f"{self.scale:g}",
            "X-Segserve-Quality": f"{self.quality:.2f}",
            "X-Segserve-Quality-Source": self.quality_source,
            "X-Segserve-Queue-Ms": f"{self.queue_ms:.3f}",
            "X-Segserve-Compute-Ms": f"{self.compute_ms:.3f}",
            "X-Segserve-Total-Ms": f"{self.total_ms:.3f}",
            "X-Segserve-Predicted-Ms": f"{self.predicted_ms:.3f}",
            "X-Segserve-Batch-Size": str(self.batch_size),
            "X-Segserve-Cache": self.cache,
            "X-Segserve-Plan": self.plan_reason,
            "Server-Timing": (f"queue;dur={self.queue_ms:.3f}, compute;dur={self.compute_ms:.3f}, "
                              f"total;dur={self.total_ms:.3f}"),
        }
        if self.budget_met is not None:
            headers["X-Segserve-Budget-Met"] = "true" if self.budget_met else "false"
        for key, values in self.stats.items():
            headers[f"X-Segserve-{key.replace('_', '-').title()}"] = ",".join(f"{v:.3f}" for v in values)
        return headers


def build_receipt(
    rt: Runtime, request: SegmentRequest, point: Point, reason: PlanReason, admitted: Plan, cached: CachedResult,
    batch: ItemResult | None, total_s: float, header: ImageHeader, task: str,
) -> Receipt:
    level = point.level
    return Receipt(
        model=point.model, point=point.name, level=level.name, knob=level.knob or "", knob_value=level.code,
        scale=point.scale, quality=point.quality, quality_source=point.quality_source, task=task,
        cache="miss" if batch is not None else "hit",
        queue_ms=round(batch.queue_s * 1e3, 3) if batch else 0.0,
        compute_ms=round(batch.compute_s * 1e3, 3) if batch else 0.0,
        total_ms=round(total_s * 1e3, 3), batch_size=batch.batch_size if batch else 0,
        budget_ms=request.budget_ms,
        budget_met=None if request.budget_ms is None else total_s * 1e3 <= request.budget_ms,
        predicted_ms=round(admitted.predicted_s * 1e3, 3), plan_reason=reason.value,
        height=header.height, width=header.width, stats=batch.stats if batch else {},
    )
