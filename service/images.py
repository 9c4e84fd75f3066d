"""Image intake: read the header cheaply, check limits, then decode to RGB, all with clear errors.

Decompression bombs are stopped before any pixel is decoded: the pixel count comes from the header
and is checked against our own limit (Pillow's global bomb check is turned off in favour of it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import BadInput, InvalidParameter, PayloadTooLarge, UnsupportedFormat

# Our per-request limit replaces Pillow's process-wide one; read_header enforces it on every image.
Image.MAX_IMAGE_PIXELS = None

ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
ALLOWED_CONTENT_TYPES = set(ALLOWED_FORMATS.values()) | {"image/jpg", "application/octet-stream"}


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "JPEG", "PNG" or "WEBP"
    height: int
    width: int


def read_header(data: bytes, *, max_pixels: int, min_side: int) -> ImageHeader:
    """Identify the image and check its size without decoding the pixels."""
    if not data:
        raise BadInput("the request body is empty; send the image bytes (JPEG, PNG or WebP)", code="empty_body")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise BadInput("the body is not an image that can be read (JPEG, PNG or WebP expected)",
                       code="invalid_image") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow raises ValueError on e.g. a short PNG IHDR chunk
        raise BadInput(f"the image cannot be read: {exc}", code="invalid_image") from exc
    if image.format not in ALLOWED_FORMATS:
        raise UnsupportedFormat(f"{image.format} images are not supported; send JPEG, PNG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            code="image_too_large",
        )
    if min(width, height) < min_side:
        raise InvalidParameter(
            f"image is {width}x{height}; the smallest accepted side is {min_side} pixels", code="image_too_small"
        )
    return ImageHeader(format=image.format, height=height, width=width)


def decode_rgb(data: bytes, header: ImageHeader) -> np.ndarray:
    """Decode to an RGB uint8 array (H, W, 3). Truncated or corrupt data is a 400, never a crash."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # raises OSError on truncated data (LOAD_TRUNCATED_IMAGES stays False)
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"the {header.format} image is truncated or corrupt: {exc}", code="truncated_image") from exc
    array = np.asarray(rgb, dtype=np.uint8)
    if array.shape[:2] != (header.height, header.width):
        raise BadInput("the decoded image size does not match its header", code="invalid_image")
    return array
