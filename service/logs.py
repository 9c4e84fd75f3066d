"""One log format for the whole process: segserve's loggers, uvicorn's and the per-call lines of both transports.

`configure(settings)` installs a single stderr handler on the root logger, plain text or JSON lines
(`SEGSERVE_LOG_FORMAT=plain|json`), and makes uvicorn's loggers propagate to it instead of printing in their
own format. uvicorn's access log is turned off (`UVICORN_LOG_SETTINGS`): `AccessLogMiddleware` writes one line per
HTTP request instead, with what uvicorn's line lacks (duration, the operating point that answered), in the same
shape as the gRPC call log (`service.grpc.logging_interceptor`). Both go to the logger `segserve.access` and skip
health probes and metric scrapes unless `SEGSERVE_LOG_PROBES=true`: a kubelet polling /readyz every few seconds
would otherwise bury the requests.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from service.settings import Settings

ACCESS_LOGGER = "segserve.access"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Liveness, readiness and scrape endpoints of both APIs (segserve's and the Open Inference Protocol's).
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
PROBE_GRPC_METHODS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
})
MAX_TARGET_CHARS = 300  # a request target longer than this is cut in the log line (query strings are unbounded)
# uvicorn.Config arguments: no logging config of its own (ours is installed), no access log (ours replaces it).
UVICORN_LOG_SETTINGS: dict[str, Any] = {"log_config": None, "access_log": False}

# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON object,
# except uvicorn's `color_message` (the message again, with terminal colour codes).
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}

access_log = logging.getLogger(ACCESS_LOGGER)


class PlainFormatter(logging.Formatter):
    """`2025-01-31T12:00:00.123Z INFO name: message`: UTC with milliseconds, like the JSON lines."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's `extra` fields, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure(settings: Settings) -> None:
    """Route every logger of the process through one stderr handler in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn installs handlers of its own when given a log config; with log_config=None it still may have
    # been configured by an earlier call in the same process (tests): let everything reach the root handler.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access_log.disabled = not settings.log_access
    logging.captureWarnings(True)  # warnings.warn from libraries in the same format, not raw on stderr


def log_call(transport: str, method: str, status: str, duration_s: float, point: str, peer: str,
             path: str | None = None) -> None:
    """The one access line per HTTP request or gRPC call, in the same shape for both transports:

    `http POST /v1/segment?latency_budget_ms=200 200 812.4ms point=edaformer-t/2211-222@0.75 peer=127.0.0.1:5312`
    `grpc /segserve.v1.Segmentation/Segment OK 790.1ms point=edaformer-t/1111-111@1 peer=ipv4:127.0.0.1:5318`
    """
    duration_ms = round(duration_s * 1e3, 3)
    fields: dict[str, Any] = {"transport": transport, "method": method}
    if path is not None:
        path = path if len(path) <= MAX_TARGET_CHARS else path[:MAX_TARGET_CHARS] + "..."
        fields["path"] = path
    fields.update({"status": status, "duration_ms": duration_ms, "point": point, "peer": peer})
    what = f"{method} {path}" if path is not None else method
    access_log.info("%s %s %s %.1fms point=%s peer=%s", transport, what, status, duration_ms, point or "-",
                    peer or "-", extra=fields)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AccessLogMiddleware:
    """Pure ASGI: one `segserve.access` line per HTTP request, written when the response has been sent.

    Probes are passed through unlogged unless `log_probes`. The operating point is read from the receipt's
    `X-Segserve-Point` header, so a pool request logs the model and point that really answered.
    """

    def __init__(self, app: ASGIApp, *, log_probes: bool = False) -> None:
        self.app = app
        self.log_probes = log_probes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (not self.log_probes and scope.get("path") in PROBE_PATHS):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        seen: dict[str, Any] = {"status": None, "point": ""}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-segserve-point":
                        seen["point"] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # No response started: the app raised (uvicorn answers 500) or the client left first.
            status = seen["status"] if seen["status"] is not None else 500
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope.get("path", "") + (f"?{query}" if query else "")
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else ""
            log_call("http", scope.get("method", ""), str(status), time.perf_counter() - start, seen["point"],
                     peer, path=target)
