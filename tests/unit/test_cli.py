"""The model commands: `python -m models.cli predict | export-onnx | bench`, end to end.

`predict` and `export-onnx` run as subprocesses, as a user runs them; `bench` runs in-process with
`--quick` and eager only (its ONNX path is the runner tested in test_export_onnx.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bench import MD_END, MD_HEADING, MD_START, update_markdown
from models.cli import main
from models.datasets import dataset_for
from models.export import META_LEVEL, read_metadata

ROOT = Path(__file__).resolve().parents[2]


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
    code = main(["bench", "--quick", "--backends", "eager", "--json", str(report_path), "--markdown", str(markdown)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["ceiling"]["gflops_median"] > 0
    assert report["eager_variant"] in report["eager_variants_ms_batch1_full"]
    assert report["machine"]["torch"] and report["machine"]["onnxruntime"]
    assert "2 GFLOP" in report["units"]
    assert [(r["level"], r["backend"], r["batch"], r["height"]) for r in report["results"]] == [
        ("1111-111", "eager", 1, 256), ("2222-222", "eager", 1, 256)]
    for r in report["results"]:
        assert r["ms_per_image"] > 0 and r["gmacs_per_image"] > 0
        assert r["pct_of_ceiling"] == pytest.approx(100 * 2 * r["gmac_per_s"] / report["ceiling"]["gflops_median"])
    assert set(report["verdicts"]) == {"ceiling_pct", "isr_speedup"}
    text = markdown.read_text()
    assert "keep me" in text and text.count(MD_START) == 1 and MD_HEADING in text
    assert "| 256x256 | 1 | 2222-222 |" in text


def _fake_report(ms_full: float) -> dict:
    results = [
        {"backend": "onnxruntime", "level": level, "rank": rank, "batch": 1, "height": 1024,
         "width": 2048, "gmacs_per_image": gmacs, "ms_per_image": ms, "gmac_per_s": gmacs / ms * 1e3,
         "pct_of_ceiling": 2 * gmacs / ms * 1e3, "samples_s": [], "note": ""}
        for level, rank, gmacs, ms in [("1111-111", 0, 150.0, ms_full), ("2222-222", 5, 60.0, 1000.0)]
    ]
    machine = {"cpu": "cpu", "logical_cores": 2, "threads": 2, "torch": "t", "onnxruntime": "o"}
    return {"model": "edaformer-t", "num_classes": 150, "date": "today", "machine": machine,
            "ceiling": {"n": 2048, "gflops_median": 100.0, "gflops_samples": [100.0]}, "eager_variant": "plain",
            "eager_variants_ms_batch1_full": {"plain": 1.0}, "results": results}


def test_verdicts_and_markdown_update_are_idempotent(tmp_path: Path) -> None:
    from models.bench import verdicts

    report = _fake_report(ms_full=2500.0)
    report["verdicts"] = verdicts(report)
    assert report["verdicts"]["isr_speedup"]["cheapest_vs_full"] == {"onnxruntime batch 1 (2222-222)": 2.5}
    assert report["verdicts"]["isr_speedup"]["met_on_all_paths"] is True
    slow = _fake_report(ms_full=1500.0)
    slow["verdicts"] = verdicts(slow)
    assert slow["verdicts"]["isr_speedup"]["met_on_some_path"] is False
    path = tmp_path / "docs" / "benchmarks.md"
    update_markdown(path, report)
    path.write_text(path.read_text() + "\n## Later section\n\nnotes\n")
    update_markdown(path, slow)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert text.count(MD_START) == text.count(MD_END) == 1
    assert "NOT MET" in text and "notes" in text
