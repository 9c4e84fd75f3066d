"""Inputs and outputs: what `segment` accepts as an image, and the mask decoded from what the server sent."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# A path, the encoded bytes of an image, a PIL image, or an (H, W, 3) uint8 RGB array.
ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
MAX_FILE_BYTES = 256 * 1024 * 1024  # a bound on what a path may make the client read (the server's is lower)
PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 spends the least CPU on the way out


def sniff_content_type(data: bytes) -> str:
    """The image content type from its magic bytes; application/octet-stream when it is none the server reads."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"  # the server answers 415 naming what it accepts


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_image(image: ImageInput) -> tuple[bytes, str]:
    """(bytes, content type) to send. Arrays and PIL images are encoded as PNG, losslessly."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        return data, sniff_content_type(data)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        size = path.stat().st_size  # FileNotFoundError names the path
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path} is {size} bytes, over the client's limit of {MAX_FILE_BYTES}")
        data = path.read_bytes()
        return data, sniff_content_type(data)
    if isinstance(image, Image.Image):
        if image.mode not in {"RGB", "RGBA", "L"}:
            image = image.convert("RGB")
        return _png(image), "image/png"
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be (H, W, 3) uint8 RGB, got shape {image.shape} {image.dtype}")
        return _png(Image.fromarray(np.ascontiguousarray(image))), "image/png"
    raise TypeError(f"cannot send {type(image).__name__} as an image: give a path, bytes, a PIL image or an "
                    "(H, W, 3) uint8 array")


def _string_to_counts(text: str) -> list[int]:
    """COCO compressed RLE counts (pycocotools' rleFrString)."""
    counts: list[int] = []
    raw, position = text.encode("ascii"), 0
    while position < len(raw):
        value, shift, more = 0, 0, True
        while more:
            group = raw[position] - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(document: dict[str, Any]) -> np.ndarray:
    """The label map of a `format=rle` answer: per class, COCO RLE over column-major pixels."""
    height, width = (int(side) for side in document["size"])
    classes = document["classes"]
    largest = max((int(c["id"]) for c in classes), default=0)
    flat = np.zeros(height * width, dtype=np.uint8 if largest < 256 else np.uint16 if largest < 65536 else np.int32)
    for entry in classes:
        counts = np.asarray(_string_to_counts(entry["counts"]), dtype=np.int64)
        if int(counts.sum()) != height * width:
            raise ValueError(f"RLE of class {entry['id']} covers {int(counts.sum())} pixels, not {height * width}")
        flat[np.repeat(np.arange(counts.size) % 2 == 1, counts)] = entry["id"]
    return flat.reshape(width, height).T


def _png_labels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in {"L", "P", "I;16", "I;16B", "I"}:  # label maps; palette indices are the class ids
            return np.asarray(image)
        raise ValueError(f"the PNG is {image.mode}, not a label map: this format carries colours, not class ids "
                         "(ask for format='png' or 'json')")


def decode_mask(body: bytes, content_type: str, output_format: str) -> np.ndarray:
    """(H, W) class ids from an answer body in `output_format`; ValueError for formats without ids (overlay)."""
    if output_format == "overlay":
        raise ValueError("format 'overlay' is the image blended with colours and carries no class ids; "
                         "ask for format='png' or 'json'")
    if content_type.startswith("application/json"):
        document = json.loads(body)
        if output_format == "rle" or ("classes" in document and "size" in document):
            return decode_rle(document)
        return _png_labels(base64.b64decode(document["mask_png_base64"]))
    return _png_labels(body)
