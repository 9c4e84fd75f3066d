"""A short run of the load test end to end: `python -m loadtest run` against real servers (segserve twice, the
plain endpoint once), plus the command's ways in and its configurations.

Small serving settings (short side 128) and two 2 s steps keep it well under a minute. The offered rate comes
from `--capacity-rps` (the probe still runs, with `--probe`), so the requests sent are fixed by the seed and
the same for every target whatever the machine's speed; every assertion is about the report's consistency
(counts add up, every point delivered is one the server lists, the verdicts follow from the steps), never
about how fast this machine is.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from loadtest import cli, configs, generator, report
from loadtest.scenarios import RequestFactory, Scenario
from tests.servers import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_BATCH = 4
CAPACITY_RPS = 12.0
SMOKE_ARGS = [
    "run", "--resize-scale", "512x128", "--calibration-shape", "128x160",
    "--sizes", "96x128:2,128x96:1", "--loads", "0.8,1.5b", "--duration", "2", "--max-requests", "40",
    "--capacity-rps", str(CAPACITY_RPS), "--probe", "--capacity-seconds", "1", "--repeat-share", "0.3",
    "--hot-set", "3", "--max-batch-size", str(MAX_BATCH), "--client-timeout", "30", "--calibration-repeats", "1",
    # One thread: with two, a machine busy with other work makes OpenMP's spinning barriers 10x slower.
    "--threads", "1",
]
TARGETS = ("segserve", "segserve-fixed", "plain")


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


def test_configurations_presets_models_and_files(tmp_path: Path) -> None:
    alone = configs.resolve(None, None, None)
    assert (alone.name, alone.default_model, alone.source) == ("edaformer-t", "edaformer-t", "preset")
    pool = configs.resolve("ade20k-pool", None, None)
    assert pool.toml.count("[[models]]") == 3 and pool.toml.count("random_weights = true") == 3
    assert "scales = [1, 0.75, 0.5]" in pool.toml
    given = configs.resolve(None, ["segformer-b0:/w/b0.pth", "seaformer-t"], "/ignored.pth", (1.0, 0.5))
    assert given.default_model == "segformer-b0" and given.default_checkpoint == "/w/b0.pth"
    assert given.toml.count("random_weights = true") == 1 and "scales = [1, 0.5]" in given.toml
    file = tmp_path / "mine.toml"
    file.write_text('[[models]]\narchitecture = "edaformer-t"\ncheckpoint = "w/t.pth"\n')
    mine = configs.resolve(str(file), None, None)
    assert mine.default_checkpoint == str(tmp_path / "w/t.pth") and mine.write(tmp_path / "out") == file.resolve()
    written = pool.write(tmp_path / "out")
    assert written.name == "models.toml" and written.read_text() == pool.toml
    for bad in (("nonexistent-preset", None), ("ade20k-pool", ["edaformer-t"])):
        with pytest.raises(ValueError):
            configs.resolve(bad[0], bad[1], None)


def test_segserve_loadtest_is_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["loadtest", "run", "--help"])
    assert done.value.code == 0 and "--config" in capsys.readouterr().out


def test_segserve_loadtest_names_the_extra_when_it_is_missing(tmp_path: Path) -> None:
    """Without matplotlib (a stand-in package that fails to import), the command says what to install."""
    fake = tmp_path / "matplotlib"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed (test stand-in)')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    for command in (["-m", "service", "loadtest", "run", "--quick"], ["-m", "loadtest", "run", "--quick"]):
        done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        assert "'loadtest' extra (matplotlib missing)" in done.stderr
        assert "pip install -c constraints/cpu.txt '.[loadtest]'" in done.stderr


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("loadtest")
    assert cli.main([*SMOKE_ARGS, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text()), out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_smoke_budgets_and_rates_follow_the_best_point(smoke_report: tuple[dict, Path]) -> None:
    data, _ = smoke_report
    ladder, capacity = data["ladder"], data["capacity"]
    best = ladder["best"]
    assert best["name"] == ladder["ladder"][0] == "edaformer-t/1111-111@1"
    assert best["quality"] == max(p["quality"] for p in ladder["points"].values())
    low, high = data["scenario"]["budget_ms"]
    assert low == pytest.approx(best["batch1_ms"], abs=0.1) and high == pytest.approx(4 * best["batch1_ms"], abs=0.1)
    assert capacity["used_rps"] == CAPACITY_RPS and capacity["measured_rps"] > 0  # --probe: measured, not used
    assert capacity["best_point"] == best["name"]
    for target in TARGETS:
        offered = [s["offered_rps"] for s in data["targets"][target]["steps"]]
        assert offered == [pytest.approx(0.8 * CAPACITY_RPS), pytest.approx(1.5 * CAPACITY_RPS)]


@pytest.mark.slow
def test_smoke_steps_add_up_for_every_target(smoke_report: tuple[dict, Path]) -> None:
    data, _ = smoke_report
    points = data["ladder"]["points"]
    counts = {}
    for target in TARGETS:
        for step in data["targets"][target]["steps"]:
            counts.setdefault(step["label"], set()).add(step["requests"])
            assert step["requests"] >= 1 and step["answered"] >= 1
            assert step["answered"] + sum(step["rejections"].values()) + sum(step["timeouts"].values()) \
                + sum(step["other_errors"].values()) == step["requests"]
            assert sum(step["point_mix"].values()) == step["requests"]
            assert set(step["point_mix"]) <= set(points) | {"unserved"}
            assert 0.0 <= step["attainment"] <= 1.0
            lat = step["latency_ms"]
            assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
            delivered = [points[p]["quality"] for p in step["point_mix"] if p != "unserved"]
            assert min(delivered) - 1e-6 <= step["mean_quality"] <= max(delivered) + 1e-6
            assert step["relative_quality"] == pytest.approx(step["mean_quality"] / data["ladder"]["best"]["quality"],
                                                             abs=1e-3)
            assert len(data["latencies_ms"][target][step["label"]]) == step["answered"]
            assert step["attainment_target"] == (None if step["burst"] else 0.99)
    # The same seed and rates: every target got the same requests.
    assert all(len(sizes) == 1 for sizes in counts.values()), counts
    for target in ("segserve-fixed", "plain"):
        for step in data["targets"][target]["steps"]:
            assert set(step["point_mix"]) <= {data["ladder"]["best"]["name"], "unserved"}
            assert step["relative_quality"] == 1.0


@pytest.mark.slow
def test_smoke_keeps_each_request_with_its_receipt(smoke_report: tuple[dict, Path]) -> None:
    data, out = smoke_report
    all_rows = rows(out)
    assert len(all_rows) == sum(s["requests"] for t in data["targets"].values() for s in t["steps"])
    for row in all_rows:
        if row["status"] != 200:
            continue
        if row["target"] == "plain":
            assert row["point"] is None  # the plain endpoint sends no receipt
            continue
        assert row["point"] in data["ladder"]["points"] and row["cache"] in {"hit", "miss"}
        assert row["quality"] == data["ladder"]["points"][row["point"]]["quality"]
        # Every request carried a budget; the fixed baseline named its point.
        allowed = {"explicit", "cache"} if row["target"] == "segserve-fixed" else {"budget", "fallback", "cache"}
        assert row["plan"].split("+")[0] in allowed
        if row["cache"] == "miss":
            assert 1 <= row["batch_size"] <= MAX_BATCH and row["compute_ms"] > 0
            if not row["repeated"]:  # a repeated image may join a computation already under way, and wait less
                assert row["latency_s"] * 1e3 >= row["compute_ms"]


@pytest.mark.slow
def test_smoke_batch_sizes_come_from_metrics(smoke_report: tuple[dict, Path]) -> None:
    data, out = smoke_report
    for target in ("segserve", "segserve-fixed"):
        for step in data["targets"][target]["steps"]:
            server = step["server"]
            misses = [r for r in rows(out) if r["target"] == target and r["step"] == step["label"]
                      and r["status"] == 200 and r["cache"] == "miss"]
            assert (server["batches"] >= 1) == bool(misses)
            assert sum(server["batch_sizes"].values()) == server["batches"]
            assert set(server["batch_sizes"]) <= {str(b) for b in range(1, MAX_BATCH + 1)}
            hits = sum(r["status"] == 200 and r["cache"] == "hit" for r in rows(out)
                       if r["target"] == target and r["step"] == step["label"])
            assert server["cache_hits"] == hits


@pytest.mark.slow
def test_smoke_verdicts_follow_from_the_steps(smoke_report: tuple[dict, Path]) -> None:
    data, _ = smoke_report
    verdicts = data["verdicts"]
    step80 = data["targets"]["segserve"]["steps"][0]
    (item,) = verdicts["attainment"]  # the burst step has no target
    assert item == {"load_fraction": 0.8, "attainment": step80["attainment"], "target": 0.99,
                    "met": step80["attainment"] >= 0.99}
    assert verdicts["quality_at_80"]["met"] == (step80["relative_quality"] >= 0.9)
    throughput = verdicts["throughput_p99_under_budget"]
    mine, plain = throughput["per_target"]["segserve"], throughput["per_target"]["plain"]
    if mine and plain:
        assert throughput["ratio"] == pytest.approx(mine["achieved_rps"] / plain["achieved_rps"], abs=0.01)
    assert (mine is None) == (not step80["p99_under_budget"])


@pytest.mark.slow
def test_smoke_writes_summary_and_valid_pngs(smoke_report: tuple[dict, Path]) -> None:
    _, out = smoke_report
    summary = (out / "summary.md").read_text()
    for heading in ("## Configuration", "## Results", "## Targets", "segserve (planner)", "plain endpoint",
                    "segserve, best point only", "edaformer-t/1111-111@1"):
        assert heading in summary
    assert (out / "models.toml").read_text().startswith("# segserve load test: configuration 'edaformer-t'")
    for name in report.PLOTS:
        payload = (out / name).read_bytes()
        assert payload.startswith(PNG_SIGNATURE), name
        with Image.open(io.BytesIO(payload)) as image:
            image.verify()
            assert image.size[0] > 200 and image.size[1] > 100
    assert cli.main(["render", str(out)]) == 0  # redrawn from report.json alone
