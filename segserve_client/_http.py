"""The HTTP transport: POST /v1/segment (or /v1/models/{model}/segment), GET /v1/models, GET /readyz.

Pure functions build the request and read the answer; `Client` and `AsyncClient` only do the I/O between them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from segserve_client.calls import SegmentCall
from segserve_client.errors import ConnectionFailed, DeadlineExceeded, ProtocolError, SegservError, from_http
from segserve_client.receipt import Receipt
from segserve_client.results import Listing, Result

# With timeout_ms, the client waits this much longer than the server's hard deadline, so that the server's own
# 504 (with its code) arrives rather than a client-side timeout.
DEADLINE_GRACE_S = 1.0


def segment_request(call: SegmentCall, default_timeout_s: float | None) -> dict[str, Any]:
    """Keyword arguments of httpx's `post` (besides the URL base) for one segment call."""
    path = "/v1/segment" if call.model is None else f"/v1/models/{quote(call.model, safe='')}/segment"
    params: dict[str, str] = {}
    if call.budget_ms is not None:
        params["latency_budget_ms"] = f"{call.budget_ms:g}"
    if call.quality is not None:
        params["quality"] = str(call.quality)
    if call.timeout_ms is not None:
        params["timeout_ms"] = f"{call.timeout_ms:g}"
    for name in ("task", "point", "level"):
        value = getattr(call, name)
        if value is not None:
            params[name] = value
    if call.format != "png":
        params["format"] = call.format
    if call.strict:
        params["strict"] = "true"
    timeout = default_timeout_s if call.timeout_ms is None else call.timeout_ms / 1e3 + DEADLINE_GRACE_S
    return {"url": path, "content": call.image, "params": params, "timeout": timeout,
            "headers": {"Content-Type": call.content_type}}


def _body(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def segment_result(response: httpx.Response, call: SegmentCall) -> Result:
    """The result of a 200, else the typed error (raised)."""
    if response.status_code != 200:
        raise from_http(response.status_code, _body(response), response.headers.get("retry-after"))
    content_type = response.headers.get("content-type", "")
    receipt = Receipt.from_headers(response.headers, call.budget_ms)
    if receipt is not None and call.format in {"json", "rle"} and content_type.startswith("application/json"):
        # These bodies carry the whole receipt (the headers lack knob, task and size).
        document = _body(response)
        if isinstance(document, dict) and isinstance(document.get("receipt"), dict):
            receipt = Receipt.from_dict(document["receipt"])
    return Result(raw=response.content, content_type=content_type, receipt=receipt, format=call.format)


def listing(response: httpx.Response) -> Listing:
    if response.status_code != 200:
        raise from_http(response.status_code, _body(response), response.headers.get("retry-after"))
    try:
        return Listing.from_json(response.json())
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"GET /v1/models answered something that is not a model listing: {exc}") from None


def transport_error(exc: httpx.HTTPError) -> SegservError:
    """A typed error for an HTTP exchange that got no answer."""
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"no answer within the client's timeout ({type(exc).__name__})",
                                code="client_timeout", status=0)
    return ConnectionFailed(f"{type(exc).__name__}: {exc}")
