"""Drive a segserve server with the kserve SDK's v2 clients; run by tests/service/api/test_oip_clients.py.

    python tests/service/api/oip_kserve_probe.py HTTP_URL GRPC_TARGET MODEL IMAGE_FILE POINT OUT_DIR

A separate process because kserve's stubs and tritonclient.grpc's (imported by the test) both define the
`inference.*` messages, and protobuf's default descriptor pool refuses a second definition in one process.
Writes OUT_DIR/report.json (scalars, receipts, errors) and OUT_DIR/arrays.npz (the tensors the clients decoded).
Nothing here asserts: the test does, on what the clients returned.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from PIL import Image


def bytes_input(image: bytes) -> InferInput:
    tensor = InferInput(name="image", shape=[1], datatype="BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
    return tensor


def pixels_input(pixels: np.ndarray, binary: bool) -> InferInput:
    tensor = InferInput(name="pixels", shape=list(pixels.shape), datatype="UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def parameter(value: Any) -> Any:
    """A response parameter as a plain value: REST gives JSON values, gRPC InferParameter messages."""
    if hasattr(value, "WhichOneof"):
        return getattr(value, value.WhichOneof("parameter_choice"))
    return value


async def rest(base: str, model: str, image: bytes, pixels: np.ndarray, point: str,
               report: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0))
    try:
        report["rest_live"] = await client.is_server_live(base)
        report["rest_ready"] = await client.is_server_ready(base)
        report["rest_model_ready"] = await client.is_model_ready(base, model)
        report["rest_unknown_model_ready"] = await client.is_model_ready(base, "no-such-model")
        # BYTES in (binary), labels out as binary data.
        request = InferRequest(model_name=model, infer_inputs=[bytes_input(image)], parameters={"point": point},
                               request_outputs=[RequestedOutput("labels", parameters={"binary_data": True})])
        response = await client.infer(base, request, model_name=model)
        arrays["rest_bytes_labels"] = response.outputs[0].as_numpy()
        report["rest_bytes_datatype"] = response.outputs[0].datatype
        report["rest_bytes_receipt"] = json.loads(parameter(response.parameters["receipt"]))
        # UINT8 batch of 2 in (JSON data), labels as UINT8 in JSON.
        batch = np.stack([pixels, pixels[:, ::-1]])
        request = InferRequest(model_name=model, infer_inputs=[pixels_input(batch, binary=False)],
                               parameters={"point": point},
                               request_outputs=[RequestedOutput("labels", parameters={"datatype": "UINT8"})])
        response = await client.infer(base, request, model_name=model)
        arrays["rest_batch_labels"] = response.outputs[0].as_numpy()
        report["rest_batch_datatype"] = response.outputs[0].datatype
        report["rest_batch_receipts"] = json.loads(parameter(response.parameters["receipt"]))
        try:
            await client.infer(base, InferRequest(model_name="no-such-model", infer_inputs=[bytes_input(image)]),
                               model_name="no-such-model")
        except httpx.HTTPStatusError as exc:
            report["rest_error"] = {"status": exc.response.status_code, "body": exc.response.json()}
    finally:
        await client.close()


async def grpc_calls(target: str, model: str, image: bytes, pixels: np.ndarray, point: str,
                     report: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    client = InferenceGRPCClient(target, timeout=120, retries=0)
    try:
        report["grpc_live"] = await client.is_server_live()
        report["grpc_ready"] = await client.is_server_ready()
        report["grpc_model_ready"] = await client.is_model_ready(model)
        # BYTES in (raw_input_contents), labels and the PNG out (raw_output_contents).
        request = InferRequest(model_name=model, infer_inputs=[bytes_input(image)], parameters={"point": point},
                               request_outputs=[RequestedOutput("labels"), RequestedOutput("mask_png")])
        response = await client.infer(request)
        arrays["grpc_bytes_labels"] = response.outputs[0].as_numpy()
        png = response.outputs[1].as_numpy()
        report["grpc_mask_png_shape"] = list(png.shape)
        arrays["grpc_mask_png_decoded"] = np.asarray(Image.open(io.BytesIO(png[0])))
        report["grpc_bytes_receipt"] = json.loads(parameter(response.parameters["receipt"]))
        # UINT8 batch of 2 in (raw), labels out (raw), a budget as an integer parameter (kserve sends int64).
        batch = np.stack([pixels, pixels[:, ::-1]])
        request = InferRequest(model_name=model, infer_inputs=[pixels_input(batch, binary=True)],
                               parameters={"point": point, "latency_budget_ms": 60000})
        response = await client.infer(request)
        arrays["grpc_batch_labels"] = response.outputs[0].as_numpy()
        report["grpc_batch_receipts"] = json.loads(parameter(response.parameters["receipt"]))
        # Typed contents instead of raw bytes: a list as data goes in uint_contents / bytes_contents.
        typed = [InferInput(name="pixels", shape=list(pixels.shape), datatype="UINT8", data=pixels.ravel().tolist()),
                 InferInput(name="image", shape=[1], datatype="BYTES", data=[image])]
        for tensor in typed:
            response = await client.infer(InferRequest(model_name=model, infer_inputs=[tensor],
                                                       parameters={"point": point}))
            arrays[f"grpc_typed_{tensor.name}_labels"] = response.outputs[0].as_numpy()
        try:
            await client.infer(InferRequest(model_name=model, infer_inputs=[bytes_input(b"not an image")]))
        except grpc.RpcError as exc:
            report["grpc_error"] = {"code": exc.code().name, "details": exc.details()}
    finally:
        await client.close()


def main(argv: list[str]) -> None:
    base, target, model, image_file, point, out = argv
    image = Path(image_file).read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    report: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    asyncio.run(rest(base, model, image, pixels, point, report, arrays))
    asyncio.run(grpc_calls(target, model, image, pixels, point, report, arrays))
    Path(out, "report.json").write_text(json.dumps(report))
    np.savez(Path(out, "arrays.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
