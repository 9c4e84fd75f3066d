"""`segserve evaluate`: measured quality and latency per operating point, on a folder of images.

    segserve evaluate data/ade/validation --model edaformer-t --checkpoint t.pth --json quality.json
    segserve evaluate traffic_sample/ --model edaformer-t --unlabelled --limit 200 --markdown quality.md
    segserve evaluate --images imgs/ --labels masks/ --ignore-index 0 --model segformer-b0 --scales 1,0.5

Folder layouts (detected, or chosen with `--layout`):

- ade20k: `images/**/*.jpg` with `annotations/**/*.png` at the same relative path; annotation 0 is ignored and
  every other id is shifted down by one (mmseg's `reduce_zero_label`, as the official ADE20K pipeline does);
- cityscapes: `leftImg8bit/**/*_leftImg8bit.png` with `gtFine/**/*_gtFine_labelTrainIds.png`, or
  `*_gtFine_labelIds.png` mapped to train ids with the official table (ids without a train id: ignored);
- generic: `--images DIR --labels DIR` matched by file stem, with `--ignore-index`;
- unlabelled (`--unlabelled`, or no labels found): each point's masks are scored against the best point's
  (the training level at scale 1), a label-free proxy for what a cheaper point loses.

Every image runs through every point in turn (so a change of machine load spreads over all points); the
latency of a point is the median per image of the whole predict (resize, forward, resize and argmax), after
one untimed warm-up run per point. The metrics are mmseg's (`models.metrics`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.base import SegmentationModel
from models.datasets import DatasetInfo
from models.metrics import (
    MetricAccumulator,
    PointQuality,
    QualityTable,
    format_percent,
    load_quality_table,
    markdown_table,
    plot_table,
    quality_table_from_dict,
)
from models.spec import Level, ModelSpec, OperatingPoint

__all__ = [
    "CITYSCAPES_TRAIN_IDS", "EvalSet", "QualityTable", "Sample", "evaluate", "find_eval_set", "load_quality_table",
    "operating_points", "quality_table_from_dict",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUTS = ("auto", "ade20k", "cityscapes", "generic", "unlabelled")
DEFAULT_SCALES = (1.0, 0.75, 0.5)

# cityscapesScripts' labels.py: label id -> train id for the 19 evaluated classes; every other id is ignored.
CITYSCAPES_TRAIN_IDS: Mapping[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}
_CITYSCAPES_LUT = np.full(256, 255, np.uint8)
for _label_id, _train_id in CITYSCAPES_TRAIN_IDS.items():
    _CITYSCAPES_LUT[_label_id] = _train_id


@dataclass(frozen=True)
class Sample:
    """One image, its label file (None when unlabelled) and whether the label holds Cityscapes label ids."""

    name: str
    image: Path
    label: Path | None = None
    cityscapes_label_ids: bool = False


@dataclass
class EvalSet:
    layout: str  # "ade20k", "cityscapes", "generic" or "unlabelled"
    samples: list[Sample]
    ignore_index: int = 255
    reduce_zero_label: bool = False

    @property
    def labelled(self) -> bool:
        return self.layout != "unlabelled"


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _require_all_labelled(samples: list[Sample], layout: str) -> None:
    missing = [s.name for s in samples if s.label is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{layout} layout: {len(missing)} of {len(samples)} images have no label: {shown}")


def _ade20k(folder: Path) -> list[Sample]:
    samples = []
    for image in _images_under(folder / "images"):
        relative = image.relative_to(folder / "images").with_suffix(".png")
        label = folder / "annotations" / relative
        samples.append(Sample(str(relative.with_suffix("")), image, label if label.is_file() else None))
    return samples


def _cityscapes(folder: Path) -> list[Sample]:
    samples = []
    for image in sorted((folder / "leftImg8bit").rglob("*_leftImg8bit.png")):
        relative = image.relative_to(folder / "leftImg8bit")
        stem = relative.name[: -len("_leftImg8bit.png")]
        base = folder / "gtFine" / relative.parent
        train_ids, label_ids = base / f"{stem}_gtFine_labelTrainIds.png", base / f"{stem}_gtFine_labelIds.png"
        name = str(relative.parent / stem)
        if train_ids.is_file():
            samples.append(Sample(name, image, train_ids))
        elif label_ids.is_file():
            samples.append(Sample(name, image, label_ids, cityscapes_label_ids=True))
        else:
            samples.append(Sample(name, image))
    return samples


def _generic(images: Path, labels: Path) -> list[Sample]:
    by_stem: dict[str, Path] = {}
    for label in _images_under(labels):  # a .png label wins over another format of the same stem
        if label.stem not in by_stem or label.suffix.lower() == ".png":
            by_stem[label.stem] = label
    return [Sample(image.stem, image, by_stem.get(image.stem)) for image in _images_under(images)]


def find_eval_set(folder: str | Path | None = None, layout: str = "auto", *, images: str | Path | None = None,
                  labels: str | Path | None = None, ignore_index: int = 255, unlabelled: bool = False) -> EvalSet:
    """The images (and labels) of a folder in one of the supported layouts; ValueError when none fits."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    root = Path(folder) if folder is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if layout == "auto":
        if images is not None:
            layout = "generic"
        elif root is not None and (root / "leftImg8bit").is_dir():
            layout = "cityscapes"
        elif root is not None and (root / "images").is_dir():
            layout = "ade20k"
        else:
            layout = "unlabelled"
    if layout == "generic":
        if images is None:
            raise ValueError("the generic layout needs --images DIR (and --labels DIR unless --unlabelled)")
        if labels is None and not unlabelled:
            raise ValueError("the generic layout needs --labels DIR (or --unlabelled)")
        samples = _generic(Path(images), Path(labels) if labels is not None else Path(images))
    elif root is None:
        raise ValueError(f"the {layout} layout needs a folder")
    elif layout == "ade20k":
        samples = _ade20k(root)
    elif layout == "cityscapes":
        samples = _cityscapes(root)
    else:
        base = root / "images" if (root / "images").is_dir() else root
        samples = [Sample(str(p.relative_to(base).with_suffix("")), p) for p in _images_under(base)]
    if not samples:
        raise ValueError(f"no images found for the {layout} layout in {images if layout == 'generic' else root}")
    if unlabelled or layout == "unlabelled" or all(s.label is None for s in samples):
        if layout != "unlabelled" and not unlabelled:
            print(f"segserve evaluate: no labels found in the {layout} layout; scoring agreement with the best "
                  "point instead (unlabelled)", file=sys.stderr)
        return EvalSet("unlabelled", [Sample(s.name, s.image) for s in samples])
    _require_all_labelled(samples, layout)
    return EvalSet(layout, samples, ignore_index=ignore_index if layout == "generic" else 255,
                   reduce_zero_label=layout == "ade20k")


def read_label(sample: Sample) -> np.ndarray:
    """A label file as class ids (H, W): single-channel PNG (grey, palette or 16-bit); Cityscapes ids mapped."""
    from PIL import Image

    assert sample.label is not None
    with Image.open(sample.label) as image:
        labels = np.asarray(image)
    if labels.ndim != 2:
        raise ValueError(f"label {sample.label} has {labels.shape[2]} channels; expected one channel of class ids")
    if sample.cityscapes_label_ids:
        labels = _CITYSCAPES_LUT[labels.astype(np.int64).clip(0, 255)]
    return labels


def operating_points(spec: ModelSpec, levels: Sequence[str] | None = None,
                     scales: Sequence[float] = DEFAULT_SCALES) -> list[OperatingPoint]:
    """Levels (names or written values; default: the whole ladder) x scales, best first."""
    chosen: list[Level] = []
    for text in levels or [level.name for level in spec.ladder()]:
        try:
            chosen.append(spec.level(text))
        except KeyError:
            if spec.knob is None:
                raise
            chosen.append(spec.knob.level(spec.knob.parse(text)))  # a valid value off the default ladder
    for scale in scales:
        if not 0 < scale <= 4:
            raise ValueError(f"scale {scale:g} must be in (0, 4]")
    return [OperatingPoint(spec.name, level, float(scale)) for level in chosen for scale in scales]


def machine_description() -> str:
    """CPU model, core count, torch version and threads, and the load when measuring (latency depends on it)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu}, {os.cpu_count()} CPUs{load}, torch {torch.__version__}, "
            f"{threads} thread{'s' if threads > 1 else ''}")


def evaluate(model: SegmentationModel, eval_set: EvalSet, points: Sequence[OperatingPoint], dataset: DatasetInfo, *,
             limit: int | None = None, progress: bool = True) -> QualityTable:
    """Run every point on every image of the set; return the quality table.

    `model` is a registered model in eval mode; `dataset` its label space and test pipeline (`pipeline_for`
    applied). The best point (training level, scale 1) is always run, as the reference of the agreement
    columns, and is added to the table when `points` lacks it.
    """
    import torch
    from tqdm import tqdm

    from models.cli import load_rgb
    from models.predict import Predictor

    spec: ModelSpec = model.spec
    machine = machine_description()  # before the run: the load it reports is the load the run starts under
    reference = OperatingPoint(spec.name, spec.training_level(), 1.0)
    points = list(points)
    if reference.name not in {p.name for p in points}:
        points.insert(0, reference)
    samples = eval_set.samples[:limit] if limit else eval_set.samples
    if not samples:
        raise ValueError("the evaluation set has no images")
    other_precision = [p.name for p in points if p.precision != "fp32"]
    if other_precision:  # the table would credit fp32 quality to another precision
        raise ValueError(f"evaluate runs the torch model in fp32; cannot measure {', '.join(other_precision)}")
    num_classes = model.num_classes
    predictor = Predictor(model, dataset)
    quality = {p.name: MetricAccumulator(num_classes, eval_set.ignore_index,
                                         reduce_zero_label=eval_set.reduce_zero_label) for p in points}
    agreement = {p.name: MetricAccumulator(num_classes, ignore_index=None) for p in points}
    latencies: dict[str, list[float]] = {p.name: [] for p in points}
    bar = tqdm(total=len(samples) * len(points), desc=f"evaluate {spec.name}", unit="run", disable=not progress)
    with torch.inference_mode():
        for index, sample in enumerate(samples):
            image = np.array(load_rgb(sample.image))  # a writable copy: torch warns on read-only arrays
            label = read_label(sample) if eval_set.labelled else None
            if label is not None and label.shape != image.shape[:2]:
                raise ValueError(f"{sample.name}: label {label.shape[::-1]} and image {image.shape[1::-1]} differ "
                                 "in size (width, height)")
            masks: dict[str, np.ndarray] = {}
            for point in points:
                size = predictor.input_size(*image.shape[:2], point.scale)
                if not spec.fits(point.level, *size):
                    raise ValueError(f"{point.name} cannot run {sample.name}: its network input {size[1]}x{size[0]} "
                                     "is too small for the level; leave the point out or use a larger scale")
                if index == 0:  # untimed warm-up: first-call allocations are not a point's cost
                    predictor.predict(image, point.level, scale=point.scale)
                start = time.perf_counter()
                masks[point.name] = predictor.predict(image, point.level, scale=point.scale).labels
                latencies[point.name].append((time.perf_counter() - start) * 1000)
                if label is not None:
                    quality[point.name].update(masks[point.name], label)
                bar.update(1)
                bar.set_postfix_str(point.name, refresh=False)
            for point in points:
                agreement[point.name].update(masks[point.name], masks[reference.name])
    bar.close()
    rows = []
    for point in points:
        agreed = agreement[point.name].scores()
        measured = quality[point.name].scores() if eval_set.labelled else None
        rows.append(PointQuality(
            point=point.name, model=point.model, level=point.level.name, scale=point.scale,
            latency_ms=statistics.median(latencies[point.name]),
            miou=measured.miou if measured else None, aacc=measured.aacc if measured else None,
            agreement_miou=agreed.miou, pixel_agreement=agreed.aacc,
            per_class_iou=list(measured.per_class_iou) if measured else None))
    meta = model.meta
    return QualityTable(
        model=spec.name, dataset=meta.dataset or dataset.name,
        source=f"labelled:{eval_set.layout}" if eval_set.labelled else "unlabelled", images=len(samples),
        metric="miou" if eval_set.labelled else "agreement_miou", machine=machine, points=rows,
        weights_sha256=meta.checkpoint_sha256 or None)


def print_summary(table: QualityTable) -> None:
    for entry in table.points:
        quality, agreed = format_percent(getattr(entry, table.metric)), format_percent(entry.agreement_miou)
        print(f"{entry.point:32s} {table.metric} {quality:>5s}  agreement {agreed:>5s}  {entry.latency_ms:7.1f} ms")


# --- the command ---------------------------------------------------------------------------------------------

def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", nargs="?", help="the set: ADE20K or Cityscapes layout, or a folder of images")
    parser.add_argument("--model", default="edaformer-t", help="registered model name (default edaformer-t)")
    parser.add_argument("--checkpoint", help="weights (default: the model's demo weights when shipped, else random)")
    parser.add_argument("--dataset", choices=("ade20k", "cityscapes", "coco-stuff", "demo"),
                        help="label space and test pipeline (default: from the checkpoint's class count)")
    parser.add_argument("--points", help="comma list of levels (default: the model's whole ladder)")
    parser.add_argument("--scales", default="1,0.75,0.5", help="comma list of input scales (default 1,0.75,0.5)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder layout (default: detected)")
    parser.add_argument("--images", help="generic layout: the image folder")
    parser.add_argument("--labels", help="generic layout: the label folder (files matched by stem)")
    parser.add_argument("--ignore-index", type=int, default=255, help="generic layout: label value to ignore")
    parser.add_argument("--unlabelled", action="store_true", help="score agreement with the best point, not labels")
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the quality table (what `serve --quality-table` reads)")
    parser.add_argument("--markdown", help="write the table as Markdown")
    parser.add_argument("--plot", help="write quality against latency as a PNG (needs matplotlib)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO")


def _number_list(text: str, what: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a comma list of numbers") from None


def run_from_args(args: argparse.Namespace) -> int:
    """The `evaluate` command: find the set, load the model, run every point, write what was asked for."""
    import torch

    from models.datasets import dataset_for
    from models.demo_scenes import demo_weights_path
    from models.predict import pipeline_for
    from models.registry import create_model, get_spec

    spec = get_spec(args.model)  # argument and folder errors first, before seconds of model loading
    points = operating_points(spec, [t for t in (args.points or "").split(",") if t.strip()] or None,
                              _number_list(args.scales, "--scales"))
    eval_set = find_eval_set(args.folder, args.layout, images=args.images, labels=args.labels,
                             ignore_index=args.ignore_index, unlabelled=args.unlabelled)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or demo_weights_path(args.model)
    if checkpoint is None:
        torch.manual_seed(0)
        print(f"segserve evaluate: warning: no --checkpoint and no demo weights for {args.model}: evaluating seeded "
              "RANDOM weights", file=sys.stderr)
    elif args.checkpoint is None:
        print(f"segserve evaluate: no --checkpoint: evaluating the demo weights {checkpoint} (trained on synthetic "
              "scenes)", file=sys.stderr)
    model = create_model(args.model, checkpoint=checkpoint, dataset=args.dataset).eval()
    name = args.dataset or model.meta.dataset  # "custom" for a class count no known dataset has
    dataset = pipeline_for(spec, dataset_for(None if name == "custom" else name, model.num_classes))
    table = evaluate(model, eval_set, points, dataset, limit=args.limit)
    print_summary(table)
    if args.json:
        print(f"wrote {table.save(args.json)}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_table(table))
        print(f"wrote {args.markdown}")
    if args.plot:
        print(f"wrote {plot_table(table, args.plot)}")
    return 0
