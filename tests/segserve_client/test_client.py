"""The Python client (`segserve_client`) against a real server, over HTTP and gRPC, blocking and asyncio.

One server for the module with a queue bound of 1 (SEGSERVE_MAX_QUEUE_SIZE=1), so that concurrent requests
get real 429s; the other tests send one request at a time, which such a queue takes. Retry tests use a strict
budget of 1 ms, which no point can meet: a 503 `budget_infeasible` with Retry-After 1 s on every attempt.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from segserve_client import (
    NO_RETRY,
    AsyncClient,
    BadRequest,
    Client,
    ConnectionFailed,
    DeadlineExceeded,
    NotFound,
    Overloaded,
    RetryPolicy,
    SegservError,
    Unavailable,
)
from segserve_client.images import encode_image
from tests.servers import ROOT, ServerProcess, free_port, jpeg_bytes

TRANSPORTS = ("http", "grpc")
INPUT_KINDS = ("path", "bytes", "pil", "array")
HEIGHT, WIDTH = 120, 160
ADE20K_CLASSES = 150


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(env={"SEGSERVE_MAX_QUEUE_SIZE": "1"}, grpc_port=free_port()) as process:
        yield process


def address(server: ServerProcess, transport: str) -> str:
    return server.base_url if transport == "http" else f"grpc://127.0.0.1:{server.grpc_port}"


def client(server: ServerProcess, transport: str, **kwargs: object) -> Client:
    return Client(address(server, transport), trust_env=False, **kwargs)


def async_client(server: ServerProcess, transport: str, **kwargs: object) -> AsyncClient:
    return AsyncClient(address(server, transport), trust_env=False, **kwargs)


def image_of_kind(kind: str, seed: int, tmp_path: Path) -> object:
    data = jpeg_bytes(HEIGHT, WIDTH, seed=seed)
    if kind == "bytes":
        return data
    if kind == "path":
        path = tmp_path / f"image-{seed}.jpg"
        path.write_bytes(data)
        return str(path)
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    return rgb if kind == "pil" else np.asarray(rgb)


def rejected_queue_full(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("segserve_rejected_total{") and 'reason="queue_full"' in line)


def check_result(result: object, budget_ms: float | None) -> None:
    assert result.mask.shape == (HEIGHT, WIDTH) and result.mask.dtype == np.uint8
    assert int(result.mask.max()) < ADE20K_CLASSES
    receipt = result.receipt
    assert receipt.model == "edaformer-t" and receipt.point.startswith("edaformer-t/")
    assert receipt.budget_ms == budget_ms and receipt.cache in {"hit", "miss"}
    assert result.attempts == 1


# ----- input kinds, sync and async, both transports -----


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_sync_segment_takes_every_input_kind(server: ServerProcess, transport: str, kind: str,
                                             tmp_path: Path) -> None:
    seed = 10 + INPUT_KINDS.index(kind) + 10 * TRANSPORTS.index(transport)
    with client(server, transport) as c:
        result = c.segment(image_of_kind(kind, seed, tmp_path), budget_ms=5000)
    check_result(result, 5000.0)
    assert result.receipt.budget_met is not None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_segment_takes_every_input_kind(server: ServerProcess, transport: str, tmp_path: Path) -> None:
    async def run() -> list:
        async with async_client(server, transport) as c:
            results = []
            for index, kind in enumerate(INPUT_KINDS):  # one at a time: the queue holds one request
                image = image_of_kind(kind, 40 + index + 10 * TRANSPORTS.index(transport), tmp_path)
                results.append(await c.segment(image, quality="best"))
            return results

    for result in asyncio.run(run()):
        check_result(result, None)
        assert result.receipt.budget_met is None


def test_arrays_and_pil_images_are_sent_losslessly() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for image in (rgb, Image.fromarray(rgb)):
        data, content_type = encode_image(image)
        assert content_type == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), rgb)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), 3.5])
def test_unsendable_inputs_are_refused_before_sending(bad: object) -> None:
    with Client("http://127.0.0.1:9", trust_env=False, retry=NO_RETRY) as c, pytest.raises((ValueError, TypeError)):
        c.segment(bad)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_format_decodes_to_the_same_class_ids(server: ServerProcess, transport: str) -> None:
    image = jpeg_bytes(HEIGHT, WIDTH, seed=70 + TRANSPORTS.index(transport))
    point = "edaformer-t/1111-111@1"  # explicit: every format is computed at the same point
    with client(server, transport) as c:
        masks = {fmt: c.segment(image, point=point, format=fmt) for fmt in ("png", "color", "json", "rle")}
        overlay = c.segment(image, point=point, format="overlay")
    reference = masks["png"].mask
    for fmt, result in masks.items():
        assert np.array_equal(result.mask, reference), fmt
        assert result.receipt.point == point and result.receipt.plan_reason in {"explicit", "cache"}
    full = masks["json"].receipt  # the JSON formats carry the whole receipt, on HTTP too
    assert (full.task, full.knob, full.height, full.width) == ("ade20k", "isr", HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="overlay"):
        _ = overlay.mask
    assert Image.open(io.BytesIO(overlay.raw)).size == (WIDTH, HEIGHT)


# ----- listing and readiness -----


def test_models_and_ready_agree_across_transports(server: ServerProcess) -> None:
    with client(server, "http") as h, client(server, "grpc") as g:
        assert h.ready() and g.ready()
        over_http, over_grpc = h.models(), g.models()

    async def async_listing() -> object:
        async with async_client(server, "grpc") as c:
            return await c.ready(), await c.models()

    ready, over_async = asyncio.run(async_listing())
    assert ready
    for listing in (over_http, over_grpc, over_async):
        assert listing.default_model == "edaformer-t" and listing.default_task == "ade20k"
        assert listing.tasks == over_http.tasks
        assert [p.name for p in listing.model().points] == [p.name for p in over_http.model().points]
    best = over_http.best_point()
    assert best.name == over_http.ladder()[0].name == "edaformer-t/1111-111@1"
    assert best.latency_ms[1] > 0 and best.quality == max(p.quality for p in over_http.model().points)
    assert over_grpc.best_point().latency_ms.keys() == best.latency_ms.keys()


def test_a_closed_port_is_not_ready_and_fails_after_bounded_attempts() -> None:
    port = free_port()  # nothing listens there
    policy = RetryPolicy(max_attempts=3, backoff_s=0.05)
    with Client(f"http://127.0.0.1:{port}", trust_env=False, retry=policy, timeout_s=5) as c:
        assert not c.ready()
        with pytest.raises(ConnectionFailed) as caught:
            c.segment(jpeg_bytes())
    assert caught.value.attempts == 3 and caught.value.code == "connection_failed"


# ----- typed errors -----

ERRORS = [
    # (kwargs, image, class, code, HTTP status; gRPC: INVALID_ARGUMENT reads as 400, NOT_FOUND as 404)
    ({}, b"not an image at all", BadRequest, "invalid_image", 400),
    ({"model": "no-such-model"}, None, NotFound, "unknown_model", 404),
    ({"point": "edaformer-t/9999-999@1"}, None, BadRequest, "unknown_point", 422),
    ({"quality": "superb"}, None, BadRequest, "invalid_quality", 422),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("kwargs", "image", "cls", "code", "status"), ERRORS)
def test_errors_are_typed_with_the_servers_code(server: ServerProcess, transport: str, kwargs: dict,
                                                image: bytes | None, cls: type, code: str, status: int) -> None:
    with client(server, transport) as c, pytest.raises(cls) as caught:
        c.segment(image or jpeg_bytes(seed=90), **kwargs)
    error = caught.value
    assert error.code == code and error.attempts == 1 and error.message
    assert (error.grpc_code is None) == (transport == "http")
    assert error.status == (status if transport == "http" else cls.status)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_image_type_the_server_does_not_read_is_refused_naming_the_accepted_ones(server: ServerProcess,
                                                                                   transport: str) -> None:
    with client(server, transport) as c, pytest.raises(BadRequest) as caught:
        c.segment(b"GIF89a" + bytes(64))  # sent as application/octet-stream: the server sniffs it
    assert caught.value.code == "invalid_image" and "JPEG, PNG or WebP" in caught.value.message


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_passed_deadline_is_deadline_exceeded_and_not_retried(server: ServerProcess, transport: str) -> None:
    with client(server, transport) as c, pytest.raises(DeadlineExceeded) as caught:
        c.segment(jpeg_bytes(seed=95 + TRANSPORTS.index(transport)), timeout_ms=1)
    assert caught.value.attempts == 1


# ----- retries -----


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retries_honour_retry_after_with_bounded_attempts(server: ServerProcess, transport: str) -> None:
    policy = RetryPolicy(max_attempts=3, max_wait_s=30)
    with client(server, transport, retry=policy) as c:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            c.segment(jpeg_bytes(seed=100), budget_ms=1, strict=True)
        elapsed = time.monotonic() - started
    error = caught.value
    assert error.code == "budget_infeasible" and error.retry_after_s == 1.0  # an idle server: 1 s
    assert error.attempts == 3
    assert elapsed >= error.waited_s >= 2.0  # two sleeps of at least the Retry-After each


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retries_stop_at_the_total_wait_bound_and_the_timeout(server: ServerProcess, transport: str) -> None:
    image = jpeg_bytes(seed=101)
    with client(server, transport, retry=RetryPolicy(max_attempts=50, max_wait_s=1.5)) as c:
        with pytest.raises(Unavailable) as caught:
            c.segment(image, budget_ms=1, strict=True)
        assert caught.value.attempts == 2 and caught.value.waited_s <= 1.5  # a second 1 s sleep would pass 1.5 s
        with pytest.raises(Unavailable) as caught:
            c.segment(image, budget_ms=1, strict=True, timeout_ms=1500)
        # Never a sleep that ends past the call's timeout: at most one (after a first attempt under 0.5 s).
        assert caught.value.attempts <= 2 and caught.value.waited_s < 1.5
    with client(server, transport, retry=NO_RETRY) as c, pytest.raises(Unavailable) as caught:
        c.segment(image, budget_ms=1, strict=True)
    assert caught.value.attempts == 1 and caught.value.waited_s == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_full_queue_is_retried_until_every_request_is_answered(server: ServerProcess, transport: str) -> None:
    """Concurrent requests against a queue of one: refused ones come back after Retry-After and get answered.

    The server's count of queue-full refusals must equal the client's retries, and without retries the
    same burst must surface them as `Overloaded` errors.
    """
    count = 6
    images = [jpeg_bytes(HEIGHT, WIDTH, seed=200 + 50 * TRANSPORTS.index(transport) + i) for i in range(2 * count)]

    async def burst(policy: RetryPolicy, batch: list[bytes]) -> list:
        async with async_client(server, transport, retry=policy) as c:
            return await asyncio.gather(*(c.segment(image, budget_ms=10_000) for image in batch),
                                        return_exceptions=True)

    before = rejected_queue_full(server)
    retried = asyncio.run(burst(RetryPolicy(max_attempts=40, max_wait_s=60), images[:count]))
    after_retried = rejected_queue_full(server)
    failures = [r for r in retried if isinstance(r, BaseException)]
    assert not failures, failures
    assert after_retried - before == sum(r.attempts - 1 for r in retried)

    plain = asyncio.run(burst(NO_RETRY, images[count:]))
    refused = [r for r in plain if isinstance(r, Overloaded)]
    assert all(isinstance(r, Overloaded) or not isinstance(r, SegservError) for r in plain)
    assert rejected_queue_full(server) - after_retried == len(refused)
    assert refused, "six simultaneous requests against a queue of one: some must be refused"
    assert all(r.code == "queue_full" and r.retry_after_s >= 1 and r.attempts == 1 for r in refused)


def test_the_client_imports_none_of_the_servers_dependencies() -> None:
    code = ("import sys, segserve_client; from segserve_client import _grpc; _grpc.stubs(); "
            "heavy = {'torch', 'fastapi', 'onnxruntime', 'uvicorn', 'models', 'cv2', 'pydantic'}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.strip() == "[]"
