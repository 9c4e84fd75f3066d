"""Image intake: EXIF orientation, reduced decoding of huge images, and the limits checked from the header."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.postprocess import REFERENCE_CHUNK_BYTES
from service.errors import BadInput, PayloadTooLarge, QueueFull
from service.images import EXIF_ORIENTATION, decode_rgb, decoded_size, read_header
from service.memory import MemoryBudget, request_bytes

# What each EXIF orientation does to the stored pixels to show them upright (PIL's transpose operations).
UPRIGHT = {
    1: [], 2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_90],
}


def stored_pixels(height: int = 30, width: int = 48) -> np.ndarray:
    """Asymmetric content, so that every orientation gives a different upright image."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 5 % 256, yy * 8 % 256, (xx + 2 * yy) % 256], axis=-1).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str = "PNG", orientation: int | None = None, **options) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        options["exif"] = exif
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(orientation: int) -> None:
    pixels = stored_pixels()
    data = encoded(pixels, orientation=orientation)
    header = read_header(data, max_pixels=10_000, min_side=8)
    expected = Image.fromarray(pixels)
    for operation in UPRIGHT[orientation]:
        expected = expected.transpose(operation)
    assert (header.height, header.width) == (expected.height, expected.width)
    assert header.orientation == orientation
    np.testing.assert_array_equal(decode_rgb(data, header), np.asarray(expected))


def test_decoded_size_reduces_only_images_of_twice_the_needed_size_or_more() -> None:
    header = read_header(encoded(stored_pixels(400, 600)), max_pixels=10**7, min_side=8)
    assert decoded_size(header, None) == (400, 600)
    assert decoded_size(header, (300, 300)) == (400, 600)  # under 2x on the height: exact decode
    assert decoded_size(header, (200, 300)) == (200, 300)
    assert decoded_size(header, (60, 80)) == (100, 150)  # 4x: 8x would go below the needed height
    assert decoded_size(header, (1, 1)) == (50, 75)  # at most 8x, as JPEG's DCT scaling


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_huge_image_is_decoded_reduced_yet_upright(fmt: str) -> None:
    pixels = np.repeat(np.repeat(stored_pixels(60, 80), 8, axis=0), 8, axis=1)  # 480x640, blocky
    data = encoded(pixels, fmt, orientation=6, quality=95) if fmt == "JPEG" else encoded(pixels, fmt, orientation=6)
    header = read_header(data, max_pixels=10**7, min_side=8)
    assert (header.height, header.width) == (640, 480)
    reduced = decode_rgb(data, header, needed=(150, 110))
    assert reduced.shape == (160, 120, 3)  # 1/4 of each side, still at least the needed size
    full = np.asarray(Image.fromarray(decode_rgb(data, header)).resize((120, 160), Image.BOX))
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 4  # the same picture


def test_limits_are_checked_before_decoding() -> None:
    data = encoded(stored_pixels(100, 100))
    with pytest.raises(PayloadTooLarge, match="over the limit of 9999"):
        read_header(data, max_pixels=9_999, min_side=8)
    with pytest.raises(BadInput, match="empty"):
        read_header(b"", max_pixels=10**6, min_side=8)
    with pytest.raises(BadInput, match="truncated or corrupt"):
        truncated = encoded(stored_pixels(100, 100), "JPEG")[:-200]
        decode_rgb(truncated, read_header(truncated, max_pixels=10**6, min_side=8))


def test_the_memory_budget_refuses_past_its_bound_and_returns_what_was_held() -> None:
    header = read_header(encoded(stored_pixels(100, 100)), max_pixels=10**6, min_side=8)
    cost = request_bytes(header, None)
    assert cost == 11 * 10_000 + 10 * 10_000 + REFERENCE_CHUNK_BYTES
    budget = MemoryBudget(limit=int(2.5 * cost))
    with budget.hold(cost, 1.0), budget.hold(cost, 1.0):
        with pytest.raises(QueueFull) as refused, budget.hold(cost, 1.0):
            pass
        assert refused.value.code == "memory_budget" and refused.value.http_status == 429
        assert budget.in_use == 2 * cost
    assert budget.in_use == 0
    with budget.hold(10 * cost, 1.0):  # larger than the budget: runs alone rather than never
        assert budget.in_use == 10 * cost
