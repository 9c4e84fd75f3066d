"""What the OpenAPI schema says about the segment routes, so that it tells the truth.

The image body is read raw (FastAPI does not parse it), so it is declared here; so are the query parameters'
real grammar (every empty parameter means unset; numbers are plain ASCII decimals), every error status with the
one error shape, and the receipt headers of a 200. `schemathesis run --checks all` holds the server to it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

_IMAGE = {"type": "string", "format": "binary"}
_EMPTY = {"type": "string", "maxLength": 0}  # an empty parameter means "unset", for every parameter

SEGMENT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {"image": _IMAGE}}},
    **{media: {"schema": _IMAGE} for media in ("image/jpeg", "image/png", "image/webp", "application/octet-stream")},
}}}


def milliseconds(maximum: float) -> dict[str, Any]:
    """A positive number of milliseconds up to `maximum`, or empty (unset)."""
    return {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": maximum}, _EMPTY]}


QUALITY = {"anyOf": [{"type": "string", "enum": ["fast", "balanced", "best"]},
                     {"type": "number", "minimum": 0, "maximum": 1}, _EMPTY]}
FORMATS = ["png", "color", "overlay", "rle", "json"]
FORMAT = {"type": "string", "enum": [*FORMATS, ""], "default": "png"}
BOOLEANS = {"true": True, "True": True, "1": True, "yes": True, "false": False, "False": False, "0": False,
            "no": False, "": False}
BOOLEAN = {"type": "string", "enum": list(BOOLEANS)}


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_budget, queue_full, deadline_expired.")
    message: str = Field(description="What went wrong, for a person.")


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"code": ..., "message": ...}}`."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body is empty, not an image, truncated or corrupt."},
    404: {"model": ErrorBody, "description": "Unknown model or task."},
    413: {"model": ErrorBody, "description": "Body or image over the server's limits."},
    415: {"model": ErrorBody, "description": "Not JPEG, PNG, WebP or multipart/form-data."},
    422: {"model": ErrorBody, "description": "A parameter (budget, quality, level, point, format) or an image size "
                                             "no point can take."},
    429: {"model": ErrorBody, "description": "The queue or the memory budget is full.", "headers": _RETRY_AFTER},
    500: {"model": ErrorBody, "description": "Inference failed for this batch (the server carries on)."},
    503: {"model": ErrorBody, "description": "Not ready, shutting down, or (strict) the budget cannot be met.",
          "headers": _RETRY_AFTER},
    504: {"model": ErrorBody, "description": "The request's timeout passed; it was not answered late."},
}

_RECEIPT_HEADERS = {
    name: {"description": description, "schema": {"type": "string"}}
    for name, description in (
        ("X-Segserve-Model", "The served model that computed the mask."),
        ("X-Segserve-Point", "The operating point: model/level@scale."),
        ("X-Segserve-Level", "The knob level."),
        ("X-Segserve-Scale", "The input scale (1 = the dataset's reference scale)."),
        ("X-Segserve-Quality", "The point's quality value (mIoU points)."),
        ("X-Segserve-Quality-Source", "measured, measured-agreement, prior or prior-unknown."),
        ("X-Segserve-Queue-Ms", "Time queued before compute."),
        ("X-Segserve-Compute-Ms", "The batch's preprocess + forward + postprocess."),
        ("X-Segserve-Total-Ms", "Time in the server."),
        ("X-Segserve-Predicted-Ms", "The admission forecast."),
        ("X-Segserve-Batch-Size", "Requests in the batch (0 on a cache hit)."),
        ("X-Segserve-Cache", "hit or miss."),
        ("X-Segserve-Plan", "Why the point: budget, quality, default, explicit, fallback or cache."),
        ("X-Segserve-Budget-Met", "true or false, when the request had a budget."),
    )
}
SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The mask (PNG label map by default; colour or overlay PNG; RLE or JSON document).",
          "content": {"image/png": {"schema": _IMAGE}, "application/json": {"schema": {"type": "object"}}},
          "headers": _RECEIPT_HEADERS},
    **ERRORS,
}


# ----- the Open Inference Protocol routes (their errors are the protocol's `{"error": "..."}`) -----


class OipError(BaseModel):
    """An Open Inference Protocol error: `{"error": "<message>"}`."""

    error: str


OIP_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": OipError, "description": "Unknown model or version."}}
OIP_INFER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "description": "An inference request (inputs, outputs, "
                                                                   "parameters)."}},
    "application/octet-stream": {"schema": _IMAGE, "description": "The binary tensor data extension: the JSON "
                                 "request, then the inputs' bytes (header Inference-Header-Content-Length)."},
}}}
OIP_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The inference response (outputs, parameters with the receipt)."},
    **{status: {"model": OipError, "description": spec["description"], **({"headers": spec["headers"]}
                                                                          if "headers" in spec else {})}
       for status, spec in ERRORS.items()},
}
