"""The planner: which ISR level can finish a request within its budget, given the work queued ahead.

`LatencyProfile` holds seconds per batch by (level, batch size) at the calibration shape, measured at
start-up on the real backend and refined online from observed batches (an exponentially weighted
average). Other input shapes are scaled by the ratio of their GMACs to the calibration shape's.

`choose` is a pure function of the request, the profile and the backlog, so it is unit-tested without
a model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from models.isr import IsrLevel

Shape = tuple[int, int]
QUALITY_NAMES = {"best": 1.0, "balanced": 0.5, "fast": 0.0}


@dataclass(frozen=True)
class Plan:
    level: IsrLevel
    shape: Shape
    reason: str  # "budget", "quality", "explicit", "default" or "fallback" (no level fits the budget)
    predicted_s: float  # predicted completion time from now, queue included
    feasible: bool  # whether the prediction (with the safety margin) fits the budget; True without one


class LatencyProfile:
    """Per-batch latency estimates, thread-safe (workers observe, the event loop reads).

    Two corrections keep start-up measurements honest: an entry that runs is refined by an exponentially
    weighted average of its observed times; an entry that has not run yet is scaled by the drift, the
    average ratio of observed to calibrated time over every batch seen. Without the drift, a level that
    calibrated slow (say, under CPU contention at start-up) would never be chosen, hence never corrected.
    """

    def __init__(
        self,
        levels: Sequence[IsrLevel],
        calibration_shape: Shape,
        gmacs: Callable[[IsrLevel, Shape], float],
        smoothing: float = 0.2,
    ) -> None:
        self.levels = list(levels)
        self.calibration_shape = calibration_shape
        self._gmacs = gmacs
        self._smoothing = smoothing
        self._calibrated: dict[str, dict[int, float]] = {level.name: {} for level in self.levels}
        self._observed: dict[str, dict[int, float]] = {level.name: {} for level in self.levels}
        self.drift = 1.0
        self._lock = threading.Lock()

    def set(self, level: IsrLevel, batch_size: int, seconds: float) -> None:
        with self._lock:
            self._calibrated[level.name][batch_size] = seconds
            self._observed[level.name].pop(batch_size, None)

    def _row(self, name: str) -> dict[int, float]:
        row = {batch: seconds * self.drift for batch, seconds in self._calibrated[name].items()}
        row.update(self._observed[name])
        return row

    def table(self) -> dict[str, dict[int, float]]:
        with self._lock:
            return {name: dict(sorted(self._row(name).items())) for name in self._calibrated}

    def _shape_factor(self, level: IsrLevel, shape: Shape) -> float:
        if shape == self.calibration_shape:
            return 1.0
        return self._gmacs(level, shape) / self._gmacs(level, self.calibration_shape)

    def estimate(self, level: IsrLevel, shape: Shape, batch_size: int = 1) -> float:
        """Seconds to run a batch of `batch_size` at `shape` (interpolated in batch size)."""
        with self._lock:
            row = self._row(level.name)
            if not row:
                raise RuntimeError(f"level {level.name} has not been calibrated")
            seconds = _interpolate(row, batch_size)
        return seconds * self._shape_factor(level, shape)

    def observe(self, level: IsrLevel, shape: Shape, batch_size: int, seconds: float) -> None:
        """Fold an observed batch time (normalized to the calibration shape) into its entry and the drift."""
        normalized = seconds / self._shape_factor(level, shape)
        alpha = self._smoothing
        with self._lock:
            calibrated = self._calibrated[level.name]
            if calibrated:
                ratio = normalized / _interpolate(calibrated, batch_size)
                self.drift = (1 - alpha) * self.drift + alpha * ratio
            observed = self._observed[level.name]
            previous = observed.get(batch_size, calibrated.get(batch_size))  # the first one starts from calibration
            observed[batch_size] = normalized if previous is None else (1 - alpha) * previous + alpha * normalized


def _interpolate(row: dict[int, float], batch_size: int) -> float:
    """Linear in batch size between measured points; beyond the largest, per-item cost of the largest."""
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


def quality_floor_rank(quality: str | float | None, ladder_size: int) -> int:
    """The best rank a quality setting allows: 1 / "best" -> 0 (full), 0 / "fast" -> the cheapest."""
    if quality is None:
        return 0
    value = QUALITY_NAMES[quality] if isinstance(quality, str) else float(quality)
    return round((1.0 - value) * (ladder_size - 1))


def choose(
    profile: LatencyProfile,
    shape: Shape,
    *,
    budget_s: float | None,
    quality: str | float | None,
    explicit: IsrLevel | None,
    backlog_s: float,
    overhead_s: float,
    safety_margin: float,
) -> Plan:
    """The best level that is predicted to finish within the budget.

    Prediction = backlog (work queued ahead, per worker) + batch-1 compute at this shape + the measured
    non-compute overhead (decode, preprocess, encode). A level fits when prediction * (1 + margin) is
    within the budget. `quality` caps the level from above; no budget and no quality means full compute.
    """
    levels = profile.levels

    def predict(level: IsrLevel) -> float:
        return backlog_s + profile.estimate(level, shape, 1) + overhead_s

    if explicit is not None:
        predicted = predict(explicit)
        feasible = budget_s is None or predicted * (1 + safety_margin) <= budget_s
        return Plan(explicit, shape, "explicit", predicted, feasible)
    floor = min(quality_floor_rank(quality, len(levels)), len(levels) - 1)
    candidates = levels[floor:]
    if budget_s is None:
        reason = "quality" if quality is not None else "default"
        return Plan(candidates[0], shape, reason, predict(candidates[0]), True)
    for level in candidates:
        predicted = predict(level)
        if predicted * (1 + safety_margin) <= budget_s:
            return Plan(level, shape, "budget", predicted, True)
    cheapest = candidates[-1]
    return Plan(cheapest, shape, "fallback", predict(cheapest), False)
