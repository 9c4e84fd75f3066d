"""The gRPC transport: `segserve.v1.Segmentation` (Segment, ListModels) and the standard health service.

Imported only when a client uses gRPC; it needs grpcio and the generated stubs, which import only protobuf and
grpc. A call gets a deadline from `timeout_ms` (the server then reads the time left as the hard timeout, and as
the budget when the call names none); without `timeout_ms` a Segment call has no deadline, so that the server
plans it as a call without a budget rather than one with a budget of the client's timeout.
"""

from __future__ import annotations

from typing import Any

import grpc

from segserve_client.calls import SegmentCall
from segserve_client.errors import ConnectionFailed, SegservError, from_grpc
from segserve_client.receipt import Receipt
from segserve_client.results import Listing, Result

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # masks of large images exceed grpc's 4 MiB default
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES))


def stubs() -> tuple[Any, Any]:
    """(segserve_pb2, segserve_pb2_grpc), imported on first use."""
    from service.grpc.gen import segserve_pb2, segserve_pb2_grpc

    return segserve_pb2, segserve_pb2_grpc


def target_of(address: str) -> str:
    """'grpc://host:port' or 'host:port' -> 'host:port'."""
    return address.split("://", 1)[1] if "://" in address else address


def segment_message(call: SegmentCall) -> Any:
    pb2, _ = stubs()
    fields: dict[str, Any] = {"image": call.image, "model": call.model or "", "task": call.task or "",
                              "quality": "" if call.quality is None else str(call.quality),
                              "level": call.level or "", "point": call.point or "", "format": call.format,
                              "strict": call.strict}
    if call.budget_ms is not None:
        fields["latency_budget_ms"] = call.budget_ms
    if call.timeout_ms is not None:
        fields["timeout_ms"] = call.timeout_ms
    return pb2.SegmentRequest(**fields)


def deadline_s(call: SegmentCall) -> float | None:
    return None if call.timeout_ms is None else call.timeout_ms / 1e3


def segment_result(response: Any, call: SegmentCall) -> Result:
    return Result(raw=response.mask, content_type=response.content_type,
                  receipt=Receipt.from_message(response.receipt), format=call.format)


def rpc_error(exc: grpc.RpcError) -> SegservError:
    """The typed error of a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    metadata = {}
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        metadata[key.lower()] = value.decode() if isinstance(value, bytes) else str(value)
    error = from_grpc(code.name, details, metadata)
    if code is grpc.StatusCode.UNAVAILABLE and "segserve-error-code" not in metadata:
        # No segserve answer: the channel could not reach a server.
        return ConnectionFailed(details or "UNAVAILABLE", code="connection_failed", grpc_code=code.name)
    return error


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The key as the metadata a server with API keys reads (`authorization: Bearer <key>`)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class GrpcSync:
    def __init__(self, address: str, api_key: str | None = None) -> None:
        _, pb2_grpc = stubs()
        self.channel = grpc.insecure_channel(target_of(address), options=CHANNEL_OPTIONS)
        self.stub = pb2_grpc.SegmentationStub(self.channel)
        self.metadata = call_metadata(api_key)

    def segment(self, call: SegmentCall) -> Result:
        try:
            response = self.stub.Segment(segment_message(call), timeout=deadline_s(call),
                                         metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return segment_result(response, call)

    def models(self, timeout_s: float | None) -> Listing:
        pb2, _ = stubs()
        try:
            return Listing.from_message(self.stub.ListModels(pb2.ListModelsRequest(), timeout=timeout_s,
                                                             metadata=self.metadata))
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def ready(self, timeout_s: float | None) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            answer = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                    timeout=timeout_s)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()


class GrpcAsync:
    """grpc.aio; the channel is made on first use, inside the event loop that uses it."""

    def __init__(self, address: str, api_key: str | None = None) -> None:
        self.address = target_of(address)
        self.channel: grpc.aio.Channel | None = None
        self.stub: Any = None
        self.metadata = call_metadata(api_key)

    def _stub(self) -> Any:
        if self.stub is None:
            _, pb2_grpc = stubs()
            self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self.stub = pb2_grpc.SegmentationStub(self.channel)
        return self.stub

    async def segment(self, call: SegmentCall) -> Result:
        try:
            response = await self._stub().Segment(segment_message(call), timeout=deadline_s(call),
                                                  metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return segment_result(response, call)

    async def models(self, timeout_s: float | None) -> Listing:
        pb2, _ = stubs()
        try:
            return Listing.from_message(await self._stub().ListModels(
                pb2.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata))
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    async def ready(self, timeout_s: float | None) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._stub()
        try:
            answer = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
