"""The Open Inference Protocol (KServe v2) without a transport: what REST (`service.api.oip`) and gRPC
(`service.grpc.oip`) share. They parse their wire format into `InferCall`; `infer` runs it through the same
`Pipeline.segment` as /v1/segment (planner, cache, receipt and errors are the pipeline's).

A model takes exactly one input:
- `image`, BYTES: encoded images (JPEG, PNG, WebP), one per element; shape [1] (or any shape of one element)
  answers a [H, W] label map, N > 1 elements answer [N, H, W].
- `pixels`, UINT8: raw RGB pixels [H, W, 3] (answers [H, W]) or [N, H, W, 3] (answers [N, H, W]).
  They are encoded losslessly as PNG in a thread and sent through the pipeline like any image: the smallest
  honest path (one code path for every input kind; the cache keys on the PNG, so equal pixels hit the cache),
  at ~30 ms of encode + decode per 512x683 image; a raw-pixel entry into the pipeline would save that.
Outputs: `labels` (INT32 by default, UINT8 with the output parameter datatype=UINT8 for up to 256 classes) and,
on request only, `mask_png` (BYTES: the PNG label map, one per image). Labels come from the pipeline's PNG label
map, decoded: PNG is lossless, cheap to decode, and the form the result cache already holds.
Request parameters: latency_budget_ms, quality, point, level, timeout_ms, task, strict (and Triton's `timeout`
in microseconds when timeout_ms is absent). The receipt is the response parameter `receipt`: a JSON object for
one image, a JSON list (one per image, in order) for N.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from service import __version__
from service.errors import BadInput, InvalidParameter, NotFound, PayloadTooLarge, ServiceError
from service.images import read_header
from service.pipeline import Pipeline, SegmentRequest, SegmentResult
from service.receipt import Receipt
from service.runtime import Runtime

SERVER_NAME = "segserve"
MODEL_VERSION = "1"  # a served name has one version: its weights and levels are fixed for the process
PLATFORM = "segserve"
EXTENSIONS = ["binary_tensor_data", "parameters"]
IMAGE, PIXELS, LABELS, MASK_PNG = "image", "pixels", "labels", "mask_png"
INPUTS = [(IMAGE, "BYTES", [-1]), (PIXELS, "UINT8", [-1, -1, 3])]
OUTPUTS = [(LABELS, "INT32", [-1, -1]), (MASK_PNG, "BYTES", [-1])]
MAX_IMAGES = 32  # images per request; each is also bounded by max_pixels and the body by max_body_bytes
MAX_RANK = 4
# Raw pixels -> PNG: stored, not compressed. The PNG only lives in memory for the request; at 512x683 level 0 costs
# 22 ms to encode + 7 ms to decode against 55 + 21 ms at level 1 (2-core CPU).
PNG_COMPRESS_LEVEL = 0
REQUEST_PARAMETERS = {"latency_budget_ms", "quality", "point", "level", "timeout_ms", "task", "strict"}
# Set by client libraries on their own (tritonclient: priority, timeout, sequence_*; REST: binary_data_output).
CLIENT_PARAMETERS = {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
                     "headers"}


@dataclass
class OutputSpec:
    name: str
    datatype: str
    binary: bool  # REST: send the data after the JSON header (gRPC always sends raw_output_contents)


@dataclass
class InferCall:
    model: str
    images: list[bytes] | np.ndarray  # encoded images, or raw pixels [N, H, W, 3] (encoded by `infer`)
    batched: bool  # answer [N, H, W] (else [H, W])
    outputs: list[OutputSpec]
    options: dict[str, Any] = field(default_factory=dict)  # SegmentRequest keyword arguments
    id: str = ""


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None = None  # numeric outputs
    elements: list[bytes] | None = None  # BYTES outputs

    def raw(self) -> bytes:
        """The tensor in the protocol's binary form: little-endian, BYTES elements length-prefixed."""
        if self.elements is not None:
            return b"".join(struct.pack("<I", len(e)) + e for e in self.elements)
        assert self.array is not None
        return np.ascontiguousarray(self.array).tobytes()


@dataclass
class InferOutcome:
    outputs: list[OutputTensor]
    receipts: list[Receipt]

    def receipt_parameter(self, batched: bool) -> str:
        receipts = [r.as_dict() for r in self.receipts]
        return json.dumps(receipts if batched else receipts[0], separators=(",", ":"))


# ----- metadata -----
def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def check_model(runtime: Runtime, name: str, version: str | None) -> None:
    """404 for a name /v1/models does not list, or a version other than the model's one."""
    if name not in runtime.models:
        raise NotFound(f"unknown model {name!r}; this server serves {', '.join(runtime.models)}", code="unknown_model")
    if version not in (None, "", MODEL_VERSION):
        raise NotFound(f"model {name!r} has no version {version!r}; its only version is {MODEL_VERSION!r}",
                       code="unknown_version")


def model_metadata(runtime: Runtime, name: str, version: str | None = None) -> dict[str, Any]:
    check_model(runtime, name, version)
    return {
        "name": name, "versions": [MODEL_VERSION], "platform": PLATFORM,
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in INPUTS],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in OUTPUTS],
    }


# ----- parameters -----
def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidParameter(f"parameter {name} must be a number, got {value!r}", code="invalid_parameter")
    try:
        number = float(value)
    except ValueError:
        raise InvalidParameter(f"parameter {name} must be a number, got {value!r}", code="invalid_parameter") from None
    if not math.isfinite(number):
        raise InvalidParameter(f"parameter {name} must be finite, got {value!r}", code="invalid_parameter")
    return number


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidParameter(f"parameter {name} must be a string, got {value!r}", code="invalid_parameter")
    return value


def segment_options(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Request parameters as `SegmentRequest` keyword arguments; unknown names are a 400 that lists the known."""
    unknown = sorted(set(parameters) - REQUEST_PARAMETERS - CLIENT_PARAMETERS)
    if unknown:
        raise BadInput(f"unknown request parameter(s) {', '.join(unknown)}; segserve reads "
                       f"{', '.join(sorted(REQUEST_PARAMETERS))}", code="unknown_parameter")
    options: dict[str, Any] = {}
    if "latency_budget_ms" in parameters:
        options["budget_ms"] = _number("latency_budget_ms", parameters["latency_budget_ms"])
    if "timeout_ms" in parameters:
        options["timeout_ms"] = _number("timeout_ms", parameters["timeout_ms"])
    elif "timeout" in parameters:  # Triton's request timeout, in microseconds
        options["timeout_ms"] = _number("timeout", parameters["timeout"]) / 1e3
    if "quality" in parameters:
        quality = parameters["quality"]
        options["quality"] = quality if isinstance(quality, str) else _number("quality", quality)
    for name in ("point", "level", "task"):
        if name in parameters:
            options[name] = _text(name, parameters[name]) or None
    if "strict" in parameters:
        strict = parameters["strict"]
        if not isinstance(strict, bool):
            raise InvalidParameter(f"parameter strict must be true or false, got {strict!r}", code="invalid_parameter")
        options["strict"] = strict
    return options


def output_specs(runtime: Runtime, model: str, requested: Sequence[tuple[str, Mapping[str, Any]]],
                 default_binary: bool) -> list[OutputSpec]:
    """The outputs to send: those requested, else `labels` alone (mask_png is on request only)."""
    if not requested:
        return [OutputSpec(LABELS, "INT32", default_binary)]
    specs: list[OutputSpec] = []
    for name, params in requested:
        if name not in (LABELS, MASK_PNG):
            raise BadInput(f"unknown output {name!r}; model {model!r} has outputs {LABELS} (INT32 or UINT8) and "
                           f"{MASK_PNG} (BYTES)", code="unknown_output")
        if any(spec.name == name for spec in specs):
            raise BadInput(f"output {name!r} is requested twice", code="invalid_output")
        if "classification" in params:
            raise BadInput("the classification extension is not supported: request the label map",
                           code="invalid_output")
        binary = params.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise BadInput(f"output {name!r}: binary_data must be true or false", code="invalid_output")
        datatype = params.get("datatype", "INT32" if name == LABELS else "BYTES")
        if name == LABELS and datatype not in ("INT32", "UINT8"):
            raise BadInput(f"output {LABELS!r} is INT32 or UINT8, not {datatype!r}", code="invalid_output")
        if name == LABELS and datatype == "UINT8" and runtime.models[model].meta.num_classes > 256:
            raise BadInput(f"model {model!r} has {runtime.models[model].meta.num_classes} classes: its labels do "
                           "not fit UINT8; request INT32", code="invalid_output")
        if name == MASK_PNG and datatype != "BYTES":
            raise BadInput(f"output {MASK_PNG!r} is BYTES, not {datatype!r}", code="invalid_output")
        specs.append(OutputSpec(name, datatype, binary))
    return specs


# ----- inputs -----
def check_shape(name: str, shape: Iterable[Any]) -> list[int]:
    dims = list(shape)
    if not dims or len(dims) > MAX_RANK or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise BadInput(f"input {name!r}: shape must be 1 to {MAX_RANK} non-negative integers, got {dims}",
                       code="invalid_shape")
    return dims


def split_bytes_elements(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """The protocol's serialized BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    elements, offset, view = [], 0, memoryview(raw)
    while offset < len(view):
        if len(elements) == count or offset + 4 > len(view):
            raise BadInput(f"input {name!r}: binary data holds more than {count} element(s) or a torn length prefix",
                           code="invalid_tensor_data")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise BadInput(f"input {name!r}: element {len(elements)} claims {length} bytes, past the end of the data",
                           code="invalid_tensor_data")
        elements.append(bytes(view[offset:offset + length]))
        offset += length
    if len(elements) != count:
        raise BadInput(f"input {name!r}: shape holds {count} element(s), the data {len(elements)}",
                       code="invalid_tensor_data")
    return elements


def _pixels_array(name: str, shape: list[int], raw: bytes | memoryview | None, values: Any) -> np.ndarray:
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count:
            raise BadInput(f"input {name!r}: UINT8 shape {shape} needs {count} bytes, got {len(raw)}",
                           code="invalid_tensor_data")
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nested lists
        raise BadInput(f"input {name!r}: data is not a regular array", code="invalid_tensor_data") from None
    if array.size != count:
        raise BadInput(f"input {name!r}: shape {shape} holds {count} values, the data {array.size}",
                       code="invalid_tensor_data")
    if array.size and (array.dtype.kind not in "iu" or int(array.min()) < 0 or int(array.max()) > 255):
        raise BadInput(f"input {name!r}: UINT8 data must be integers in [0, 255]", code="invalid_tensor_data")
    return array.astype(np.uint8).reshape(shape)


def images_from_input(runtime: Runtime, name: str, datatype: str, shape: Iterable[Any],
                      raw: bytes | memoryview | None, values: Any) -> tuple[list[bytes] | np.ndarray, bool]:
    """The images of the one input (`raw`: binary data, else `values`: JSON data or typed contents).

    Returns (encoded images, or a [N, H, W, 3] uint8 array) and whether the answer is batched.
    """
    settings = runtime.settings
    dims = check_shape(name, shape)
    if name not in (IMAGE, PIXELS):
        raise BadInput(f"unknown input {name!r}; send {IMAGE!r} (BYTES: encoded images) or {PIXELS!r} "
                       "(UINT8: RGB pixels [H, W, 3] or [N, H, W, 3])", code="unknown_input")
    expected = "BYTES" if name == IMAGE else "UINT8"
    if datatype != expected:
        raise BadInput(f"input {name!r} must be {expected}, got {datatype!r}", code="invalid_datatype")
    if name == IMAGE:
        count = math.prod(dims)
        if count == 0:
            raise BadInput(f"input {IMAGE!r} holds no image", code="empty_body")
        if count > MAX_IMAGES:
            raise PayloadTooLarge(f"{count} images in one request; the limit is {MAX_IMAGES}", code="too_many_images")
        if raw is not None:
            return split_bytes_elements(name, raw, count), count > 1
        elements = flatten(values) if isinstance(values, list) else list(values) if values is not None else []
        if len(elements) != count:
            raise BadInput(f"input {IMAGE!r}: shape {dims} holds {count} element(s), the data {len(elements)}",
                           code="invalid_tensor_data")
        images = []
        for element in elements:
            if isinstance(element, str):  # JSON carries BYTES as strings: their UTF-8 bytes are the element
                element = element.encode()
            if not isinstance(element, bytes):
                raise BadInput(f"input {IMAGE!r}: BYTES elements must be strings or bytes", code="invalid_tensor_data")
            images.append(element)
        return images, count > 1
    if len(dims) not in (3, 4) or dims[-1] != 3:
        raise BadInput(f"input {PIXELS!r}: shape must be [H, W, 3] or [N, H, W, 3], got {dims}", code="invalid_shape")
    n, height, width = (1, *dims[:2]) if len(dims) == 3 else dims[:3]
    if n == 0:
        raise BadInput(f"input {PIXELS!r} holds no image", code="empty_body")
    if n > MAX_IMAGES:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {MAX_IMAGES}", code="too_many_images")
    if height * width > settings.max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                              f"{settings.max_pixels}", code="image_too_large")
    if min(height, width) < settings.min_side:
        raise InvalidParameter(f"image is {width}x{height}; the smallest accepted side is {settings.min_side} pixels",
                               code="image_too_small")
    return _pixels_array(name, dims, raw, values).reshape(n, height, width, 3), len(dims) == 4


def flatten(data: list[Any]) -> list[Any]:
    """Nested row-major lists (JSON tensor data may nest) as one flat list; iterative, so depth cannot hurt."""
    flat: list[Any] = []
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def encode_pixels(pixels: np.ndarray) -> list[bytes]:
    """[N, H, W, 3] uint8 -> N lossless PNGs (CPU work: call in a thread)."""
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        # A uint8 [H, W, 3] array is RGB to Pillow (fromarray's `mode` argument is deprecated).
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        encoded.append(buffer.getvalue())
    return encoded


# ----- running -----
def _check_same_size(images: list[bytes], runtime: Runtime) -> None:
    sizes = {(h.width, h.height) for h in (read_header(image, max_pixels=runtime.settings.max_pixels,
                                                       min_side=runtime.settings.min_side) for image in images)}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise BadInput(f"the images of one request must have one size for a [N, H, W] {LABELS!r} tensor (got "
                       f"{listed}); send them in separate requests, or request only {MASK_PNG!r}",
                       code="mixed_image_sizes")


async def _segment_all(pipeline: Pipeline, requests: list[SegmentRequest]) -> list[SegmentResult]:
    """All images at once (the scheduler batches them); the first failure cancels the rest and is raised."""
    tasks = [asyncio.create_task(pipeline.segment(r)) for r in requests]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            errors = [t.exception() for t in failed]
            raise next((e for e in errors if isinstance(e, ServiceError)), errors[0])  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()  # no-op for finished ones; drops the queued work of the others on failure or cancellation


def labels_from_png(body: bytes, datatype: str) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as image:
        labels = np.asarray(image)
    return labels.astype("<i4" if datatype == "INT32" else np.uint8, copy=False)


async def infer(runtime: Runtime, pipeline: Pipeline, call: InferCall, route: str) -> InferOutcome:
    """Run every image of `call` through the pipeline and build the requested outputs."""
    if isinstance(call.images, np.ndarray):
        images = await asyncio.to_thread(encode_pixels, call.images)
    else:
        images = call.images
        if len(images) > 1 and any(o.name == LABELS for o in call.outputs):
            await asyncio.to_thread(_check_same_size, images, runtime)
    requests = [SegmentRequest(image=image, model=call.model, format="png", route=route, **call.options)
                for image in images]
    results = await _segment_all(pipeline, requests)
    outputs = []
    for spec in call.outputs:
        if spec.name == MASK_PNG:
            bodies = [r.body for r in results]
            outputs.append(OutputTensor(MASK_PNG, "BYTES", [len(bodies)], elements=bodies))
            continue
        maps = await asyncio.to_thread(lambda dt=spec.datatype: [labels_from_png(r.body, dt) for r in results])
        array = np.stack(maps) if call.batched else maps[0]
        outputs.append(OutputTensor(LABELS, spec.datatype, list(array.shape), array=array))
    return InferOutcome(outputs, [r.receipt for r in results])
