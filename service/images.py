"""Image intake: read the header cheaply, check limits, then decode upright RGB, all with clear errors.

- Decompression bombs are stopped before any pixel is decoded: the pixel count comes from the header and is
  checked against our own limit (Pillow's global bomb check is turned off in favour of it).
- EXIF orientation is applied: the mask has the size and orientation of the image as viewers show it.
- No more pixels are decoded than the network needs: a JPEG much larger than the largest network input is
  decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (DCT scaling, never below the size needed), and any
  other format is downscaled right after decoding, so a huge image does not stay in memory at full size while it
  waits in the queue. Images within 2x of the needed size are decoded exactly as the reference pipeline does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadInput, InvalidParameter, PayloadTooLarge, UnsupportedFormat

# Our per-request limit replaces Pillow's process-wide one; read_header enforces it on every image.
Image.MAX_IMAGE_PIXELS = None

ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
ALLOWED_CONTENT_TYPES = set(ALLOWED_FORMATS.values()) | {"image/jpg", "application/octet-stream"}
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # orientations that swap width and height
Shape = tuple[int, int]


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "JPEG", "PNG" or "WEBP"
    height: int  # as displayed (EXIF orientation applied): the mask's size
    width: int
    orientation: int = 1  # EXIF orientation, 1..8 (1: stored upright)

    @property
    def pixels(self) -> int:
        return self.height * self.width


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: treat the image as upright rather than refuse it
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


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
    orientation = _orientation(image)
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(format=image.format, height=height, width=width, orientation=orientation)


def _stored(size: Shape, header: ImageHeader) -> Shape:
    """A displayed (H, W) in the file's stored orientation."""
    return (size[1], size[0]) if header.orientation in TRANSPOSED_ORIENTATIONS else size


def decoded_size(header: ImageHeader, needed: Shape | None) -> Shape:
    """The (H, W) `decode_rgb` returns: the image's, or smaller when at least 2x larger than `needed` on both
    sides (by a power of 2 for JPEG, as its decoder scales; to about 2x `needed` for other formats)."""
    if needed is None:
        return header.height, header.width
    factor = 1
    while header.height >= 2 * factor * needed[0] and header.width >= 2 * factor * needed[1] and factor < 8:
        factor *= 2
    if factor == 1:
        return header.height, header.width
    return -(-header.height // factor), -(-header.width // factor)


def decode_rgb(data: bytes, header: ImageHeader, needed: Shape | None = None) -> np.ndarray:
    """Decode to an upright RGB uint8 array (H, W, 3); reduced when the image is 2x `needed` (H, W) or more.

    Truncated or corrupt data is a 400, never a crash.
    """
    target = decoded_size(header, needed)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if target != (header.height, header.width) and image.format == "JPEG":
                height, width = _stored(target, header)
                image.draft("RGB", (width, height))  # DCT scaling: decodes at 1/2, 1/4 or 1/8 of the size
            image.load()  # raises OSError on truncated data (LOAD_TRUNCATED_IMAGES stays False)
            upright = ImageOps.exif_transpose(image)
            rgb = upright.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"the {header.format} image is truncated or corrupt: {exc}", code="truncated_image") from exc
    if rgb.height > target[0] and rgb.width > target[1]:
        # Other formats decode at full size: downscale at once (box filter over whole factors is exact averaging),
        # so the full-size copy is freed before the request waits in the queue.
        rgb = rgb.resize((target[1], target[0]), Image.BOX)
    array = np.asarray(rgb, dtype=np.uint8)
    if array.shape[:2] != target and array.shape[:2] != (header.height, header.width):
        raise BadInput("the decoded image size does not match its header", code="invalid_image")
    return array
