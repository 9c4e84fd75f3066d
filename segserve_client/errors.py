"""Typed errors carrying the server's stable error code, the same classes for HTTP and gRPC.

Every failure the server reports is a `SegservError` with:

- `code`: the server's machine-readable code (`queue_full`, `budget_infeasible`, `unknown_model`, ...), or a
  client-side one (`client_timeout`, `connection_failed`, `http_<status>` when the server sent no code);
- `status`: the HTTP status, or on gRPC the HTTP status the server maps that gRPC code from (so one `except`
  clause reads the same for both transports); 0 for failures with no answer (timeouts, connections);
- `grpc_code`: the gRPC status name (`"RESOURCE_EXHAUSTED"`) on the gRPC transport, else None;
- `message`, `retry_after_s` (the server's Retry-After, if any), `attempts` (how many were sent) and
  `waited_s` (how long the client slept between them).

`Overloaded` (429) and `Unavailable` (503, connection failures) are the retryable ones.
"""

from __future__ import annotations


class SegservError(Exception):
    """A request segserve refused or could not answer."""

    status = 0
    default_code = "error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 grpc_code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        if status is not None:
            self.status = status
        self.grpc_code = grpc_code
        self.retry_after_s = retry_after_s
        self.attempts = 1  # requests sent, retries included
        self.waited_s = 0.0  # seconds slept between them

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.grpc_code is None else self.grpc_code
        tries = f", after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{self.code} ({where}{tries}): {self.message}"


class BadRequest(SegservError):
    """400: the request is wrong (not an image, bad parameter); sending it again will not help."""

    status = 400
    default_code = "bad_request"


class PayloadTooLarge(BadRequest):
    status = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(BadRequest):
    status = 415
    default_code = "unsupported_format"


class InvalidParameter(BadRequest):
    status = 422
    default_code = "invalid_parameter"


class NotFound(SegservError):
    """404: no such model, task, level or point (see `Client.models()`)."""

    status = 404
    default_code = "not_found"


class Overloaded(SegservError):
    """429: the server's queue is full; retried after its Retry-After."""

    status = 429
    default_code = "queue_full"
    retryable = True


class Unavailable(SegservError):
    """503: not ready, draining, no point can meet a strict budget, or no connection; retried."""

    status = 503
    default_code = "unavailable"
    retryable = True


class ConnectionFailed(Unavailable):
    """No answer at all: the connection was refused or broke."""

    status = 0
    default_code = "connection_failed"


class DeadlineExceeded(SegservError):
    """504 from the server (its hard deadline passed), or the client's own timeout (`code="client_timeout"`)."""

    status = 504
    default_code = "deadline_expired"


class ServerError(SegservError):
    """500 or another unexpected status: the server failed on this request."""

    status = 500
    default_code = "internal"


class ProtocolError(SegservError):
    """The answer could not be understood (e.g. a body that is not the requested format)."""

    status = 0
    default_code = "protocol_error"


_BY_STATUS: dict[int, type[SegservError]] = {
    400: BadRequest, 413: PayloadTooLarge, 415: UnsupportedMediaType, 422: InvalidParameter, 404: NotFound,
    429: Overloaded, 503: Unavailable, 504: DeadlineExceeded, 500: ServerError,
}

# gRPC status name -> (class, HTTP-equivalent status), as service/errors.py maps them on the server.
_BY_GRPC: dict[str, tuple[type[SegservError], int]] = {
    "INVALID_ARGUMENT": (BadRequest, 400),
    "NOT_FOUND": (NotFound, 404),
    "RESOURCE_EXHAUSTED": (Overloaded, 429),
    "UNAVAILABLE": (Unavailable, 503),
    "DEADLINE_EXCEEDED": (DeadlineExceeded, 504),
    "INTERNAL": (ServerError, 500),
    "UNAUTHENTICATED": (BadRequest, 401),  # no or a wrong API key (code unauthorized)
}
# Codes the server sends with a gRPC status shared by several HTTP statuses.
_GRPC_CODE_OVERRIDES: dict[str, tuple[type[SegservError], int]] = {
    "body_too_large": (PayloadTooLarge, 413),
    "payload_too_large": (PayloadTooLarge, 413),
    "unsupported_format": (UnsupportedMediaType, 415),
}


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (segserve sends whole seconds); None when absent or not a number of seconds."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: segserve never sends one, and a wrong guess is worse than the backoff
    return seconds if seconds >= 0 else None


def from_http(status: int, body: object, retry_after: str | None) -> SegservError:
    """The error for an HTTP answer other than 200; `body` is the decoded JSON (or None)."""
    code, message = None, f"HTTP {status}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = error.get("code"), str(error.get("message", message))
    elif isinstance(error, str):  # the Open Inference Protocol's shape
        message = error
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else BadRequest)
    return cls(message, code=code or f"http_{status}", status=status, retry_after_s=parse_retry_after(retry_after))


def from_grpc(grpc_code: str, details: str | None, metadata: dict[str, str]) -> SegservError:
    """The error for a failed gRPC call; `metadata` holds the trailing metadata (segserve-error-code, retry-after)."""
    code = metadata.get("segserve-error-code")
    cls, status = _GRPC_CODE_OVERRIDES.get(code or "") or _BY_GRPC.get(grpc_code, (ServerError, 500))
    return cls(details or grpc_code, code=code or grpc_code.lower(), status=status, grpc_code=grpc_code,
               retry_after_s=parse_retry_after(metadata.get("retry-after")))
