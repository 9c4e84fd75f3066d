"""`segserve evaluate`: mmseg's metrics on hand-computed cases, the folder layouts, the agreement mode, the
quality table (round trip and validation) and the command end to end on a tiny generated set."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.base import ModelMeta
from models.cli import main
from models.datasets import DATASETS
from models.demo_scenes import SKY, write_labelled_set
from models.evaluate import EvalSet, Sample, evaluate, find_eval_set, operating_points, read_label
from models.metrics import (
    MetricAccumulator,
    intersect_and_union,
    load_quality_table,
    markdown_table,
    pareto_front,
    quality_table_from_dict,
    remap_labels,
)
from models.registry import get_spec

# --- metrics, against hand-computed confusion matrices -------------------------------------------------------

def test_one_image_with_ignored_pixels() -> None:
    pred = np.array([[0, 0, 1, 1], [2, 2, 1, 0], [0, 1, 2, 2]])
    label = np.array([[0, 1, 1, 1], [2, 255, 1, 255], [0, 0, 2, 1]])
    areas = intersect_and_union(pred, label, 3)
    # 10 counted pixels; per class (0, 1, 2): intersect 2, 3, 2; pred 3, 4, 3; label 3, 5, 2.
    assert areas.intersect.tolist() == [2, 3, 2]
    assert areas.pred.tolist() == [3, 4, 3]
    assert areas.label.tolist() == [3, 5, 2]
    assert areas.union.tolist() == [4, 6, 3]
    accumulator = MetricAccumulator(3)
    accumulator.update(pred, label)
    scores = accumulator.scores()
    assert scores.per_class_iou == pytest.approx([50.0, 50.0, 200 / 3])
    assert scores.miou == pytest.approx((50 + 50 + 200 / 3) / 3)
    assert scores.aacc == pytest.approx(70.0)
    assert scores.per_class_acc == pytest.approx([200 / 3, 60.0, 100.0])


def test_areas_are_summed_over_the_set_before_dividing() -> None:
    accumulator = MetricAccumulator(2)
    accumulator.update(np.array([[0, 0]]), np.array([[0, 0]]))
    accumulator.update(np.array([[1, 1, 1, 1]]), np.array([[1, 0, 0, 0]]))
    # Totals: class 0 intersect 2, union 5; class 1 intersect 1, union 4. The mean of per-image mIoUs is 56.25.
    scores = accumulator.scores()
    assert scores.per_class_iou == pytest.approx([40.0, 25.0])
    assert scores.miou == pytest.approx(32.5)
    assert scores.aacc == pytest.approx(50.0)  # 3 of 6 pixels right
    assert accumulator.images == 2


def test_a_class_absent_from_the_whole_set_is_left_out_of_the_mean() -> None:
    accumulator = MetricAccumulator(4)
    accumulator.update(np.array([[0, 2]]), np.array([[0, 0]]))  # class 2 predicted, never labelled: IoU 0
    scores = accumulator.scores()
    assert scores.per_class_iou[0] == pytest.approx(50.0)
    assert math.isnan(scores.per_class_iou[1]) and math.isnan(scores.per_class_iou[3])
    assert scores.per_class_iou[2] == 0.0
    assert scores.miou == pytest.approx(25.0)


def test_reduce_zero_label_ignores_0_and_shifts_the_rest() -> None:
    stored = np.array([[0, 1, 2, 255, 3]], np.uint8)
    assert remap_labels(stored, reduce_zero_label=True).tolist() == [[255, 0, 1, 255, 2]]
    assert stored.tolist() == [[0, 1, 2, 255, 3]]  # the caller's array is untouched
    accumulator = MetricAccumulator(3, reduce_zero_label=True)
    accumulator.update(np.array([[1, 0, 2, 1, 2]]), stored)
    scores = accumulator.scores()
    assert scores.per_class_iou == pytest.approx([100.0, 0.0, 50.0])
    assert scores.aacc == pytest.approx(200 / 3)


def test_label_map_applies_before_reduce_zero_label() -> None:
    # mmseg maps first: 3 -> 0, which reduce_zero_label then ignores; the other order would score pixel 0 wrong.
    areas = intersect_and_union(np.array([[1, 0]]), np.array([[3, 1]]), 3, label_map={3: 0}, reduce_zero_label=True)
    assert areas.label.tolist() == [1, 0, 0]
    assert areas.intersect.tolist() == [1, 0, 0]


def test_a_label_out_of_range_counts_in_no_label_histogram_like_mmseg() -> None:
    areas = intersect_and_union(np.array([[0, 1]]), np.array([[0, 7]]), 2)
    assert areas.pred.tolist() == [1, 1] and areas.label.tolist() == [1, 0]
    accumulator = MetricAccumulator(2)
    accumulator.update(np.array([[0, 1]]), np.array([[0, 7]]))
    assert accumulator.scores().per_class_iou == pytest.approx([100.0, 0.0])


def test_agreement_of_identical_predictions_is_100() -> None:
    rng = np.random.default_rng(0)
    accumulator = MetricAccumulator(5, ignore_index=None)
    for _ in range(3):
        mask = rng.integers(0, 5, (9, 7))
        accumulator.update(mask, mask.copy())
    scores = accumulator.scores()
    assert scores.miou == 100.0 and scores.aacc == 100.0


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        intersect_and_union(np.zeros((2, 3)), np.zeros((3, 2)), 2)


# --- folder layouts ------------------------------------------------------------------------------------------

def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(height: int = 8, width: int = 10) -> np.ndarray:
    return np.full((height, width, 3), 100, np.uint8)


def test_ade20k_layout_pairs_by_relative_path_and_reduces_zero_label(tmp_path: Path) -> None:
    for name in ("validation/a", "validation/b"):
        _save(tmp_path / "images" / f"{name}.jpg", _rgb())
        _save(tmp_path / "annotations" / f"{name}.png", np.zeros((8, 10), np.uint8))
    found = find_eval_set(tmp_path)
    assert (found.layout, found.reduce_zero_label, found.ignore_index) == ("ade20k", True, 255)
    assert [s.name for s in found.samples] == ["validation/a", "validation/b"]
    assert found.samples[0].label == tmp_path / "annotations" / "validation" / "a.png"


def test_ade20k_layout_with_some_labels_missing_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "a.jpg", _rgb())
    _save(tmp_path / "images" / "b.jpg", _rgb())
    _save(tmp_path / "annotations" / "a.png", np.zeros((8, 10), np.uint8))
    with pytest.raises(ValueError, match=r"1 of 2 images have no label: b"):
        find_eval_set(tmp_path)


def test_cityscapes_layout_prefers_train_ids_and_maps_label_ids(tmp_path: Path) -> None:
    city = "leftImg8bit/val/aachen"
    _save(tmp_path / city / "aachen_000000_000019_leftImg8bit.png", _rgb(2, 2))
    _save(tmp_path / city / "aachen_000001_000019_leftImg8bit.png", _rgb(2, 2))
    gt = tmp_path / "gtFine/val/aachen"
    _save(gt / "aachen_000000_000019_gtFine_labelTrainIds.png", np.array([[0, 18], [255, 5]], np.uint8))
    _save(gt / "aachen_000000_000019_gtFine_labelIds.png", np.zeros((2, 2), np.uint8))  # loses to train ids
    _save(gt / "aachen_000001_000019_gtFine_labelIds.png", np.array([[7, 26], [1, 33]], np.uint8))
    found = find_eval_set(tmp_path)
    assert found.layout == "cityscapes" and not found.reduce_zero_label
    first, second = found.samples
    assert first.name == "val/aachen/aachen_000000_000019" and not first.cityscapes_label_ids
    assert read_label(first).tolist() == [[0, 18], [255, 5]]
    assert second.cityscapes_label_ids
    assert read_label(second).tolist() == [[0, 13], [255, 18]]  # road, car, ego vehicle (ignored), bicycle


def test_generic_layout_matches_by_stem_with_its_ignore_index(tmp_path: Path) -> None:
    _save(tmp_path / "imgs" / "x1.jpg", _rgb())
    _save(tmp_path / "imgs" / "x2.png", _rgb())
    _save(tmp_path / "masks" / "x1.png", np.zeros((8, 10), np.uint8))
    _save(tmp_path / "masks" / "x2.png", np.ones((8, 10), np.uint8))
    found = find_eval_set(images=tmp_path / "imgs", labels=tmp_path / "masks", ignore_index=0)
    assert (found.layout, found.ignore_index, found.reduce_zero_label) == ("generic", 0, False)
    assert {s.name: s.label.name for s in found.samples} == {"x1": "x1.png", "x2": "x2.png"}
    with pytest.raises(ValueError, match="needs --labels"):
        find_eval_set(images=tmp_path / "imgs")


def test_a_folder_without_labels_is_unlabelled(tmp_path: Path) -> None:
    _save(tmp_path / "one.jpg", _rgb())
    _save(tmp_path / "sub" / "two.png", _rgb())
    found = find_eval_set(tmp_path)
    assert found.layout == "unlabelled" and not found.labelled
    assert sorted(s.name for s in found.samples) == ["one", "sub/two"]
    _save(tmp_path / "x" / "images" / "a.jpg", _rgb())  # ADE20K-like, but no annotations at all
    assert find_eval_set(tmp_path / "x").layout == "unlabelled"
    with pytest.raises(ValueError, match="no images"):
        find_eval_set(tmp_path / "x", layout="cityscapes")


def test_labelled_layout_can_be_scored_unlabelled(tmp_path: Path) -> None:
    write_labelled_set(tmp_path, 2, sizes=((32, 32),))
    found = find_eval_set(tmp_path, unlabelled=True)
    assert found.layout == "unlabelled" and all(s.label is None for s in found.samples)


# --- evaluate() with a model whose masks are known -----------------------------------------------------------

class ConstantModel(torch.nn.Module):
    """EDAFormer-T's spec (its ladder and fits rule), but logits that always pick one class."""

    def __init__(self, label: int, num_classes: int = 10) -> None:
        super().__init__()
        self.spec = get_spec("edaformer-t")
        self.meta = ModelMeta("edaformer-t", num_classes, dataset="demo")
        self.label = label

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def forward(self, images: torch.Tensor, isr: object = None) -> torch.Tensor:
        batch, _, height, width = images.shape
        logits = torch.zeros(batch, self.num_classes, math.ceil(height / 8), math.ceil(width / 8))
        logits[:, self.label] = 1.0
        return logits


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_labelled_set(tmp_path_factory.mktemp("demo_set"), 3, seed=123, sizes=((64, 64), (48, 80)))


def test_evaluate_scores_a_constant_mask_as_hand_computed(demo_set: Path) -> None:
    found = find_eval_set(demo_set)
    points = operating_points(get_spec("edaformer-t"), ["2211-222"], [1.0, 0.5])
    table = evaluate(ConstantModel(SKY), found, points, DATASETS["demo"], progress=False)
    # Always "sky": IoU(sky) = sky pixels / labelled pixels; classes in the labels get 0; the others are NaN.
    labels = [np.asarray(Image.open(s.label)).astype(np.int64) - 1 for s in found.samples]  # reduce_zero_label
    counts = np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=10)
    present = np.count_nonzero(counts)
    assert table.source == "labelled:ade20k" and table.metric == "miou" and table.images == 3
    assert [p.point for p in table.points] == ["edaformer-t/1111-111@1", "edaformer-t/2211-222@1",
                                               "edaformer-t/2211-222@0.5"]  # the reference is added first
    for entry in table.points:
        assert entry.miou == pytest.approx(100 * counts[SKY] / counts.sum() / present)
        assert entry.aacc == pytest.approx(100 * counts[SKY] / counts.sum())
        assert entry.agreement_miou == 100.0 and entry.pixel_agreement == 100.0
        assert entry.latency_ms > 0
        absent = [c for c in range(10) if counts[c] == 0]
        assert all(math.isnan(entry.per_class_iou[c]) for c in absent)
    assert table.quality("edaformer-t/2211-222@0.5") == table.points[2].miou


def test_evaluate_unlabelled_scores_agreement_only(demo_set: Path) -> None:
    found = find_eval_set(demo_set, unlabelled=True)
    table = evaluate(ConstantModel(3), found, operating_points(get_spec("edaformer-t"), ["1111-111"], [1.0]),
                     DATASETS["demo"], limit=2, progress=False)
    assert (table.source, table.metric, table.images) == ("unlabelled", "agreement_miou", 2)
    (entry,) = table.points
    assert entry.miou is None and entry.per_class_iou is None and entry.agreement_miou == 100.0


def test_a_point_too_small_for_the_image_is_refused(tmp_path: Path) -> None:
    found = EvalSet("unlabelled", [Sample("tiny", _save(tmp_path / "tiny.png", _rgb(40, 40)))])
    points = operating_points(get_spec("edaformer-t"), ["2222-222"], [0.1])
    with pytest.raises(ValueError, match="too small for the level"):
        evaluate(ConstantModel(0), found, points, DATASETS["demo"], progress=False)


# --- the quality table ---------------------------------------------------------------------------------------

def test_quality_table_round_trip_and_lookup(demo_set: Path, tmp_path: Path) -> None:
    points = operating_points(get_spec("edaformer-t"), ["1111-111", "2222-222"], [1.0, 0.75])
    table = evaluate(ConstantModel(SKY), find_eval_set(demo_set), points, DATASETS["demo"], progress=False)
    loaded = load_quality_table(table.save(tmp_path / "q.json"))
    assert [p.point for p in loaded.points] == [p.point for p in table.points]
    for before, after in zip(table.points, loaded.points, strict=True):
        assert after.miou == pytest.approx(before.miou, abs=1e-4)
        assert after.per_class_iou == [None if math.isnan(v) else pytest.approx(v, abs=1e-4)
                                       for v in before.per_class_iou]
    assert loaded.quality("edaformer-t/2222-222@0.750") == pytest.approx(table.points[3].miou, abs=1e-4)
    assert loaded.quality("edaformer-t/2222-222@0.5") is None  # not measured
    assert loaded.quality("edaformer-t/2222-222@0.75:int8") is None  # another precision: not measured
    assert loaded.quality("not a point@x") is None
    assert "★" in markdown_table(loaded) and pareto_front(loaded)


def _valid_table() -> dict:
    row = {"point": "edaformer-t/2211-222@0.75", "model": "edaformer-t", "level": "2211-222", "scale": 0.75,
           "miou": 50.0, "aacc": 80.0, "agreement_miou": 90.0, "pixel_agreement": 95.0, "latency_ms": 12.5,
           "per_class_iou": [50.0, None]}
    return {"version": 1, "model": "edaformer-t", "dataset": "demo", "weights_sha256": None,
            "source": "labelled:ade20k", "images": 4, "metric": "miou", "machine": "test", "points": [row]}


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.update(version=2), "'version' is 2"),
    (lambda t: t.pop("model"), "'model' must be a non-empty string"),
    (lambda t: t.update(source="labelled"), "'source' is 'labelled'"),
    (lambda t: t.update(metric="agreement_miou"), "a labelled table measures 'miou'"),
    (lambda t: t.update(weights_sha256="abc"), "'weights_sha256'"),
    (lambda t: t.update(images=0), "'images' must be a positive integer"),
    (lambda t: t.update(points=[]), "'points' must be a non-empty list"),
    (lambda t: t["points"][0].update(miou=150.0), r"points\[0\]: 'miou' must be null or a number in \[0, 100\]"),
    (lambda t: t["points"][0].update(miou=None), "'miou' \\(the table's metric\\) is missing"),
    (lambda t: t["points"][0].update(latency_ms=0), "'latency_ms' must be positive"),
    (lambda t: t["points"][0].update(scale=0.5), "disagree with the point name"),
    (lambda t: t["points"][0].update(point="segformer-b0/2211@0.75"), "is not of model 'edaformer-t'"),
    (lambda t: t["points"][0].update(point="edaformer-t/2211-222@fast"), "is not a number"),
    (lambda t: t["points"][0].update(per_class_iou=[101.0]), "'per_class_iou'"),
    (lambda t: t["points"].append(copy.deepcopy(t["points"][0])), "listed twice"),
])
def test_quality_table_validation_names_what_is_wrong(change, message: str) -> None:
    table = _valid_table()
    quality_table_from_dict(copy.deepcopy(table))  # the unchanged table is valid
    change(table)
    with pytest.raises(ValueError, match=message):
        quality_table_from_dict(table, "q.json")


def test_load_quality_table_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_quality_table(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_quality_table(tmp_path / "bad.json")
    unlabelled = _valid_table() | {"source": "unlabelled", "metric": "agreement_miou"}
    (tmp_path / "u.json").write_text(json.dumps(unlabelled))
    assert load_quality_table(tmp_path / "u.json").quality("edaformer-t/2211-222@0.75") == 90.0


# --- the command, end to end ---------------------------------------------------------------------------------

def test_cli_evaluate_writes_table_markdown_and_plot(demo_set: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["evaluate", str(demo_set), "--model", "edaformer-t", "--dataset", "demo", "--points",
                 "1111-111,2222-222", "--scales", "1,0.5", "--limit", "1", "--json", str(out / "q.json"), "--markdown",
                 str(out / "q.md"), "--plot", str(out / "q.png")])
    assert code == 0
    table = load_quality_table(out / "q.json")
    assert [p.point for p in table.points] == ["edaformer-t/1111-111@1", "edaformer-t/1111-111@0.5",
                                               "edaformer-t/2222-222@1", "edaformer-t/2222-222@0.5"]
    assert table.images == 1 and table.source == "labelled:ade20k" and table.dataset == "demo"
    assert table.points[0].agreement_miou == 100.0
    assert "`edaformer-t/2222-222@0.5`" in (out / "q.md").read_text()
    assert (out / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "edaformer-t/2222-222@0.5" in capsys.readouterr().out


def test_cli_evaluate_reports_a_bad_level_as_one_line(demo_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(demo_set), "--points", "9999-999x"]) == 2
    assert "segserve evaluate: error:" in capsys.readouterr().err
