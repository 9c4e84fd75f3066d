"""Typed per-request errors and the one mapping from error to HTTP and gRPC status.

Everything a caller can get wrong, or that refuses a request for load, is a `ServiceError` with a stable
machine-readable `code`. Transports turn it into `{"error": {"code", "message"}}` with `http_status`
(HTTP) or `grpc_code` (gRPC). Never `assert` on caller input: raise one of these.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request-level failure: the server, other requests and cached data are unaffected."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    code = "bad_request"

    def __init__(self, message: str, *, retry_after_s: float | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class BadInput(ServiceError):
    """400: the body is empty, not an image, or truncated."""


class PayloadTooLarge(ServiceError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "payload_too_large"


class UnsupportedFormat(ServiceError):
    http_status = 415
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    code = "unsupported_format"


class InvalidParameter(ServiceError):
    """422: a parameter (budget, quality, level, format) or an image size the model cannot take."""

    http_status = 422
    code = "invalid_parameter"


class NotFound(ServiceError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    code = "not_found"


class QueueFull(ServiceError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "queue_full"


class Unavailable(ServiceError):
    """503: the budget cannot be met (strict), the server is draining, or no worker can run."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "unavailable"


class DeadlineExpired(ServiceError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "deadline_expired"


class InferenceFailed(ServiceError):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    code = "inference_failed"
