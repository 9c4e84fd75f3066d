"""The planner as a pure function over a latency table, the quality priors, the Pareto ladder, the pool.

No model and no server: points are built from EDAFormer's ladder, latencies from a table.
"""

from __future__ import annotations

import itertools
import random

import pytest

from models import get_spec
from models.isr import LADDER
from service.planner import Demand, Load, NoPointFits, Planner, PlanReason, capped, quality_value
from service.points import (
    KNOB_STEP_PENALTY,
    SCALE_PENALTY,
    Point,
    Pool,
    QualityLookup,
    model_points,
    pareto_ladder,
    quality_prior,
)

SIZE = (120, 160)
# Milliseconds per image at batch 1: a plausible, decreasing ladder.
MS = [100.0, 80.0, 60.0, 45.0, 35.0, 30.0]
POINTS = [Point("m", level, 1.0, quality=50.0 - level.rank) for level in LADDER]


def table_planner(ms: dict[str, float], fits=lambda point, shape: True) -> Planner:
    return Planner(lambda point, shape, batch, image: ms[point.name] * batch / 1e3, lambda point, size: size, fits)


PLANNER = table_planner({p.name: ms for p, ms in zip(POINTS, MS, strict=True)})


def plan(budget_ms: float | None = None, *, quality: float | None = None, explicit: Point | None = None,
         queue_s: float = 0.0, overhead_s: float = 0.0, margin: float = 0.0, batch: int = 1, planner=PLANNER):
    demand = Demand(POINTS, SIZE, batch, None if budget_ms is None else budget_ms / 1e3, quality, explicit)
    return planner.plan(demand, Load(queue_s, overhead_s, margin))


# ----- the planner -----

def test_no_budget_means_the_best_point() -> None:
    result = plan()
    assert (result.point, result.reason, result.feasible) == (POINTS[0], PlanReason.DEFAULT, True)
    assert result.predicted_s == pytest.approx(0.100)
    assert result.shape == SIZE


@pytest.mark.parametrize(("budget_ms", "expected"), [(100, 0), (99, 1), (80, 1), (61, 2), (45, 3), (30, 5)])
def test_a_budget_gets_the_best_point_that_fits(budget_ms: float, expected: int) -> None:
    result = plan(budget_ms)
    assert result.point == POINTS[expected] and result.reason == PlanReason.BUDGET and result.feasible


def test_the_queue_overheads_and_margin_count_against_the_budget() -> None:
    assert plan(100, queue_s=0.040).point == POINTS[2]  # 40 ms ahead: 60 ms left
    assert plan(100, overhead_s=0.020).point == POINTS[1]  # 20 ms of decode/encode
    assert plan(100, margin=0.5).point == POINTS[2]  # 60 * 1.5 = 90 <= 100 < 80 * 1.5
    assert plan(100, margin=0.5).predicted_s == pytest.approx(0.060)


def test_batch_size_scales_the_prediction() -> None:
    assert plan(100, batch=2).point == POINTS[3]  # 2 x 45 = 90 <= 100 < 2 x 60
    assert plan(100, batch=2).predicted_s == pytest.approx(0.090)


def test_nothing_fits_falls_back_to_the_fastest_point_predicted_late() -> None:
    result = plan(10)
    assert (result.point, result.reason, result.feasible) == (POINTS[-1], PlanReason.FALLBACK, False)


def test_quality_caps_by_quality_value_not_by_rank() -> None:
    # Qualities 50..45: 0.5 caps at 47.5, so 47 is the best allowed.
    assert plan(quality=0.5).point.quality == 47.0
    assert plan(quality=0.5).reason == PlanReason.QUALITY
    assert plan(quality=1.0).point == POINTS[0]
    assert plan(quality=0.0).point == POINTS[-1]
    assert plan(1000, quality=0.5).point.quality == 47.0  # the cap holds with a loose budget
    assert plan(31, quality=1.0).point == POINTS[-1]  # and a tight budget can still go below it


def test_capped_keeps_points_at_or_under_the_cap() -> None:
    assert capped(POINTS, None) == POINTS
    assert [p.quality for p in capped(POINTS, 0.4)] == [47.0, 46.0, 45.0]
    assert quality_value("fast") == 0.0 and quality_value("best") == 1.0 and quality_value(None) is None


def test_an_explicit_point_is_not_second_guessed() -> None:
    result = plan(1, explicit=POINTS[2])
    assert (result.point, result.reason, result.feasible) == (POINTS[2], PlanReason.EXPLICIT, False)
    assert plan(None, explicit=POINTS[2]).feasible


def test_points_that_cannot_take_the_input_are_skipped_or_refused() -> None:
    ms = {p.name: m for p, m in zip(POINTS, MS, strict=True)}
    planner = table_planner(ms, fits=lambda point, shape: point.level.rank < 3)  # deep pooling needs more pixels
    assert plan(30, planner=planner).point == POINTS[2]  # the cheapest that fits, late
    with pytest.raises(NoPointFits):
        plan(explicit=POINTS[4], planner=planner)
    nothing = table_planner(ms, fits=lambda point, shape: False)
    with pytest.raises(NoPointFits, match="160x120"):
        plan(100, planner=nothing)


def test_looser_budgets_never_get_a_worse_point() -> None:
    rng = random.Random(0)
    budgets = sorted(rng.uniform(1, 200) for _ in range(200))
    qualities = [plan(b).point.quality for b in budgets]
    assert all(a <= b for a, b in itertools.pairwise(qualities))


# ----- quality priors and measured values -----

def test_the_prior_is_published_miou_minus_stated_penalties() -> None:
    spec = get_spec("edaformer-t")
    published = spec.published_miou["ade20k"]
    assert quality_prior(spec, "ade20k", LADDER[0], 1.0, None) == published
    assert quality_prior(spec, "ade20k", LADDER[2], 0.5, None) == pytest.approx(
        published - 2 * KNOB_STEP_PENALTY - 0.5 * SCALE_PENALTY)
    assert quality_prior(spec, "cityscapes", LADDER[0], 1.0, 30.0) == 30.0  # no published figure: the base


def test_model_points_prefer_measured_values_and_name_their_source() -> None:
    spec = get_spec("edaformer-t")
    measured = QualityLookup(values={"t/1111-111@1": 44.0}, agreement={"t/2222-222@0.5": 90.0})
    points = {p.name: p for p in model_points("t", spec, "ade20k", LADDER, (1.0, 0.5), measured, None)}
    assert len(points) == len(LADDER) * 2
    assert (points["t/1111-111@1"].quality, points["t/1111-111@1"].quality_source) == (44.0, "measured")
    best_prior = spec.published_miou["ade20k"]
    assert points["t/2222-222@0.5"].quality == pytest.approx(best_prior * 0.9, abs=1e-3)
    assert points["t/2222-222@0.5"].quality_source == "measured-agreement"
    assert points["t/2211-222@1"].quality_source == "prior"
    unknown = model_points("t", spec, "cityscapes", LADDER[:1], (1.0,), None, 20.0)
    assert unknown[0].quality == 20.0 and unknown[0].quality_source == "prior-unknown"


# ----- the ladder and the pool -----

def test_the_pareto_ladder_drops_points_beaten_on_both_axes() -> None:
    slow_bad = Point("m", LADDER[1], 0.75, quality=40.0)  # worse than POINTS[5] and slower
    latency = {p.name: ms for p, ms in zip(POINTS, MS, strict=True)} | {slow_bad.name: 90.0}
    ladder = pareto_ladder([*POINTS, slow_bad], lambda p: latency[p.name])
    assert ladder == POINTS  # best quality first, each one faster than all above it
    faster_worse = Point("m", LADDER[1], 0.5, quality=40.0)
    latency[faster_worse.name] = 10.0
    assert pareto_ladder([*POINTS, faster_worse], lambda p: latency[p.name])[-1] == faster_worse


def test_a_pool_restricts_to_one_model_and_ranks_every_point_by_quality() -> None:
    other = [Point("n", LADDER[0], 1.0, quality=55.0), Point("n", LADDER[0], 0.5, quality=10.0)]
    latency = {p.name: ms for p, ms in zip(POINTS, MS, strict=True)} | {other[0].name: 500.0, other[1].name: 5.0}
    pool = Pool("ade20k", [*POINTS, *other], lambda p: latency[p.name])
    assert pool.ladder()[0] == other[0] and pool.ladder()[-1] == other[1]
    assert pool.ladder("m") == POINTS
    assert pool.quality_rank[other[0].name] == 0 and pool.quality_rank[POINTS[0].name] == 1
    assert pool.point("m/2211-222@1") == POINTS[3] and pool.point("nope") is None
    assert pool.models == ["m", "n"]
