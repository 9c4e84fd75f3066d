"""`Client` (blocking) and `AsyncClient` (asyncio): segment images, list models, check readiness.

    from segserve_client import Client
    with Client("http://127.0.0.1:8080") as client:           # or Client("127.0.0.1:50051", transport="grpc")
        result = client.segment("photo.jpg", budget_ms=800)
        result.mask                                             # (H, W) class ids
        result.receipt.point, result.receipt.budget_met         # what ran, and whether it was in time

Refusals for load (429 and 503; gRPC RESOURCE_EXHAUSTED and UNAVAILABLE) are retried after the server's
Retry-After (or an exponential backoff when it sends none), at most `RetryPolicy.max_attempts` times in all and
never sleeping more than `RetryPolicy.max_wait_s` in total, nor past the call's `timeout_ms`; each attempt
carries the same budget. Everything else raises its typed `SegservError` at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Literal

import httpx

from segserve_client import _http
from segserve_client.calls import SegmentCall, make_call
from segserve_client.errors import SegservError
from segserve_client.images import ImageInput
from segserve_client.results import Listing, Result

Transport = Literal["http", "grpc"]
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """How refusals for load are retried. `RetryPolicy(max_attempts=1)` (or `NO_RETRY`) never retries."""

    max_attempts: int = 4  # requests in all, the first included
    max_wait_s: float = 10.0  # total sleep between attempts
    backoff_s: float = 0.2  # first delay when the server sends no Retry-After; doubles per retry
    max_backoff_s: float = 5.0
    # Up to this fraction is added to each delay at random, so that clients refused together do not all come
    # back in the same instant; only added, so a Retry-After is always honoured.
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 100:
            raise ValueError(f"max_attempts must be in [1, 100], got {self.max_attempts}")
        if not 0 <= self.max_wait_s <= 3600 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("max_wait_s must be in [0, 3600] and the backoffs non-negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay_s(self, error: SegservError, attempt: int) -> float:
        """The sleep before attempt `attempt + 1`: the server's Retry-After, else the backoff."""
        if error.retry_after_s is not None:
            base = error.retry_after_s
        else:
            base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (1 + random.uniform(0, self.jitter))


NO_RETRY = RetryPolicy(max_attempts=1, max_wait_s=0.0)


class _Retrier:
    """The retry decisions, shared by the blocking and the asyncio loop."""

    def __init__(self, policy: RetryPolicy, timeout_ms: float | None) -> None:
        self.policy = policy
        self.waited_s = 0.0
        self.deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1e3

    def next_delay(self, error: SegservError, attempt: int) -> float | None:
        """Seconds to sleep before retrying, or None to give up (and raise `error`)."""
        error.attempts = attempt
        error.waited_s = self.waited_s
        if not error.retryable or attempt >= self.policy.max_attempts:
            return None
        delay = self.policy.delay_s(error, attempt)
        if self.waited_s + delay > self.policy.max_wait_s:
            return None
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        self.waited_s += delay
        return delay

    def call_for_retry(self, call: SegmentCall) -> SegmentCall:
        """The timeout shrinks to what is left of the first attempt's; the budget stays."""
        if self.deadline is None:
            return call
        return call.with_timeout(max(1.0, (self.deadline - time.monotonic()) * 1e3))


def _transport_of(address: str, transport: Transport | None) -> Transport:
    if transport is not None:
        if transport not in ("http", "grpc"):
            raise ValueError(f"transport must be 'http' or 'grpc', got {transport!r}")
        return transport
    if address.startswith(("http://", "https://")):
        return "http"
    if address.startswith("grpc://"):
        return "grpc"
    raise ValueError(f"cannot tell the transport of {address!r}: use an http:// or grpc:// address, "
                     "or pass transport='http' or 'grpc'")


def _auth_headers(api_key: str | None) -> dict[str, str]:
    """The bearer token of a server with API keys (`api_key=`); nothing without one."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class _Base:
    def __init__(self, address: str, transport: Transport | None, retry: RetryPolicy | None,
                 timeout_s: float | None) -> None:
        self.transport = _transport_of(address, transport)
        if self.transport == "http" and "://" not in address:
            address = f"http://{address}"  # "host:port" with transport="http"
        self.address = address.rstrip("/")
        self.retry = retry if retry is not None else RetryPolicy()
        self.timeout_s = timeout_s


class Client(_Base):
    """A blocking client over HTTP (`http://host:port`) or gRPC (`grpc://host:port`, or transport='grpc');
    `api_key` for a server that asks for one (sent as `Authorization: Bearer`, on gRPC as metadata)."""

    def __init__(self, address: str, *, transport: Transport | None = None, retry: RetryPolicy | None = None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, trust_env: bool = True,
                 api_key: str | None = None) -> None:
        super().__init__(address, transport, retry, timeout_s)
        if self.transport == "http":
            self._http = httpx.Client(base_url=self.address, timeout=timeout_s, trust_env=trust_env,
                                      headers=_auth_headers(api_key))
        else:
            from segserve_client._grpc import GrpcSync

            self._grpc = GrpcSync(self.address, api_key)

    def segment(self, image: ImageInput, budget_ms: float | None = None, quality: str | float | None = None,
                model: str | None = None, task: str | None = None, point: str | None = None,
                level: str | None = None, timeout_ms: float | None = None, format: str = "png",
                strict: bool = False) -> Result:
        """Segment one image; see the module docstring for retries. Raises a `SegservError` subclass."""
        call = make_call(image, budget_ms=budget_ms, quality=quality, model=model, task=task, point=point,
                          level=level, timeout_ms=timeout_ms, format=format, strict=strict)
        retrier = _Retrier(self.retry, call.timeout_ms)
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._segment_once(call)
            except SegservError as error:
                delay = retrier.next_delay(error, attempt)
                if delay is None:
                    raise
                time.sleep(delay)
                call = retrier.call_for_retry(call)
                continue
            result.attempts = attempt
            return result

    def _segment_once(self, call: SegmentCall) -> Result:
        if self.transport == "grpc":
            return self._grpc.segment(call)
        request = _http.segment_request(call, self.timeout_s)
        try:
            response = self._http.post(**request)
        except httpx.HTTPError as exc:
            raise _http.transport_error(exc) from None
        return _http.segment_result(response, call)

    def models(self) -> Listing:
        """The served models, their operating points and the ladders."""
        if self.transport == "grpc":
            return self._grpc.models(self.timeout_s)
        try:
            return _http.listing(self._http.get("/v1/models"))
        except httpx.HTTPError as exc:
            raise _http.transport_error(exc) from None

    def ready(self) -> bool:
        """Whether the server takes requests now (GET /readyz, or gRPC health SERVING)."""
        if self.transport == "grpc":
            return self._grpc.ready(self.timeout_s)
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        if self.transport == "grpc":
            self._grpc.close()
        else:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client; the same methods as `Client`, awaited. `max_connections` bounds concurrent requests."""

    def __init__(self, address: str, *, transport: Transport | None = None, retry: RetryPolicy | None = None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, trust_env: bool = True,
                 max_connections: int = 100, api_key: str | None = None) -> None:
        super().__init__(address, transport, retry, timeout_s)
        if self.transport == "http":
            limits = httpx.Limits(max_connections=max_connections,
                                  max_keepalive_connections=min(max_connections, 256))
            self._http = httpx.AsyncClient(base_url=self.address, timeout=timeout_s, trust_env=trust_env,
                                           limits=limits, headers=_auth_headers(api_key))
        else:
            from segserve_client._grpc import GrpcAsync

            self._grpc = GrpcAsync(self.address, api_key)

    async def segment(self, image: ImageInput, budget_ms: float | None = None,
                      quality: str | float | None = None, model: str | None = None, task: str | None = None,
                      point: str | None = None, level: str | None = None, timeout_ms: float | None = None,
                      format: str = "png", strict: bool = False) -> Result:
        call = make_call(image, budget_ms=budget_ms, quality=quality, model=model, task=task, point=point,
                          level=level, timeout_ms=timeout_ms, format=format, strict=strict)
        retrier = _Retrier(self.retry, call.timeout_ms)
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._segment_once(call)
            except SegservError as error:
                delay = retrier.next_delay(error, attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                call = retrier.call_for_retry(call)
                continue
            result.attempts = attempt
            return result

    async def _segment_once(self, call: SegmentCall) -> Result:
        if self.transport == "grpc":
            return await self._grpc.segment(call)
        request = _http.segment_request(call, self.timeout_s)
        try:
            response = await self._http.post(**request)
        except httpx.HTTPError as exc:
            raise _http.transport_error(exc) from None
        return _http.segment_result(response, call)

    async def models(self) -> Listing:
        if self.transport == "grpc":
            return await self._grpc.models(self.timeout_s)
        try:
            return _http.listing(await self._http.get("/v1/models"))
        except httpx.HTTPError as exc:
            raise _http.transport_error(exc) from None

    async def ready(self) -> bool:
        if self.transport == "grpc":
            return await self._grpc.ready(self.timeout_s)
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        if self.transport == "grpc":
            await self._grpc.close()
        else:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

