"""Segmentation metrics exactly as mmseg 0.x computes them (`mmseg/core/evaluation/metrics.py`).

Per image: labels are remapped (`label_map`, then `reduce_zero_label`: 0 -> ignored, every other id - 1), the
pixels whose label is `ignore_index` are dropped, and the areas of intersection (pred == label), of the
prediction and of the label are histogrammed over `num_classes` bins (values outside [0, num_classes) fall out
of every histogram, as with mmseg's `histc`). The areas are summed over the whole set, and only then divided:

    IoU[c] = intersect[c] / union[c]      (NaN where class c is in neither any prediction nor any label)
    Acc[c] = intersect[c] / label[c]      (NaN where class c is in no label)
    mIoU = nanmean(IoU), mAcc = nanmean(Acc), aAcc = sum(intersect) / sum(label)

So a class absent from the whole set (never predicted, never labelled) is excluded from the mean, while a class
that is predicted but never labelled counts with IoU 0. The same accumulation against a reference prediction
instead of labels gives the label-free agreement (`ignore_index=None`).

The quality table (`QualityTable`, `load_quality_table`) is what `segserve evaluate --json` writes and the
server's planner reads: per operating point, mIoU (or agreement) in percent and the measured latency.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Areas:
    """Per-class pixel counts (num_classes,) of the intersection, union, prediction and label."""

    intersect: np.ndarray
    union: np.ndarray
    pred: np.ndarray
    label: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> Areas:
        return cls(*(np.zeros(num_classes, np.int64) for _ in range(4)))

    def __add__(self, other: Areas) -> Areas:
        return Areas(self.intersect + other.intersect, self.union + other.union, self.pred + other.pred,
                     self.label + other.label)


def _histogram(values: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of each class id in [0, num_classes); other values are dropped (mmseg's histc range)."""
    values = values[(values >= 0) & (values < num_classes)]
    return np.bincount(values, minlength=num_classes).astype(np.int64)


def remap_labels(label: np.ndarray, label_map: Mapping[int, int] | None = None,
                 reduce_zero_label: bool = False) -> np.ndarray:
    """mmseg's label preprocessing, in its order: `label_map` first, then `reduce_zero_label`."""
    label = np.asarray(label).astype(np.int64)  # a copy: the caller's array is never changed
    if label_map:
        original = label.copy()
        for old_id, new_id in label_map.items():
            label[original == old_id] = new_id
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int | None = 255,
                        label_map: Mapping[int, int] | None = None, reduce_zero_label: bool = False) -> Areas:
    """The areas of one image (pred and label of the same shape, class ids)."""
    pred = np.asarray(pred)
    if pred.shape != np.shape(label):
        raise ValueError(f"prediction {pred.shape} and label {np.shape(label)} differ in shape")
    label = remap_labels(label, label_map, reduce_zero_label)
    pred = pred.astype(np.int64)
    if ignore_index is not None:
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
    else:
        pred, label = pred.reshape(-1), label.reshape(-1)
    area_intersect = _histogram(pred[pred == label], num_classes)
    area_pred = _histogram(pred, num_classes)
    area_label = _histogram(label, num_classes)
    return Areas(area_intersect, area_pred + area_label - area_intersect, area_pred, area_label)


@dataclass
class Scores:
    """The metrics of a set, in percent (0-100); per-class values are NaN where undefined."""

    miou: float
    aacc: float
    macc: float
    per_class_iou: list[float]
    per_class_acc: list[float]


def scores_from_areas(areas: Areas) -> Scores:
    """mmseg's `total_area_to_metrics` for mIoU and aAcc: ratios of the totals, NaN classes left out of means."""
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = areas.intersect / areas.union.astype(np.float64)
        acc = areas.intersect / areas.label.astype(np.float64)
        total_label = areas.label.sum()
        aacc = areas.intersect.sum() / total_label if total_label else math.nan
    with warnings.catch_warnings():  # nanmean of all-NaN (an empty set) is NaN, said by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        miou, macc = float(np.nanmean(iou)), float(np.nanmean(acc))
    return Scores(miou=100 * miou, aacc=100 * float(aacc), macc=100 * macc,
                  per_class_iou=[100 * float(v) for v in iou], per_class_acc=[100 * float(v) for v in acc])


class MetricAccumulator:
    """Sums the areas over a set of images, then scores them once (mmseg's `total_intersect_and_union`).

        accumulator = MetricAccumulator(150, reduce_zero_label=True)   # ADE20K annotations as stored
        for pred, label in pairs: accumulator.update(pred, label)

    `ignore_index=None` compares every pixel: with another prediction as the "label" it measures agreement.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, *,
                 label_map: Mapping[int, int] | None = None, reduce_zero_label: bool = False) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_map = dict(label_map) if label_map else None
        self.reduce_zero_label = reduce_zero_label
        self.areas = Areas.zeros(num_classes)
        self.images = 0

    def update(self, pred: np.ndarray, label: np.ndarray) -> Areas:
        """Add one image; returns its own areas."""
        areas = intersect_and_union(pred, label, self.num_classes, self.ignore_index, self.label_map,
                                    self.reduce_zero_label)
        self.areas = self.areas + areas
        self.images += 1
        return areas

    def scores(self) -> Scores:
        return scores_from_areas(self.areas)


# --- the quality table: measured quality per operating point, as `segserve evaluate` writes it ----------------

QUALITY_TABLE_VERSION = 1
_METRIC_BY_SOURCE = {"labelled": "miou", "unlabelled": "agreement_miou"}
_HEX = frozenset("0123456789abcdef")


@dataclass
class PointQuality:
    """One operating point's measured quality (percent, 0-100) and latency (median ms per image)."""

    point: str  # "edaformer-t/2211-222@0.75"
    model: str
    level: str
    scale: float
    latency_ms: float
    miou: float | None = None
    aacc: float | None = None
    agreement_miou: float | None = None
    pixel_agreement: float | None = None
    per_class_iou: list[float | None] | None = None


@dataclass
class QualityTable:
    """What the planner reads: per operating point, the quality measured on a set of images.

    `metric` names the field `quality()` returns: "miou" on a labelled set, "agreement_miou" (with the best
    point's masks as the reference) on an unlabelled one.
    """

    model: str
    dataset: str
    source: str  # "labelled:<layout>" or "unlabelled"
    images: int
    metric: str
    machine: str
    points: list[PointQuality]
    weights_sha256: str | None = None
    version: int = QUALITY_TABLE_VERSION

    def point(self, name: str) -> PointQuality | None:
        """The entry of a point named `model/level@scale[:precision]` (scale and precision normalized)."""
        from models.spec import OperatingPoint

        try:
            wanted = OperatingPoint.split(name)
        except ValueError:
            return None
        for entry in self.points:
            model, level, scale, precision = OperatingPoint.split(entry.point)
            if (model, level, precision) == wanted[:2] + wanted[3:] and math.isclose(scale, wanted[2]):
                return entry
        return None

    def quality(self, point_name: str) -> float | None:
        """The measured quality (percent) of a point in this table's metric; None when it was not measured."""
        entry = self.point(point_name)
        return None if entry is None else getattr(entry, self.metric)

    def to_dict(self) -> dict:
        def clean(value: float | None) -> float | None:  # JSON has no NaN: an undefined value is null
            return None if value is None or math.isnan(value) else round(float(value), 4)

        points = []
        for entry in self.points:
            row = {"point": entry.point, "model": entry.model, "level": entry.level, "scale": entry.scale,
                   **{key: clean(getattr(entry, key)) for key in ("miou", "aacc", "agreement_miou", "pixel_agreement")},
                   "latency_ms": round(entry.latency_ms, 3),
                   "per_class_iou": None if entry.per_class_iou is None else [clean(v) for v in entry.per_class_iou]}
            points.append(row)
        return {"version": self.version, "model": self.model, "dataset": self.dataset,
                "weights_sha256": self.weights_sha256, "source": self.source, "images": self.images,
                "metric": self.metric, "machine": self.machine, "points": points}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        # One line per point: the table stays readable (and diffs well) with per-class lists in it.
        head = json.dumps({k: v for k, v in data.items() if k != "points"}, indent=1)[:-2]
        points = ",\n".join(f"  {json.dumps(row)}" for row in data["points"])
        path.write_text(f'{head},\n "points": [\n{points}\n ]\n}}\n')
        return path


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"quality table {where}: {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def quality_table_from_dict(data: object, where: str = "") -> QualityTable:
    """Validate a parsed quality table; a ValueError names the first thing that is wrong."""
    from models.spec import OperatingPoint

    where = where or "(in memory)"
    _require(isinstance(data, dict), where, f"expected a JSON object, got {type(data).__name__}")
    assert isinstance(data, dict)
    _require(data.get("version") == QUALITY_TABLE_VERSION, where,
             f"'version' is {data.get('version')!r}; this segserve reads version {QUALITY_TABLE_VERSION}")
    for key in ("model", "dataset", "source", "metric", "machine"):
        _require(isinstance(data.get(key), str) and bool(data.get(key)), where, f"'{key}' must be a non-empty string")
    kind = data["source"].split(":", 1)[0]
    _require(kind in _METRIC_BY_SOURCE and (kind == "unlabelled") == (":" not in data["source"]), where,
             f"'source' is {data['source']!r}; expected 'labelled:<layout>' or 'unlabelled'")
    _require(data["metric"] == _METRIC_BY_SOURCE[kind], where,
             f"'metric' is {data['metric']!r} but a {kind} table measures {_METRIC_BY_SOURCE[kind]!r}")
    sha = data.get("weights_sha256")
    _require(sha is None or (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX), where,
             "'weights_sha256' must be null or 64 lowercase hex digits")
    _require(isinstance(data.get("images"), int) and not isinstance(data["images"], bool) and data["images"] >= 1,
             where, "'images' must be a positive integer")
    _require(isinstance(data.get("points"), list) and bool(data["points"]), where, "'points' must be a non-empty list")
    points, seen = [], set()
    for index, row in enumerate(data["points"]):
        at = f"{where} points[{index}]"
        _require(isinstance(row, dict), at, "must be an object")
        _require(isinstance(row.get("point"), str), at, "'point' must be a string such as 'model/level@0.75'")
        try:
            model, level, scale, _ = OperatingPoint.split(row["point"])
        except ValueError as exc:
            raise ValueError(f"quality table {at}: {exc}") from None
        _require(model == data["model"], at, f"point {row['point']!r} is not of model {data['model']!r}")
        _require((row.get("model"), row.get("level")) == (model, level) and _is_number(row.get("scale"))
                 and math.isclose(row["scale"], scale), at,
                 f"'model', 'level' and 'scale' disagree with the point name {row['point']!r}")
        _require(row["point"] not in seen, at, f"point {row['point']!r} is listed twice")
        seen.add(row["point"])
        for key in ("miou", "aacc", "agreement_miou", "pixel_agreement"):
            value = row.get(key)
            _require(value is None or (_is_number(value) and 0 <= value <= 100), at,
                     f"'{key}' must be null or a number in [0, 100] (percent), got {value!r}")
        _require(row.get(data["metric"]) is not None, at, f"'{data['metric']}' (the table's metric) is missing")
        _require(_is_number(row.get("latency_ms")) and row["latency_ms"] > 0, at, "'latency_ms' must be positive")
        per_class = row.get("per_class_iou")
        _require(per_class is None or (isinstance(per_class, list) and all(
            v is None or (_is_number(v) and 0 <= v <= 100) for v in per_class)), at,
            "'per_class_iou' must be null or a list of percentages (null where undefined)")
        points.append(PointQuality(
            point=row["point"], model=model, level=level, scale=float(row["scale"]),
            latency_ms=float(row["latency_ms"]), miou=row.get("miou"), aacc=row.get("aacc"),
            agreement_miou=row.get("agreement_miou"), pixel_agreement=row.get("pixel_agreement"),
            per_class_iou=per_class))
    return QualityTable(model=data["model"], dataset=data["dataset"], source=data["source"], images=data["images"],
                        metric=data["metric"], machine=data["machine"], points=points, weights_sha256=sha,
                        version=data["version"])


def load_quality_table(path: str | Path) -> QualityTable:
    """Read and validate a quality table file (`segserve evaluate --json`); ValueError says what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"quality table {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"quality table {path}: not valid JSON ({exc})") from None
    return quality_table_from_dict(data, str(path))


# --- reports: Markdown and a plot of quality against latency ----------------------------------------------

def pareto_front(table: QualityTable) -> list[PointQuality]:
    """The points no other point beats on both latency (lower) and quality (higher), fastest first."""
    front, best = [], -1.0
    for entry in sorted(table.points, key=lambda e: (e.latency_ms, -(getattr(e, table.metric) or 0))):
        value = getattr(entry, table.metric)
        if value is not None and value > best:
            front.append(entry)
            best = value
    return front


def format_percent(value: float | None, digits: int = 1) -> str:  # a dash where undefined
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def markdown_table(table: QualityTable, heading_level: int = 3) -> str:
    """The table as Markdown: a heading, what was measured where, one row per point (Pareto points marked)."""
    front = {entry.point for entry in pareto_front(table)}
    source = table.source.replace("labelled:", "labelled, ")
    sha = f"`{table.weights_sha256[:12]}…`" if table.weights_sha256 else "none (random weights)"
    lines = [
        f"{'#' * heading_level} {table.model} on {table.dataset} ({source}, {table.images} images)", "",
        f"Weights sha256 {sha}; measured on {table.machine}. Latency: median per image of the whole predict. "
        "Agreement: the point's masks scored against the best point's (training level at scale 1). "
        "★: on the Pareto front of quality against latency.", "",
        "| point | mIoU | aAcc | agreement mIoU | pixel agreement | latency ms | |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for e in table.points:
        cells = [format_percent(v) for v in (e.miou, e.aacc, e.agreement_miou, e.pixel_agreement, e.latency_ms)]
        lines.append(f"| `{e.point}` | {' | '.join(cells)} | {'★' if e.point in front else ''} |")
    return "\n".join(lines) + "\n"


def _label_offsets(texts: list[str], anchors: np.ndarray, dpi: float, size: float = 7) -> list[tuple[float, float]]:
    """Offsets (points) for point labels that do not overlap: clustered points get labels stacked above and
    below them (greedy, left to right)."""
    char_w, line_h = 0.62 * size * dpi / 72, 1.25 * size * dpi / 72  # pixels
    placed: list[tuple[float, float, float, float]] = []
    offsets: list[tuple[float, float]] = [(0.0, 0.0)] * len(texts)
    for index in sorted(range(len(texts)), key=lambda i: (anchors[i][0], -anchors[i][1])):
        (x, y), width = anchors[index], char_w * len(texts[index])
        for step in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7):
            box = (x + 5, y + step * line_h - line_h / 2, x + 5 + width, y + step * line_h + line_h / 2)
            if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in placed):
                break
        placed.append(box)
        offsets[index] = (5 * 72 / dpi, step * line_h * 72 / dpi)
    return offsets


def plot_table(table: QualityTable, path: str | Path) -> Path:
    """Quality against latency per point, each labelled, the Pareto front drawn as a line (PNG, Agg backend)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = {"miou": "mIoU (%)", "agreement_miou": "agreement mIoU with the best point (%)"}[table.metric]
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    xs = [e.latency_ms for e in table.points]
    ys = [getattr(e, table.metric) for e in table.points]
    axes.scatter(xs, ys, color="0.6", zorder=2, label="operating point")
    front = pareto_front(table)
    axes.plot([e.latency_ms for e in front], [getattr(e, table.metric) for e in front], "o-", color="tab:red",
              zorder=3, label="Pareto front")
    axes.set_xlabel("latency, median ms per image")
    axes.set_ylabel(label)
    axes.set_title(f"{table.model} on {table.dataset} ({table.source}, {table.images} images)", fontsize=10)
    axes.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    axes.autoscale_view()
    texts = [f"{entry.level}@{entry.scale:g}" for entry in table.points]
    anchors = axes.transData.transform(np.column_stack([xs, ys]))
    for text, (x, y), (dx, dy) in zip(texts, zip(xs, ys, strict=True), _label_offsets(texts, anchors, figure.dpi),
                                      strict=True):
        arrow = {"arrowstyle": "-", "color": "0.7", "lw": 0.5} if abs(dy) > 8 else None
        axes.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, va="center",
                      arrowprops=arrow)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
