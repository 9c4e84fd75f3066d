"""The gRPC API against a real `segserve serve --grpc-port` process, over a real channel.

One server for the module, with the result cache off so that every call computes (the HTTP and gRPC
masks compared below are both computed, not one served from the other's cache entry). Its start is
watched through the health service from the moment the gRPC port opens: NOT_SERVING while calibrating,
then SERVING.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from service.grpc.gen import segserve_pb2, segserve_pb2_grpc
from tests.servers import ServerProcess, free_port, jpeg_bytes

SERVICE = "segserve.v1.Segmentation"
SEGMENT_ROUTE = f"grpc:/{SERVICE}/Segment"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Calibration slow enough that the health poller sees it: timed runs per (level, batch size), per attempt.
CALIBRATION_REPEATS = ("3", "12")
MAX_BODY_BYTES = 1_000_000


@dataclass
class HealthWatch:
    """Polls Check("") and Check(SERVICE) from a thread until both are SERVING; records each change."""

    port: int
    seen: dict[str, list[int]] = field(default_factory=lambda: {"": [], SERVICE: []})
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        # Wait for the port with plain connects: a gRPC channel that failed to connect backs off for seconds.
        while not self.stop.is_set():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.02)
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                for service, statuses in self.seen.items():
                    try:
                        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0).status
                    except grpc.RpcError:
                        continue  # the port is not open yet
                    if not statuses or statuses[-1] != status:
                        statuses.append(status)
                if all(statuses and statuses[-1] == SERVING for statuses in self.seen.values()):
                    return
                time.sleep(0.05)


@dataclass
class GrpcServer:
    process: ServerProcess
    health: dict[str, list[int]]
    channel: grpc.Channel

    @property
    def stub(self) -> segserve_pb2_grpc.SegmentationStub:
        return segserve_pb2_grpc.SegmentationStub(self.channel)


@pytest.fixture(scope="module")
def server() -> Iterator[GrpcServer]:
    for attempt, repeats in enumerate(CALIBRATION_REPEATS, start=1):
        process = ServerProcess(grpc_port=free_port(), env={
            "SEGSERVE_CACHE_BYTES": "0", "SEGSERVE_CALIBRATION_REPEATS": repeats,
            "SEGSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES)})
        watch = HealthWatch(process.grpc_port)
        poller = threading.Thread(target=watch.run, daemon=True)
        poller.start()
        try:
            process.start()
            poller.join(timeout=30)
        except BaseException:
            process.terminate()
            raise
        finally:
            watch.stop.set()
        first_seen = [statuses[0] if statuses else None for statuses in watch.seen.values()]
        if first_seen != [SERVING, SERVING] or attempt == len(CALIBRATION_REPEATS):
            break
        process.terminate()  # calibration ended before the first check could see it: again, calibrating slower
    try:
        with grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}") as channel:
            yield GrpcServer(process, watch.seen, channel)
    finally:
        process.terminate()


def test_health_goes_from_not_serving_to_serving_after_calibration(server: GrpcServer) -> None:
    for service, statuses in server.health.items():
        assert statuses == [NOT_SERVING, SERVING], (service, statuses)
    stub = health_pb2_grpc.HealthStub(server.channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_segment_round_trip_with_a_deadline(server: GrpcServer) -> None:
    image = jpeg_bytes(height=96, width=144, seed=301)
    response = server.stub.Segment(segserve_pb2.SegmentRequest(image=image), timeout=30)
    mask = Image.open(io.BytesIO(response.mask))
    assert response.content_type == "image/png"
    assert (mask.width, mask.height) == (144, 96)
    levels = {level.name: level for level in server.stub.ListModels(segserve_pb2.ListModelsRequest()).models[0].levels}
    receipt = response.receipt
    assert receipt.model == "edaformer-t"
    assert receipt.level in levels
    assert receipt.isr == receipt.knob_value == levels[receipt.level].knob_value
    assert receipt.point == f"edaformer-t/{receipt.level}@{receipt.scale:g}" and receipt.knob == "isr"
    assert receipt.quality > 0 and receipt.quality_source == "prior" and receipt.task == "ade20k"
    assert (receipt.cache, receipt.batch_size) == ("miss", 1)
    assert receipt.compute_ms > 0 and receipt.total_ms >= receipt.compute_ms and receipt.queue_ms >= 0
    assert receipt.predicted_ms > 0
    assert (receipt.height, receipt.width) == (96, 144)
    # The deadline is the budget: the time left when the call reached the server. gRPC core may round the
    # timeout it sends up (here by up to ~0.1 s), so that can be a little over the client's 30 s.
    assert receipt.HasField("budget_ms") and 25_000 < receipt.budget_ms <= 30_200
    assert receipt.plan_reason == "budget"
    assert receipt.HasField("budget_met") and receipt.budget_met is (receipt.total_ms <= receipt.budget_ms)


def test_without_a_deadline_there_is_no_budget_and_an_explicit_budget_wins(server: GrpcServer) -> None:
    image = jpeg_bytes(height=64, width=64, seed=302)
    receipt = server.stub.Segment(segserve_pb2.SegmentRequest(image=image)).receipt
    assert not receipt.HasField("budget_ms") and not receipt.HasField("budget_met")
    assert receipt.plan_reason == "default"
    receipt = server.stub.Segment(segserve_pb2.SegmentRequest(image=image, latency_budget_ms=20_000),
                                  timeout=60).receipt
    assert receipt.budget_ms == 20_000 and receipt.HasField("budget_met")


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, int(1.5 * MAX_BODY_BYTES)])
def test_a_message_over_the_size_limit_carries_the_error_code(server: GrpcServer, size: int) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        server.stub.Segment(segserve_pb2.SegmentRequest(image=b"\xff" * size), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(raised.value.trailing_metadata())["segserve-error-code"] == "body_too_large"


def test_list_models_matches_http(server: GrpcServer) -> None:
    response = server.stub.ListModels(segserve_pb2.ListModelsRequest(), timeout=30)
    listing = httpx.get(f"{server.process.base_url}/v1/models", timeout=30).json()
    (model,), (expected,) = response.models, listing["models"]
    assert (response.default_model, response.default_task) == (listing["default_model"], listing["default_task"])
    assert [(t.name, list(t.ladder)) for t in response.tasks] == [(n, t["ladder"]) for n, t in listing["tasks"].items()]
    assert model.name == expected["name"] == "edaformer-t"
    assert list(model.classes) == expected["classes"] and model.num_classes == expected["num_classes"] == 150
    assert (model.weights, model.dataset, model.backend) == (expected["weights"], expected["dataset"], "torch")
    assert (model.architecture, model.family, model.task, model.knob) == ("edaformer-t", "edaformer", "ade20k", "isr")
    assert list(model.calibration_shape) == expected["calibration_shape"]
    assert [level.name for level in model.levels] == expected["knob"]["levels"]
    assert (list(model.levels[3].isr.encoder), list(model.levels[3].isr.decoder)) == ([2, 2, 1, 1], [2, 2, 2])
    assert [p.name for p in model.points] == [p["name"] for p in expected["points"]]
    for point, want in zip(model.points, expected["points"], strict=True):
        assert (point.level, point.scale, point.quality, point.on_ladder) == (
            want["level"], want["scale"], want["quality"], want["on_ladder"])
        assert point.gmacs == pytest.approx(want["gmacs"]) and point.gmacs > 0
        # Latencies are refined online, so compare the batch sizes measured, each a positive time.
        assert {1, 4} <= set(point.latency_ms) and all(ms > 0 for ms in point.latency_ms.values())


@pytest.mark.parametrize(("request_fields", "code", "error_code", "message"), [
    ({"image": b"this is not an image"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_image", "not an image"),
    ({"image": b""}, grpc.StatusCode.INVALID_ARGUMENT, "empty_body", "empty"),
    ({"level": "9999-999"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown_level", "unknown isr level"),
    ({"point": "edaformer-t/9999-999@1"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown_point", "unknown point"),
    ({"task": "cityscapes"}, grpc.StatusCode.NOT_FOUND, "unknown_task", "unknown task"),
    ({"quality": "superb"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_quality", "quality"),
    ({"format": "gif"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown_format", "unknown format"),
    ({"latency_budget_ms": -5}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_budget", "latency_budget_ms"),
    ({"model": "edaformer-z"}, grpc.StatusCode.NOT_FOUND, "unknown_model", "unknown model"),
])
def test_invalid_requests_get_clear_errors(server: GrpcServer, request_fields, code, error_code, message) -> None:
    fields = {"image": jpeg_bytes(height=64, width=64, seed=303), **request_fields}
    with pytest.raises(grpc.RpcError) as raised:
        server.stub.Segment(segserve_pb2.SegmentRequest(**fields), timeout=30)
    assert raised.value.code() == code
    assert message in raised.value.details()
    assert dict(raised.value.trailing_metadata())["segserve-error-code"] == error_code


def test_an_infeasible_strict_budget_is_unavailable_with_retry_after(server: GrpcServer) -> None:
    request = segserve_pb2.SegmentRequest(image=jpeg_bytes(height=64, width=64, seed=304), latency_budget_ms=0.5,
                                          strict=True)
    with pytest.raises(grpc.RpcError) as raised:
        server.stub.Segment(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    metadata = dict(raised.value.trailing_metadata())
    assert metadata["segserve-error-code"] == "budget_infeasible" and int(metadata["retry-after"]) >= 1


def test_reflection_lists_the_services(server: GrpcServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
    listed, described = stub.ServerReflectionInfo(iter(requests), timeout=30)
    names = {service.name for service in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the .proto is served, for grpcurl & co


def test_http_and_grpc_give_identical_bytes(server: GrpcServer) -> None:
    image = jpeg_bytes(height=100, width=130, seed=305)
    for level, output_format in (("2211-222", "png"), ("1111-111", "rle")):
        via_grpc = server.stub.Segment(segserve_pb2.SegmentRequest(image=image, level=level, format=output_format),
                                       timeout=60)
        via_http = httpx.post(f"{server.process.base_url}/v1/segment", content=image, timeout=60,
                              headers={"Content-Type": "image/jpeg"}, params={"level": level, "format": output_format})
        assert via_http.status_code == 200, via_http.text
        assert via_grpc.receipt.cache == via_http.headers["X-Segserve-Cache"] == "miss"  # both computed
        assert via_grpc.receipt.level == via_http.headers["X-Segserve-Level"] == level
        assert via_grpc.content_type == via_http.headers["content-type"]
        if output_format == "png":
            assert via_grpc.mask == via_http.content
            assert np.asarray(Image.open(io.BytesIO(via_grpc.mask))).shape == (100, 130)
        else:  # JSON bodies carry their own request's receipt (timings differ); the rest is the same
            grpc_body, http_body = json.loads(via_grpc.mask), via_http.json()
            assert grpc_body.pop("receipt")["level"] == http_body.pop("receipt")["level"] == level
            assert grpc_body == http_body


def test_grpc_requests_are_counted_with_http_status_codes(server: GrpcServer) -> None:
    text = httpx.get(f"{server.process.base_url}/metrics", timeout=30).text

    def count(status: str) -> float:
        """Every model label: a refused request names no model that answered it."""
        found = 0.0
        for line in text.splitlines():
            if line.startswith("segserve_requests_total{") and f'route="{SEGMENT_ROUTE}"' in line \
                    and f'status="{status}"' in line:
                found += float(line.rsplit(" ", 1)[1])
        return found

    assert count("200") >= 1
    assert f'segserve_requests_total{{model="edaformer-t",route="{SEGMENT_ROUTE}",status="200"}}' in text
    assert count("400") >= 1  # the invalid images
    assert count("404") >= 1  # the unknown model


def test_health_turns_not_serving_when_the_server_drains(server: GrpcServer) -> None:
    """Last in this module: it stops the module's server (SIGTERM), watching health while it drains."""
    stub = health_pb2_grpc.HealthStub(server.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
    statuses = [next(watch).status]
    server.process.process.send_signal(signal.SIGTERM)
    with contextlib.suppress(grpc.RpcError):  # the stream ends when the server stops
        statuses.extend(message.status for message in watch)
    assert statuses[:2] == [SERVING, NOT_SERVING], statuses
    assert server.process.process.wait(timeout=60) == 0
