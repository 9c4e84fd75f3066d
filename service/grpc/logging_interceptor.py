"""The gRPC call log: one `segserve.access` line per call (method, status code, duration, operating point).

A server interceptor, so every service on the port is covered (segserve.v1, the Open Inference Protocol,
reflection) without each servicer logging for itself. Health and readiness methods are not logged unless
`log_probes` (see `service.logs.PROBE_GRPC_METHODS`), like the HTTP probes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.logs import PROBE_GRPC_METHODS, log_call

MAX_POINTS_LOGGED = 4  # a batched OIP request may have used several points; the line stays short


def point_of(response: Any) -> str:
    """The operating point(s) that answered: segserve.v1's `receipt.point`, or the points in an Open Inference
    Protocol response's `receipt` parameter (a JSON object, or a list of them for a batched request)."""
    receipt = getattr(response, "receipt", None)
    if receipt is not None and getattr(receipt, "point", ""):
        return str(receipt.point)
    parameters = getattr(response, "parameters", None)
    try:
        if parameters is None or "receipt" not in parameters:
            return ""
        parsed = json.loads(parameters["receipt"].string_param)
    except (TypeError, AttributeError, ValueError):  # not an OIP receipt: nothing to report
        return ""
    receipts = parsed if isinstance(parsed, list) else [parsed]
    points = sorted({str(r.get("point", "")) for r in receipts if isinstance(r, dict)} - {""})
    return ",".join(points[:MAX_POINTS_LOGGED]) + (",..." if len(points) > MAX_POINTS_LOGGED else "")


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The call's final code: what the servicer set or aborted with, else OK, or the kind of failure."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN.name  # an exception grpc turns into UNKNOWN
    return grpc.StatusCode.OK.name


class CallLogInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's behaviour to time it and log one line when the call ends, however it ends."""

    def __init__(self, *, log_probes: bool = False) -> None:
        self.log_probes = log_probes

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (not self.log_probes and method in PROBE_GRPC_METHODS):
            return handler
        codecs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_logged(handler.unary_unary, method), **codecs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_logged(handler.unary_stream, method), **codecs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_logged(handler.stream_unary, method), **codecs)
        return grpc.stream_stream_rpc_method_handler(_logged(handler.stream_stream, method), **codecs)


def _logged(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """The same behaviour, logged. Async generators (streamed responses) stay async generators: grpc.aio
    tells the two kinds apart by the function's type."""

    def finish(context: grpc.aio.ServicerContext, start: float, error: BaseException | None, point: str) -> None:
        log_call("grpc", method, _status(context, error), time.perf_counter() - start, point, context.peer())

    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, error = time.perf_counter(), None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                finish(context, start, error, "")

        return streamed

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start, error, response = time.perf_counter(), None, None
        try:
            response = behavior(request, context)
            if inspect.isawaitable(response):
                response = await response
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            finish(context, start, error, point_of(response))

    return unary
