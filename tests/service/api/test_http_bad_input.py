"""Bad input through a real server: each case is a JSON error with the right status and a message naming the
problem, and the very next good request is served as usual.

Most cases run on the session's `live_server` (default limits: 20 MB bodies, 40 megapixels, 32-pixel sides);
the body-size limit is checked on a server with a small `SEGSERVE_MAX_BODY_BYTES`.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from models import LADDER
from models.datasets import dataset_for
from models.predict import network_input_size
from tests.servers import FAST_SETTINGS, ServerProcess, jpeg_bytes

CHEAPEST = "2222-222"
_good_seeds = itertools.count(20_000)


def post(server: ServerProcess, body: bytes, content_type: str | None = "image/jpeg", headers: dict | None = None,
         **params: object) -> httpx.Response:
    headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return httpx.post(f"{server.base_url}/v1/segment", content=body, params=params, headers=headers, timeout=120)


def assert_error(response: httpx.Response, status: int, code: str, *mentions: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in mentions:
        assert word.lower() in error["message"].lower(), (word, error["message"])


def assert_still_serves(server: ServerProcess) -> None:
    """A good request (an image never sent before, so it really runs the model) right after the bad one."""
    image = jpeg_bytes(48, 64, seed=next(_good_seeds))
    response = post(server, image, level=CHEAPEST)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (64, 48)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def photo(height: int = 64, width: int = 80) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes(height, width, seed=7))).convert("RGB")


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG of width x height black pixels (1 bit each) in a few tens of kB: decoded, it would take
    hundreds of MB (more as RGB). Built chunk by chunk, never holding the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    block = row * rows_per_block
    data = b"".join(compressor.compress(block) for _ in range(height // rows_per_block))
    data += compressor.compress(row * (height % rows_per_block)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def peak_rss_mb(server: ServerProcess) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


# ----- the body -----

def test_empty_body(live_server) -> None:
    assert_error(post(live_server, b""), 400, "empty_body", "empty")
    assert_still_serves(live_server)


@pytest.mark.parametrize("body", [b"this is plain text, not an image at all", bytes(range(256)) * 4,
                                  b"\xff\xd8\xff\xe0 a JPEG signature and nothing else"])
def test_bytes_that_are_not_an_image(live_server, body: bytes) -> None:
    assert_error(post(live_server, body), 400, "invalid_image", "image")
    assert_still_serves(live_server)


def test_a_png_with_a_malformed_header_chunk(live_server) -> None:
    """Pillow raises ValueError (not OSError) on an IHDR chunk shorter than 13 bytes: still a 400, not a 500."""
    png = bytearray(encoded(photo(), "PNG"))
    assert png[12:16] == b"IHDR"
    png[8:12] = struct.pack(">I", 7)
    assert_error(post(live_server, bytes(png), "image/png"), 400, "invalid_image", "IHDR")
    assert_still_serves(live_server)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image(live_server, fmt: str) -> None:
    whole = encoded(photo(), fmt) if fmt == "PNG" else jpeg_bytes(64, 80, seed=8)
    cut = whole[: len(whole) // 2]
    Image.open(io.BytesIO(cut))  # the header alone still reads: the problem is only found when decoding
    content_type = "image/png" if fmt == "PNG" else "image/jpeg"
    assert_error(post(live_server, cut, content_type), 400, "truncated_image", "truncated", fmt)
    assert_still_serves(live_server)


@pytest.mark.parametrize(("fmt", "content_type"), [
    ("GIF", "application/octet-stream"), ("BMP", "image/jpeg"), ("TIFF", None),
])
def test_an_unsupported_image_format(live_server, fmt: str, content_type: str | None) -> None:
    body = encoded(photo(), fmt)
    assert_error(post(live_server, body, content_type), 415, "unsupported_format", fmt)
    assert_still_serves(live_server)


@pytest.mark.parametrize("content_type", ["text/plain", "image/gif", "application/json"])
def test_an_unsupported_content_type(live_server, content_type: str) -> None:
    body = jpeg_bytes(seed=9)  # a good image, declared as something else
    assert_error(post(live_server, body, content_type), 415, "unsupported_format", content_type)
    assert_still_serves(live_server)


def test_multipart_without_an_image_field(live_server) -> None:
    response = httpx.post(f"{live_server.base_url}/v1/segment", files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")},
                          timeout=60)
    assert_error(response, 400, "missing_image_field", "image")
    response = httpx.post(f"{live_server.base_url}/v1/segment", files={"image": ("a.txt", b"hello", "text/plain")},
                          timeout=60)
    assert_error(response, 400, "invalid_image", "image")
    assert_still_serves(live_server)


# ----- sizes -----

def test_a_decompression_bomb_is_refused_from_its_header(live_server) -> None:
    bomb = png_bomb()
    assert len(bomb) < 200_000  # tiny on the wire
    peak_before = peak_rss_mb(live_server)
    started = time.monotonic()
    response = post(live_server, bomb, "image/png")
    elapsed = time.monotonic() - started
    assert_error(response, 413, "image_too_large", "20000x20000", "40000000")
    assert elapsed < 5, elapsed  # refused from the header, not after decoding 400 megapixels
    assert peak_rss_mb(live_server) - peak_before < 100  # decoding it would need 400 MB or more
    assert_still_serves(live_server)


def test_more_pixels_than_the_limit(live_server) -> None:
    # 8000x6000 = 48 megapixels, over the 40 MP default: a plain large image, refused just the same.
    response = post(live_server, png_bomb(8000, 6000), "image/png")
    assert_error(response, 413, "image_too_large", "8000x6000")
    assert_still_serves(live_server)


@pytest.mark.parametrize(("height", "width"), [(8, 8), (31, 200), (200, 31)])
def test_an_image_smaller_than_the_model_accepts(live_server, height: int, width: int) -> None:
    response = post(live_server, jpeg_bytes(height, width, seed=10))
    assert_error(response, 422, "image_too_small", f"{width}x{height}", "32")
    assert_still_serves(live_server)


def test_a_thin_image_runs_at_a_point_it_fits(live_server) -> None:
    """32x2000 becomes a thin network input: too thin for the cheap levels' pools, fine at the full level.
    A budget or quality that would pick a cheap point runs a cheaper point that fits instead of refusing."""
    long_side, short_side = (int(side) for side in FAST_SETTINGS["SEGSERVE_RESIZE_SCALE"].split("x"))
    pipeline = dataclasses.replace(dataset_for("ade20k"), resize_scale=(long_side, short_side))

    def fits(point_name: str) -> bool:
        level, scale = point_name.split("/")[1].split("@")
        shape = network_input_size(32, 2000, pipeline, float(scale))
        return next(lv for lv in LADDER if lv.name == level).isr.fits(*shape)

    listing = httpx.get(f"{live_server.base_url}/v1/models").json()
    ladder = listing["tasks"]["ade20k"]["ladder"]
    fitting = [name for name in ladder if fits(name)]
    # Points of the ladder that cannot take it (the cheap levels; usually the cheapest point itself, unless the
    # learning profile has just dropped it from the ladder).
    unfit = [name for name in ladder if not fits(name)]
    assert fitting and unfit
    cases = (({"quality": "fast"}, fitting[-1]), ({"latency_budget_ms": 1}, None), ({}, ladder[0]))
    for seed, (params, expected) in enumerate(cases, start=18):  # a new image each time: no cache hit
        response = post(live_server, jpeg_bytes(32, 2000, seed=seed), format="json", **params)
        assert response.status_code == 200, (params, response.text)
        assert response.headers["X-Segserve-Point"] in fitting
        if expected is not None:  # the lowest quality that fits; the best point
            assert response.headers["X-Segserve-Point"] == expected
        else:  # nothing meets 1 ms: the fastest point that fits, reported as the fallback
            assert response.headers["X-Segserve-Plan"] == "fallback"
        assert (response.json()["height"], response.json()["width"]) == (32, 2000)
    image = jpeg_bytes(32, 2000, seed=30)
    response = post(live_server, image, level=LADDER[-1].name)  # an explicit level is not second-guessed
    assert_error(response, 422, "image_too_small", "2000x32", LADDER[-1].name)
    response = post(live_server, image, point=unfit[-1])
    assert_error(response, 422, "image_too_small", "2000x32", unfit[-1])
    assert_still_serves(live_server)


@pytest.fixture(scope="module")
def small_body_server() -> Iterator[ServerProcess]:
    env = {"SEGSERVE_MAX_BODY_BYTES": "65536", "SEGSERVE_LEVELS": CHEAPEST, "SEGSERVE_CALIBRATION_BATCH_SIZES": "1"}
    with ServerProcess(env=env) as server:
        yield server


def test_a_body_over_the_size_limit(small_body_server) -> None:
    large = jpeg_bytes(600, 800, seed=11, quality=98)
    assert len(large) > 65536
    assert_error(post(small_body_server, large), 413, "body_too_large", "65536")
    assert_still_serves(small_body_server)


def test_a_chunked_body_over_the_size_limit(small_body_server) -> None:
    """Without a Content-Length the server counts as it reads, and stops at the limit."""
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield bytes(8192)

    response = httpx.post(f"{small_body_server.base_url}/v1/segment", content=chunks(),
                          headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body_too_large", "65536")
    assert_still_serves(small_body_server)


# ----- parameters -----

@pytest.mark.parametrize(("params", "code", "mention"), [
    ({"level": "3333-333"}, "unknown_level", "3333-333"),
    ({"level": "fastest"}, "unknown_level", "fastest"),
    ({"format": "tiff"}, "unknown_format", "tiff"),
    ({"format": "PNG "}, "unknown_format", "png"),
    ({"strict": "maybe"}, "invalid_parameter", "strict"),
])
def test_unknown_level_format_or_flag(live_server, params: dict, code: str, mention: str) -> None:
    assert_error(post(live_server, jpeg_bytes(seed=12), **params), 422, code, mention)
    assert_still_serves(live_server)


@pytest.mark.parametrize("budget", ["-5", "0", "-0", "nan", "NaN", "abc", "1e12", "inf", "1e400"])
def test_an_invalid_budget(live_server, budget: str) -> None:
    response = post(live_server, jpeg_bytes(seed=13), latency_budget_ms=budget)
    assert_error(response, 422, "invalid_budget", "latency_budget_ms")
    assert_still_serves(live_server)


@pytest.mark.parametrize("budget", ["abc", "-1", "nan"])
def test_an_invalid_budget_header(live_server, budget: str) -> None:
    response = post(live_server, jpeg_bytes(seed=14), headers={"X-Latency-Budget-Ms": budget})
    assert_error(response, 422, "invalid_budget", "latency_budget_ms")


@pytest.mark.parametrize("timeout_ms", ["0", "-10", "nan", "soon"])
def test_an_invalid_timeout(live_server, timeout_ms: str) -> None:
    response = post(live_server, jpeg_bytes(seed=15), timeout_ms=timeout_ms)
    assert_error(response, 422, "invalid_budget", "timeout_ms")


@pytest.mark.parametrize("quality", ["2", "ultra", "-0.1", "1.5", "nan"])
def test_an_invalid_quality(live_server, quality: str) -> None:
    assert_error(post(live_server, jpeg_bytes(seed=16), quality=quality), 422, "invalid_quality", quality)
    assert_still_serves(live_server)


def test_bad_input_never_reaches_the_model(live_server) -> None:
    """The refusals above happen before compute: a burst of them leaves the batch counter alone."""
    def computed() -> float:
        text = httpx.get(f"{live_server.base_url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("segserve_batch_size_sum"))

    before = computed()
    cases = [(b"", {}), (b"not an image", {}), (jpeg_bytes(8, 8), {}), (jpeg_bytes(seed=17), {"level": "x"}),
             (jpeg_bytes(seed=17), {"latency_budget_ms": "0"}), (png_bomb(8000, 6000), {})]
    for body, params in cases:
        assert post(live_server, body, **params).status_code >= 400
    assert computed() == before
