"""Open-loop load generation with asyncio + httpx, against loopback servers only.

Open loop: every request is sent at its scheduled time whether or not earlier ones have answered, as
independent users do. A closed loop (send the next one when the last answers) hides queueing: the
client slows down exactly when the server does, and the measured latency looks better than users see.

Each step is bounded by its request list (count) and by `duration_s` plus the client timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from loadtest.scenarios import RequestFactory, RequestSpec

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
    level: str | None = None
    cache: str | None = None  # "hit" / "miss" (segserve only)
    plan: str | None = None  # why the planner chose the level: budget, fallback, quality, explicit, default
    batch_size: int | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    server_budget_met: bool | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def met_budget(self) -> bool:
        """Met its own budget as the client saw it: answered 200 within budget_ms end to end."""
        return self.ok and self.latency_s * 1e3 <= self.budget_ms


CLIENT_TIMEOUT = 0
CONNECTION_ERROR = -1

# Query parameters for a request: segserve gets its budget; the plain endpoint ignores extra parameters.
ParamsFn = Callable[[RequestSpec], dict[str, str]]


def budget_params(spec: RequestSpec) -> dict[str, str]:
    return {"latency_budget_ms": f"{spec.budget_ms:.1f}"}


def _float(headers: httpx.Headers, name: str) -> float | None:
    value = headers.get(name)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def send_one(client: httpx.AsyncClient, url: str, spec: RequestSpec, params: dict[str, str],
                   started: float, timeout_s: float) -> RequestResult:
    sent = time.perf_counter()
    result = RequestResult(sent - started, 0.0, CLIENT_TIMEOUT, spec.budget_ms, spec.size, spec.repeated)
    try:
        response = await client.post(url, content=spec.image, params=params,
                                     headers={"Content-Type": "image/jpeg"}, timeout=timeout_s)
    except httpx.TimeoutException:
        result.status = CLIENT_TIMEOUT
    except httpx.TransportError:
        result.status = CONNECTION_ERROR
    else:
        headers = response.headers
        result.status = response.status_code
        result.level = headers.get("x-segserve-level")
        result.cache = headers.get("x-segserve-cache")
        result.plan = headers.get("x-segserve-plan")
        batch = headers.get("x-segserve-batch-size")
        result.batch_size = int(batch) if batch and batch.isdigit() else None
        result.queue_ms = _float(headers, "x-segserve-queue-ms")
        result.compute_ms = _float(headers, "x-segserve-compute-ms")
        met = headers.get("x-segserve-budget-met")
        result.server_budget_met = None if met is None else met == "true"
    result.latency_s = time.perf_counter() - sent
    return result


def make_client(max_connections: int = 2048) -> httpx.AsyncClient:
    # Open loop needs a connection per outstanding request; httpx's default pool (100) would queue
    # requests inside the client and hide server-side queueing.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=256)
    return httpx.AsyncClient(limits=limits, trust_env=False)


async def run_open_loop(base_url: str, specs: list[RequestSpec], *, params: ParamsFn = budget_params,
                        timeout_s: float = 5.0, path: str = "/v1/segment") -> tuple[list[RequestResult], float]:
    """Send every spec at its `at_s`; returns the results (in send order) and the step's wall time."""
    url = require_loopback(base_url.rstrip("/")) + path
    async with make_client() as client:
        started = time.perf_counter()
        tasks: list[asyncio.Task[RequestResult]] = []
        for spec in specs:
            delay = started + spec.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_one(client, url, spec, params(spec), started, timeout_s)))
        results = list(await asyncio.gather(*tasks))
        wall_s = time.perf_counter() - started
    return results, wall_s


async def run_closed_loop(base_url: str, factory: RequestFactory, *, concurrency: int, duration_s: float,
                          params: ParamsFn, timeout_s: float = 10.0,
                          path: str = "/v1/segment") -> tuple[list[RequestResult], float]:
    """`concurrency` users each sending fresh images back to back for `duration_s` (capacity probes)."""
    url = require_loopback(base_url.rstrip("/")) + path
    results: list[RequestResult] = []
    async with make_client() as client:
        started = time.perf_counter()
        stop_at = started + duration_s

        async def user() -> None:
            while time.perf_counter() < stop_at:
                spec = factory.fresh()
                results.append(await send_one(client, url, spec, params(spec), started, timeout_s))

        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return results, wall_s


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
