"""Open Inference Protocol (KServe v2) over HTTP, beside the segserve API and over the same pipeline.

GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{model}[/versions/{v}] (metadata), .../ready;
POST /v2/models/{model}[/versions/{v}]/infer. What a model takes and returns is in `service.api.oip_core`.
The binary tensor data extension: with the header `Inference-Header-Content-Length: L`, the body's first L bytes
are the JSON request and the rest the inputs' data, each input sized by its `binary_data_size` parameter, in order.
Outputs go binary (after the JSON, same header) when the output's `binary_data` parameter or the request's
`binary_data_output` says so, else as JSON `data` (flattened, row-major). Errors are the protocol's
`{"error": "<message>"}` with the status of the `ServiceError` (400, 404, 413, 422, 429, 503, 504), and
Retry-After on load refusals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api import oip_core as core
from service.api.routes import CLIENT_CLOSED_REQUEST, read_body, unless_disconnected
from service.api.schema import OIP_INFER_BODY, OIP_INFER_RESPONSES, OIP_NOT_FOUND
from service.errors import BadInput, ServiceError, UnsupportedFormat
from service.pipeline import Pipeline
from service.runtime import Runtime

log = logging.getLogger(__name__)
router = APIRouter(tags=["Open Inference Protocol (v2)"])
HEADER_LENGTH = "inference-header-content-length"
OCTET_STREAM = "application/octet-stream"


def error_response(exc: ServiceError) -> JSONResponse:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse({"error": exc.message}, status_code=exc.http_status, headers=headers)


async def answer(handler: Callable[[], Awaitable[Response]]) -> Response:
    """The protocol's error shape for every failure of a v2 route (the app's own handler writes segserve's)."""
    try:
        return await handler()
    except ServiceError as exc:
        return error_response(exc)
    except Exception:
        log.exception("unhandled error on an Open Inference Protocol route")
        return JSONResponse({"error": "internal server error"}, status_code=500)


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


@router.get("/v2", summary="Server metadata (Open Inference Protocol)")
async def server_metadata() -> JSONResponse:
    return JSONResponse(core.server_metadata())


@router.get("/v2/health/live", summary="The server is live (Open Inference Protocol)")
async def live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get("/v2/health/ready", summary="The server is ready: calibrated, a live worker, not draining")
async def ready(request: Request) -> JSONResponse:
    is_ready = runtime_of(request).update_ready()
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/v2/models/{model}", summary="Model metadata: inputs and outputs (Open Inference Protocol)",
            responses=OIP_NOT_FOUND)
@router.get("/v2/models/{model}/versions/{version}", summary="Model metadata of a version", responses=OIP_NOT_FOUND)
async def model_metadata(request: Request, model: str, version: str | None = None) -> Response:
    async def handle() -> Response:
        return JSONResponse(core.model_metadata(runtime_of(request), model, version))

    return await answer(handle)


@router.get("/v2/models/{model}/ready", summary="The model is ready (Open Inference Protocol)",
            responses=OIP_NOT_FOUND)
@router.get("/v2/models/{model}/versions/{version}/ready", summary="The model version is ready",
            responses=OIP_NOT_FOUND)
async def model_ready(request: Request, model: str, version: str | None = None) -> Response:
    async def handle() -> Response:
        runtime = runtime_of(request)
        core.check_model(runtime, model, version)
        is_ready = runtime.update_ready()
        return JSONResponse({"name": model, "ready": is_ready}, status_code=200 if is_ready else 503)

    return await answer(handle)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON request and the binary data after it."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
            raise BadInput(f"Inference-Header-Content-Length {header_length!r} must be an integer in "
                           f"[1, {len(body)}] (the body's length)", code="invalid_header_length")
        json_part, binary = body[:int(header_length)], memoryview(body)[int(header_length):]
    try:
        document = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadInput(f"the inference request is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(document, dict):
        raise BadInput("the inference request must be a JSON object", code="invalid_json")
    return document, binary


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"{what} must be a JSON object", code="invalid_json")
    return value


def parse_call(runtime: Runtime, model: str, document: dict[str, Any], binary: memoryview) -> core.InferCall:
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput(f"send exactly one input: {core.IMAGE!r} (BYTES) or {core.PIXELS!r} (UINT8)",
                       code="invalid_inputs")
    tensor = inputs[0]
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(tensor.get("shape"), list):
        raise BadInput("an input needs a name, a datatype and a shape", code="invalid_inputs")
    input_params = _object(tensor.get("parameters"), f"input {name!r} parameters")
    raw = None
    if "binary_data_size" in input_params:
        size = input_params["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
            raise BadInput(f"input {name!r}: binary_data_size {size!r} does not match the {len(binary)} bytes "
                           "after the JSON header", code="invalid_tensor_data")
        raw = binary
    elif len(binary):
        raise BadInput(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size",
                       code="invalid_tensor_data")
    elif "data" not in tensor:
        raise BadInput(f"input {name!r} has no data (neither 'data' nor binary_data_size)", code="invalid_tensor_data")
    parameters = _object(document.get("parameters"), "parameters")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise BadInput("binary_data_output must be true or false", code="invalid_parameter")
    requested = document.get("outputs") or []
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                  for o in requested):
        raise BadInput("outputs must be a list of objects with a name", code="invalid_outputs")
    specs = core.output_specs(runtime, model, [(o["name"], _object(o.get("parameters"), "output parameters"))
                                               for o in requested], default_binary)
    for spec in specs:
        if spec.name == core.MASK_PNG and not spec.binary:
            raise BadInput(f"{core.MASK_PNG!r} holds PNG bytes, which JSON cannot carry: request it with the output "
                           "parameter binary_data: true", code="invalid_output")
    options = core.segment_options(parameters)
    # Last: the tensor's data is the costly part to check, not worth it for a request refused on its parameters.
    images, batched = core.images_from_input(runtime, name, datatype, tensor["shape"], raw, tensor.get("data"))
    request_id = document.get("id", "")
    return core.InferCall(model=model, images=images, batched=batched, outputs=specs, options=options,
                          id=request_id if isinstance(request_id, str) else "")


def infer_response(call: core.InferCall, outcome: core.InferOutcome, model: str) -> Response:
    outputs, blobs = [], []
    for spec, tensor in zip(call.outputs, outcome.outputs, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if spec.binary:
            blob = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            assert tensor.array is not None  # BYTES outputs are binary (checked when parsing)
            entry["data"] = tensor.array.ravel().tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": model, "model_version": core.MODEL_VERSION, "outputs": outputs,
                                "parameters": {"receipt": outcome.receipt_parameter(call.batched)}}
    if call.id:
        document["id"] = call.id
    header = json.dumps(document, separators=(",", ":")).encode()
    headers = outcome.receipts[0].headers() if not call.batched else {"X-Segserve-Model": outcome.receipts[0].model}
    if not blobs:
        return Response(header, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(len(header))
    return Response(b"".join([header, *blobs]), media_type=OCTET_STREAM, headers=headers)


@router.post("/v2/models/{model}/infer", summary="Segment images (Open Inference Protocol)",
             responses=OIP_INFER_RESPONSES, openapi_extra=OIP_INFER_BODY)
@router.post("/v2/models/{model}/versions/{version}/infer", summary="Segment images with a model version",
             responses=OIP_INFER_RESPONSES, openapi_extra=OIP_INFER_BODY)
async def infer(request: Request, model: str, version: str | None = None) -> Response:
    runtime = runtime_of(request)

    async def handle() -> Response:
        core.check_model(runtime, model, version)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding not in ("", "identity"):
            raise UnsupportedFormat(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed",
                                    code="unsupported_encoding")
        body = await read_body(request, runtime.settings.max_body_bytes)
        header_length = request.headers.get(HEADER_LENGTH)
        # JSON parsing and tensor checks are CPU work on up to max_body_bytes: off the event loop.
        call = await asyncio.to_thread(lambda: parse_call(runtime, model, *split_body(body, header_length)))
        pipeline: Pipeline = request.app.state.pipeline
        outcome = await unless_disconnected(request, runtime, core.infer(runtime, pipeline, call, request.url.path))
        if outcome is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return await asyncio.to_thread(infer_response, call, outcome, model)  # JSON data of a large map is slow

    return await answer(handle)
