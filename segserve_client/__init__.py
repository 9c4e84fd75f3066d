"""segserve's Python client: segment images over HTTP or gRPC, blocking or asyncio, with typed receipts and errors.

    from segserve_client import Client
    with Client("http://127.0.0.1:8080") as client:
        result = client.segment("photo.jpg", budget_ms=800)
        print(result.mask.shape, result.receipt.point, result.receipt.budget_met)

It imports httpx, numpy and Pillow, and grpcio with segserve's generated stubs only when gRPC is used: none of
the server's dependencies (torch, onnxruntime, FastAPI).
"""

from segserve_client.client import NO_RETRY, AsyncClient, Client, RetryPolicy
from segserve_client.errors import (
    BadRequest,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidParameter,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    SegservError,
    ServerError,
    Unavailable,
    UnsupportedMediaType,
)
from segserve_client.receipt import Receipt
from segserve_client.results import Listing, ModelInfo, PointInfo, Result

__all__ = [
    "NO_RETRY", "AsyncClient", "BadRequest", "Client", "ConnectionFailed", "DeadlineExceeded", "InvalidParameter",
    "Listing", "ModelInfo", "NotFound", "Overloaded", "PayloadTooLarge", "PointInfo", "ProtocolError", "Receipt",
    "Result", "RetryPolicy", "SegservError", "ServerError", "Unavailable", "UnsupportedMediaType",
]
