"""HTTP routes: thin. Each parses the request into a `SegmentRequest`, calls the pipeline, and writes the
receipt into headers. Errors are raised as `ServiceError` and mapped to JSON in `service.app`.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Coroutine
from email import message_from_bytes
from email.policy import HTTP
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from service.api.schema import BOOLEAN, BOOLEANS, FORMAT, QUALITY, SEGMENT_BODY, SEGMENT_RESPONSES, milliseconds
from service.describe import describe
from service.errors import BadInput, InvalidParameter, PayloadTooLarge, UnsupportedFormat
from service.images import ALLOWED_CONTENT_TYPES
from service.metrics import METRICS_CONTENT_TYPE
from service.pipeline import Pipeline, SegmentRequest
from service.runtime import Runtime
from service.settings import Settings

router = APIRouter()
T = TypeVar("T")
# The schema's bound of a budget: the server's default max_budget_ms (a deployment can lower it, not raise it past).
MAX_BUDGET_MS = Settings.model_fields["max_budget_ms"].default
CLIENT_CLOSED_REQUEST = 499  # nginx's convention for "the client went away before the answer"


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (never buffered beyond it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def image_from_body(body: bytes, content_type: str) -> bytes:
    """Raw image bytes, or the `image` field of a multipart/form-data body."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        message = message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=HTTP)
        for part in message.iter_parts() if message.is_multipart() else []:
            if part.get_param("name", header="content-disposition") == "image":
                return part.get_payload(decode=True) or b""
        raise BadInput("multipart body has no field named 'image'", code="missing_image_field")
    if media_type and media_type not in ALLOWED_CONTENT_TYPES:
        raise UnsupportedFormat(f"content type {media_type!r} is not supported; send image/jpeg, image/png, "
                                "image/webp or multipart/form-data with an 'image' field")
    return body


# Plain ASCII decimals only: Python's float() also takes "１２３" (full-width digits), "1_000", " 5 ", "inf" and "nan".
NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def parse_ms(name: str, value: str | None) -> float | None:
    if value is None or value == "":
        return None
    if not NUMBER.fullmatch(value):
        raise InvalidParameter(f"{name} must be a number of milliseconds (ASCII digits), got {value!r}",
                               code="invalid_budget")
    number = float(value)
    if math.isinf(number):
        raise InvalidParameter(f"{name} must be a finite number of milliseconds, got {value!r}", code="invalid_budget")
    return number


def parse_bool(name: str, value: str | None) -> bool:
    if value is None:
        return False
    if value not in BOOLEANS:
        raise InvalidParameter(f"{name} must be true or false, got {value!r}", code="invalid_parameter")
    return BOOLEANS[value]


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, runtime: Runtime, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work` (counted in flight) unless the client hangs up first: then it is cancelled, so its queued
    compute is dropped, and None is returned (the route answers 499)."""
    task = asyncio.create_task(work)
    gone = asyncio.create_task(_wait_for_disconnect(request))
    runtime.metrics.inflight.inc()
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        runtime.metrics.inflight.dec()
    if not task.done():
        task.cancel()
        return None
    gone.cancel()
    return task.result()


SEGMENT_DOC = """Segment one image. The body is the raw image (image/jpeg, image/png, image/webp) or a
multipart/form-data field `image`. The response is the mask (a PNG label map by default) with a receipt of
what was spent in the `X-Segserve-*` headers. `/v1/segment` lets the planner choose any model of the task's
pool; `/v1/models/{model}/segment` restricts the choice to one model."""


@router.post("/v1/segment", summary="Segment an image", description=SEGMENT_DOC, openapi_extra=SEGMENT_BODY,
             responses=SEGMENT_RESPONSES, response_class=Response)
@router.post("/v1/models/{model}/segment", summary="Segment an image with a named model", description=SEGMENT_DOC,
             openapi_extra=SEGMENT_BODY, responses=SEGMENT_RESPONSES, response_class=Response)
async def segment(
    request: Request,
    runtime: RuntimeDep,
    model: str | None = None,
    task: Annotated[str | None, Query(description="Label space whose pool may answer (default: the default "
                                      "model's, e.g. ade20k).")] = None,
    latency_budget_ms: Annotated[str | None, Query(
        description="Latency budget in ms (also the header X-Latency-Budget-Ms).",
        json_schema_extra=milliseconds(MAX_BUDGET_MS))] = None,
    quality: Annotated[str | None, Query(description="fast, balanced, best, or 0..1; caps the quality of the "
                                         "point chosen (1 = any, 0 = only the cheapest).",
                                         json_schema_extra=QUALITY)] = None,
    level: Annotated[str | None, Query(description="A knob level of the model (e.g. 2211-222), at scale 1; "
                                       "bypasses the planner.")] = None,
    point: Annotated[str | None, Query(description="An operating point from /v1/models (model/level@scale); "
                                       "bypasses the planner.")] = None,
    format: Annotated[str, Query(description="png (the label map), color, overlay (the image blended with the "
                                 "class colours), rle or json.", json_schema_extra=FORMAT)] = "png",
    strict: Annotated[str | None, Query(description="true: refuse at once (503) if the budget cannot be met.",
                                        json_schema_extra=BOOLEAN)] = None,
    timeout_ms: Annotated[str | None, Query(
        description="Hard deadline: the answer never comes later; past it the request gets 504.",
        json_schema_extra=milliseconds(MAX_BUDGET_MS))] = None,
    x_latency_budget_ms: Annotated[str | None, Header(json_schema_extra=milliseconds(MAX_BUDGET_MS))] = None,
    x_request_timeout_ms: Annotated[str | None, Header(json_schema_extra=milliseconds(MAX_BUDGET_MS))] = None,
) -> Response:
    body = await read_body(request, runtime.settings.max_body_bytes)
    segment_request = SegmentRequest(
        image=image_from_body(body, request.headers.get("content-type", "")),
        model=model,
        task=task or None,
        budget_ms=parse_ms("latency_budget_ms", latency_budget_ms or x_latency_budget_ms),
        quality=quality,
        level=level or None,
        point=point or None,
        format=format or "png",
        strict=parse_bool("strict", strict),
        timeout_ms=parse_ms("timeout_ms", timeout_ms or x_request_timeout_ms),
        route=request.url.path,
    )
    pipeline: Pipeline = request.app.state.pipeline
    result = await unless_disconnected(request, runtime, pipeline.segment(segment_request))
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(result.body, media_type=result.content_type, headers=result.receipt.headers())


@router.get("/v1/models", summary="Served models, their operating points (GMACs, latency, quality) and the ladders")
async def list_models(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse(await asyncio.to_thread(describe, runtime))


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Models loaded, calibrated and workers alive")
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    ready = runtime.update_ready()
    detail = {"calibrated": runtime.calibrated, "draining": runtime.draining,
              "workers_alive": runtime.workers.alive_count}
    return JSONResponse({"status": "ready" if ready else "not ready", **detail}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)
