"""Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService` beside `segserve.v1`.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, with the semantics of the
REST routes (`service.api.oip`; inputs, outputs and parameters in `service.api.oip_core`), over the same
pipeline. Input data comes in `raw_input_contents` (BYTES elements length-prefixed) or typed `contents`
(`bytes_contents` for BYTES, `uint_contents` for UINT8); outputs always go in `raw_output_contents`, as Triton
sends them. As on segserve.v1, the call's deadline is the latency budget when the request names none, and always
a hard deadline. A `ServiceError` ends the call with its `grpc_code` and message, plus the trailing metadata
`segserve-error-code` and, for load refusals, `retry-after` (seconds). Calls are counted in
`segserve_requests_total` with route "grpc:/inference.GRPCInferenceService/<Method>".
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import descriptor_pool

from service.api import oip_core as core
from service.errors import BadInput, DeadlineExpired, ServiceError
from service.grpc.gen import grpc_predict_v2_pb2 as pb
from service.grpc.gen import grpc_predict_v2_pb2_grpc as pb_grpc
from service.pipeline import Pipeline
from service.runtime import Runtime

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
CLIENT_CLOSED_REQUEST = 499
Reply = TypeVar("Reply")


def parameter_value(parameter: pb.InferParameter) -> Any:
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def parameters_of(parameters: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def error_metadata(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    metadata = [("segserve-error-code", exc.code)]
    if exc.retry_after_s is not None:
        metadata.append(("retry-after", str(max(1, math.ceil(exc.retry_after_s)))))
    return tuple(metadata)


def tensor_metadata(entries: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=e["name"], datatype=e["datatype"], shape=e["shape"])
            for e in entries]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: Runtime, pipeline: Pipeline) -> None:
        self.runtime = runtime
        self.pipeline = pipeline

    async def _answer(self, method: str, context: grpc.aio.ServicerContext, model: str,
                      handler: Callable[[], Awaitable[Reply]]) -> Reply:
        """Run `handler`, count the call, and turn a ServiceError into the call's status."""
        route = f"grpc:/{SERVICE_NAME}/{method}"
        status, error = 500, None
        try:
            reply = await handler()
            status = 200
            return reply
        except ServiceError as exc:
            status, error = exc.http_status, exc
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the caller went away, its queued work is dropped
                status = CLIENT_CLOSED_REQUEST
                raise
            log.exception("unhandled error in %s", route)
        finally:
            self.runtime.metrics.requests.labels(route, str(status), model if status == 200 else "").inc()
        if error is not None:
            await context.abort(error.grpc_code, error.message, trailing_metadata=error_metadata(error))
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        raise AssertionError("unreachable: context.abort raises")

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        async def handle() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._answer("ServerLive", context, "", handle)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        async def handle() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.runtime.update_ready())

        return await self._answer("ServerReady", context, "", handle)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        async def handle() -> pb.ModelReadyResponse:
            core.check_model(self.runtime, request.name, request.version)
            return pb.ModelReadyResponse(ready=self.runtime.update_ready())

        return await self._answer("ModelReady", context, request.name, handle)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        async def handle() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(**core.server_metadata())

        return await self._answer("ServerMetadata", context, "", handle)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        async def handle() -> pb.ModelMetadataResponse:
            meta = core.model_metadata(self.runtime, request.name, request.version)
            return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                            inputs=tensor_metadata(meta["inputs"]),
                                            outputs=tensor_metadata(meta["outputs"]))

        return await self._answer("ModelMetadata", context, request.name, handle)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        async def handle() -> pb.ModelInferResponse:
            # Tensor checks (and typed contents of a large image) are CPU work: off the event loop.
            call = await asyncio.to_thread(self.infer_call, request)
            self.apply_deadline(call, context)
            self.runtime.metrics.inflight.inc()
            try:
                outcome = await core.infer(self.runtime, self.pipeline, call, f"grpc:/{SERVICE_NAME}/ModelInfer")
            finally:
                self.runtime.metrics.inflight.dec()
            return infer_response(call, outcome)

        return await self._answer("ModelInfer", context, request.model_name, handle)

    def infer_call(self, request: pb.ModelInferRequest) -> core.InferCall:
        rt = self.runtime
        core.check_model(rt, request.model_name, request.model_version)
        if len(request.inputs) != 1:
            raise BadInput(f"send exactly one input: {core.IMAGE!r} (BYTES) or {core.PIXELS!r} (UINT8)",
                           code="invalid_inputs")
        tensor = request.inputs[0]
        requested = [(o.name, parameters_of(o.parameters)) for o in request.outputs]
        outputs = core.output_specs(rt, request.model_name, requested, default_binary=True)
        options = core.segment_options(parameters_of(request.parameters))
        raw, values = None, None
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise BadInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} "
                               "input(s): send one per input, or none", code="invalid_tensor_data")
            raw = request.raw_input_contents[0]
        elif tensor.datatype == "BYTES":
            values = list(tensor.contents.bytes_contents)
        else:  # 4 bytes per value, not a Python int each: typed contents may hold millions of pixels
            pixels = tensor.contents.uint_contents
            values = np.fromiter(pixels, dtype=np.uint32, count=len(pixels))
        images, batched = core.images_from_input(rt, tensor.name, tensor.datatype, tensor.shape, raw, values)
        return core.InferCall(model=request.model_name, images=images, batched=batched, outputs=outputs,
                              options=options, id=request.id)

    def apply_deadline(self, call: core.InferCall, context: grpc.aio.ServicerContext) -> None:
        """As on segserve.v1: the call's remaining deadline fills in an absent budget and caps the timeout."""
        remaining_s = context.time_remaining()
        if remaining_s is not None and math.isfinite(remaining_s):
            if remaining_s <= 0:
                raise DeadlineExpired("the call's deadline had passed when it reached the server",
                                      code="deadline_expired")
            # Capped at the largest accepted budget: a deadline hours away is no constraint, not an error.
            remaining_ms = min(remaining_s * 1e3, self.runtime.settings.max_budget_ms)
            call.options.setdefault("budget_ms", remaining_ms)
            call.options["timeout_ms"] = min(call.options.get("timeout_ms", remaining_ms), remaining_ms)


def infer_response(call: core.InferCall, outcome: core.InferOutcome) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=call.model, model_version=core.MODEL_VERSION, id=call.id,
        parameters={"receipt": pb.InferParameter(string_param=outcome.receipt_parameter(call.batched))},
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                 for t in outcome.outputs],
        raw_output_contents=[t.raw() for t in outcome.outputs],
    )


def publish_for_reflection() -> bool:
    """Add the protocol's file to protobuf's default pool, where server reflection looks up services.

    The generated module keeps its messages in a pool of its own (see scripts/gen_grpc.sh), so that it can be
    imported beside tritonclient.grpc or kserve; a server process imports neither, but if it did, their own
    definition of `inference.*` is already in the default pool and reflection describes that one.
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE_NAME)
        return True
    except KeyError:
        pass
    try:
        pool.AddSerializedFile(pb.DESCRIPTOR.serialized_pb)
    except TypeError as exc:  # a conflicting definition is in the pool already: reflection cannot describe ours
        log.warning("reflection cannot describe %s: %s", SERVICE_NAME, exc)
        return False
    return True


def add_to_server(server: grpc.aio.Server, runtime: Runtime) -> list[str]:
    """Register the OIP servicer on `server`; returns the full service names it added (for reflection)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(runtime, Pipeline(runtime)), server)
    publish_for_reflection()
    return [SERVICE_NAME]
