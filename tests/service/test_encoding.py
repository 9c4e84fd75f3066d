"""Unit tests for service/encoding.py: every format decoded back with Pillow / pycocotools."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from service.encoding import (
    Format,
    decode_rle,
    encode,
    encode_color_png,
    encode_json,
    encode_png,
    encode_rle,
    replace_json_receipt,
)

NAMES_150 = [f"class-{k}" for k in range(150)]


def blocky_map(
    rng: np.random.Generator, height: int, width: int, num_classes: int, block: int = 16
) -> np.ndarray:
    """A label map with region-like runs (what a segmenter outputs), plus scattered single pixels."""
    coarse = rng.integers(0, num_classes, (height // block + 1, width // block + 1))
    labels = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]
    noise = rng.random((height, width)) < 0.01
    labels[noise] = rng.integers(0, num_classes, int(noise.sum()))
    return labels


def decode_png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- PNG label map ---------------------------------------------------------------------------------


def test_png_8bit_round_trip():
    labels = blocky_map(np.random.default_rng(0), 97, 131, 150)
    image = decode_png(encode_png(labels, 150))
    assert image.mode == "L"
    assert image.size == (131, 97)  # Pillow: (W, H)
    np.testing.assert_array_equal(np.array(image), labels)


def test_png_16bit_round_trip_with_300_classes():
    labels = blocky_map(np.random.default_rng(1), 64, 80, 300, block=8)
    labels[0, 0], labels[-1, -1] = 299, 256  # ids that do not fit in 8 bits
    image = decode_png(encode_png(labels, 300))
    assert image.mode in ("I;16", "I")  # Pillow opens 16-bit grey as either, depending on version
    decoded = np.array(image)
    np.testing.assert_array_equal(decoded, labels)
    assert decoded.max() == 299


def test_png_accepts_any_integer_dtype_and_non_contiguous_input():
    labels = blocky_map(np.random.default_rng(2), 40, 50, 19).astype(np.int32)
    view = labels.T  # Fortran-ordered view
    np.testing.assert_array_equal(np.array(decode_png(encode_png(view, 19))), view)


@pytest.mark.parametrize(
    "labels, num_classes, message",
    [
        (np.zeros((4, 4, 1), dtype=np.uint8), 10, "2-D"),
        (np.zeros((4, 4), dtype=np.float32), 10, "integer"),
        (np.zeros((0, 4), dtype=np.uint8), 10, "empty"),
        (np.full((4, 4), 10, dtype=np.int64), 10, r"\[0, 10\)"),
        (np.full((4, 4), -1, dtype=np.int64), 10, r"\[0, 10\)"),
    ],
)
def test_png_rejects_invalid_maps(labels, num_classes, message):
    with pytest.raises(ValueError, match=message):
        encode_png(labels, num_classes)


def test_png_of_a_one_class_map_is_tiny_and_exact():
    labels = np.full((512, 683), 7, dtype=np.int64)
    data = encode_png(labels, 150)
    assert len(data) < labels.size // 100  # one long run: ~2.5 kB for 350 kB of pixels at zlib level 1
    np.testing.assert_array_equal(np.array(decode_png(data)), labels)


# --- colour PNG ------------------------------------------------------------------------------------


def test_color_png_is_a_palette_image_with_class_ids_as_indices():
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, (150, 3)).tolist()
    labels = blocky_map(rng, 60, 70, 150)
    image = decode_png(encode_color_png(labels, palette))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.array(image), labels)
    stored = np.array(image.getpalette()[: 3 * 150]).reshape(150, 3)
    np.testing.assert_array_equal(stored, np.array(palette))
    np.testing.assert_array_equal(np.array(image.convert("RGB")), np.array(palette)[labels])


def test_color_png_above_256_classes_falls_back_to_rgb():
    rng = np.random.default_rng(4)
    palette = rng.integers(0, 256, (300, 3)).tolist()
    labels = blocky_map(rng, 30, 40, 300, block=4)
    image = decode_png(encode_color_png(labels, palette))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.array(image), np.array(palette, dtype=np.uint8)[labels])


def test_color_png_rejects_ids_beyond_the_palette_and_bad_palettes():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        encode_color_png(np.full((4, 4), 2), [[0, 0, 0], [255, 255, 255]])
    with pytest.raises(ValueError, match="palette"):
        encode_color_png(np.zeros((4, 4), dtype=np.uint8), [[0, 0], [1, 1]])


# --- COCO RLE --------------------------------------------------------------------------------------

RLE_CASES = {
    "blocky-150": lambda rng: blocky_map(rng, 120, 90, 150),
    "noise-3": lambda rng: rng.integers(0, 3, (33, 17)),
    "one-row": lambda rng: rng.integers(0, 4, (1, 50)),
    "one-column": lambda rng: rng.integers(0, 4, (50, 1)),
    "one-pixel": lambda rng: np.array([[5]]),
    # Huge runs next to tiny ones: multi-char counts and negative deltas in the string encoding.
    "big-rectangles": lambda rng: np.pad(np.ones((700, 650), dtype=np.int64), ((3, 297), (40, 310))),
}


@pytest.mark.parametrize("case", sorted(RLE_CASES))
def test_rle_round_trip(case):
    labels = RLE_CASES[case](np.random.default_rng(5))
    document = encode_rle(labels, NAMES_150)
    assert document["size"] == list(labels.shape)
    assert [entry["id"] for entry in document["classes"]] == np.unique(labels).tolist()
    np.testing.assert_array_equal(decode_rle(document), labels)
    assert sum(entry["area"] for entry in document["classes"]) == labels.size


@pytest.mark.parametrize("case", sorted(RLE_CASES))
# pycocotools 2.0.x still calls np.array(copy=False) semantics on numpy 2; harmless here.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_rle_matches_pycocotools(case):
    # pycocotools is a dev dependency: a missing one must fail here, not skip the cross-check.
    from pycocotools import mask as coco_mask

    labels = RLE_CASES[case](np.random.default_rng(6))
    document = encode_rle(labels, NAMES_150)
    for entry in document["classes"]:
        binary = np.asfortranarray((labels == entry["id"]).astype(np.uint8))
        reference = coco_mask.encode(binary)
        assert entry["counts"] == reference["counts"].decode("ascii"), entry["id"]
        assert entry["area"] == int(coco_mask.area(reference))
        ours = {"size": document["size"], "counts": entry["counts"].encode("ascii")}
        np.testing.assert_array_equal(coco_mask.decode(ours), binary)


def test_rle_of_a_one_class_map():
    labels = np.full((6, 4), 12)
    document = encode_rle(labels, NAMES_150)
    assert document == {
        "size": [6, 4],
        "classes": [{"id": 12, "name": "class-12", "counts": "0h0", "area": 24}],  # runs [0, 24]
    }
    np.testing.assert_array_equal(decode_rle(document), labels)


def test_rle_lists_only_present_classes_and_names_unnamed_ids():
    labels = np.array([[3, 3, 9], [9, 9, 3]])
    document = encode_rle(labels, ["zero", "one", "two", "three"])
    assert [(entry["id"], entry["name"], entry["area"]) for entry in document["classes"]] == [
        (3, "three", 3),
        (9, "class_9", 3),
    ]


def test_rle_rejects_invalid_maps():
    with pytest.raises(ValueError, match="empty"):
        encode_rle(np.zeros((3, 0), dtype=np.int64), NAMES_150)
    with pytest.raises(ValueError, match="integer"):
        encode_rle(np.zeros((3, 3)), NAMES_150)


def test_decode_rle_rejects_counts_that_do_not_cover_the_image():
    document = encode_rle(np.zeros((4, 4), dtype=np.int64), NAMES_150)
    document["size"] = [4, 5]
    with pytest.raises(ValueError, match="covers 16 pixels"):
        decode_rle(document)


# --- JSON and dispatch -----------------------------------------------------------------------------


def test_json_document_fields():
    labels = np.array([[0, 0, 4], [4, 7, 7]])
    receipt = {"level": "isr-2", "queue_ms": 1.5, "cache_hit": False}
    document = json.loads(encode_json(labels, 150, NAMES_150, receipt))
    assert document["height"] == 2
    assert document["width"] == 3
    assert document["num_classes"] == 150
    assert document["present_class_ids"] == [0, 4, 7]
    assert document["class_map"] == {"0": "class-0", "4": "class-4", "7": "class-7"}
    assert document["receipt"] == receipt
    mask = decode_png(base64.b64decode(document["mask_png_base64"]))
    np.testing.assert_array_equal(np.array(mask), labels)


def test_replace_json_receipt_keeps_the_mask():
    labels = np.array([[1, 2], [2, 1]])
    body = encode_json(labels, 3, ["a", "b", "c"], {"cache_hit": False, "compute_ms": 12.0})
    refreshed = json.loads(replace_json_receipt(body, {"cache_hit": True}))
    original = json.loads(body)
    assert refreshed["receipt"] == {"cache_hit": True}
    assert {k: v for k, v in refreshed.items() if k != "receipt"} == {
        k: v for k, v in original.items() if k != "receipt"
    }


@pytest.mark.parametrize(
    "output_format, content_type, first_bytes",
    [
        ("png", "image/png", b"\x89PNG"),
        (Format.COLOR, "image/png", b"\x89PNG"),
        ("rle", "application/json", b'{"size"'),
        ("json", "application/json", b'{"height"'),
    ],
)
def test_encode_dispatches_on_format(output_format, content_type, first_bytes):
    labels = np.array([[0, 1], [1, 1]])
    body, returned_type = encode(
        output_format, labels, num_classes=2, class_names=["bg", "fg"], palette=[[0, 0, 0], [9, 9, 9]],
        receipt={"level": "full"},
    )
    assert returned_type == content_type
    assert body.startswith(first_bytes)


def test_encode_rle_body_decodes_back():
    labels = blocky_map(np.random.default_rng(7), 20, 30, 5, block=4)
    body, _ = encode("rle", labels, num_classes=5, class_names=NAMES_150[:5])
    np.testing.assert_array_equal(decode_rle(json.loads(body)), labels)


def test_encode_rejects_unknown_format_missing_palette_and_out_of_range_ids():
    labels = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(ValueError):
        encode("jpeg", labels, num_classes=2, class_names=["a", "b"])
    with pytest.raises(ValueError, match="palette"):
        encode("color", labels, num_classes=2, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        encode("rle", np.full((2, 2), 5), num_classes=2, class_names=["a", "b"])
