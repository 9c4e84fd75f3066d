"""The model commands: `python -m models.cli predict | export-onnx | bench`, end to end.

`predict` and `export-onnx` run as subprocesses, as a user runs them; `bench` runs in-process with
`--quick` and eager only (its ONNX paths are the runner tested in test_export_onnx.py and test_int8.py); its
reports, Markdown blocks and Pareto plot are checked on made-up reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bench_report import MD_END, MD_HEADING, MD_START, ZOO_END, ZOO_HEADING, ZOO_START, update_markdown
from models.cli import main
from models.datasets import dataset_for
from models.export import META_LEVEL, read_metadata
from tests.paths import ROOT


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "models.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A non-square RGBA PNG and a grey JPEG (both converted to RGB by the CLI)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    png, jpeg = folder / "wide.png", folder / "tall.jpg"
    Image.fromarray(rng.integers(0, 256, (75, 101, 4), dtype=np.uint8)).save(png)  # RGBA
    Image.fromarray(rng.integers(0, 256, (90, 61), dtype=np.uint8)).save(jpeg, quality=90)
    return {"png": png, "jpeg": jpeg}


def test_predict_png_writes_a_label_map_of_the_image_size(images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mask.png"
    done = run_cli("predict", str(images["png"]), "--model", "edaformer-t", "--level", "2222-222", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "level 2222-222" in done.stdout
    assert "RANDOM weights" in done.stderr  # no checkpoint: said plainly
    mask = Image.open(out)
    assert mask.mode == "L"
    assert mask.size == (101, 75)
    labels = np.asarray(mask)
    assert labels.max() < 150  # ADE20K class ids


def test_predict_jpeg_color_writes_the_dataset_palette(images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mask.png"
    done = run_cli("predict", str(images["jpeg"]), "--dataset", "coco-stuff", "--isr", "2211/222", "--color",
                   "-o", str(out))
    assert done.returncode == 0, done.stderr
    mask = Image.open(out)
    assert mask.mode == "P"
    assert mask.size == (61, 90)
    assert np.asarray(mask).max() < 171
    palette = dataset_for("coco-stuff").palette
    assert mask.getpalette()[: 3 * len(palette)] == [c for color in palette for c in color]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--isr", "12/3", "ISR needs 4 encoder and 3 decoder ratios"),
    ("--level", "fastest", "unknown isr level 'fastest'"),
    ("--level", "s12", "unknown isr level 's12'"),
])
def test_predict_reports_bad_isr_without_traceback(images: dict[str, Path], tmp_path: Path,
                                                   flag: str, value: str, message: str) -> None:
    done = run_cli("predict", str(images["png"]), flag, value, "-o", str(tmp_path / "m.png"))
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "m.png").exists()


@pytest.mark.slow
def test_export_onnx_end_to_end(images: dict[str, Path], tmp_path: Path) -> None:
    out, image = tmp_path / "t.onnx", images["png"]
    done = run_cli("export-onnx", "--model", "edaformer-t", "--level", "2211-222", "-o", str(out),
                   "--parity-sizes", "1x96x160,1x100x164,2x64x96")
    assert done.returncode == 0, done.stderr
    assert read_metadata(out)[META_LEVEL] == "2211-222"
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("batch ")]
    assert [line.split(":")[0].strip() for line in lines] == ["batch 1 96x160", "batch 1 100x164", "batch 2 64x96"]
    assert all(float(line.split(":")[1]) <= 1e-4 for line in lines)

    # The exported graph serves `predict --onnx` through the same Predictor (level read from the file).
    mask = tmp_path / "mask.png"
    done = run_cli("predict", str(image), "--onnx", str(out), "-o", str(mask))
    assert done.returncode == 0, done.stderr
    assert "level 2211-222" in done.stdout
    assert Image.open(mask).size == (101, 75) and np.asarray(Image.open(mask)).max() < 150
    done = run_cli("predict", str(image), "--onnx", str(out), "--isr", "2222/222", "-o", str(mask))
    assert done.returncode == 2 and "exported at level 2211-222, not 2222-222" in done.stderr


def test_predict_is_seeded_without_a_checkpoint(images: dict[str, Path], tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for out in (first, second):
        done = run_cli("predict", str(images["png"]), "-o", str(out))
        assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_predict_overlay_blends_the_image_with_class_colours(images: dict[str, Path], tmp_path: Path) -> None:
    mask, blended = tmp_path / "mask.png", tmp_path / "overlay.png"
    assert run_cli("predict", str(images["png"]), "-o", str(mask)).returncode == 0
    done = run_cli("predict", str(images["png"]), "--overlay", "-o", str(blended))
    assert done.returncode == 0, done.stderr
    labels = np.asarray(Image.open(mask)).astype(np.int64)
    pixels = np.asarray(Image.open(images["png"]).convert("RGB")).astype(np.float64)
    palette = np.asarray(dataset_for("ade20k").palette, dtype=np.float64)
    expected = np.clip(0.5 * pixels + 0.5 * palette[labels] + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(blended)), expected)


@pytest.mark.slow
def test_bench_quick_writes_json_and_markdown(tmp_path: Path) -> None:
    report_path, markdown = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\n## Serving: someone else's section\n\nkeep me\n")
    code = main(["bench", "--quick", "--backends", "eager", "--json", str(report_path), "--markdown", str(markdown),
                 "--detail-markdown", str(markdown)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["ceiling"]["gflops_median"] > 0
    assert report["machine"]["torch"] and report["machine"]["onnxruntime"]
    assert "2 GFLOP" in report["units"] and len(report["load_average_start"]) == 3
    (model,) = report["models"]
    assert model["model"] == "edaformer-t" and model["eager_variant"] in model["eager_variants_ms_batch1_full"]
    assert [(r["level"], r["backend"], r["batch"], r["height"]) for r in model["results"]] == [
        ("1111-111", "eager", 1, 256), ("2222-222", "eager", 1, 256)]
    for r in model["results"]:
        assert r["ms_per_image"] > 0 and r["gmacs_per_image"] > 0
        assert r["ceiling_gflops"] > 0 and r["rounds"] >= 1  # the matmul timed among the case's own calls
        assert r["pct_of_ceiling"] == pytest.approx(100 * 2 * r["gmac_per_s"] / r["ceiling_gflops"])
    assert set(model["verdicts"]) == {"ceiling_pct", "isr_speedup"}
    assert [level["gmacs"]["512x512"] for level in model["levels"]] == pytest.approx([5.593, 4.055], abs=1e-3)
    text = markdown.read_text()
    assert "keep me" in text and text.count(MD_START) == 1 and MD_HEADING in text
    assert "| 256x256 | 1 | 2222-222 |" in text
    assert text.count(ZOO_START) == 1 and ZOO_HEADING in text
    assert "| edaformer-t | 1111-111 | 5.59 | 151.8 | 42.3 |" in text


@pytest.mark.slow
def test_bench_runs_a_knobless_model_and_lists_the_zoo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from models.registry import list_models

    assert main(["bench", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{name} " in listing for name in list_models()) and "t0.96, t0.93, t0.9" in listing
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--model", "seaformer-t", "--quick", "--backends", "eager", "--json", str(report_path)]) == 0
    (model,) = json.loads(report_path.read_text())["models"]
    assert [(r["level"], r["backend"], r["height"]) for r in model["results"]] == [("base", "eager", 256)]
    (level,) = model["levels"]
    assert level["gmacs"]["512x512"] == pytest.approx(0.563, abs=1e-3) and level["published_miou"] == 36.5
    printed = capsys.readouterr().out.splitlines()
    assert any(line.split()[:5] == ["seaformer-t", "base", "0.56", "4.5", "36.5"] for line in printed)


def _case(model: str, level: str, rank: int, backend: str, ms: float, gmacs: float, size=(512, 512)) -> dict:
    return {"backend": backend, "level": level, "rank": rank, "batch": 1, "height": size[0], "width": size[1],
            "gmacs_per_image": gmacs, "ms_per_image": ms, "gmac_per_s": gmacs / ms * 1e3,
            "pct_of_ceiling": 2 * gmacs / ms * 1e3, "samples_s": [ms / 1e3], "note": ""}


def _fake_report(ms_full: float) -> dict:
    """EDAFormer-T at two levels (1024x2048), SeaFormer-T (512, all backends) and DoViT-S (no published mIoU)."""
    eda = [_case("edaformer-t", level, rank, "onnxruntime", ms, gmacs, (1024, 2048))
           for level, rank, gmacs, ms in [("1111-111", 0, 150.0, ms_full), ("2222-222", 5, 60.0, 1000.0)]]
    eda += [_case("edaformer-t", level, rank, b, ms, gmacs) for level, rank, gmacs in [("1111-111", 0, 5.6),
            ("2222-222", 5, 4.0)] for b, ms in [("eager", 100.0 - 10 * rank), ("onnxruntime", 90.0 - 8 * rank),
                                                ("int8", 75.0 - 5 * rank)]]
    sea = [_case("seaformer-t", "base", 0, b, ms, 0.56) for b, ms in [("eager", 20.0), ("onnxruntime", 12.0),
                                                                       ("int8", 10.0)]]
    dovit = [_case("dovit-s", "t0.96", 0, "onnxruntime", 300.0, 30.0)]
    machine = {"cpu": "cpu", "logical_cores": 2, "threads": 2, "torch": "t", "onnxruntime": "o", "nice": 10}

    def entry(name: str, family: str, levels: list[tuple[str, int, float | None]], results: list[dict]) -> dict:
        return {"model": name, "family": family, "num_classes": 150, "weights": "random", "results": results,
                "eager_variant": "plain", "eager_variants_ms_batch1_full": {"plain": 1.0},
                "load_average": [[2.0, 2.0, 2.0]], "dense_gmacs": family == "dovit",
                "levels": [{"level": lv, "rank": rank, "published_miou": miou, "gmacs": {"512x512": 5.0,
                            "1024x2048": 150.0}, "int8_agreement": [0.98, 0.96], "fp32_mask_classes": [20, 30]}
                           for lv, rank, miou in levels]}

    models = [entry("edaformer-t", "edaformer", [("1111-111", 0, 42.3), ("2222-222", 5, None)], eda),
              entry("seaformer-t", "seaformer", [("base", 0, 36.5)], sea),
              entry("dovit-s", "dovit", [("t0.96", 0, None)], dovit)]
    return {"date": "2026-01-01T00:00:00", "machine": machine, "models": models, "load_average_start": [1.0, 1, 1],
            "load_average_end": [3.0, 3, 3], "ceiling": {"n": 2048, "gflops_median": 100.0, "gflops_samples": [100.0]}}


def test_verdicts_and_markdown_update_are_idempotent(tmp_path: Path) -> None:
    from models.bench_report import verdicts

    report = _fake_report(ms_full=2500.0)
    report["models"][0]["verdicts"] = verdicts(report["models"][0])
    assert report["models"][0]["verdicts"]["isr_speedup"]["cheapest_vs_full"] == {
        "onnxruntime batch 1 (2222-222)": 2.5}
    assert report["models"][0]["verdicts"]["isr_speedup"]["met_on_all_paths"] is True
    slow = _fake_report(ms_full=1500.0)
    slow["models"][0]["verdicts"] = verdicts(slow["models"][0])
    assert slow["models"][0]["verdicts"]["isr_speedup"]["met_on_some_path"] is False
    path = tmp_path / "docs" / "benchmarks.md"
    update_markdown(path, report, "detail")
    update_markdown(path, report, "zoo")
    path.write_text(path.read_text() + "\n## Later section\n\nnotes\n")
    update_markdown(path, slow, "detail")
    update_markdown(path, slow, "zoo", plot=tmp_path / "docs" / "img" / "zoo.png")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert text.count(MD_START) == text.count(MD_END) == text.count(ZOO_START) == text.count(ZOO_END) == 1
    assert "NOT MET" in text and "notes" in text and "](img/zoo.png)" in text
    assert "machine load (1-min load average): start 1.0, during 2.0" in text


def test_zoo_table_and_pareto_front(tmp_path: Path) -> None:
    from models.bench_plot import pareto_front, write_pareto_plot, zoo_points
    from models.bench_report import zoo_rows

    report = _fake_report(ms_full=2500.0)
    header, rows = zoo_rows(report)
    table = {(r[0], r[1].split(" ")[0]): dict(zip(header, r, strict=True)) for r in rows}
    full = table[("edaformer-t", "1111-111")]
    assert (full["ADE20K mIoU"], full["eager ms 512²"], full["ORT ms 512²"], full["int8 ms 512²"]) == (
        "42.3", "100", "90", "75")
    assert full["int8 speed-up"] == "1.20x" and full["int8 agreement"] == "97.0% (96.0)"
    assert full["1024x2048 ms eager / ORT / int8"] == "- / 2500 / -"
    assert table[("edaformer-t", "2222-222")]["ADE20K mIoU"] == ""  # published for the training setting only
    assert table[("dovit-s", "t0.96")]["ADE20K mIoU"] == "n/a" and table[("dovit-s", "t0.96")]["GMAC 512²"] == "5.00*"
    points, unplaced = zoo_points(report)
    assert unplaced == ["dovit-s"]
    assert {(p["model"], p["level"], p["ms"], p["miou"]) for p in points} == {
        ("edaformer-t", "1111-111", 90.0, 42.3), ("edaformer-t", "2222-222", 50.0, 42.3 - 2.5),
        ("seaformer-t", "base", 12.0, 36.5)}
    assert [p["model"] + "/" + p["level"] for p in pareto_front(points)] == [
        "seaformer-t/base", "edaformer-t/2222-222", "edaformer-t/1111-111"]
    pytest.importorskip("matplotlib")
    write_pareto_plot(report, tmp_path / "zoo.png")
    assert (tmp_path / "zoo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleaved_timing_pairs_rounds() -> None:
    from models.bench_timing import paired_ratio, time_interleaved

    order: list[str] = []
    timed = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3,
                             budget_s=10.0, long_s=5.0)
    # warm-ups, then 3 rounds of one untimed switch run plus one timed run per call, a and b alternating
    assert "".join(order) == "ab" + "aabb" * 3
    assert {name: (len(samples), rounds) for name, (samples, rounds, _) in timed.items()} == {"a": (3, 3), "b": (3, 3)}
    # The load changed between rounds (b ran 2x faster in two of them): pairing by round sees it, the ratio of the
    # medians mixes rounds (0.30 / 0.25).
    slow, fast = ([0.10, 0.50, 0.30], 3), ([0.05, 0.25, 0.29], 3)
    assert paired_ratio(slow, fast) == pytest.approx(2.0)
    assert paired_ratio((slow[0], 1), (fast[0], 1)) == pytest.approx(0.30 / 0.25)
    assert paired_ratio(([2.0], 1), ([1.0], 1)) == pytest.approx(2.0)
    # A case timed while the matmul ran at a quarter of the idle rate took 4x its idle time.
    from models.bench_report import scaled_ms

    assert scaled_ms({"ms_per_image": 100.0, "ceiling_gflops": 50.0}, idle=200.0) == pytest.approx(25.0)
    assert scaled_ms({"ms_per_image": 100.0}, idle=200.0) == pytest.approx(100.0)  # no local ceiling: unscaled
