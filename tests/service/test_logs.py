"""One log format for the whole process, checked on real servers: segserve's and uvicorn's records as plain
lines or JSON objects (SEGSERVE_LOG_FORMAT), one access line per HTTP request and per gRPC call with its
status, duration and operating point, and probes left out unless SEGSERVE_LOG_PROBES=true.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.grpc.gen import segserve_pb2, segserve_pb2_grpc
from tests.servers import ROOT, ServerProcess, free_port, jpeg_bytes

PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
# The calibration progress bar (tqdm, on stderr) is not a log record; its redraws are separated by \r.
PROGRESS_BAR = re.compile(r"^calibration \S+: ")
PROBES = ("/healthz", "/readyz", "/metrics")


def output_lines(server: ServerProcess) -> list[str]:
    assert server.log_path is not None
    text = server.log_path.read_text(errors="replace")
    return [line for line in re.split(r"[\r\n]+", text) if line.strip() and not PROGRESS_BAR.match(line)]


def exercise(server: ServerProcess) -> dict[str, str]:
    """Probes, a good and a bad request on each transport, a gRPC health check; the points that answered."""
    base = server.base_url
    for path in PROBES:
        assert httpx.get(f"{base}{path}").status_code == 200
    good = httpx.post(f"{base}/v1/segment", content=jpeg_bytes(seed=31), params={"latency_budget_ms": 5000},
                      headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert good.status_code == 200
    assert httpx.post(f"{base}/v1/segment", content=b"not an image",
                      headers={"Content-Type": "image/jpeg"}).status_code == 400
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = segserve_pb2_grpc.SegmentationStub(channel)
        reply = stub.Segment(segserve_pb2.SegmentRequest(image=jpeg_bytes(seed=32), latency_budget_ms=5000),
                             timeout=60)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Segment(segserve_pb2.SegmentRequest(image=b"not an image"), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    return {"http": good.headers["x-segserve-point"], "grpc": reply.receipt.point}


def start(env: dict[str, str]) -> ServerProcess:
    return ServerProcess(env={"SEGSERVE_LOG_LEVEL": "info", **env}, grpc_port=free_port()).start()


@pytest.fixture(scope="module")
def json_run() -> Iterator[tuple[list[dict], dict[str, str]]]:
    server = start({"SEGSERVE_LOG_FORMAT": "json"})
    try:
        points = exercise(server)
    finally:
        server.terminate()
    lines = output_lines(server)
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    yield records, points


def access(records: list[dict]) -> list[dict]:
    return [r for r in records if r["logger"] == "segserve.access"]


def test_json_lines_from_segserve_and_uvicorn(json_run: tuple[list[dict], dict[str, str]]) -> None:
    records, _ = json_run
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
        assert "\x1b" not in json.dumps(record), "terminal colour codes in a JSON record"
    loggers = {r["logger"] for r in records}
    assert {"uvicorn.error", "service.runtime", "service.grpc.server", "segserve.access"} <= loggers
    assert any(r["message"].startswith("Uvicorn running on") for r in records)
    assert "uvicorn.access" not in loggers  # replaced by segserve.access, which knows duration and point


def test_json_access_lines_for_both_transports(json_run: tuple[list[dict], dict[str, str]]) -> None:
    records, points = json_run
    lines = [(r["transport"], r["method"], r.get("path"), r["status"], r["point"]) for r in access(records)]
    assert sorted(lines, key=str) == sorted([
        ("http", "POST", "/v1/segment?latency_budget_ms=5000", "200", points["http"]),
        ("http", "POST", "/v1/segment", "400", ""),
        ("grpc", "/segserve.v1.Segmentation/Segment", None, "OK", points["grpc"]),
        ("grpc", "/segserve.v1.Segmentation/Segment", None, "INVALID_ARGUMENT", ""),
    ], key=str), "probes (HTTP and gRPC health) must not be access-logged by default"
    for record in access(records):
        assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 0
        assert record["peer"].split(":")[-2].endswith("127.0.0.1")


def test_plain_lines_with_probes_logged() -> None:
    server = start({"SEGSERVE_LOG_FORMAT": "plain", "SEGSERVE_LOG_PROBES": "true"})
    try:
        points = exercise(server)
    finally:
        server.terminate()
    lines = output_lines(server)
    odd = [line for line in lines if not PLAIN_LINE.match(line)]
    assert odd == [], f"lines not in the plain format: {odd[:5]}"
    assert any(" INFO uvicorn.error: Uvicorn running on " in line for line in lines)
    logged = [line.split(" segserve.access: ", 1)[1] for line in lines if " segserve.access: " in line]
    for path in PROBES:
        assert any(line.startswith(f"http GET {path} 200 ") for line in logged), (path, logged)
    assert any(line.startswith("grpc /grpc.health.v1.Health/Check OK ") for line in logged), logged
    segment = next(line for line in logged if line.startswith("http POST /v1/segment?"))
    assert re.fullmatch(rf"http POST /v1/segment\?latency_budget_ms=5000 200 \d+\.\dms "
                        rf"point={re.escape(points['http'])} peer=127\.0\.0\.1:\d+", segment)
    call = next(line for line in logged if line.startswith("grpc /segserve.v1.Segmentation/Segment OK"))
    assert f" point={points['grpc']} " in call


def test_an_unknown_log_format_is_refused_by_name() -> None:
    env = {**os.environ, "SEGSERVE_LOG_FORMAT": "xml", "SEGSERVE_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "log_format" in result.stderr and "Traceback" not in result.stderr


def test_the_grpc_log_reads_the_point_from_both_apis() -> None:
    from service.grpc.gen import grpc_predict_v2_pb2
    from service.grpc.logging_interceptor import point_of

    assert point_of(segserve_pb2.SegmentResponse(receipt=segserve_pb2.Receipt(point="m/a@1"))) == "m/a@1"
    assert point_of(segserve_pb2.ListModelsResponse()) == ""
    # The Open Inference Protocol carries the receipt as a JSON parameter: one object, or a list for a batch.
    infer = grpc_predict_v2_pb2.ModelInferResponse()
    infer.parameters["receipt"].string_param = json.dumps({"point": "m/a@1", "total_ms": 3.0})
    assert point_of(infer) == "m/a@1"
    batch = [{"point": "m/b@0.5"}, {"point": "m/a@1"}, {"point": "m/a@1"}]
    infer.parameters["receipt"].string_param = json.dumps(batch)
    assert point_of(infer) == "m/a@1,m/b@0.5"
    infer.parameters["receipt"].string_param = "not json"
    assert point_of(infer) == ""
