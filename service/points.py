"""Operating points, their quality values, and the ladder a pool of models offers the planner.

A point is (served model, knob level, input scale, precision). Its quality value is in mIoU points:

- measured: from a quality table written by `segserve evaluate` on labelled data (its mIoU), or on
  unlabelled data (the best point's quality times the point's agreement with it, as a fraction);
- else a documented prior: the model's published single-scale mIoU on the served dataset (from the
  specs, `ModelSpec.published_miou`), minus `KNOB_STEP_PENALTY` per step down the model's knob ladder and
  `SCALE_PENALTY` per unit of input scale below 1.0. A model with no published figure for the dataset
  ranks just below the pool's weakest published model (`UNKNOWN_MARGIN`), so it is chosen only when named.

The points no other point beats on both latency and quality form the ladder (best first), which is all the
planner walks. Latency comes from the profile, so the ladder is recomputed as the profile learns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from models.spec import Level, ModelSpec, OperatingPoint

# Priors, in mIoU points. ISR and the other knobs cost "minimal mIoU" per their papers (EDAFormer: minimal
# degradation up to 61% fewer GMACs; DoViT: within 0.8% at the trained threshold); 0.5 per ladder step is a
# deliberately cautious guess. Input scale: SeaFormer-S/B lose 5.3/5.5 mIoU on Cityscapes at half
# resolution (specs/seaformer.md section 2), i.e. about 10 mIoU per unit of scale.
KNOB_STEP_PENALTY = 0.5
SCALE_PENALTY = 10.0
# Reduced precision under autocast: SegFormer-B0's argmax agreed with fp32 on >= 99.8% of pixels in fp16 on an H200
# (tests/models/test_segformer_gpu.py); bf16 keeps 3 fewer mantissa bits than fp16.
PRECISION_PENALTY = {"fp32": 0.0, "fp16": 0.1, "bf16": 0.3}
UNKNOWN_MARGIN = 1.0
LADDER_REFRESH_S = 2.0  # how stale the cached ladder may be while the profile learns


@dataclass(frozen=True)
class Point:
    """An operating point of a served model, with its quality value and where that value comes from."""

    model: str  # served name
    level: Level
    scale: float
    precision: str = "fp32"
    quality: float = 0.0
    quality_source: str = "prior"  # "measured", "measured-agreement", "prior" or "prior-unknown"

    @property
    def name(self) -> str:
        return OperatingPoint(self.model, self.level, self.scale, self.precision).name



def quality_prior(spec: ModelSpec, dataset: str, level: Level, scale: float, base: float | None,
                  precision: str = "fp32") -> float:
    """The documented prior: published mIoU (or `base`) minus the knob-step, input-scale and precision penalties."""
    published = spec.published_miou.get(dataset, base)
    start = published if published is not None else 0.0
    return (start - KNOB_STEP_PENALTY * level.rank - SCALE_PENALTY * max(0.0, 1.0 - scale)
            - PRECISION_PENALTY[precision])


@dataclass
class QualityLookup:
    """Measured quality for point names (from a quality table); `best` is the table's best point's quality."""

    values: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # point -> agreement mIoU (0-100) with the best
    path: str | None = None

    def get(self, point_name: str, best_prior: float) -> tuple[float, str] | None:
        if point_name in self.values:
            return self.values[point_name], "measured"
        if point_name in self.agreement:
            return best_prior * self.agreement[point_name] / 100.0, "measured-agreement"
        return None


def model_points(
    model: str,
    spec: ModelSpec,
    dataset: str,
    levels: Sequence[Level],
    scales: Sequence[float],
    measured: QualityLookup | None,
    base: float | None,
    precisions: Sequence[str] = ("fp32",),
) -> list[Point]:
    """Every (level, scale, precision) point of one served model with its quality value."""
    best_prior = quality_prior(spec, dataset, levels[0], 1.0, base)
    points = []
    for precision in precisions:
        for level in levels:
            for scale in scales:
                name = OperatingPoint(model, level, scale, precision).name
                found = measured.get(name, best_prior) if measured else None
                if found is not None:
                    quality, source = found
                else:
                    quality = quality_prior(spec, dataset, level, scale, base, precision)
                    source = "prior" if dataset in spec.published_miou else "prior-unknown"
                points.append(Point(model, level, scale, precision, round(quality, 3), source))
    return points


def pareto_ladder(points: Iterable[Point], latency: Callable[[Point], float]) -> list[Point]:
    """The points not dominated (another is at least as good and as fast, and better in one), best first."""
    timed = sorted(((p, latency(p)) for p in points), key=lambda pt: (-pt[0].quality, pt[1], pt[0].name))
    ladder: list[Point] = []
    fastest = math.inf
    for point, seconds in timed:  # quality descending: a point survives only if it is faster than all above it
        if seconds < fastest:
            ladder.append(point)
            fastest = seconds
    return ladder


class Pool:
    """The models that share one label space, their points, and the ladder the planner walks.

    `ladder(None)` is the pool's ladder; `ladder(model)` restricts to one model (its own Pareto front).
    """

    def __init__(self, task: str, points: Sequence[Point], latency: Callable[[Point], float]) -> None:
        self.task = task
        self.points = list(points)
        self.models = list(dict.fromkeys(p.model for p in self.points))
        self._latency = latency
        self._cache: dict[str | None, tuple[float, list[Point]]] = {}
        # A stable order of every point by quality (0 = best), used as the cache's quality rank.
        ordered = sorted(self.points, key=lambda p: (-p.quality, p.name))
        self.quality_rank = {p.name: rank for rank, p in enumerate(ordered)}
        self._by_name = {p.name: p for p in self.points}

    def ladder(self, model: str | None = None) -> list[Point]:
        now = time.monotonic()
        cached = self._cache.get(model)
        if cached is None or now - cached[0] > LADDER_REFRESH_S:
            chosen = [p for p in self.points if model is None or p.model == model]
            cached = (now, pareto_ladder(chosen, self._latency))
            self._cache[model] = cached
        return cached[1]

    def point(self, name: str) -> Point | None:
        return self._by_name.get(name)

    def invalidate(self) -> None:
        self._cache.clear()


def with_quality(point: Point, quality: float, source: str) -> Point:
    return replace(point, quality=quality, quality_source=source)
