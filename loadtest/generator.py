"""Open-loop load generation with segserve's asyncio client (`segserve_client.AsyncClient`), loopback only.

Open loop: every request is sent at its scheduled time whether or not earlier ones have answered, as
independent users do. A closed loop (send the next one when the last answers) hides queueing: the
client slows down exactly when the server does, and the measured latency looks better than users see.

Each step is bounded by its request list (count) and by `duration_s` plus the client timeout. The client sends
without retries and its answers' masks are never decoded; the receipt (point, quality, queue and compute time)
is kept per request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from loadtest.scenarios import RequestFactory, RequestSpec
from segserve_client import NO_RETRY, AsyncClient, ConnectionFailed, Listing, SegservError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class NotLoopback(ValueError):
    """The target is not on this machine: the load generator refuses to send load elsewhere."""


def require_loopback(url: str) -> str:
    """`url` unchanged when its host is a loopback address or localhost, else `NotLoopback`.

    Names other than localhost are refused rather than resolved: a DNS answer can change between the
    check and the connection.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in {"http", "https"} or not host:
        raise NotLoopback(f"{url!r} is not an http(s) URL with a host")
    if host in LOOPBACK_NAMES:
        return url
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise NotLoopback(f"refusing {url!r}: only loopback targets (127.0.0.0/8, ::1, localhost)") from None
    if not address.is_loopback:
        raise NotLoopback(f"refusing {url!r}: {address} is not a loopback address")
    return url


@dataclass
class RequestResult:
    sent_s: float  # relative to the step start
    latency_s: float
    status: int  # HTTP status; 0 = client timeout, -1 = connection error
    budget_ms: float
    size: tuple[int, int]
    repeated: bool
    # From segserve's receipt (None for the plain endpoint, which sends none):
    point: str | None = None
    model: str | None = None
    scale: float | None = None
    quality: float | None = None
    cache: str | None = None  # "hit" / "miss"
    plan: str | None = None  # why the planner chose the point: budget, fallback, quality, explicit, default, cache
    batch_size: int | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    server_budget_met: bool | None = None
    error: str | None = None  # the server's error code (or client_timeout, connection_failed)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def met_budget(self) -> bool:
        """Met its own budget as the client saw it: answered 200 within budget_ms end to end."""
        return self.ok and self.latency_s * 1e3 <= self.budget_ms


CLIENT_TIMEOUT = 0
CONNECTION_ERROR = -1

# Keyword arguments of `AsyncClient.segment` for a request: segserve gets its budget (and, for the fixed-point
# baseline, the point); the plain endpoint ignores the query parameters.
ParamsFn = Callable[[RequestSpec], dict[str, Any]]


def budget_params(spec: RequestSpec) -> dict[str, Any]:
    return {"budget_ms": round(spec.budget_ms, 1)}


def fixed_point_params(point: str) -> ParamsFn:
    return lambda spec: {"budget_ms": round(spec.budget_ms, 1), "point": point}


async def send_one(client: AsyncClient, spec: RequestSpec, params: dict[str, Any], started: float) -> RequestResult:
    sent = time.perf_counter()
    result = RequestResult(sent - started, 0.0, CLIENT_TIMEOUT, spec.budget_ms, spec.size, spec.repeated)
    try:
        answer = await client.segment(spec.image, **params)  # the mask is never decoded: no client CPU spent
    except SegservError as exc:
        if exc.code == "client_timeout":
            result.status = CLIENT_TIMEOUT
        elif isinstance(exc, ConnectionFailed):
            result.status = CONNECTION_ERROR
        else:
            result.status = exc.status
        result.error = exc.code
    else:
        result.status = 200
        receipt = answer.receipt
        if receipt is not None:
            result.point, result.model, result.scale = receipt.point, receipt.model, receipt.scale
            result.quality, result.cache, result.plan = receipt.quality, receipt.cache, receipt.plan_reason
            result.batch_size, result.queue_ms = receipt.batch_size, receipt.queue_ms
            result.compute_ms, result.server_budget_met = receipt.compute_ms, receipt.budget_met
    result.latency_s = time.perf_counter() - sent
    return result


def make_client(base_url: str, timeout_s: float, max_connections: int = 2048) -> AsyncClient:
    # Open loop needs a connection per outstanding request; a small pool would queue requests inside the
    # client and hide server-side queueing. No retries: a refusal is a result, not something to hide.
    return AsyncClient(require_loopback(base_url), retry=NO_RETRY, timeout_s=timeout_s, trust_env=False,
                       max_connections=max_connections)


async def run_open_loop(base_url: str, specs: list[RequestSpec], *, params: ParamsFn = budget_params,
                        timeout_s: float = 5.0) -> tuple[list[RequestResult], float]:
    """Send every spec at its `at_s`; returns the results (in send order) and the step's wall time."""
    async with make_client(base_url, timeout_s) as client:
        started = time.perf_counter()
        tasks: list[asyncio.Task[RequestResult]] = []
        for spec in specs:
            delay = started + spec.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_one(client, spec, params(spec), started)))
        results = list(await asyncio.gather(*tasks))
        wall_s = time.perf_counter() - started
    return results, wall_s


async def run_closed_loop(base_url: str, factory: RequestFactory, *, concurrency: int, duration_s: float,
                          params: ParamsFn, timeout_s: float = 10.0) -> tuple[list[RequestResult], float]:
    """`concurrency` users each sending fresh images back to back for `duration_s` (capacity probes)."""
    results: list[RequestResult] = []
    async with make_client(base_url, timeout_s) as client:
        started = time.perf_counter()
        stop_at = started + duration_s

        async def user() -> None:
            while time.perf_counter() < stop_at:
                spec = factory.fresh()
                results.append(await send_one(client, spec, params(spec), started))

        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return results, wall_s


async def get_listing(base_url: str, timeout_s: float = 30.0) -> Listing:
    """GET /v1/models through the client's typed listing."""
    async with make_client(base_url, timeout_s, max_connections=1) as client:
        return await client.models()


async def get_json(base_url: str, path: str, timeout_s: float = 30.0) -> dict:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(require_loopback(base_url.rstrip("/")) + path, timeout=timeout_s)
        response.raise_for_status()
        return response.json()


async def get_text(base_url: str, path: str, timeout_s: float = 10.0) -> str:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(require_loopback(base_url.rstrip("/")) + path, timeout=timeout_s)
        response.raise_for_status()
        return response.text
