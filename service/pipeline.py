"""One request's path, transport-free: validate -> plan -> cache -> decode -> queue -> encode -> receipt.

HTTP routes, gRPC methods and the Open Inference Protocol parse their input into a `SegmentRequest` and call
`Pipeline.segment`; nothing else happens in the transports. CPU work (decoding, encoding) runs in threads,
off the event loop; preprocessing happens in the worker at dispatch, once the point is decided.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass

from service import encoding
from service.batching.scheduler import ItemResult, WorkItem
from service.cache import CachedResult, CacheKey
from service.errors import DeadlineExpired, InvalidParameter, NotFound, Unavailable
from service.images import ImageHeader, decode_rgb, read_header
from service.memory import request_bytes
from service.planner import QUALITY_NAMES, Demand, Load, NoPointFits, Plan, PlanReason, quality_value
from service.points import Point
from service.receipt import Receipt, build_receipt
from service.runtime import Runtime

log = logging.getLogger(__name__)
JSON_FORMATS = {"json", "rle"}  # bodies that carry the receipt inside


@dataclass
class SegmentRequest:
    image: bytes
    model: str | None = None  # restrict to one served model; None = any model of the task's pool
    task: str | None = None  # the label space (pool); None = the default model's
    budget_ms: float | None = None
    quality: str | float | None = None
    level: str | None = None  # an explicit knob level of `model` (default: the default model), at scale 1
    point: str | None = None  # an explicit operating point, `model/level@scale`
    format: str = "png"
    strict: bool = False
    timeout_ms: float | None = None  # hard deadline: never answered 200 past it (504 instead)
    route: str = "/v1/segment"


@dataclass
class SegmentResult:
    body: bytes
    content_type: str
    receipt: Receipt


@dataclass(frozen=True)
class Target:
    """What a request may run on: a pool, optionally one model of it, optionally one explicit point."""

    task: str
    model: str | None
    explicit: Point | None


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

    # ----- validation -----
    def target(self, request: SegmentRequest) -> Target:
        """Resolve task, model restriction and explicit point; 404/422 for names the server does not know."""
        rt = self.rt
        model = request.model or None
        if request.point:
            model_name = request.point.partition("/")[0]
            if model is not None and model_name != model:
                raise InvalidParameter(f"point {request.point!r} is not a point of model {model!r}",
                                       code="unknown_point")
            model = model_name
        if model is not None and model not in rt.models:
            raise NotFound(f"unknown model {model!r}; this server serves {', '.join(rt.models)}", code="unknown_model")
        task = request.task or (rt.models[model].task if model else rt.default_task)
        if task not in rt.pools:
            raise NotFound(f"unknown task {task!r}; this server's tasks: {', '.join(rt.pools)}", code="unknown_task")
        if model is not None and rt.models[model].task != task:
            raise InvalidParameter(f"model {model!r} serves task {rt.models[model].task!r}, not {task!r}",
                                   code="unknown_task")
        explicit = None
        if request.point:
            explicit = rt.pools[task].point(request.point) or rt.pools[task].point(f"{request.point}@1")
            if explicit is None:
                raise InvalidParameter(f"unknown point {request.point!r}; GET /v1/models lists each model's points",
                                       code="unknown_point")
        elif request.level:
            model = model or rt.default_model
            served = rt.models[model]
            try:
                level = served.spec.level(request.level, served.levels)
            except KeyError as exc:
                raise InvalidParameter(str(exc.args[0]), code="unknown_level") from None
            scale = max(served.entry.scales)
            explicit = rt.pools[task].point(f"{model}/{level.name}@{scale:g}")
        return Target(task, model, explicit)

    def _validate(self, request: SegmentRequest) -> tuple[Target, float | None]:
        settings = self.rt.settings
        request.format = (request.format or "png").lower()
        if request.format not in {f.value for f in encoding.Format}:
            raise InvalidParameter(f"unknown format {request.format!r}; use png, color, overlay, rle or json",
                                   code="unknown_format")
        for name, value in (("latency_budget_ms", request.budget_ms), ("timeout_ms", request.timeout_ms)):
            if value is not None and (math.isnan(value) or value <= 0 or value > settings.max_budget_ms):
                raise InvalidParameter(
                    f"{name} must be a number of milliseconds in (0, {settings.max_budget_ms:g}], got {value}",
                    code="invalid_budget")
        return self.target(request), quality_value(parse_quality(request.quality))

    def _check_ready(self) -> None:
        rt = self.rt
        if rt.draining:
            raise Unavailable("the server is shutting down; retry on another replica", retry_after_s=1.0,
                              code="shutting_down")
        if not rt.ready:
            raise Unavailable("the server is not ready (starting, or no live worker)", retry_after_s=1.0,
                              code="not_ready")

    # ----- the request -----
    async def segment(self, request: SegmentRequest) -> SegmentResult:
        """The answer, never later than the request's `timeout_ms` (or the server's `request_timeout_s`).

        Work still queued at the deadline is dropped uncomputed; a batch already running finishes for the
        requests that still wait on it, but this request is answered 504 at its deadline, not late.
        """
        limit_s = min(self.rt.settings.request_timeout_s,
                      request.timeout_ms / 1e3 if request.timeout_ms is not None else math.inf)
        try:
            async with asyncio.timeout(limit_s):
                return await self._segment(request, time.monotonic(), limit_s)
        except TimeoutError:
            self.rt.metrics.rejected.labels("", "deadline_expired").inc()
            raise DeadlineExpired(f"the request did not finish within its {limit_s * 1e3:.0f} ms timeout",
                                  code="deadline_expired") from None

    async def _segment(self, request: SegmentRequest, arrived: float, limit_s: float) -> SegmentResult:
        rt = self.rt
        self._check_ready()
        target, quality = self._validate(request)
        started = time.perf_counter()
        header = await asyncio.to_thread(read_header, request.image, max_pixels=rt.settings.max_pixels,
                                         min_side=rt.settings.min_side)
        size = (header.height, header.width)
        budget_s = request.budget_ms / 1e3 if request.budget_ms is not None else None
        demand = Demand(rt.ladder(target.task, target.model), size, 1, budget_s, quality, target.explicit)
        load = Load(rt.scheduler.backlog_s(), rt.overhead_pre.value + rt.overhead_post.value,
                    rt.settings.safety_margin)
        try:
            plan = rt.planner.plan(demand, load)
        except NoPointFits as exc:
            raise InvalidParameter(f"image of {header.width}x{header.height} is too small: {exc}",
                                   code="image_too_small") from None
        key = self._cache_key(request, target, size)
        ranks = rt.pools[target.task].quality_rank
        cached = await rt.cache.get(key, ranks[plan.point.name])
        if cached is not None and target.model is not None and not cached.level.startswith(f"{target.model}/"):
            cached = None  # computed by another model of the pool: not what this request restricted itself to
        if cached is None:
            if request.strict and not plan.feasible:
                rt.metrics.rejected.labels(plan.point.model, "infeasible").inc()
                raise Unavailable(
                    f"no operating point can finish within {request.budget_ms:g} ms under the current load "
                    f"(predicted {plan.predicted_s * 1e3:.0f} ms at {plan.point.name})",
                    retry_after_s=max(1.0, rt.scheduler.backlog_s()), code="budget_infeasible")
            flight_key = f"{key.digest()}:{plan.point.name}"
            cached, batch = await rt.singleflight.do(
                flight_key, lambda: self._compute(request, target, header, plan, arrived, key, quality, started))
            point = batch.plan.point if batch else plan.point
            reason = batch.plan.reason if batch else plan.reason
        else:
            batch = None
            point = rt.pools[target.task].point(cached.level) or plan.point
            reason = PlanReason.CACHE
        total_s = time.monotonic() - arrived
        if total_s > limit_s:
            # The answer and the timeout became due in the same turn of a busy event loop and the answer woke
            # first: it is late all the same (the result stays cached for the next request).
            raise TimeoutError
        receipt = build_receipt(rt, request, point, reason, plan, cached, batch, total_s, header, target.task)
        self._record(point, reason, receipt, total_s, target.task)
        body = cached.body
        if request.format in JSON_FORMATS:
            body = encoding.replace_json_receipt(body, receipt.as_dict())
        return SegmentResult(body, cached.content_type, receipt)

    def _cache_key(self, request: SegmentRequest, target: Target, size: tuple[int, int]) -> CacheKey:
        """One entry per image and pool: the best result any of the pool's models computed for it so far.

        The pool's composition (served names, weights, pipelines) is part of the key, so replicas that serve
        other models or weights never share entries; the value names the point that computed it.
        """
        rt = self.rt
        members = sorted((m.name, m.weights_id, m.cache_options) for m in rt.models.values() if m.task == target.task)
        weights = hashlib.sha256(repr(members).encode()).hexdigest()
        return CacheKey.for_image(request.image, model=f"pool:{target.task}", checkpoint=weights,
                                  output_format=request.format, output_size=size)

    async def _compute(
        self, request: SegmentRequest, target: Target, header: ImageHeader, plan: Plan, arrived: float,
        key: CacheKey, quality: float | None, started: float,
    ) -> tuple[CachedResult, ItemResult]:
        rt = self.rt
        needed = self._needed_size(target, header) if rt.settings.reduced_decode else None
        with rt.memory.hold(request_bytes(header, needed), retry_after_s=max(1.0, rt.scheduler.backlog_s())):
            return await self._run(request, target, header, plan, arrived, key, quality, started, needed)

    def _needed_size(self, target: Target, header: ImageHeader) -> tuple[int, int]:
        """The largest network input any allowed point would resize this image to: decode no more than that."""
        shapes = [self.rt.shape_of(p, (header.height, header.width)) for p in self.rt.ladder(target.task, target.model)]
        if target.explicit is not None:
            shapes.append(self.rt.shape_of(target.explicit, (header.height, header.width)))
        return max(h for h, _ in shapes), max(w for _, w in shapes)

    async def _run(
        self, request: SegmentRequest, target: Target, header: ImageHeader, plan: Plan, arrived: float,
        key: CacheKey, quality: float | None, started: float, needed: tuple[int, int] | None,
    ) -> tuple[CachedResult, ItemResult]:
        rt = self.rt
        decode_start = time.perf_counter()
        pixels = await asyncio.to_thread(decode_rgb, request.image, header, needed)
        decoded = time.perf_counter()
        rt.metrics.stage.labels("decode").observe(decoded - decode_start)
        rt.overhead_pre.add(decoded - started)
        loop = asyncio.get_running_loop()
        hard_s = min(request.timeout_ms / 1e3 if request.timeout_ms else math.inf, rt.settings.request_timeout_s)
        budget_deadline = arrived + request.budget_ms / 1e3 if request.budget_ms else None
        if request.strict and request.budget_ms:
            hard_s = min(hard_s, request.budget_ms / 1e3)
        item = WorkItem(pixels=pixels, original_size=(header.height, header.width), pool=target.task,
                        model=target.model, admitted=plan, budget_deadline=budget_deadline,
                        hard_deadline=arrived + hard_s, future=loop.create_future(), quality=quality,
                        explicit=target.explicit)
        rt.scheduler.submit(item)
        result: ItemResult = await item.future
        served = rt.served(result.plan.point)
        encode_start = time.perf_counter()
        body, content_type = await asyncio.to_thread(
            encoding.encode, request.format, result.labels, num_classes=served.meta.num_classes,
            class_names=served.meta.class_names, palette=served.meta.palette, receipt={},
            image=pixels if request.format == "overlay" else None)
        encoded = time.perf_counter()
        rt.metrics.stage.labels("encode").observe(encoded - encode_start)
        rt.overhead_post.add(encoded - encode_start)
        point = result.plan.point
        cached = CachedResult(body=body, content_type=content_type, level=point.name,
                              level_rank=rt.pools[target.task].quality_rank[point.name])
        await rt.cache.put(key, cached)
        return cached, result

    def _record(self, point: Point, reason: PlanReason, receipt: Receipt, total_s: float, task: str) -> None:
        m = self.rt.metrics
        m.request_duration.labels(point.model, point.name).observe(total_s)
        m.point_chosen.labels(point.model, point.name, reason.value).inc()
        m.delivered_quality.labels(task).observe(point.quality)
        if receipt.cache == "miss":
            m.queue_wait.labels(point.model, point.name).observe(receipt.queue_ms / 1e3)
            m.compute.labels(point.model, point.name).observe(receipt.compute_ms / 1e3)
            for key, values in receipt.stats.items():
                if key == "kept_fraction":
                    for tap, value in enumerate(values):
                        m.kept_tokens.labels(point.model, str(tap)).observe(value)
        if receipt.budget_met is not None:
            m.budget_outcomes.labels(point.model, "met" if receipt.budget_met else "missed").inc()
