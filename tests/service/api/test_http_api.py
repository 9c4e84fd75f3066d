"""The HTTP API against real `segserve serve` processes: masks, formats, receipts, model listing, docs.

Most tests use the session's `live_server` (random weights). The mask-equality tests start a second
server on a checkpoint written here, so this process can build the very same model and compare the
served masks with a direct prediction.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models import LADDER, create_model
from models.checkpoint import official_checkpoint
from models.datasets import dataset_for
from models.predict import Predictor
from service.encoding import decode_rle
from tests.servers import FAST_SETTINGS, ServerProcess, jpeg_bytes

COMPARED_LEVELS = (LADDER[-1], LADDER[0])  # the cheapest first, so the full level's result is not cached yet
CHEAPEST = LADDER[-1].name


def post(server: ServerProcess, image: bytes, path: str = "/v1/segment", content_type: str = "image/jpeg",
         **params: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", content=image, params=params,
                      headers={"Content-Type": content_type}, timeout=120)


def labels_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


# ----- the served mask is the model's prediction -----

@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return create_model("edaformer-t").eval()


@pytest.fixture(scope="module")
def checkpoint_server(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path: Path = tmp_path_factory.mktemp("checkpoint") / "edaformer_t_test.pth"
    torch.save(official_checkpoint(model, model.meta.class_names, model.meta.palette), path)
    env = {
        "SEGSERVE_CHECKPOINT": str(path),
        "SEGSERVE_LEVELS": ",".join(level.name for level in COMPARED_LEVELS),
        "SEGSERVE_CALIBRATION_BATCH_SIZES": "1",  # this server only needs to answer correctly: calibrate little
    }
    with ServerProcess(env=env) as server:
        yield server


def direct_prediction(model: torch.nn.Module, jpeg: bytes, level) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # decoded as the server decodes it
    scale = tuple(int(side) for side in FAST_SETTINGS["SEGSERVE_RESIZE_SCALE"].split("x"))
    dataset = dataclasses.replace(dataset_for("ade20k"), resize_scale=scale)
    return Predictor(model, dataset).predict(rgb, level).labels


@pytest.mark.parametrize(("height", "width"), [(120, 160), (97, 203)])
def test_the_returned_mask_equals_the_models_direct_prediction(checkpoint_server, model, height, width) -> None:
    jpeg = jpeg_bytes(height, width, seed=height)
    served = {}
    for level in COMPARED_LEVELS:
        response = post(checkpoint_server, jpeg, level=level.name)
        assert response.status_code == 200, response.text
        assert response.headers["X-Segserve-Level"] == level.name
        assert response.headers["X-Segserve-Cache"] == "miss"
        served[level.name] = labels_of(response.content)
        expected = direct_prediction(model, jpeg, level)
        assert served[level.name].shape == (height, width)
        mismatch = np.count_nonzero(served[level.name] != expected)
        assert mismatch == 0, f"{mismatch} of {expected.size} pixels differ from the direct prediction at {level.name}"
        assert len(np.unique(expected)) > 3  # a mask worth comparing, not one class everywhere
    # The level is really applied: the two levels' masks differ (so a server ignoring it would fail above).
    assert not np.array_equal(*served.values())


@pytest.fixture(scope="module")
def onnx_server(checkpoint_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The checkpoint server's weights on the ONNX Runtime backend (one level, one scale: one export)."""
    env = {**checkpoint_server.env, "SEGSERVE_BACKEND": "onnx", "SEGSERVE_LEVELS": COMPARED_LEVELS[0].name,
           "SEGSERVE_SCALES": "1", "SEGSERVE_ONNX_CACHE_DIR": str(tmp_path_factory.mktemp("onnx"))}
    with ServerProcess(env=env) as server:
        yield server


def test_the_onnx_backend_serves_the_same_masks(onnx_server, model) -> None:
    jpeg = jpeg_bytes(97, 203, seed=97)
    response = post(onnx_server, jpeg, level=COMPARED_LEVELS[0].name)
    assert response.status_code == 200, response.text
    assert httpx.get(f"{onnx_server.base_url}/v1/models").json()["models"][0]["backend"] == "onnx"
    served = labels_of(response.content)
    expected = direct_prediction(model, jpeg, COMPARED_LEVELS[0])
    # ONNX Runtime's kernels differ from torch's in the last bits: only near-ties may flip.
    assert served.shape == expected.shape and (served == expected).mean() > 0.999


def test_models_report_checkpoint_or_random_weights(checkpoint_server, live_server) -> None:
    with_checkpoint = httpx.get(f"{checkpoint_server.base_url}/v1/models").json()["models"][0]
    assert with_checkpoint["weights"] == "checkpoint"
    assert with_checkpoint["knob"]["levels"] == [level.name for level in COMPARED_LEVELS[::-1]]
    assert httpx.get(f"{live_server.base_url}/v1/models").json()["models"][0]["weights"] == "random"


# ----- formats -----

@pytest.fixture(scope="module")
def format_image() -> bytes:
    return jpeg_bytes(100, 150, seed=6501)


@pytest.fixture(scope="module")
def png_labels(live_server, format_image) -> np.ndarray:
    response = post(live_server, format_image, level=CHEAPEST)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "L"  # 150 classes: 8 bits
    assert image.size == (150, 100)
    return np.asarray(image)


def test_png_is_a_label_map_of_the_images_size(png_labels) -> None:
    assert png_labels.shape == (100, 150)
    assert png_labels.max() < 150


def test_color_is_a_palette_png_with_the_same_ids(live_server, format_image, png_labels) -> None:
    response = post(live_server, format_image, level=CHEAPEST, format="color")
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "P"
    assert image.size == (150, 100)
    np.testing.assert_array_equal(np.asarray(image), png_labels)
    palette = [channel for colour in dataset_for("ade20k").palette for channel in colour]
    assert image.getpalette()[: len(palette)] == palette  # the dataset's colours, class by class


def test_overlay_blends_the_image_with_the_class_colours(live_server, format_image, png_labels) -> None:
    response = post(live_server, format_image, level=CHEAPEST, format="overlay")
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert (image.mode, image.size) == ("RGB", (150, 100))
    pixels = np.asarray(Image.open(io.BytesIO(format_image)).convert("RGB")).astype(np.float64)
    palette = np.asarray(dataset_for("ade20k").palette, dtype=np.float64)
    expected = np.clip(0.5 * pixels + 0.5 * palette[png_labels] + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_rle_decodes_to_the_png(live_server, format_image, png_labels) -> None:
    response = post(live_server, format_image, level=CHEAPEST, format="rle")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["size"] == [100, 150]
    assert [entry["id"] for entry in document["classes"]] == np.unique(png_labels).tolist()
    np.testing.assert_array_equal(decode_rle(document), png_labels)


def test_json_carries_fields_receipt_and_the_png(live_server, format_image, png_labels) -> None:
    response = post(live_server, format_image, level=CHEAPEST, format="json", latency_budget_ms=60_000)
    assert response.status_code == 200, response.text
    document = response.json()
    assert (document["height"], document["width"], document["num_classes"]) == (100, 150, 150)
    assert document["present_class_ids"] == np.unique(png_labels).tolist()
    assert set(document["class_map"]) == {str(i) for i in document["present_class_ids"]}
    receipt = document["receipt"]
    assert receipt["level"] == CHEAPEST == response.headers["X-Segserve-Level"]
    assert receipt["budget_ms"] == 60_000 and receipt["budget_met"] is True
    for key in ("queue_ms", "compute_ms", "total_ms", "batch_size", "cache", "point", "scale", "quality",
                "quality_source", "knob", "knob_value", "predicted_ms", "plan_reason"):
        assert key in receipt
    assert receipt["point"] == f"edaformer-t/{CHEAPEST}@1" == response.headers["X-Segserve-Point"]
    assert (receipt["knob"], receipt["knob_value"], receipt["scale"]) == ("isr", "2222/222", 1.0)
    assert receipt["batch_size"] == int(response.headers["X-Segserve-Batch-Size"])
    np.testing.assert_array_equal(labels_of(base64.b64decode(document["mask_png_base64"])), png_labels)


def test_a_cached_json_answer_carries_its_own_receipt(live_server, format_image) -> None:
    response = post(live_server, format_image, level=CHEAPEST, format="json")
    assert response.status_code == 200
    receipt = response.json()["receipt"]
    assert receipt["cache"] == "hit" and receipt["budget_ms"] is None and receipt["budget_met"] is None


# ----- receipts -----

RECEIPT_HEADERS = ("X-Segserve-Level", "X-Segserve-Queue-Ms", "X-Segserve-Compute-Ms", "X-Segserve-Batch-Size",
                   "Server-Timing")


def test_receipt_headers_without_a_budget(live_server) -> None:
    response = post(live_server, jpeg_bytes(seed=6502), level=CHEAPEST)
    assert response.status_code == 200
    for name in RECEIPT_HEADERS:
        assert name in response.headers, name
    assert "X-Segserve-Budget-Met" not in response.headers
    assert float(response.headers["X-Segserve-Compute-Ms"]) > 0
    assert float(response.headers["X-Segserve-Queue-Ms"]) >= 0
    assert int(response.headers["X-Segserve-Batch-Size"]) >= 1
    timing = response.headers["Server-Timing"]
    assert "queue;dur=" in timing and "compute;dur=" in timing


@pytest.mark.parametrize("how", ["query", "header"])
def test_budget_met_is_reported_when_a_budget_is_given(live_server, how: str) -> None:
    image = jpeg_bytes(seed=6503 if how == "query" else 6504)
    if how == "query":
        response = post(live_server, image, latency_budget_ms=120_000)
    else:
        response = httpx.post(f"{live_server.base_url}/v1/segment", content=image, timeout=120,
                              headers={"Content-Type": "image/jpeg", "X-Latency-Budget-Ms": "120000"})
    assert response.status_code == 200, response.text
    for name in RECEIPT_HEADERS:
        assert name in response.headers, name
    assert response.headers["X-Segserve-Budget-Met"] == "true"
    assert response.headers["X-Segserve-Plan"] == "budget"


# ----- routes -----

def test_multipart_upload(live_server) -> None:
    image = jpeg_bytes(90, 130, seed=6505)
    response = httpx.post(f"{live_server.base_url}/v1/segment", params={"level": CHEAPEST}, timeout=120,
                          files={"image": ("photo.jpg", image, "image/jpeg")}, data={"note": "ignored"})
    assert response.status_code == 200, response.text
    labels = labels_of(response.content)
    assert labels.shape == (90, 130)
    raw = post(live_server, image, level=CHEAPEST)  # the same image sent raw: the same mask (from the cache)
    np.testing.assert_array_equal(labels_of(raw.content), labels)
    assert raw.headers["X-Segserve-Cache"] == "hit"


def test_the_named_model_route(live_server) -> None:
    response = post(live_server, jpeg_bytes(seed=6506), path="/v1/models/edaformer-t/segment", level=CHEAPEST)
    assert response.status_code == 200, response.text
    assert response.headers["X-Segserve-Model"] == "edaformer-t"
    assert labels_of(response.content).shape == (120, 160)


def test_an_unknown_model_is_a_404_json_error(live_server) -> None:
    response = post(live_server, jpeg_bytes(seed=6507), path="/v1/models/segformer-x/segment")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "unknown_model"
    assert "segformer-x" in error["message"]


def test_models_list_points_best_first_with_gmacs_latency_and_quality(live_server) -> None:
    listing = httpx.get(f"{live_server.base_url}/v1/models").json()
    (entry,) = listing["models"]
    assert (entry["name"], entry["task"], listing["default_task"]) == ("edaformer-t", "ade20k", "ade20k")
    assert len(entry["classes"]) == entry["num_classes"] == 150
    assert entry["knob"]["name"] == "isr" and entry["knob"]["levels"] == [level.name for level in LADDER]
    assert entry["scales"] == [1.0, 0.75, 0.5]  # the default start offers input-scale points
    points = entry["points"]
    assert len(points) == len(LADDER) * 3
    assert [p["quality"] for p in points] == sorted((p["quality"] for p in points), reverse=True)
    assert points[0]["name"] == f"edaformer-t/{LADDER[0].name}@1" and points[0]["quality_source"] == "prior"
    full = {p["level"]: p for p in points if p["scale"] == 1.0}
    gmacs = [full[level.name]["gmacs"] for level in LADDER]
    assert all(a > b for a, b in itertools.pairwise(gmacs)), gmacs
    half = next(p for p in points if p["level"] == LADDER[0].name and p["scale"] == 0.5)
    assert half["gmacs"] < full[LADDER[0].name]["gmacs"] / 2  # a quarter of the pixels
    calibrated = {"1", max(FAST_SETTINGS["SEGSERVE_CALIBRATION_BATCH_SIZES"].split(","), key=int)}
    for point in points:
        sizes = list(point["latency_ms"])  # the anchor sizes, and any other size a batch has run at since
        assert calibrated <= set(sizes) and sizes == sorted(sizes, key=int)
        assert all(ms > 0 for ms in point["latency_ms"].values())
    ladder = listing["tasks"]["ade20k"]["ladder"]
    assert ladder[0] == points[0]["name"] and {p["name"] for p in points if p["on_ladder"]} == set(ladder)
    assert "published single-scale mIoU" in listing["quality_prior"]


def test_health_and_readiness(live_server) -> None:
    assert httpx.get(f"{live_server.base_url}/healthz").status_code == 200
    ready = httpx.get(f"{live_server.base_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["workers_alive"] >= 1


def test_openapi_schema_and_docs(live_server) -> None:
    schema = httpx.get(f"{live_server.base_url}/openapi.json").json()
    assert "/v1/segment" in schema["paths"]
    assert "/v1/models/{model}/segment" in schema["paths"]
    parameters = {p["name"] for p in schema["paths"]["/v1/segment"]["post"]["parameters"]}
    assert {"latency_budget_ms", "quality", "level", "format", "strict"} <= parameters
    docs = httpx.get(f"{live_server.base_url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert json.dumps(schema)  # serializable, i.e. a real document
