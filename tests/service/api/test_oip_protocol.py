"""The Open Inference Protocol's REST routes at the wire level (httpx against the session's live server): the
binary tensor data framing, the request-level and per-output switches, the `{"error": "..."}` shape with the
status codes, the bounds, and the version and readiness routes. The real third-party clients are exercised in
test_oip_clients.py; these are the cases those clients never send.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servers import ServerProcess, jpeg_bytes

MODEL = "edaformer-t"
INFER = f"/v2/models/{MODEL}/infer"
IMAGE = jpeg_bytes(80, 100, seed=5)


def image_input(*images: bytes) -> tuple[dict[str, Any], bytes]:
    """An `image` BYTES input sent as binary data: (its JSON entry, its bytes)."""
    data = b"".join(struct.pack("<I", len(i)) + i for i in images)
    return {"name": "image", "datatype": "BYTES", "shape": [len(images)],
            "parameters": {"binary_data_size": len(data)}}, data


def post(server: ServerProcess, document: Any, binary: bytes = b"", path: str = INFER,
         headers: dict[str, str] | None = None) -> httpx.Response:
    header = json.dumps(document).encode()
    extra = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    return httpx.post(f"{server.base_url}{path}", content=header + binary, headers={**extra, **(headers or {})},
                      timeout=120)


def split(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    length = int(response.headers.get("inference-header-content-length", len(response.content)))
    return json.loads(response.content[:length]), response.content[length:]


def test_health_versions_and_readiness(live_server: ServerProcess) -> None:
    base = live_server.base_url
    assert httpx.get(f"{base}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{base}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{base}/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert httpx.get(f"{base}/v2/models/{MODEL}/versions/1/ready").status_code == 200
    assert httpx.get(f"{base}/v2/models/{MODEL}/versions/1").json()["versions"] == ["1"]
    for path in (f"/v2/models/{MODEL}/versions/2", f"/v2/models/{MODEL}/versions/2/ready", "/v2/models/nope/ready"):
        response = httpx.get(f"{base}{path}")
        assert response.status_code == 404 and isinstance(response.json()["error"], str), path


def test_binary_framing_id_headers_and_request_level_binary_switch(live_server: ServerProcess) -> None:
    entry, data = image_input(IMAGE)
    document = {"id": "req-7", "inputs": [entry], "parameters": {"binary_data_output": True},
                "outputs": [{"name": "mask_png"}, {"name": "labels", "parameters": {"binary_data": False}}]}
    response = post(live_server, document, data, path=f"/v2/models/{MODEL}/versions/1/infer")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    body, blob = split(response)
    assert body["id"] == "req-7" and body["model_name"] == MODEL and body["model_version"] == "1"
    mask, labels = body["outputs"]
    assert mask["name"] == "mask_png" and mask["parameters"]["binary_data_size"] == len(blob)
    (length,) = struct.unpack_from("<I", blob)
    png = np.asarray(Image.open(io.BytesIO(blob[4:4 + length])))
    assert labels["datatype"] == "INT32" and labels["shape"] == [80, 100] and "parameters" not in labels
    np.testing.assert_array_equal(np.array(labels["data"]).reshape(80, 100), png)
    stamp = json.loads(body["parameters"]["receipt"])
    assert response.headers["x-segserve-point"] == stamp["point"]  # one image: the receipt headers of /v1 too


def test_json_nested_pixels_and_uint8_labels(live_server: ServerProcess) -> None:
    pixels = np.asarray(Image.open(io.BytesIO(IMAGE)).convert("RGB"))
    document = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                            "data": pixels.tolist()}],  # nested row-major lists are valid JSON tensor data
                "outputs": [{"name": "labels", "parameters": {"datatype": "UINT8"}}]}
    response = post(live_server, document)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    labels = response.json()["outputs"][0]
    assert (labels["datatype"], labels["shape"]) == ("UINT8", [80, 100]) and max(labels["data"]) < 150


def test_mixed_sizes_are_refused_for_labels_but_fine_for_pngs(live_server: ServerProcess) -> None:
    entry, data = image_input(IMAGE, jpeg_bytes(64, 64, seed=1))
    refused = post(live_server, {"inputs": [entry]}, data)
    assert refused.status_code == 400 and "one size" in refused.json()["error"]
    answered = post(live_server, {"inputs": [entry], "outputs": [{"name": "mask_png",
                                                                  "parameters": {"binary_data": True}}]}, data)
    assert answered.status_code == 200
    body, _ = split(answered)
    assert body["outputs"][0]["shape"] == [2] and len(json.loads(body["parameters"]["receipt"])) == 2


def _pixels(shape: list[int], data: Any = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "pixels", "datatype": "UINT8", "shape": shape}
    if data is not None:
        entry["data"] = data
    return {"inputs": [entry]}


BAD_REQUESTS = [
    # (request document, binary data, extra headers, status, fragment of the error)
    ([1, 2], b"", {}, 400, "JSON object"),
    ({"inputs": []}, b"", {}, 400, "exactly one input"),
    ({"inputs": [{"name": "img", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, b"", {}, 400, "unknown input"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [1]}]}, b"", {}, 400, "must be BYTES"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]}, b"", {}, 400,
     "not an image"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}}]},
     b"\x00" * 10, {}, 400, "binary_data_size"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]},
     struct.pack("<I", 1000) + b"abcd", {}, 400, "past the end"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [40], "data": ["x"] * 40}]}, b"", {}, 413,
     "limit is 32"),
    (_pixels([9000, 9000, 3], []), b"", {}, 413, "over the limit"),  # refused before the data is read
    (_pixels([10, 10, 3], [0] * 300), b"", {}, 422, "smallest accepted side"),
    (_pixels([40, 40, 3], [300] * 4800), b"", {}, 400, "[0, 255]"),
    (_pixels([40, 40, 4], [0] * 6400), b"", {}, 400, "[H, W, 3]"),
    ({**_pixels([40, 40, 3], [0] * 4800), "outputs": [{"name": "logits"}]}, b"", {}, 400, "unknown output"),
    ({**_pixels([40, 40, 3], [0] * 4800), "outputs": [{"name": "mask_png"}]}, b"", {}, 400, "binary_data: true"),
    ({**_pixels([40, 40, 3], [0] * 4800), "parameters": {"budget": 5}}, b"", {}, 400, "unknown request parameter"),
    ({**_pixels([40, 40, 3], [0] * 4800), "parameters": {"latency_budget_ms": "soon"}}, b"", {}, 422,
     "must be a number"),
    ({**_pixels([40, 40, 3], [0] * 4800), "parameters": {"quality": 5}}, b"", {}, 422, "within [0, 1]"),
    ({**_pixels([40, 40, 3], [0] * 4800), "parameters": {"point": "edaformer-t/9999-999@1"}}, b"", {}, 422,
     "unknown point"),
    (_pixels([40, 40, 3], [0] * 4800), b"", {"Content-Encoding": "gzip"}, 415, "Content-Encoding"),
]


@pytest.mark.parametrize(("document", "binary", "headers", "status", "fragment"), BAD_REQUESTS,
                         ids=[f"{case[3]}-{case[4]}" for case in BAD_REQUESTS])
def test_bad_requests_get_the_protocols_error_shape(live_server: ServerProcess, document: Any, binary: bytes,
                                                    headers: dict[str, str], status: int, fragment: str) -> None:
    response = post(live_server, document, binary, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert list(error) == ["error"] and isinstance(error["error"], str) and fragment in error["error"]


@pytest.mark.parametrize("header", ["abc", "0", "999999"])
def test_a_bad_header_length_is_a_400(live_server: ServerProcess, header: str) -> None:
    response = httpx.post(f"{live_server.base_url}{INFER}", content=b'{"inputs": []}',
                          headers={"Inference-Header-Content-Length": header}, timeout=30)
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]


def test_unknown_model_is_a_404_and_calls_are_counted(live_server: ServerProcess) -> None:
    response = post(live_server, _pixels([40, 40, 3], [0] * 4800), path="/v2/models/nope/infer")
    assert response.status_code == 404 and "unknown model 'nope'" in response.json()["error"]
    metrics = httpx.get(f"{live_server.base_url}/metrics").text
    assert 'route="/v2/models/{model}/infer",status="404"' in metrics
