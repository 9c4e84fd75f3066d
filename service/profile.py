"""Latency per operating point and batch size: seeded from a few measured anchors, refined by every batch.

A batch's time has two parts that scale differently. The network's forward scales with the network input (the
point's scale and knob): each point has a reference shape (the network input of a calibration-sized image at the
point's scale) and a row of forward seconds per batch size there. Preprocessing (resizing the decoded image) and
postprocessing (resizing the logits to the image's size, the argmax) scale with the image's own pixels, whatever
the point: a per-model rate in seconds per megapixel. (Folding both into one number made small-scale points
look 3-4x cheaper than they are on large images, and the planner overbooked them under load.)

The forward rows start from calibration (`seed`): a per-model affine fit `t = a + c * GMACs` over the measured
anchor points (fixed cost plus cost per GMAC, one fit per batch size) gives every point's row, the anchors'
too, so that the order of the points at start follows their GMACs rather than one sample's noise. Every
executed batch refines its point's row by an exponentially weighted average, after normalizing its time to the
reference shape by the same fit. An entry that has not run yet is scaled by its model's drift (the average
ratio of observed to seeded time), so that a model that calibrated slow under contention is corrected
everywhere, not only where traffic happened to go.

Thread-safe: workers observe while the event loop estimates. Plain data only (no torch): the GMAC counts
come from a callback.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from service.points import Point

log = logging.getLogger(__name__)
Shape = tuple[int, int]
PROFILE_VERSION = 3  # 2: fits and drift per precision group; 3: pre/postprocessing rate apart


def interpolate(row: Mapping[int, float], batch_size: int) -> float:
    """Linear in batch size between known sizes; outside them, the per-item cost of the nearest end."""
    if batch_size in row:
        return row[batch_size]
    sizes = sorted(row)
    if batch_size < sizes[0]:
        return row[sizes[0]] * batch_size / sizes[0]
    if batch_size > sizes[-1]:
        return row[sizes[-1]] * batch_size / sizes[-1]
    upper = next(s for s in sizes if s > batch_size)
    lower = max(s for s in sizes if s < batch_size)
    weight = (batch_size - lower) / (upper - lower)
    return row[lower] * (1 - weight) + row[upper] * weight


def affine_fit(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept seconds, seconds per GMAC) through (GMACs, seconds) samples; proportional when the
    least-squares line is not physical (negative fixed cost or slope) or there is one distinct GMAC value."""
    xs = [g for g, _ in samples]
    if len(set(xs)) < 2:
        ratio = sum(t for _, t in samples) / sum(xs)
        return 0.0, ratio
    n = len(samples)
    mean_x, mean_y = sum(xs) / n, sum(t for _, t in samples) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((g - mean_x) * (t - mean_y) for g, t in samples) / var
    intercept = mean_y - slope * mean_x
    if slope <= 0 or intercept < 0:
        ratio = sum(t for _, t in samples) / sum(xs)
        return 0.0, ratio
    return intercept, slope


def group_of(point: Point) -> str:
    """Points whose cost follows one affine fit and one drift: a model at one numeric precision."""
    return point.model if point.precision == "fp32" else f"{point.model}:{point.precision}"


class LatencyProfile:
    """Seconds per batch by point and batch size at each point's reference shape, plus the shape scaling."""

    def __init__(self, gmacs: Callable[[Point, Shape], float], smoothing: float = 0.2,
                 reference_image: Shape = (512, 512)) -> None:
        self._gmacs = gmacs
        self.reference_pixels = reference_image[0] * reference_image[1]  # the calibration image's
        self._io_rate: dict[str, float] = {}  # group -> seconds of pre- and postprocessing per image megapixel
        self._smoothing = smoothing
        self._reference: dict[str, Shape] = {}  # point name -> reference network shape
        self._model_of: dict[str, str] = {}  # point name -> its group: model and precision (one cost regime)
        self._seeded: dict[str, dict[int, float]] = {}
        self._observed: dict[str, dict[int, float]] = {}
        self._fits: dict[str, dict[int, tuple[float, float]]] = {}  # model -> batch -> (a, c)
        self.drift: dict[str, float] = {}
        self._lock = threading.Lock()

    # ----- set-up -----
    def register(self, point: Point, reference_shape: Shape) -> None:
        with self._lock:
            self._reference[point.name] = reference_shape
            self._model_of[point.name] = group_of(point)
            self._seeded.setdefault(point.name, {})
            self._observed.setdefault(point.name, {})
            self.drift.setdefault(group_of(point), 1.0)

    def reference_shape(self, point: Point) -> Shape:
        return self._reference[point.name]

    def seed(self, model: str, anchors: Mapping[str, Mapping[int, float]], points: list[Point],
             io_rate: float = 0.0) -> None:
        """Seed every point of one group (`group_of`: a model at one precision) from measured anchors
        {point name: {batch: forward seconds}} and the measured pre/postprocessing seconds per megapixel."""
        batches = sorted({b for row in anchors.values() for b in row})
        fits = {}
        for batch in batches:
            samples = [(self._gmacs(p, self._reference[p.name]), anchors[p.name][batch])
                       for p in points if p.name in anchors and batch in anchors[p.name]]
            fits[batch] = affine_fit(samples)
        with self._lock:
            self._fits[model] = fits
            for point in points:
                # Every point, the anchors too, is seeded from the fit: one noisy sample of an anchor must not
                # make it look slower than a point with more GMACs and drop it from the ladder (at small inputs
                # the knob levels are a few percent apart, within one sample's noise). Batches refine it.
                gmacs = self._gmacs(point, self._reference[point.name])
                self._seeded[point.name] = {b: a + c * gmacs for b, (a, c) in fits.items()}
                self._observed[point.name] = {}
            self.drift[model] = 1.0
            self._io_rate[model] = io_rate

    def seeded(self, point: Point) -> bool:
        return bool(self._seeded.get(point.name))

    # ----- estimates -----
    def _row(self, name: str) -> dict[int, float]:
        drift = self.drift.get(self._model_of[name], 1.0)
        row = {b: s * drift for b, s in self._seeded[name].items()}
        row.update(self._observed[name])
        return row

    def _shape_factor(self, point: Point, shape: Shape) -> float:
        reference = self._reference[point.name]
        if shape == reference:
            return 1.0
        a, c = self._fits.get(group_of(point), {}).get(1, (0.0, 1.0))
        here, there = self._gmacs(point, shape), self._gmacs(point, reference)
        return (a + c * here) / max(a + c * there, 1e-12)

    def io_seconds(self, point: Point, pixels: int) -> float:
        """Pre- and postprocessing of images totalling `pixels` (their own sizes) at this point's model."""
        return self._io_rate.get(group_of(point), 0.0) * pixels / 1e6

    def batch_seconds(self, point: Point, shape: Shape, batch_size: int, image_size: Shape) -> float:
        """A whole batch: the forward at `shape` plus pre/postprocessing of `batch_size` images of `image_size`."""
        return self.estimate(point, shape, batch_size) + self.io_seconds(point, batch_size * image_size[0]
                                                                          * image_size[1])

    def estimate(self, point: Point, shape: Shape, batch_size: int = 1) -> float:
        """Forward seconds of a batch of `batch_size` at `shape` (network input) at this point."""
        with self._lock:
            row = self._row(point.name)
            if not row:
                raise RuntimeError(f"point {point.name} has not been calibrated")
            seconds = interpolate(row, batch_size)
        return seconds * self._shape_factor(point, shape)

    def observe(self, point: Point, shape: Shape, batch_size: int, seconds: float, io_seconds: float = 0.0,
                pixels: int = 0) -> None:
        """Fold an executed batch's forward time (normalized to the reference shape) into its entry and the
        drift, and its pre/postprocessing time over `pixels` image pixels into the model's rate."""
        normalized = seconds / self._shape_factor(point, shape)
        alpha = self._smoothing
        with self._lock:
            if pixels > 0:
                group = group_of(point)
                rate = io_seconds / (pixels / 1e6)
                previous_rate = self._io_rate.get(group)
                self._io_rate[group] = rate if not previous_rate else (1 - alpha) * previous_rate + alpha * rate
            seeded = self._seeded[point.name]
            if seeded:
                ratio = normalized / interpolate(seeded, batch_size)
                group = group_of(point)
                self.drift[group] = (1 - alpha) * self.drift[group] + alpha * ratio
            observed = self._observed[point.name]
            previous = observed.get(batch_size, seeded.get(batch_size))
            observed[batch_size] = normalized if previous is None else (1 - alpha) * previous + alpha * normalized

    def table(self, model: str | None = None) -> dict[str, dict[int, float]]:
        """{point name: {batch: seconds}} for calibration-sized images (forward at each point's reference shape
        plus pre/postprocessing), optionally one model's."""
        with self._lock:
            return {
                name: {b: s + self._io_rate.get(self._model_of[name], 0.0) * b * self.reference_pixels / 1e6
                       for b, s in sorted(self._row(name).items())}
                for name in self._seeded
                if self._seeded[name] and (model is None or name.split("/", 1)[0] == model)
            }

    # ----- persistence -----
    def _groups(self, model: str) -> list[str]:
        return sorted({group for name, group in self._model_of.items() if name.split("/", 1)[0] == model})

    def save(self, path: Path, model: str, key: Mapping[str, object]) -> None:
        """Write one model's profile (seeded rows, observed rows, fits and drift per precision) under `key`."""
        with self._lock:
            names = [n for n in self._model_of if n.split("/", 1)[0] == model]
            groups = self._groups(model)
            data = {
                "version": PROFILE_VERSION, "key": dict(key),
                "drift": {g: self.drift.get(g, 1.0) for g in groups},
                "io_rate": {g: self._io_rate.get(g, 0.0) for g in groups},
                "fits": {g: {str(b): list(ab) for b, ab in self._fits.get(g, {}).items()} for g in groups},
                "seeded": {n: {str(b): s for b, s in self._seeded[n].items()} for n in names},
                "observed": {n: {str(b): s for b, s in self._observed[n].items()} for n in names},
            }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)

    def load(self, path: Path, model: str, key: Mapping[str, object], points: list[Point]) -> bool:
        """Restore a saved profile if it exists, matches `key` and covers the points; False otherwise."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION or data.get("key") != dict(key):
            return False
        try:
            fits = {g: {int(b): (float(ab[0]), float(ab[1])) for b, ab in row.items()}
                    for g, row in data["fits"].items()}
            seeded = {n: {int(b): float(s) for b, s in row.items()} for n, row in data["seeded"].items()}
            observed = {n: {int(b): float(s) for b, s in row.items()} for n, row in data["observed"].items()}
            drift = {g: float(value) for g, value in data["drift"].items()}
            io_rate = {g: float(value) for g, value in data["io_rate"].items()}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            log.warning("ignoring the malformed latency profile %s", path)
            return False
        if any(group_of(p) not in fits or not seeded.get(p.name) for p in points):
            return False  # a point (or precision) the saved profile never measured: calibrate again
        with self._lock:
            self._fits.update(fits)
            for point in points:
                self._seeded[point.name] = seeded[point.name]
                self._observed[point.name] = observed.get(point.name, {})
            self.drift.update(drift)
            self._io_rate.update(io_rate)
        return True
