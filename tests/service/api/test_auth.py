"""Optional API keys, per-client rate limits, CORS and the ops port (`service/api/guards.py`, `service/grpc/guards.py`)
on real servers, over both transports and through the Python client.

Two servers, each calibrating one point only (what is tested here is in front of the model):
- `keyed`: keys from SEGSERVE_API_KEYS and from a file of digests, gRPC, CORS for one origin, a rate limit per key;
- `open_server`: no keys on loopback (so no authentication), an ops port, a rate limit per client address. Its
  rate test connects from 127.0.0.2 (also loopback), a client address no other test uses.
Start-up refusals (auth=on without keys, a key file of plain keys, a taken ops port) run the CLI to its exit.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from segserve_client import BadRequest, Client
from service.api.guards import Guard, GuardConfigError, TokenBuckets
from service.grpc.gen import segserve_pb2, segserve_pb2_grpc
from service.settings import Settings
from tests.servers import FAST_SETTINGS, ROOT, ServerProcess, free_port, jpeg_bytes

ORIGIN = "http://demo.example"
RATE, BURST = 0.2, 10  # a token every 5 s: BURST cheap requests on loopback take far less
ONE_POINT = {"SEGSERVE_LEVELS": "2222-222", "SEGSERVE_SCALES": "1", "SEGSERVE_CALIBRATION_BATCH_SIZES": "1"}
LIMITED = {"SEGSERVE_RATE_LIMIT_RPS": str(RATE), "SEGSERVE_RATE_LIMIT_BURST": str(BURST)}
# alpha: general use; beta: the HTTP rate test; delta: the gRPC rate test; gamma: only in the key file.
PLAIN_KEYS = "alpha-key, beta-key,delta-key"
FILE_KEY = "gamma-key"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    key_file = tmp_path_factory.mktemp("keys") / "api-keys.sha256"
    digest = hashlib.sha256(FILE_KEY.encode()).hexdigest()
    key_file.write_text(f"# segserve API keys\n\n{digest}  reporting-job  # a label and a comment\n")
    env = {**ONE_POINT, **LIMITED, "SEGSERVE_API_KEYS": PLAIN_KEYS, "SEGSERVE_API_KEYS_FILE": str(key_file),
           "SEGSERVE_CORS_ORIGINS": f"{ORIGIN}, http://other.example"}
    with ServerProcess(env=env, grpc_port=free_port()) as server:
        yield server


class OpsPortServer(ServerProcess):
    """A server whose /readyz is on its ops port (the API port answers it 404)."""

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{ops_port(self)}/readyz"


def ops_port(server: ServerProcess) -> int:
    return int(server.env["SEGSERVE_OPS_PORT"])


@pytest.fixture(scope="module")
def open_server() -> Iterator[ServerProcess]:
    with OpsPortServer(env={**ONE_POINT, **LIMITED, "SEGSERVE_OPS_PORT": str(free_port())},
                       grpc_port=free_port()) as server:
        yield server


# ----- keys over HTTP -----

def test_http_without_a_key_is_refused_with_a_bearer_challenge(keyed: ServerProcess) -> None:
    for headers, challenge in (({}, 'Bearer realm="segserve"'), (bearer("wrong-key"), "invalid_token"),
                               ({"Authorization": "Basic YWxwaGEta2V5Og=="}, 'Bearer realm="segserve"')):
        response = httpx.post(f"{keyed.base_url}/v1/segment", content=jpeg_bytes(),
                              headers={"Content-Type": "image/jpeg", **headers})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        assert challenge in response.headers["WWW-Authenticate"]
    # The Open Inference Protocol's routes answer in its own error shape.
    oip = httpx.get(f"{keyed.base_url}/v2/models/edaformer-t")
    assert oip.status_code == 401 and isinstance(oip.json()["error"], str)


def test_http_with_a_key_from_the_variable_or_the_file(keyed: ServerProcess) -> None:
    for key in ("alpha-key", FILE_KEY):
        response = httpx.post(f"{keyed.base_url}/v1/segment", content=jpeg_bytes(seed=3),
                              headers={"Content-Type": "image/jpeg", **bearer(key)}, timeout=60)
        assert response.status_code == 200, response.text
    assert httpx.get(f"{keyed.base_url}/v2/models/edaformer-t", headers=bearer(FILE_KEY)).status_code == 200


def test_probes_metrics_and_public_pages_stay_open(keyed: ServerProcess) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs"):
        assert httpx.get(keyed.base_url + path).status_code == 200, path
    assert httpx.get(f"{keyed.base_url}/v1/models").status_code == 401


def test_the_openapi_document_names_the_key(keyed: ServerProcess) -> None:
    schema = httpx.get(f"{keyed.base_url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "An API key: 'Authorization: Bearer <key>'."}
    segment = schema["paths"]["/v1/segment"]["post"]
    assert segment["security"] == [{"apiKey": []}] and {"401", "429"} <= set(segment["responses"])
    assert "security" not in schema["paths"]["/readyz"]["get"]


# ----- keys over gRPC -----

def test_grpc_without_a_key_is_unauthenticated_and_health_stays_open(keyed: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{keyed.grpc_port}") as channel:
        stub = segserve_pb2_grpc.SegmentationStub(channel)
        request = segserve_pb2.SegmentRequest(image=jpeg_bytes(seed=4))
        for metadata in (None, (("authorization", "Bearer wrong-key"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Segment(request, timeout=30, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ("segserve-error-code", "unauthorized") in refused.value.trailing_metadata()
        answer = stub.Segment(request, timeout=60, metadata=(("authorization", f"Bearer {FILE_KEY}"),))
        assert answer.receipt.point == "edaformer-t/2222-222@1"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_client_sends_its_key_on_both_transports(keyed: ServerProcess) -> None:
    for address in (keyed.base_url, f"grpc://127.0.0.1:{keyed.grpc_port}"):
        with Client(address, api_key="alpha-key", trust_env=False) as client:
            result = client.segment(jpeg_bytes(seed=5), point="edaformer-t/2222-222@1")
            assert result.mask.shape == (120, 160)
        with Client(address, trust_env=False) as client, pytest.raises(BadRequest) as refused:
            client.models()
        assert (refused.value.status, refused.value.code) == (401, "unauthorized"), address


# ----- rate limits -----

def test_a_key_gets_its_burst_then_429_with_retry_after_then_a_token_again(keyed: ServerProcess) -> None:
    with httpx.Client(base_url=keyed.base_url, headers=bearer("beta-key")) as http:
        started = time.monotonic()
        statuses = [http.get("/v2").status_code for _ in range(BURST)]
        refused = http.get("/v2")
        elapsed = time.monotonic() - started
        assert statuses == [200] * BURST
        assert refused.status_code == 429, (refused.text, elapsed)  # fewer than 1/RATE s went by: no new token
        assert "rate limit" in refused.json()["error"]  # a v2 route: the protocol's error shape, a string
        wait = int(refused.headers["Retry-After"])
        assert 1 <= wait <= 1 / RATE
        # Another key has its own bucket.
        assert httpx.post(f"{keyed.base_url}/v1/segment", content=b"x", headers=bearer("alpha-key")).status_code == 400
        time.sleep(wait)
        assert http.get("/v2").status_code == 200  # Retry-After was enough for one token
        assert http.get("/v1/models").json()["error"]["code"] == "rate_limited"  # and it is spent


def test_grpc_calls_share_the_key_s_bucket_with_http(keyed: ServerProcess) -> None:
    metadata = (("authorization", "Bearer delta-key"),)
    with grpc.insecure_channel(f"127.0.0.1:{keyed.grpc_port}") as channel:
        stub = segserve_pb2_grpc.SegmentationStub(channel)
        for _ in range(BURST - 1):
            stub.ListModels(segserve_pb2.ListModelsRequest(), timeout=30, metadata=metadata)
        assert httpx.get(f"{keyed.base_url}/v2", headers=bearer("delta-key")).status_code == 200  # the last token
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(segserve_pb2.ListModelsRequest(), timeout=30, metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(refused.value.trailing_metadata())
    assert trailing["segserve-error-code"] == "rate_limited" and 1 <= int(trailing["retry-after"]) <= 1 / RATE


def test_without_keys_the_limit_is_per_client_address(open_server: ServerProcess) -> None:
    other = httpx.HTTPTransport(local_address="127.0.0.2")  # loopback too, and a client address of its own
    with httpx.Client(base_url=open_server.base_url, transport=other) as http:
        statuses = [http.get("/v2").status_code for _ in range(BURST + 1)]
        assert statuses == [200] * BURST + [429], statuses
        assert http.get("/v1/models").json()["error"]["code"] == "rate_limited"
    assert httpx.get(f"{open_server.base_url}/v2").status_code == 200  # 127.0.0.1 has its own bucket


# ----- without keys; the ops port -----

def test_without_keys_on_loopback_both_transports_are_open(open_server: ServerProcess) -> None:
    response = httpx.post(f"{open_server.base_url}/v1/segment", content=jpeg_bytes(seed=6),
                          headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200, response.text
    with grpc.insecure_channel(f"127.0.0.1:{open_server.grpc_port}") as channel:
        answer = segserve_pb2_grpc.SegmentationStub(channel).Segment(
            segserve_pb2.SegmentRequest(image=jpeg_bytes(seed=6)), timeout=60)
    assert answer.receipt.point == "edaformer-t/2222-222@1"


def test_the_ops_port_serves_the_probes_and_metrics_and_nothing_else(open_server: ServerProcess) -> None:
    ops = f"http://127.0.0.1:{ops_port(open_server)}"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(ops + path).status_code == 200, path
        moved = httpx.get(open_server.base_url + path)
        assert moved.status_code == 404 and "ops port" in moved.json()["error"]["message"], path
    assert "segserve_requests_total" in httpx.get(f"{ops}/metrics").text
    for path in ("/v1/models", "/docs", "/v2/health/ready"):
        assert httpx.get(ops + path).status_code == 404, path
    assert httpx.get(f"{open_server.base_url}/v2/health/ready").status_code == 200


# ----- CORS -----

def test_cors_preflight_and_exposed_receipt_headers(keyed: ServerProcess) -> None:
    preflight = httpx.options(f"{keyed.base_url}/v1/segment", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-latency-budget-ms"})
    assert preflight.status_code == 200  # answered before the key check: a preflight carries no credentials
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert {"authorization", "content-type", "x-latency-budget-ms"} <= {h.strip() for h in allowed.split(",")}
    stranger = httpx.options(f"{keyed.base_url}/v1/segment", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert stranger.status_code == 400 and "Access-Control-Allow-Origin" not in stranger.headers

    answer = httpx.post(f"{keyed.base_url}/v1/segment", content=jpeg_bytes(seed=7), timeout=60,
                        headers={"Content-Type": "image/jpeg", "Origin": ORIGIN, **bearer("alpha-key")})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = {h.strip().lower() for h in answer.headers["Access-Control-Expose-Headers"].split(",")}
    receipt = {name.lower() for name in answer.headers if name.lower().startswith("x-segserve-")}
    assert {"x-segserve-point", "x-segserve-total-ms"} <= receipt <= exposed
    # A refusal is readable by the page too (its status, code and challenge).
    refused = httpx.get(f"{keyed.base_url}/v1/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "www-authenticate" in refused.headers["Access-Control-Expose-Headers"].lower()
    # Without an Origin (not a browser), no CORS headers.
    assert "Access-Control-Allow-Origin" not in httpx.get(f"{keyed.base_url}/healthz").headers


# ----- start-up refusals: one clear line, exit 2 -----

def serve_until_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **FAST_SETTINGS, "SEGSERVE_PORT": str(free_port()), **env}
    return subprocess.run([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case", ["auth-on-without-keys", "plain-key-in-the-file", "ops-port-taken"])
def test_a_wrong_access_setting_stops_the_start_with_one_line(case: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if case == "auth-on-without-keys":
            env, expected = {"SEGSERVE_AUTH": "on"}, "no API key is configured"
        elif case == "plain-key-in-the-file":
            (tmp_path / "keys").write_text("# keys\nalpha-key\n")
            env, expected = {"SEGSERVE_API_KEYS_FILE": str(tmp_path / "keys")}, f"{tmp_path / 'keys'}:2: expected"
        else:
            env = {"SEGSERVE_OPS_PORT": str(taken.getsockname()[1])}
            expected = f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"
        done = serve_until_exit(env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines[-1].startswith("segserve serve: error: ") and expected in lines[-1], lines
    assert "Traceback" not in done.stderr


# ----- the decision itself, in-process -----

def test_auth_modes() -> None:
    assert Guard.from_settings(Settings()).digests is None  # auto without keys: open
    assert Guard.from_settings(Settings(api_keys="k")).digests  # auto with keys: required
    assert Guard.from_settings(Settings(api_keys="k", auth="off")).digests is None
    assert not Guard.from_settings(Settings(api_keys="k", auth="off")).active  # nothing to do: no middleware work
    with pytest.raises(GuardConfigError):
        Guard.from_settings(Settings(auth="on", api_keys=" , "))
    assert "s3cret-key" not in repr(Settings(api_keys="s3cret-key"))  # never in a printed or logged Settings


def test_buckets_refill_at_the_rate_and_stay_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, max_clients=100, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") == pytest.approx(0.5)
    for client in range(1000):
        buckets.take(f"client-{client}")
    assert len(buckets) == 100  # least recently used dropped
