"""The Open Inference Protocol (REST and gRPC) as clients nobody here wrote speak it: tritonclient (http, grpc)
and the kserve SDK's v2 clients, against a real `segserve serve --grpc-port` process.

One server for the module, with the result cache off, so that every mask compared below was computed (none is
the cached answer to another request). The kserve clients run in a subprocess (tests/integration/
oip_kserve_probe.py): their stubs and tritonclient.grpc's cannot be loaded into one process.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.paths import ROOT
from tests.servers import ServerProcess, free_port, jpeg_bytes

MODEL = "edaformer-t"
POINT = "edaformer-t/2111-111@1"  # an explicit point: the same computation on every transport
HEIGHT, WIDTH = 96, 128
PROBE = Path(__file__).with_name("oip_kserve_probe.py")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(grpc_port=free_port(), env={"SEGSERVE_CACHE_BYTES": "0"}) as process:
        yield process


@pytest.fixture(scope="module")
def image() -> bytes:
    return jpeg_bytes(HEIGHT, WIDTH, seed=3)


@pytest.fixture(scope="module")
def pixels(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))


@pytest.fixture(scope="module")
def v1_labels(server: ServerProcess, image: bytes) -> np.ndarray:
    """The /v1/segment PNG label map of the image at POINT: what every OIP answer must equal."""
    response = httpx.post(f"{server.base_url}/v1/segment", content=image, params={"point": POINT},
                          headers={"Content-Type": "image/jpeg"}, timeout=120)
    response.raise_for_status()
    labels = np.asarray(Image.open(io.BytesIO(response.content)))
    assert labels.shape == (HEIGHT, WIDTH) and len(np.unique(labels)) > 3  # a mask worth comparing
    return labels


@pytest.fixture(scope="module")
def http_client(server: ServerProcess) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def receipt(parameters: dict[str, Any]) -> Any:
    value = parameters["receipt"]
    return json.loads(value["string_param"] if isinstance(value, dict) else value)


# ----- tritonclient.http -----
def test_tritonclient_http_health_and_metadata(http_client: triton_http.InferenceServerClient) -> None:
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.is_model_ready(MODEL) and not http_client.is_model_ready("no-such-model")
    server = http_client.get_server_metadata()
    assert server["name"] == "segserve" and "binary_tensor_data" in server["extensions"]
    model = http_client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in model["inputs"]} == {("image", "BYTES"), ("pixels", "UINT8")}
    assert {(t["name"], t["datatype"]) for t in model["outputs"]} == {("labels", "INT32"), ("mask_png", "BYTES")}


def test_tritonclient_http_bytes_image_binary_in_and_out(http_client, image, v1_labels) -> None:
    tensor = triton_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
    outputs = [triton_http.InferRequestedOutput("labels", binary_data=True),
               triton_http.InferRequestedOutput("mask_png", binary_data=True)]
    result = http_client.infer(MODEL, [tensor], outputs=outputs, parameters={"point": POINT})
    labels = result.as_numpy("labels")
    assert labels.dtype == np.int32 and labels.shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(labels, v1_labels)
    png = result.as_numpy("mask_png")
    assert png.shape == (1,)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png[0]))), v1_labels)
    stamp = receipt(result.get_response()["parameters"])
    assert stamp["point"] == POINT and stamp["cache"] == "miss" and (stamp["height"], stamp["width"]) == (96, 128)


def test_tritonclient_http_uint8_pixels_as_json(http_client, pixels, v1_labels) -> None:
    """Raw pixels in JSON, labels back in JSON: the same mask as the encoded image (decoded the same way)."""
    tensor = triton_http.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    result = http_client.infer(MODEL, [tensor], outputs=[triton_http.InferRequestedOutput("labels", binary_data=False)],
                               parameters={"point": POINT, "latency_budget_ms": 60000})
    assert "binary_data_size" not in result.get_output("labels").get("parameters", {})
    np.testing.assert_array_equal(result.as_numpy("labels"), v1_labels)
    stamp = receipt(result.get_response()["parameters"])
    assert stamp["budget_ms"] == 60000 and stamp["point"] == POINT


def test_tritonclient_http_uint8_batch_of_two(http_client, pixels, v1_labels) -> None:
    batch = np.stack([pixels, np.ascontiguousarray(pixels[::-1])])
    tensor = triton_http.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=True)
    result = http_client.infer(MODEL, [tensor], parameters={"point": POINT})  # no outputs: labels, binary
    labels = result.as_numpy("labels")
    assert labels.shape == (2, HEIGHT, WIDTH)
    np.testing.assert_array_equal(labels[0], v1_labels)
    assert not np.array_equal(labels[1], v1_labels)  # the flipped image is another image
    stamps = receipt(result.get_response()["parameters"])
    assert [s["point"] for s in stamps] == [POINT, POINT]


@pytest.mark.parametrize(("call", "status", "fragment"), [
    ({"model_name": "no-such-model"}, "404", "unknown model"),
    ({"parameters": {"latency_budget_ms": -5}}, "422", "latency_budget_ms"),
    ({"parameters": {"latency_budget": 5}}, "400", "unknown request parameter"),
])
def test_tritonclient_http_errors_carry_status_and_message(http_client, image, call, status, fragment) -> None:
    tensor = triton_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as error:
        http_client.infer(call.get("model_name", MODEL), [tensor], parameters=call.get("parameters"))
    assert error.value.status() == status and fragment in error.value.message()


# ----- tritonclient.grpc -----
def test_tritonclient_grpc_health_and_metadata(grpc_client: triton_grpc.InferenceServerClient) -> None:
    assert grpc_client.is_server_live() and grpc_client.is_server_ready() and grpc_client.is_model_ready(MODEL)
    server = grpc_client.get_server_metadata(as_json=True)
    assert server["name"] == "segserve" and "binary_tensor_data" in server["extensions"]
    model = grpc_client.get_model_metadata(MODEL, as_json=True)
    assert model["platform"] == "segserve"
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("image", "BYTES", ["-1"]), ("pixels", "UINT8", ["-1", "-1", "3"])]  # int64 as strings in proto JSON


def test_tritonclient_grpc_bytes_image(grpc_client, image, v1_labels) -> None:
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    outputs = [triton_grpc.InferRequestedOutput("mask_png"), triton_grpc.InferRequestedOutput("labels")]
    result = grpc_client.infer(MODEL, [tensor], outputs=outputs, parameters={"point": POINT}, client_timeout=120)
    np.testing.assert_array_equal(result.as_numpy("labels"), v1_labels)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(result.as_numpy("mask_png")[0]))), v1_labels)
    response = result.get_response(as_json=True)
    assert [o["name"] for o in response["outputs"]] == ["mask_png", "labels"]  # the order asked for
    stamp = receipt(response["parameters"])
    # The call's deadline (client_timeout=120 s) is the budget when the request names none, as on segserve.v1
    # (tritonclient rounds the deadline it sends up by up to a second).
    assert stamp["point"] == POINT and 60_000 < stamp["budget_ms"] <= 121_000


def test_tritonclient_grpc_uint8_batch_of_two_with_a_float_budget(grpc_client, pixels, v1_labels) -> None:
    batch = np.stack([pixels, pixels])
    tensor = triton_grpc.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    # tritonclient sends a Python float as double_param: segserve's proto has it (field 4).
    result = grpc_client.infer(MODEL, [tensor], parameters={"point": POINT, "latency_budget_ms": 60000.5})
    labels = result.as_numpy("labels")
    assert labels.dtype == np.int32 and labels.shape == (2, HEIGHT, WIDTH)
    np.testing.assert_array_equal(labels[0], v1_labels)
    np.testing.assert_array_equal(labels[1], v1_labels)
    stamps = receipt(result.get_response(as_json=True)["parameters"])
    assert [s["budget_ms"] for s in stamps] == [60000.5, 60000.5]


@pytest.mark.parametrize(("model", "data", "status", "fragment"), [
    ("no-such-model", None, "StatusCode.NOT_FOUND", "unknown model"),
    (MODEL, b"\xff\xd8 not a jpeg", "StatusCode.INVALID_ARGUMENT", "not an image"),
])
def test_tritonclient_grpc_errors_carry_code_and_message(grpc_client, image, model, data, status, fragment) -> None:
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data or image], dtype=np.object_))
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer(model, [tensor], client_timeout=120)
    assert error.value.status() == status and fragment in error.value.message()


def test_reflection_lists_and_describes_the_inference_service(server: ServerProcess) -> None:
    """grpcurl needs no .proto: reflection serves the protocol's file (kept out of the default pool by the stubs,
    published there by the server)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    assert "inference.GRPCInferenceService" in {s.name for s in listed.list_services_response.service}
    (raw,) = described.file_descriptor_response.file_descriptor_proto
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert file.package == "inference"
    assert [m.name for m in file.service[0].method] == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                        "ModelMetadata", "ModelInfer"]


# ----- the kserve SDK (in a subprocess) -----
@pytest.fixture(scope="module")
def kserve_run(server: ServerProcess, image: bytes, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("kserve")
    image_file = out / "image.jpg"
    image_file.write_bytes(image)
    result = subprocess.run(
        [sys.executable, str(PROBE), server.base_url, f"127.0.0.1:{server.grpc_port}", MODEL, str(image_file), POINT,
         str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, f"the kserve probe failed:\n{result.stderr[-4000:]}"
    with np.load(out / "arrays.npz") as arrays:
        return json.loads((out / "report.json").read_text()), dict(arrays)


def test_kserve_rest_client(kserve_run, v1_labels) -> None:
    report, arrays = kserve_run
    assert report["rest_live"] and report["rest_ready"] and report["rest_model_ready"]
    assert not report["rest_unknown_model_ready"]
    assert report["rest_bytes_datatype"] == "INT32"
    np.testing.assert_array_equal(arrays["rest_bytes_labels"], v1_labels)
    assert report["rest_bytes_receipt"]["point"] == POINT
    assert report["rest_batch_datatype"] == "UINT8" and arrays["rest_batch_labels"].dtype == np.uint8
    assert arrays["rest_batch_labels"].shape == (2, HEIGHT, WIDTH)
    np.testing.assert_array_equal(arrays["rest_batch_labels"][0], v1_labels)
    assert len(report["rest_batch_receipts"]) == 2
    assert report["rest_error"]["status"] == 404 and "unknown model" in report["rest_error"]["body"]["error"]


def test_kserve_grpc_client(kserve_run, v1_labels) -> None:
    report, arrays = kserve_run
    assert report["grpc_live"] and report["grpc_ready"] and report["grpc_model_ready"]
    np.testing.assert_array_equal(arrays["grpc_bytes_labels"], v1_labels)
    assert report["grpc_mask_png_shape"] == [1]
    np.testing.assert_array_equal(arrays["grpc_mask_png_decoded"], v1_labels)
    assert report["grpc_bytes_receipt"]["point"] == POINT
    assert arrays["grpc_batch_labels"].shape == (2, HEIGHT, WIDTH)
    np.testing.assert_array_equal(arrays["grpc_batch_labels"][0], v1_labels)
    assert [r["budget_ms"] for r in report["grpc_batch_receipts"]] == [60000, 60000]
    np.testing.assert_array_equal(arrays["grpc_typed_pixels_labels"], v1_labels)  # uint_contents
    np.testing.assert_array_equal(arrays["grpc_typed_image_labels"], v1_labels)  # bytes_contents
    assert report["grpc_error"]["code"] == "INVALID_ARGUMENT" and "not an image" in report["grpc_error"]["details"]
