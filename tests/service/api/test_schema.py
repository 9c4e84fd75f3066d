"""The OpenAPI schema tells the truth: schemathesis, a real third-party tool, checks a real server against it.

Every check (`--checks all`: no server errors, documented status codes, content types and headers, response
schemas, schema-valid requests accepted, schema-invalid ones rejected, ...) with the allowances written in
tests/data/schemathesis.toml for what a schema cannot say (a real image, a served name, a passed timeout). A
bounded run here; `schemathesis run` with more examples is the same command.
"""

from __future__ import annotations

import subprocess

import httpx

from tests.paths import DATA
from tests.tools import require_tool

CONFIG = DATA / "schemathesis.toml"


def test_schemathesis_finds_no_failure(live_server) -> None:
    schemathesis = require_tool("schemathesis", "pip install -e '.[dev]'")
    done = subprocess.run(
        [schemathesis, "--config-file", str(CONFIG), "run", f"{live_server.base_url}/openapi.json",
         "--checks", "all", "--max-examples", "8", "--workers", "1", "--seed", "1"],
        capture_output=True, text=True, timeout=600)
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, report  # schemathesis exits non-zero on any failure
    assert " passed" in report, report
    assert httpx.get(f"{live_server.base_url}/readyz").status_code == 200  # and the server is still fine


def test_framework_errors_use_the_documented_shape(live_server) -> None:
    missing = httpx.get(f"{live_server.base_url}/v1/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = httpx.delete(f"{live_server.base_url}/v1/models")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "GET"


def test_numbers_are_plain_ascii_and_empty_parameters_mean_unset(live_server) -> None:
    from tests.servers import jpeg_bytes

    url = f"{live_server.base_url}/v1/segment"
    image = jpeg_bytes(64, 80, seed=8001)
    for budget in ("１２３", "1_000", "inf", "nan", " 5", "0x10"):
        response = httpx.post(url, content=image, params={"latency_budget_ms": budget},
                              headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 422, (budget, response.text)
        assert response.json()["error"]["code"] == "invalid_budget"
    empty = {"model": "", "task": "", "level": "", "point": "", "quality": "", "latency_budget_ms": "",
             "timeout_ms": "", "format": "", "strict": ""}
    response = httpx.post(url, content=image, params=empty, headers={"Content-Type": "image/jpeg"}, timeout=120)
    assert response.status_code == 200, response.text
