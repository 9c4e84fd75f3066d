"""The planner: the one decider of which operating point runs a request (or a batch of requests).

`Planner.plan(demand, load)` is used twice, with the same rules:

- at admission, for one request (batch 1), with the work queued ahead of it: the forecast that decides a
  strict refusal, the cache lookup and the receipt's prediction;
- at dispatch, for the batch about to run, with the time left until its most urgent member's budget
  deadline: late binding, so a burst that arrived after admission moves queued work to a cheaper point
  (a smaller scale, a cheaper knob level or a cheaper model of the pool) instead of making it late.

It walks the ladder (best quality first) and takes the first point whose predicted completion, with the safety
margin, fits the time left and whose knob fits the network input; `quality` caps the ladder by quality value.
It is a pure function of its inputs: the profile estimates, the shapes, and a `Load` snapshot.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.points import Point

Shape = tuple[int, int]
QUALITY_NAMES = {"best": 1.0, "balanced": 0.5, "fast": 0.0}


class PlanReason(enum.StrEnum):
    """Why a point was chosen (receipts, metrics)."""

    BUDGET = "budget"  # the best point predicted to meet the budget
    QUALITY = "quality"  # no budget: the best point the quality setting allows
    DEFAULT = "default"  # no budget, no quality: the best point
    EXPLICIT = "explicit"  # the request named the point or level
    FALLBACK = "fallback"  # nothing fits the budget: the cheapest allowed point, predicted late
    CACHE = "cache"  # answered from the result cache; no point ran for it


@dataclass(frozen=True)
class Plan:
    point: Point
    shape: Shape  # the network input at that point
    reason: PlanReason
    predicted_s: float  # predicted completion from now: queue ahead + compute + overheads
    feasible: bool  # whether the prediction (with the safety margin) fits the time left; True without a budget


@dataclass(frozen=True)
class Demand:
    """What must run: the points allowed (best first), the image, the batch and the time left."""

    candidates: Sequence[Point]
    image_size: Shape  # original (H, W): every member of a batch has this size
    batch_size: int = 1
    slack_s: float | None = None  # seconds until the earliest budget deadline; None = no budget
    quality: float | None = None  # 0 (fastest) .. 1 (best), caps the ladder by quality value
    explicit: Point | None = None


@dataclass(frozen=True)
class Load:
    """The state of the server the plan depends on, as a snapshot."""

    queue_ahead_s: float = 0.0  # predicted wait before a worker takes the work (0 at dispatch)
    overhead_s: float = 0.0  # measured non-compute time per request still to come (decode, encode)
    safety_margin: float = 0.15


class NoPointFits(ValueError):
    """No allowed point can take this input size (every knob pools more than the input allows)."""


def quality_value(quality: str | float | None) -> float | None:
    """'fast'/'balanced'/'best' or a number in [0, 1] -> the number; None passes through."""
    if quality is None:
        return None
    return QUALITY_NAMES[quality] if isinstance(quality, str) else float(quality)


def capped(candidates: Sequence[Point], quality: float | None) -> list[Point]:
    """The candidates at or below the quality cap: `quality` 1 keeps all, 0 keeps only the cheapest quality."""
    if quality is None or not candidates:
        return list(candidates)
    values = [p.quality for p in candidates]
    cap = min(values) + quality * (max(values) - min(values))
    return [p for p in candidates if p.quality <= cap + 1e-9]


class Planner:
    """Binds the profile's estimate (point, network shape, batch size, image size -> seconds) and the per-point
    network shape to the pure planning rules."""

    def __init__(
        self,
        estimate: Callable[[Point, Shape, int, Shape], float],
        shape_of: Callable[[Point, Shape], Shape],
        fits: Callable[[Point, Shape], bool],
    ) -> None:
        self._estimate = estimate
        self._shape_of = shape_of
        self._fits = fits

    def predict(self, point: Point, demand: Demand, load: Load) -> tuple[Shape, float]:
        shape = self._shape_of(point, demand.image_size)
        compute = self._estimate(point, shape, demand.batch_size, demand.image_size)
        return shape, load.queue_ahead_s + compute + load.overhead_s

    def plan(self, demand: Demand, load: Load) -> Plan:
        margin = 1 + load.safety_margin
        if demand.explicit is not None:
            shape, predicted = self.predict(demand.explicit, demand, load)
            if not self._fits(demand.explicit, shape):
                raise NoPointFits(f"point {demand.explicit.name} cannot take a {shape[1]}x{shape[0]} network input")
            feasible = demand.slack_s is None or predicted * margin <= demand.slack_s
            return Plan(demand.explicit, shape, PlanReason.EXPLICIT, predicted, feasible)
        # Fit first, then cap: a thin image that only the best points can take still gets an answer for "fast".
        fitting = [p for p in demand.candidates if self._fits(p, self._shape_of(p, demand.image_size))]
        if not fitting:
            raise NoPointFits(f"no operating point can take a {demand.image_size[1]}x{demand.image_size[0]} image")
        fitting = [(p, *self.predict(p, demand, load)) for p in capped(fitting, demand.quality)]
        if demand.slack_s is None:
            point, shape, predicted = fitting[0]
            reason = PlanReason.QUALITY if demand.quality is not None else PlanReason.DEFAULT
            return Plan(point, shape, reason, predicted, True)
        for point, shape, predicted in fitting:
            if predicted * margin <= demand.slack_s:
                return Plan(point, shape, PlanReason.BUDGET, predicted, True)
        point, shape, predicted = min(fitting, key=lambda item: item[2])  # late anyway: free the worker soonest
        return Plan(point, shape, PlanReason.FALLBACK, predicted, False)
