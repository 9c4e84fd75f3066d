"""API keys and the rate limit on gRPC: the same `Guard` as HTTP (`service.api.guards`), as a server interceptor.

A call sends its key as the metadata `authorization: Bearer <key>`. Refusals end the call with UNAUTHENTICATED
(`segserve-error-code: unauthorized`) or RESOURCE_EXHAUSTED (`segserve-error-code: rate_limited` and
`retry-after` in seconds), in the trailing metadata as every segserve error. Health, the Open Inference
Protocol's liveness and readiness, and reflection stay open, as the HTTP probes and the OpenAPI document do.
The Guard is the HTTP app's when there is one, so that a client's rate is counted over both transports.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.api.guards import Guard, Refusal
from service.settings import Settings

OPEN_METHODS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})
CODES = {401: grpc.StatusCode.UNAUTHENTICATED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED}


def peer_address(peer: str) -> str:
    """The client's address without its port: 'ipv4:127.0.0.1:5312' -> '127.0.0.1', 'ipv6:[::1]:5312' -> '::1'."""
    _, _, rest = peer.partition(":")
    if rest.startswith("["):
        return rest[1:].partition("]")[0]
    return rest.rpartition(":")[0] or rest or peer


def refusal_metadata(refusal: Refusal) -> tuple[tuple[str, str], ...]:
    metadata = [("segserve-error-code", refusal.code)]
    if refusal.retry_after_s is not None:
        metadata.append(("retry-after", str(refusal.retry_after_s)))
    if refusal.challenge:
        metadata.append(("www-authenticate", refusal.challenge))
    return tuple(metadata)


async def _refused(context: grpc.aio.ServicerContext, guard: Guard) -> None:
    """Abort the call (raises) if the guard refuses it."""
    authorization = next((str(value) for key, value in context.invocation_metadata() or ()
                          if key.lower() == "authorization"), None)
    refusal, _ = guard.check(authorization, peer_address(context.peer() or ""))
    if refusal is not None:
        await context.abort(CODES[refusal.status], refusal.message, trailing_metadata=refusal_metadata(refusal))


def _guarded(behavior: Callable[..., Any], guard: Guard) -> Callable[..., Any]:
    """The same behaviour after the guard's check; async generators stay async generators (grpc.aio tells the
    kinds apart by the function's type)."""
    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _refused(context, guard)
            async for item in behavior(request, context):
                yield item

        return streamed

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _refused(context, guard)
        response = behavior(request, context)
        return await response if inspect.isawaitable(response) else response

    return unary


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        codecs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guarded(handler.unary_unary, self.guard), **codecs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_guarded(handler.unary_stream, self.guard), **codecs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_guarded(handler.stream_unary, self.guard), **codecs)
        return grpc.stream_stream_rpc_method_handler(_guarded(handler.stream_stream, self.guard), **codecs)


def interceptors(settings: Settings, app: Any = None) -> list[grpc.aio.ServerInterceptor]:
    """The guard interceptor, sharing the HTTP app's Guard (and so its buckets) when there is one; none when
    neither keys nor a rate limit are configured."""
    state = getattr(app, "state", None)
    guard = getattr(state, "guard", None) if state is not None else None
    if not isinstance(guard, Guard):
        guard = Guard.from_settings(settings)
    return [GuardInterceptor(guard)] if guard.active else []
