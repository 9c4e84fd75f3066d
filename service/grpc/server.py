"""The gRPC server (grpc.aio) beside HTTP: `segserve.v1.Segmentation`, `grpc.health.v1.Health`, reflection.

Thin like the HTTP routes: `Segment` turns its message into a `SegmentRequest` and calls the same
`Pipeline.segment`. A call's deadline is the latency budget when the request names none, and always a hard
deadline (`timeout_ms`). A `ServiceError` ends the call with its `grpc_code` and message, plus the trailing
metadata `segserve-error-code` (its stable code) and, for load refusals, `retry-after` (seconds).

Health (overall "" and "segserve.v1.Segmentation") is NOT_SERVING until the runtime is calibrated and has a
live worker, SERVING then, and NOT_SERVING for good once the server begins to drain. Requests are counted in
`segserve_requests_total` with route "grpc:/segserve.v1.Segmentation/<Method>" and the HTTP-equivalent
status code, so dashboards see one family for both transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.describe import describe
from service.errors import DeadlineExpired, PayloadTooLarge, ServiceError
from service.grpc import guards, oip
from service.grpc.gen import segserve_pb2, segserve_pb2_grpc
from service.grpc.logging_interceptor import CallLogInterceptor
from service.pipeline import Pipeline, SegmentRequest, SegmentResult
from service.receipt import Receipt
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = segserve_pb2.DESCRIPTOR.services_by_name["Segmentation"].full_name  # "segserve.v1.Segmentation"
SEGMENT_ROUTE = f"grpc:/{SERVICE_NAME}/Segment"
LIST_MODELS_ROUTE = f"grpc:/{SERVICE_NAME}/ListModels"
CLIENT_CLOSED_REQUEST = 499  # as on HTTP: the caller cancelled or its deadline passed before the answer
# Room for the request's other fields on top of the image, which is bounded by settings.max_body_bytes.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
# gRPC refuses a message over its transport limit before any handler runs, with no way to add our error code.
# So the transport accepts up to twice the body limit, and the servicer refuses what is over `max_body_bytes` with
# RESOURCE_EXHAUSTED and `segserve-error-code: body_too_large`; only a message over twice the limit meets
# gRPC's own refusal. The memory this costs is bounded either way.
TRANSPORT_LIMIT_FACTOR = 2
HEALTH_POLL_S = 0.2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def receipt_message(receipt: Receipt) -> segserve_pb2.Receipt:
    fields: dict[str, Any] = {
        "model": receipt.model, "level": receipt.level, "isr": receipt.knob_value, "cache": receipt.cache,
        "queue_ms": receipt.queue_ms, "compute_ms": receipt.compute_ms, "total_ms": receipt.total_ms,
        "batch_size": receipt.batch_size, "predicted_ms": receipt.predicted_ms, "plan_reason": receipt.plan_reason,
        "height": receipt.height, "width": receipt.width, "point": receipt.point, "knob": receipt.knob,
        "knob_value": receipt.knob_value, "scale": receipt.scale, "quality": receipt.quality,
        "quality_source": receipt.quality_source, "task": receipt.task,
        "stats": {key: segserve_pb2.Values(values=values) for key, values in receipt.stats.items()},
    }
    # proto3 `optional`: left unset (HasField false) when the request carried no budget.
    if receipt.budget_ms is not None:
        fields["budget_ms"] = receipt.budget_ms
    if receipt.budget_met is not None:
        fields["budget_met"] = receipt.budget_met
    return segserve_pb2.Receipt(**fields)


def segment_response(result: SegmentResult) -> segserve_pb2.SegmentResponse:
    return segserve_pb2.SegmentResponse(mask=result.body, content_type=result.content_type,
                                        receipt=receipt_message(result.receipt))


def error_metadata(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    metadata = [("segserve-error-code", exc.code)]
    if exc.retry_after_s is not None:
        metadata.append(("retry-after", str(max(1, math.ceil(exc.retry_after_s)))))
    return tuple(metadata)


class SegmentationServicer(segserve_pb2_grpc.SegmentationServicer):
    def __init__(self, runtime: Runtime, pipeline: Pipeline) -> None:
        self.runtime = runtime
        self.pipeline = pipeline

    def segment_request(self, message: segserve_pb2.SegmentRequest,
                        context: grpc.aio.ServicerContext) -> SegmentRequest:
        """The transport-free request; the call's remaining deadline fills in an absent budget and timeout."""
        settings = self.runtime.settings
        if len(message.image) > settings.max_body_bytes:
            raise PayloadTooLarge(f"image of {len(message.image)} bytes is over the limit of "
                                  f"{settings.max_body_bytes} bytes", code="body_too_large")
        budget_ms = message.latency_budget_ms if message.HasField("latency_budget_ms") else None
        timeout_ms = message.timeout_ms if message.HasField("timeout_ms") else None
        remaining_s = context.time_remaining()
        if remaining_s is not None and math.isfinite(remaining_s):
            if remaining_s <= 0:
                raise DeadlineExpired("the call's deadline had passed when it reached the server",
                                      code="deadline_expired")
            # Capped at the largest accepted budget: a deadline hours away is no constraint, not an error.
            remaining_ms = min(remaining_s * 1e3, settings.max_budget_ms)
            if budget_ms is None:
                budget_ms = remaining_ms
            timeout_ms = remaining_ms if timeout_ms is None else min(timeout_ms, remaining_ms)
        return SegmentRequest(
            image=message.image,
            model=message.model or None,
            task=message.task or None,
            budget_ms=budget_ms,
            quality=message.quality or None,
            level=message.level or None,
            point=message.point or None,
            format=message.format or "png",
            strict=message.strict,
            timeout_ms=timeout_ms,
            route=SEGMENT_ROUTE,
        )

    async def Segment(self, request: segserve_pb2.SegmentRequest,
                      context: grpc.aio.ServicerContext) -> segserve_pb2.SegmentResponse:
        rt = self.runtime
        status = 500
        answered_by = ""
        error: ServiceError | None = None
        rt.metrics.inflight.inc()
        try:
            result = await self.pipeline.segment(self.segment_request(request, context))
            status, answered_by = 200, result.receipt.model
            return segment_response(result)
        except ServiceError as exc:
            status, error = exc.http_status, exc
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST  # the caller went away; its queued work is dropped, not computed
            raise
        except Exception:
            log.exception("unhandled error in %s", SEGMENT_ROUTE)
        finally:
            rt.metrics.inflight.dec()
            rt.metrics.requests.labels(SEGMENT_ROUTE, str(status), answered_by).inc()
        if error is not None:
            await context.abort(error.grpc_code, error.message, trailing_metadata=error_metadata(error))
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        raise AssertionError("unreachable: context.abort raises")

    async def ListModels(self, request: segserve_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> segserve_pb2.ListModelsResponse:
        rt = self.runtime
        status = 500
        try:
            response = await self.list_models()
            status = 200
            return response
        finally:
            rt.metrics.requests.labels(LIST_MODELS_ROUTE, str(status), "").inc()

    async def list_models(self) -> segserve_pb2.ListModelsResponse:
        """The content of GET /v1/models."""
        listing = await asyncio.to_thread(describe, self.runtime)
        return list_models_message(listing)


def _level_message(model: dict[str, Any], name: str, rank: int) -> segserve_pb2.Level:
    point = next(p for p in model["points"] if p["level"] == name)
    fields: dict[str, Any] = {"name": name, "rank": rank, "knob_value": point["knob_value"]}
    if model["knob"] and model["knob"]["name"] == "isr":
        encoder, decoder = ([*point["knob_value"].split("/"), "111"])[:2]
        fields["isr"] = segserve_pb2.IsrConfig(encoder=[int(c) for c in encoder], decoder=[int(c) for c in decoder])
    return segserve_pb2.Level(**fields)


def list_models_message(listing: dict[str, Any]) -> segserve_pb2.ListModelsResponse:
    """`service.describe.describe()` as the ListModels response."""
    models = []
    for model in listing["models"]:
        points = [segserve_pb2.Point(
            name=p["name"], model=p["model"], level=p["level"], knob_value=p["knob_value"], scale=p["scale"],
            precision=p["precision"], network_input=p["network_input"], gmacs=p["gmacs"],
            latency_ms={int(b): ms for b, ms in p["latency_ms"].items()}, quality=p["quality"],
            quality_source=p["quality_source"], on_ladder=p["on_ladder"],
        ) for p in model["points"]]
        levels = model["knob"]["levels"] if model["knob"] else ["base"]
        models.append(segserve_pb2.Model(
            name=model["name"], classes=model["classes"], num_classes=model["num_classes"],
            dataset=model["dataset"] or "", weights=model["weights"], backend=model["backend"],
            device=model["device"], calibration_shape=model["calibration_shape"],
            levels=[_level_message(model, name, rank) for rank, name in enumerate(levels)],
            architecture=model["architecture"], family=model["family"], task=model["task"],
            knob=model["knob"]["name"] if model["knob"] else "", scales=model["scales"], points=points,
        ))
    tasks = [segserve_pb2.Task(name=name, models=task["models"], ladder=task["ladder"])
             for name, task in listing["tasks"].items()]
    return segserve_pb2.ListModelsResponse(models=models, default_model=listing["default_model"],
                                           default_task=listing["default_task"], tasks=tasks,
                                           quality_prior=listing["quality_prior"])


class GrpcServer:
    """The gRPC server of one runtime: `await start()`, `begin_drain()`, `await stop(grace=...)`."""

    def __init__(self, runtime: Runtime, app: Any, settings: Settings) -> None:
        self.runtime = runtime
        self.app = app  # the HTTP app of the same runtime (unused: both transports share the runtime)
        self.settings = settings
        self.port: int | None = None  # the bound port once started (settings.grpc_port may be 0)
        self.health = health.aio.HealthServicer()
        self._status: int | None = None
        self._draining = False
        self._stopped = False
        self._poller: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None
        limit = TRANSPORT_LIMIT_FACTOR * settings.max_body_bytes + MESSAGE_OVERHEAD_BYTES
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)],
                                      interceptors=[CallLogInterceptor(log_probes=settings.log_probes),
                                                    *guards.interceptors(settings, app)])  # keys, rate: refusals logged
        segserve_pb2_grpc.add_SegmentationServicer_to_server(
            SegmentationServicer(runtime, Pipeline(runtime)), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        extra = oip.add_to_server(self.server, runtime)  # the Open Inference Protocol beside segserve.v1
        reflection.enable_server_reflection((SERVICE_NAME, *extra, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)

    async def start(self) -> None:
        await self._set_status(NOT_SERVING)  # the health servicer starts out SERVING for ""
        port = self.settings.grpc_port if self.settings.grpc_port is not None else 0
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"gRPC could not bind {self.settings.host}:{port}")
        await self.server.start()
        self._poller = asyncio.create_task(self._poll_readiness(), name="segserve-grpc-health")
        log.info("gRPC serving %s on %s:%d", SERVICE_NAME, self.settings.host, self.port)

    async def _set_status(self, status: int) -> None:
        if status == self._status:
            return
        self._status = status
        for service in (health.OVERALL_HEALTH, SERVICE_NAME):
            await self.health.set(service, status)
        log.info("gRPC health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    async def _poll_readiness(self) -> None:
        while not self._draining:
            try:
                await self._set_status(SERVING if self.runtime.update_ready() else NOT_SERVING)
            except Exception:  # never let a transient failure end the poller
                log.exception("gRPC health update failed")
            await asyncio.sleep(HEALTH_POLL_S)

    def begin_drain(self) -> None:
        """Health turns NOT_SERVING for good; calls in progress (and new ones, refused by the runtime) go on."""
        if self._draining:
            return
        self._draining = True
        self._status = NOT_SERVING
        self._drain_task = asyncio.get_running_loop().create_task(self.health.enter_graceful_shutdown())

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, then stop: calls in progress get `grace` seconds. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self.begin_drain()
        if self._drain_task is not None:
            await self._drain_task
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.server.stop(grace)
