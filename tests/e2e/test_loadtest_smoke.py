"""A short run of the load test end to end: `python -m loadtest run` against a real segserve subprocess.

Small serving settings (short side 128, ~20 requests over 3 s) keep it well under a minute; the point
is that the generator, the /metrics deltas, the report and the plots work on a live server and that
their figures are internally consistent, not the figures themselves.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from loadtest import cli, generator, report
from loadtest.scenarios import RequestFactory, Scenario

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_BATCH = 4
SMOKE_ARGS = [
    "run", "--targets", "segserve", "--resize-scale", "512x128", "--calibration-shape", "128x160",
    "--sizes", "96x128:2,128x96:1", "--loads", "0.5", "--duration", "3", "--max-requests", "20",
    "--capacity-seconds", "1.5", "--repeat-share", "0.3", "--hot-set", "3", "--max-batch-size", str(MAX_BATCH),
    "--client-timeout", "20", "--calibration-repeats", "1",
    # One thread: with two, a machine busy with other work makes OpenMP's spinning barriers 10x slower.
    "--threads", "1",
]


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "http://example.com", "http://192.168.1.5", "ftp://127.0.0.1"])
def test_generator_refuses_non_loopback_targets(url: str) -> None:
    with pytest.raises(generator.NotLoopback):
        generator.require_loopback(url)
    specs = [RequestFactory(Scenario(hot_set=1)).one()]
    with pytest.raises(generator.NotLoopback):  # refused before any connection is attempted
        asyncio.run(generator.run_open_loop(url, specs))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://127.3.2.1", "http://localhost:1", "http://[::1]:9"])
def test_generator_accepts_loopback_targets(url: str) -> None:
    assert generator.require_loopback(url) == url


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("loadtest")
    assert cli.main([*SMOKE_ARGS, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text()), out


@pytest.mark.slow
def test_smoke_report_figures_are_sane(smoke_report: tuple[dict, Path]) -> None:
    data, _ = smoke_report
    assert data["capacity"]["measured_rps"] > 0 and data["capacity"]["used_rps"] == data["capacity"]["measured_rps"]
    levels = {lv["name"]: lv for lv in data["models"]["levels"]}
    cheapest = max(levels.values(), key=lambda lv: lv["rank"])
    low, high = data["scenario"]["budget_ms"]
    batch1 = float(cheapest["latency_ms"]["1"])
    assert low == pytest.approx(2 * batch1, rel=0.01) and high == pytest.approx(6 * batch1, rel=0.01)

    (step,) = data["targets"]["segserve"]["steps"]
    # The count depends on the measured capacity; even a slow, shared machine offers a few per second.
    assert 5 <= step["requests"] <= 20
    assert step["answered"] >= 1 and step["achieved_rps"] > 0
    assert 0.0 <= step["attainment"] <= 1.0
    lat = step["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert sum(step["level_mix"].values()) == step["requests"]
    assert set(step["level_mix"]) <= set(levels) | {"unserved"}
    answered_levels = [name for name in step["level_mix"] if name != "unserved"]
    gmacs = [levels[name]["gmacs"] for name in answered_levels]
    assert min(gmacs) - 1e-6 <= step["mean_gmacs"] <= max(gmacs) + 1e-6
    assert step["cache_hit_rate"] is not None and 0.0 <= step["cache_hit_rate"] <= 1.0
    assert step["answered"] + sum(step["rejections"].values()) + sum(step["timeouts"].values()) \
        + sum(step["other_errors"].values()) == step["requests"]
    assert len(data["latencies_ms"]["segserve"][step["label"]]) == step["answered"]


@pytest.mark.slow
def test_smoke_batch_sizes_come_from_metrics(smoke_report: tuple[dict, Path]) -> None:
    data, _ = smoke_report
    (step,) = data["targets"]["segserve"]["steps"]
    server = step["server"]
    # Every answered cache miss ran in some batch, so at least one batch ran during the step.
    assert server["batches"] >= 1
    assert sum(server["batch_sizes"].values()) == server["batches"]
    assert set(server["batch_sizes"]) <= {str(b) for b in range(1, MAX_BATCH + 1)}
    assert 1.0 <= server["mean_batch_size"] <= MAX_BATCH
    hits = step["cache_hit_rate"] * step["answered"]
    assert server["cache_hits"] == pytest.approx(hits, abs=0.5)


@pytest.mark.slow
def test_smoke_keeps_each_request_with_its_receipt(smoke_report: tuple[dict, Path]) -> None:
    data, out = smoke_report
    (step,) = data["targets"]["segserve"]["steps"]
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == step["requests"]
    answered = [row for row in rows if row["status"] == 200]
    assert len(answered) == step["answered"]
    for row in answered:
        assert row["level"] in step["level_mix"] and row["cache"] in {"hit", "miss"}
        # Every request carried a budget; a suffix (e.g. "+dispatch") tells of a later change of level.
        assert row["plan"].split("+")[0] in {"budget", "fallback"}
        if row["cache"] == "miss":
            assert 1 <= row["batch_size"] <= MAX_BATCH and row["compute_ms"] > 0
            assert row["latency_s"] * 1e3 >= row["compute_ms"]


@pytest.mark.slow
def test_smoke_writes_summary_and_valid_pngs(smoke_report: tuple[dict, Path]) -> None:
    _, out = smoke_report
    summary = (out / "summary.md").read_text()
    assert "## Results" in summary and "## Targets" in summary
    assert "segserve (planner)" in summary
    for name in report.PLOTS:
        payload = (out / name).read_bytes()
        assert payload.startswith(PNG_SIGNATURE), name
        with Image.open(io.BytesIO(payload)) as image:
            image.verify()
            assert image.size[0] > 200 and image.size[1] > 100
