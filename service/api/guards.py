"""Optional API keys, per-client rate limits, CORS and a separate ops port, in front of the HTTP API.

Keys come from `SEGSERVE_API_KEYS` (comma-separated plain keys) and/or `SEGSERVE_API_KEYS_FILE` (one SHA-256 hex
digest of a key per line, an optional label after it; `#` comments). A client sends `Authorization: Bearer <key>`
(gRPC: the metadata `authorization: Bearer <key>`, see `service.grpc.guards`). Only digests are kept, and a
presented key's digest is compared with every stored one in constant time. `SEGSERVE_AUTH`: `auto` (the default)
requires a key when keys are configured, `on` refuses to start without keys, `off` never asks.

Open whatever the setting: the probes and the scrape (/healthz, /readyz, /metrics, /v2/health/live and
/v2/health/ready: a kubelet or Prometheus has no key) and the public pages (/, /demo, /docs, /redoc,
/openapi.json: static documents, no model work). With `SEGSERVE_OPS_PORT`, /healthz, /readyz and /metrics are
served on that port only (and only they are), so that the API port can be exposed while the ops port is not.

The rate limit is a token bucket per key (per client address when no key is asked for), shared by both
transports: `SEGSERVE_RATE_LIMIT_RPS` tokens a second up to `SEGSERVE_RATE_LIMIT_BURST`; past it, 429 with
`Retry-After` (seconds until a token) and code `rate_limited`. At most `MAX_CLIENTS` buckets are kept (least
recently used dropped), so memory stays bounded whatever the number of clients.

Errors use the documented shape `{"error": {"code", "message"}}`, and the Open Inference Protocol's
`{"error": "..."}` on its `/v2` routes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from service.logs import ASGIApp, Message, Receive, Scope, Send
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_KEYS = 10_000  # keys in all (variable and file): each request compares its digest with every one
MAX_KEY_FILE_BYTES = 4 * 1024 * 1024
MAX_CLIENTS = 10_000  # token buckets kept; an evicted client starts again with a full bucket
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/", "/demo", "/docs", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/demo/", "/docs/")
DIGEST = re.compile(r"[0-9a-f]{64}")
# What a browser may send cross-origin: the bearer token, the body's type and segserve's and the protocol's headers.
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "X-Latency-Budget-Ms", "X-Request-Timeout-Ms",
                        "Inference-Header-Content-Length"]
EXPOSED_ALWAYS = ("Retry-After", "WWW-Authenticate", "Server-Timing", "Inference-Header-Content-Length")


class GuardConfigError(ValueError):
    """A user error in the guard settings (no keys with auth=on, a bad key file, an ops port that is taken)."""


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, for either transport."""

    status: int  # 401 or 429
    code: str  # unauthorized or rate_limited
    message: str
    retry_after_s: int | None = None
    challenge: str | None = None  # the WWW-Authenticate value of a 401


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_key_file(path: str) -> list[bytes]:
    """The digests of a key file: one SHA-256 hex digest per line (e.g. `printf %s KEY | sha256sum`), an optional
    label after it, blank lines and `#` comments ignored. Raises GuardConfigError naming the bad line."""
    file = Path(path).expanduser()
    try:
        if file.stat().st_size > MAX_KEY_FILE_BYTES:
            raise GuardConfigError(f"API key file {path} is over {MAX_KEY_FILE_BYTES} bytes")
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GuardConfigError(f"cannot read the API key file {path}: {exc}") from None
    digests = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not DIGEST.fullmatch(words[0].lower()):
            raise GuardConfigError(f"{path}:{number}: expected the SHA-256 hex digest of a key (64 hex digits), "
                                   f"not a plain key; make one with: printf %s \"$KEY\" | sha256sum")
        digests.append(bytes.fromhex(words[0]))
    return digests


def configured_digests(settings: Settings) -> list[bytes]:
    """Every configured key's digest (the variable's and the file's, deduplicated)."""
    plain = settings.api_keys.get_secret_value() if settings.api_keys is not None else ""
    digests = [digest_of(key.strip()) for key in plain.split(",") if key.strip()]
    if settings.api_keys_file and settings.api_keys_file.strip():
        digests += read_key_file(settings.api_keys_file.strip())
    unique = list(dict.fromkeys(digests))
    if len(unique) > MAX_KEYS:
        raise GuardConfigError(f"{len(unique)} API keys configured; at most {MAX_KEYS} are supported")
    return unique


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenBuckets:
    """Token buckets by client identity: `rate` tokens a second up to `burst`, at most `max_clients` kept."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_clients, self.clock = rate, float(burst), max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # identity -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, identity: str) -> float:
        """Take a token: 0 when there was one, else the seconds until there is one (nothing taken)."""
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.pop(identity, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[identity] = (tokens - 1 if wait == 0 else tokens, now)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait

    def __len__(self) -> int:
        return len(self._buckets)


class Guard:
    """The transport-neutral decision: is this call authenticated, and within its client's rate?"""

    def __init__(self, digests: list[bytes] | None, buckets: TokenBuckets | None) -> None:
        self.digests = digests  # None: no key is asked for
        self.buckets = buckets

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        digests = configured_digests(settings)
        if settings.auth == "on" and not digests:
            raise GuardConfigError("auth is on but no API key is configured: set SEGSERVE_API_KEYS (comma-separated "
                                   "keys) or SEGSERVE_API_KEYS_FILE (SHA-256 digests, one a line)")
        required = settings.auth == "on" or (settings.auth == "auto" and bool(digests))
        buckets = None
        if settings.rate_limit_rps > 0:
            burst = settings.rate_limit_burst or max(1, math.ceil(settings.rate_limit_rps))
            buckets = TokenBuckets(settings.rate_limit_rps, burst)
        return cls(digests if required else None, buckets)

    @property
    def active(self) -> bool:
        return self.digests is not None or self.buckets is not None

    def matches(self, key: str) -> bool:
        presented = digest_of(key)
        found = False
        for stored in self.digests or ():  # every digest compared, in constant time: no early exit to time
            found |= hmac.compare_digest(presented, stored)
        return found

    def check(self, authorization: str | None, client: str) -> tuple[Refusal | None, str]:
        """(the refusal or None, the caller's identity) for a call with this Authorization value."""
        identity = f"address {client}"
        if self.digests is not None:
            scheme, _, key = (authorization or "").strip().partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                return Refusal(401, "unauthorized", "an API key is required: send the header "
                               "'Authorization: Bearer <key>'", challenge='Bearer realm="segserve"'), identity
            if not self.matches(key.strip()):
                return Refusal(401, "unauthorized", "the API key is not valid",
                               challenge='Bearer realm="segserve", error="invalid_token"'), identity
            identity = "key " + digest_of(key.strip()).hex()[:16]
        if self.buckets is not None:
            wait = self.buckets.take(identity)
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                return Refusal(429, "rate_limited", f"rate limit of {self.buckets.rate:g} requests a second "
                               f"(burst {self.buckets.burst:g}) reached; retry in {seconds} s",
                               retry_after_s=seconds), identity
        return None, identity


def refusal_response(refusal: Refusal, oip: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of an HTTP refusal; the Open Inference Protocol's error shape on its routes."""
    error: Any = refusal.message if oip else {"code": refusal.code, "message": refusal.message}
    headers = [(b"content-type", b"application/json")]
    if refusal.challenge:
        headers.append((b"www-authenticate", refusal.challenge.encode()))
    if refusal.retry_after_s is not None:
        headers.append((b"retry-after", str(refusal.retry_after_s).encode()))
    return refusal.status, headers, json.dumps({"error": error}).encode()


class GuardMiddleware:
    """Pure ASGI: the ops port split, then the key and the rate limit for everything that is not open."""

    def __init__(self, app: ASGIApp, *, guard: Guard, ops_port: int | None, expose: bool) -> None:
        self.app, self.guard, self.ops_port, self.expose = app, guard, ops_port, expose

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if self.ops_port is not None:
            on_ops_port = (scope.get("server") or ("", None))[1] == self.ops_port
            if on_ops_port != (path in OPS_PATHS):
                message = ("the ops port serves only /healthz, /readyz and /metrics" if on_ops_port
                           else f"{path} is served on the ops port ({self.ops_port})")
                await self._answer(send, 404, [(b"content-type", b"application/json")], json.dumps(
                    {"error": {"code": "not_found", "message": message}}).encode())
                return
        if path in OPS_PATHS or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or not self.guard.active:
            await self.app(scope, receive, self._exposing(scope, send))
            return
        headers = dict(scope.get("headers") or ())
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        client = (scope.get("client") or ("unknown", 0))[0]
        refusal, _ = self.guard.check(authorization, client)
        if refusal is not None:
            status, response_headers, body = refusal_response(refusal, oip=path.startswith("/v2"))
            await self._answer(self._exposing(scope, send), status, response_headers, body)
            return
        await self.app(scope, receive, self._exposing(scope, send))

    @staticmethod
    async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _exposing(self, scope: Scope, send: Send) -> Send:
        """With CORS on, a cross-origin answer names its own X-Segserve-* headers as readable: the receipt's
        names vary (one per statistic), and CORS has no pattern for them."""
        if not self.expose or not any(name == b"origin" for name, _ in scope.get("headers") or ()):
            return send

        async def send_exposed(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = [name.decode("latin-1") for name, _ in message.get("headers", ())
                         if name.lower().startswith(b"x-segserve-")]
                exposed = ", ".join([*EXPOSED_ALWAYS, *names]).encode()
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"access-control-expose-headers", exposed)]}
            await send(message)

        return send_exposed


def install(app: FastAPI, settings: Settings) -> Guard:
    """Add the guard (and CORS, outside it, so that refusals carry CORS headers too) to the app; the Guard is
    kept as `app.state.guard` so that gRPC shares its buckets. Raises GuardConfigError."""
    guard = Guard.from_settings(settings)
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if guard.active or settings.ops_port is not None or origins:  # by default nothing is added: no cost
        app.add_middleware(GuardMiddleware, guard=guard, ops_port=settings.ops_port, expose=bool(origins))
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=CORS_REQUEST_HEADERS, max_age=600)
    app.state.guard = guard
    if guard.active:
        _document(app, guard)
    if guard.digests is None and not is_loopback(settings.host):
        log.warning("serving %s without API keys on %s: anyone who reaches the port can use it (set "
                    "SEGSERVE_API_KEYS or SEGSERVE_API_KEYS_FILE, and SEGSERVE_AUTH=on)",
                    "HTTP and gRPC" if settings.grpc_port is not None else "HTTP", settings.host)
    return guard


def _document(app: FastAPI, guard: Guard) -> None:
    """The OpenAPI document says which operations need the key (so /docs offers "Authorize") and that they may
    answer 401 and 429."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI's, cached after the first call; what follows is idempotent
        components = schema.setdefault("components", {})
        if guard.digests is not None:
            components.setdefault("securitySchemes", {})["apiKey"] = {
                "type": "http", "scheme": "bearer", "description": "An API key: 'Authorization: Bearer <key>'."}
        error = ({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
                 if "ErrorBody" in components.get("schemas", {}) else {})
        for path, operations in schema.get("paths", {}).items():
            if path in OPS_PATHS or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
                continue
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if guard.digests is not None:
                    operation["security"] = [{"apiKey": []}]
                    responses.setdefault("401", {"description": "No API key, or not a valid one.",
                                                 **({} if path.startswith("/v2") else error)})
                if guard.buckets is not None:
                    responses.setdefault("429", {"description": "Over the client's rate limit (rate_limited).",
                                                 **({} if path.startswith("/v2") else error)})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def listen_sockets(settings: Settings) -> list[socket.socket] | None:
    """With an ops port, the API's and the ops port's listening sockets for uvicorn; None otherwise (uvicorn binds
    the API port itself, as without this module). Raises GuardConfigError when a port cannot be bound."""
    if settings.ops_port is None:
        return None
    if settings.ops_port == settings.port:
        raise GuardConfigError(f"the ops port must differ from the API port ({settings.port})")
    sockets: list[socket.socket] = []
    for port in (settings.port, settings.ops_port):
        sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
        try:
            sock.bind((settings.host, port))
        except OSError as exc:
            sock.close()
            for bound in sockets:
                bound.close()
            raise GuardConfigError(f"cannot listen on {settings.host}:{port}: {exc.strerror or exc}") from None
        sock.set_inheritable(True)
        sockets.append(sock)
    log.info("HTTP API on %s:%d, /healthz /readyz /metrics on %s:%d", settings.host, sockets[0].getsockname()[1],
             settings.host, settings.ops_port)
    return sockets
