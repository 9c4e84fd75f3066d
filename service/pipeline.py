"""One request's path, transport-free: validate -> cache -> plan -> submit -> encode -> receipt.

HTTP routes and gRPC methods parse their input into a `SegmentRequest` and call `Pipeline.segment`;
nothing else happens in the transports. CPU work (decoding, preprocessing, encoding) runs in threads,
off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass

from models.isr import IsrLevel
from models.predict import preprocess
from service import encoding
from service.batching.scheduler import ItemResult, WorkItem
from service.cache import CachedResult, CacheKey
from service.errors import InvalidParameter, NotFound, Unavailable
from service.images import ImageHeader, decode_rgb, read_header
from service.planner import QUALITY_NAMES, Plan, Shape, choose, quality_floor_rank
from service.runtime import Runtime

log = logging.getLogger(__name__)

JSON_FORMATS = {"json", "rle"}


@dataclass
class SegmentRequest:
    image: bytes
    model: str | None = None
    budget_ms: float | None = None
    quality: str | float | None = None
    level: str | None = None
    format: str = "png"
    strict: bool = False
    timeout_ms: float | None = None  # hard deadline: past it, a queued request is answered 504
    route: str = "/v1/segment"


@dataclass
class Receipt:
    """What was spent on a request; sent as headers (HTTP), fields (JSON bodies) and gRPC fields."""

    model: str
    level: str
    isr: str
    cache: str  # "hit" or "miss"
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_size: int
    budget_ms: float | None
    budget_met: bool | None
    predicted_ms: float
    plan_reason: str
    height: int
    width: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SegmentResult:
    body: bytes
    content_type: str
    receipt: Receipt


def parse_quality(value: str | float | None) -> str | float | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value in QUALITY_NAMES:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"quality {value!r} is not fast, balanced, best or a number in [0, 1]",
                               code="invalid_quality") from None
    if not 0.0 <= number <= 1.0 or math.isnan(number):
        raise InvalidParameter(f"quality {value!r} must be within [0, 1]", code="invalid_quality")
    return number


class Pipeline:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def _validate(self, request: SegmentRequest) -> tuple[IsrLevel | None, str | float | None]:
        settings = self.rt.settings
        request.format = (request.format or "png").lower()
        if request.model not in (None, self.rt.model_name):
            raise NotFound(f"unknown model {request.model!r}; this server serves {self.rt.model_name!r}",
                           code="unknown_model")
        if request.format not in {f.value for f in encoding.Format}:
            raise InvalidParameter(f"unknown format {request.format!r}; use png, color, rle or json",
                                   code="unknown_format")
        for name, value in (("latency_budget_ms", request.budget_ms), ("timeout_ms", request.timeout_ms)):
            if value is not None and (math.isnan(value) or value <= 0 or value > settings.max_budget_ms):
                raise InvalidParameter(
                    f"{name} must be a number of milliseconds in (0, {settings.max_budget_ms:g}], got {value}",
                    code="invalid_budget")
        level = None
        if request.level:
            try:
                level = self.rt.level(request.level)
            except KeyError as exc:
                raise InvalidParameter(str(exc.args[0]), code="unknown_level") from None
        return level, parse_quality(request.quality)

    async def segment(self, request: SegmentRequest) -> SegmentResult:
        rt = self.rt
        arrived = time.monotonic()
        if not rt.ready:
            raise Unavailable("the server is not ready (starting, draining, or no live worker)",
                              retry_after_s=1.0, code="not_ready")
        explicit, quality = self._validate(request)
        header = await asyncio.to_thread(read_header, request.image, max_pixels=rt.settings.max_pixels,
                                         min_side=rt.settings.min_side)
        shape = rt.predictor_input_size(header.height, header.width)
        budget_s = request.budget_ms / 1e3 if request.budget_ms is not None else None
        plan = choose(rt.profile, shape, budget_s=budget_s, quality=quality, explicit=explicit,
                      backlog_s=rt.scheduler.backlog_s(), overhead_s=rt.overhead_s,
                      safety_margin=rt.settings.safety_margin)
        if not plan.level.isr.fits(*shape):
            plan = self._fitting_plan(plan, shape, explicit, budget_s, header)
        key = CacheKey.for_image(request.image, model=rt.model_name, checkpoint=rt.weights_id,
                                 output_format=request.format, output_size=(header.height, header.width),
                                 options=rt.cache_options)
        cached = await rt.cache.get(key, plan.level.rank)
        if cached is None:
            if request.strict and not plan.feasible:
                rt.metrics.rejected.labels(rt.model_name, "infeasible").inc()
                retry = max(1.0, rt.scheduler.backlog_s())
                raise Unavailable(
                    f"no level can finish within {request.budget_ms:g} ms under the current load (predicted "
                    f"{plan.predicted_s * 1e3:.0f} ms at the cheapest level {plan.level.name})",
                    retry_after_s=retry, code="budget_infeasible")
            flight_key = f"{key.digest()}:{plan.level.name}"
            cached, batch = await rt.singleflight.do(
                flight_key, lambda: self._compute(request, header, plan, arrived, key, quality))
            cache_state = "miss"
        else:
            batch = None
            cache_state = "hit"
        total_s = time.monotonic() - arrived
        receipt = self._receipt(request, plan, cached, batch, cache_state, total_s, header)
        self._record(request, plan, receipt, total_s)
        body = cached.body
        if request.format in JSON_FORMATS:
            body = encoding.replace_json_receipt(body, receipt.as_dict())
        return SegmentResult(body, cached.content_type, receipt)

    def _fitting_plan(
        self, plan: Plan, shape: Shape, explicit: IsrLevel | None, budget_s: float | None, header: ImageHeader
    ) -> Plan:
        """The planned level pools more than a thin input allows: run the closest level that fits instead.

        Cheaper levels pool more, so the levels that fit are the better ones; the cheapest of them replaces
        the plan. An explicit level is not second-guessed, and an input no level fits is refused.
        """
        rt = self.rt
        fitting = [level for level in rt.levels if level.isr.fits(*shape)]
        if explicit is not None or not fitting:
            raise InvalidParameter(f"image of {header.width}x{header.height} is too small for level {plan.level.name}",
                                   code="image_too_small")
        better = [level for level in fitting if level.rank < plan.level.rank]
        level = better[-1] if better else fitting[0]
        refit = choose(rt.profile, shape, budget_s=budget_s, quality=None, explicit=level,
                       backlog_s=rt.scheduler.backlog_s(), overhead_s=rt.overhead_s,
                       safety_margin=rt.settings.safety_margin)
        return dataclasses.replace(refit, reason=plan.reason if refit.feasible else "fallback")

    async def _compute(
        self, request: SegmentRequest, header: ImageHeader, plan: Plan, arrived: float, key: CacheKey,
        quality: str | float | None,
    ) -> tuple[CachedResult, ItemResult]:
        rt = self.rt
        started = time.perf_counter()
        image = await asyncio.to_thread(decode_rgb, request.image, header)
        decoded_only = time.perf_counter()
        images = await asyncio.to_thread(preprocess, image, plan.shape)
        decoded = time.perf_counter()
        rt.metrics.stage.labels("decode").observe(decoded_only - started)
        rt.metrics.stage.labels("preprocess").observe(decoded - decoded_only)
        loop = asyncio.get_running_loop()
        hard_s = min(request.timeout_ms / 1e3 if request.timeout_ms else math.inf, rt.settings.request_timeout_s)
        budget_deadline = arrived + request.budget_ms / 1e3 if request.budget_ms else None
        if request.strict and budget_deadline is not None:
            hard_s = min(hard_s, request.budget_ms / 1e3)
        # The scheduler may re-plan the level at dispatch, but never above the quality cap.
        best_rank = min(quality_floor_rank(quality, len(rt.levels)), len(rt.levels) - 1)
        item = WorkItem(images=images, original_size=(header.height, header.width), level=plan.level,
                        budget_deadline=budget_deadline, hard_deadline=arrived + hard_s, future=loop.create_future(),
                        best_rank=rt.levels[best_rank].rank, pinned=plan.reason == "explicit")
        rt.scheduler.submit(item)
        result = await item.future
        encode_start = time.perf_counter()
        body, content_type = await asyncio.to_thread(
            encoding.encode, request.format, result.labels, num_classes=rt.num_classes,
            class_names=rt.class_names, palette=rt.palette, receipt={})
        encoded = time.perf_counter()
        rt.metrics.stage.labels("encode").observe(encoded - encode_start)
        rt.observe_overhead((decoded - started) + (encoded - encode_start))
        cached = CachedResult(body=body, content_type=content_type, level=result.level.name,
                              level_rank=result.level.rank)
        await rt.cache.put(key, cached)
        return cached, result

    def _receipt(
        self, request: SegmentRequest, plan: Plan, cached: CachedResult, batch: ItemResult | None,
        cache_state: str, total_s: float, header: ImageHeader,
    ) -> Receipt:
        level = self.rt.level(cached.level)
        budget_met = None if request.budget_ms is None else total_s * 1e3 <= request.budget_ms
        return Receipt(
            model=self.rt.model_name, level=level.name, isr=level.isr.code, cache=cache_state,
            queue_ms=round(batch.queue_s * 1e3, 3) if batch else 0.0,
            compute_ms=round(batch.compute_s * 1e3, 3) if batch else 0.0,
            total_ms=round(total_s * 1e3, 3), batch_size=batch.batch_size if batch else 0,
            budget_ms=request.budget_ms, budget_met=budget_met, predicted_ms=round(plan.predicted_s * 1e3, 3),
            plan_reason=plan.reason if batch is None or batch.level == plan.level else f"{plan.reason}+dispatch",
            height=header.height, width=header.width,
        )

    def _record(self, request: SegmentRequest, plan: Plan, receipt: Receipt, total_s: float) -> None:
        m, model = self.rt.metrics, self.rt.model_name
        m.request_duration.labels(model, receipt.level).observe(total_s)
        m.level_chosen.labels(model, plan.level.name, plan.reason).inc()
        if receipt.cache == "miss":
            m.queue_wait.labels(model, receipt.level).observe(receipt.queue_ms / 1e3)
            m.compute.labels(model, receipt.level).observe(receipt.compute_ms / 1e3)
        if receipt.budget_met is not None:
            m.budget_outcomes.labels(model, "met" if receipt.budget_met else "missed").inc()

