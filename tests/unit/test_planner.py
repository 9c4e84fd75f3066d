"""The planner as a pure function: `choose` over a `LatencyProfile`, no model, no server."""

from __future__ import annotations

import itertools
import random

import pytest

from models.isr import LADDER, IsrLevel
from service.planner import LatencyProfile, Plan, choose, quality_floor_rank

CALIBRATION = (128, 160)
# Milliseconds per batch of 1 at the calibration shape, full level first (a plausible, decreasing ladder).
MS = [100.0, 80.0, 60.0, 45.0, 35.0, 30.0]


def fake_gmacs(level: IsrLevel, shape: tuple[int, int]) -> float:
    """Cost proportional to the pixel count, slightly lower for cheaper levels."""
    return shape[0] * shape[1] * (1.0 - 0.05 * level.rank) / 1e4


def make_profile(ms_per_level=MS, levels=LADDER, batch_sizes=(1, 2, 4)) -> LatencyProfile:
    profile = LatencyProfile(levels, CALIBRATION, fake_gmacs)
    for level, ms in zip(levels, ms_per_level, strict=True):
        for batch in batch_sizes:
            profile.set(level, batch, ms * (1 + 0.6 * (batch - 1)) / 1e3)  # batching amortizes
    return profile


def plan(profile: LatencyProfile, budget_ms: float | None = None, *, quality=None, explicit=None,
         backlog_s: float = 0.0, overhead_s: float = 0.0, margin: float = 0.0, shape=CALIBRATION) -> Plan:
    return choose(profile, shape, budget_s=None if budget_ms is None else budget_ms / 1e3, quality=quality,
                  explicit=explicit, backlog_s=backlog_s, overhead_s=overhead_s, safety_margin=margin)


# ----- LatencyProfile -----

def test_estimate_reads_interpolates_and_extrapolates_in_batch_size() -> None:
    profile = LatencyProfile(LADDER, CALIBRATION, fake_gmacs)
    full = LADDER[0]
    profile.set(full, 1, 0.010)
    profile.set(full, 4, 0.025)
    assert profile.estimate(full, CALIBRATION, 1) == pytest.approx(0.010)
    assert profile.estimate(full, CALIBRATION, 4) == pytest.approx(0.025)
    assert profile.estimate(full, CALIBRATION, 2) == pytest.approx(0.015)  # linear between 1 and 4
    assert profile.estimate(full, CALIBRATION, 8) == pytest.approx(0.050)  # per-item cost of the largest


def test_estimate_scales_other_shapes_by_gmacs() -> None:
    profile = make_profile()
    full = LADDER[0]
    doubled = (CALIBRATION[0] * 2, CALIBRATION[1])
    assert profile.estimate(full, doubled) == pytest.approx(2 * profile.estimate(full, CALIBRATION))


def test_uncalibrated_level_raises() -> None:
    profile = LatencyProfile(LADDER, CALIBRATION, fake_gmacs)
    with pytest.raises(RuntimeError, match="not been calibrated"):
        profile.estimate(LADDER[0], CALIBRATION)


def test_observe_folds_in_batches_normalized_to_the_calibration_shape() -> None:
    profile = LatencyProfile(LADDER, CALIBRATION, fake_gmacs, smoothing=0.5)
    full = LADDER[0]
    profile.set(full, 1, 0.100)
    profile.observe(full, CALIBRATION, 1, 0.200)
    assert profile.table()[full.name][1] == pytest.approx(0.150)
    # A batch at twice the pixels counts as half the time at the calibration shape.
    profile.observe(full, (CALIBRATION[0] * 2, CALIBRATION[1]), 1, 0.300)
    assert profile.table()[full.name][1] == pytest.approx(0.150)
    # A batch size never measured is taken as observed.
    profile.observe(full, CALIBRATION, 3, 0.240)
    assert profile.table()[full.name][3] == pytest.approx(0.240)


# ----- choose -----

def test_no_budget_no_quality_is_full_compute() -> None:
    chosen = plan(make_profile())
    assert (chosen.level, chosen.reason, chosen.feasible) == (LADDER[0], "default", True)
    assert chosen.predicted_s == pytest.approx(0.100)


def test_budget_picks_the_best_level_that_fits_with_the_margin() -> None:
    profile = make_profile()
    assert plan(profile, 100).level == LADDER[0]
    assert plan(profile, 99.9).level == LADDER[1]
    assert plan(profile, 60).level == LADDER[2]
    # With a 20% margin, 60 ms no longer fits 60 ms of work; 45 * 1.2 = 54 does.
    chosen = plan(profile, 60, margin=0.2)
    assert (chosen.level, chosen.reason, chosen.feasible) == (LADDER[3], "budget", True)


def test_backlog_and_overhead_count_against_the_budget() -> None:
    profile = make_profile()
    assert plan(profile, 105).level == LADDER[0]
    assert plan(profile, 105, backlog_s=0.030).level == LADDER[2]  # 30 + 60 <= 105 < 30 + 80
    assert plan(profile, 105, overhead_s=0.050).level == LADDER[3]  # 45 + 50 <= 105 < 60 + 50
    chosen = plan(profile, 105, backlog_s=0.030, overhead_s=0.010)
    assert chosen.predicted_s == pytest.approx(0.030 + 0.060 + 0.010)


def test_larger_inputs_choose_cheaper_levels() -> None:
    profile = make_profile()
    big = (CALIBRATION[0] * 2, CALIBRATION[1] * 2)  # four times the GMACs
    assert plan(profile, 150).level == LADDER[0]
    assert plan(profile, 150, shape=big).level.rank > 0


def test_infeasible_budget_falls_back_to_the_cheapest_level() -> None:
    chosen = plan(make_profile(), 1)
    assert (chosen.level, chosen.reason, chosen.feasible) == (LADDER[-1], "fallback", False)
    assert chosen.predicted_s == pytest.approx(0.030)


@pytest.mark.parametrize("seed", range(20))
def test_larger_budgets_never_choose_cheaper_levels(seed: int) -> None:
    """Property: at a fixed profile and load, the chosen rank is non-increasing in the budget.

    Latencies are random and not even monotone in the rank (measured profiles on a noisy machine are not).
    """
    rng = random.Random(seed)
    profile = make_profile([rng.uniform(5, 500) for _ in LADDER])
    backlog, overhead, margin = rng.uniform(0, 0.2), rng.uniform(0, 0.05), rng.uniform(0, 0.5)
    quality = rng.choice([None, None, "balanced", 0.8, 0.3])
    budgets = sorted(rng.uniform(1, 2000) for _ in range(200))
    ranks = [plan(profile, b, quality=quality, backlog_s=backlog, overhead_s=overhead, margin=margin).level.rank
             for b in budgets]
    assert all(a >= b for a, b in itertools.pairwise(ranks)), ranks
    # And a loose budget is at least as good as any tight one, strictly better than the infeasible fallback.
    assert ranks[-1] <= ranks[0]


def test_a_tight_budget_chooses_a_cheaper_level_than_a_loose_one() -> None:
    profile = make_profile()
    tight, loose = plan(profile, 40), plan(profile, 10_000)
    assert tight.level.rank > loose.level.rank


@pytest.mark.parametrize(("quality", "rank"), [
    ("best", 0), (1.0, 0), ("fast", 5), (0.0, 5), ("balanced", 2), (0.5, 2), (0.8, 1), (0.2, 4),
])
def test_quality_floor_rank(quality, rank: int) -> None:
    assert quality_floor_rank(quality, len(LADDER)) == rank


def test_quality_caps_the_level_from_above() -> None:
    profile = make_profile()
    assert plan(profile, quality="fast").level == LADDER[-1]
    assert plan(profile, quality="best").level == LADDER[0]
    assert plan(profile, quality="fast").reason == "quality"
    # A huge budget would allow full compute; quality caps it.
    assert plan(profile, 1e6, quality="balanced").level == LADDER[2]
    assert plan(profile, 1e6, quality="fast").level == LADDER[-1]
    # Quality is a cap, not a floor: a tight budget still goes cheaper.
    assert plan(profile, 40, quality="best").level == LADDER[4]


def test_quality_on_a_short_ladder_stays_in_range() -> None:
    levels = (LADDER[0], LADDER[3])
    profile = make_profile([100.0, 45.0], levels=levels)
    assert plan(profile, quality="fast").level == LADDER[3]
    assert plan(profile, quality=0.9).level == LADDER[0]


def test_explicit_level_bypasses_the_planner_and_reports_feasibility() -> None:
    profile = make_profile()
    cheapest = LADDER[-1]
    chosen = plan(profile, 1e6, explicit=cheapest)
    assert (chosen.level, chosen.reason, chosen.feasible) == (cheapest, "explicit", True)
    chosen = plan(profile, 1, explicit=LADDER[0], quality="fast")
    assert (chosen.level, chosen.reason, chosen.feasible) == (LADDER[0], "explicit", False)
    assert plan(profile, explicit=LADDER[0]).feasible


def test_levels_that_never_ran_follow_the_drift_of_those_that_did() -> None:
    profile = make_profile()
    full, cheap = LADDER[0], LADDER[-1]
    cheap_before = profile.estimate(cheap, CALIBRATION, 4)
    calibrated_full = profile.estimate(full, CALIBRATION, 1)
    for _ in range(30):  # the full level keeps running at half its calibrated time
        profile.observe(full, CALIBRATION, 1, calibrated_full / 2)
    assert profile.drift == pytest.approx(0.5, rel=0.02)
    assert profile.estimate(cheap, CALIBRATION, 4) == pytest.approx(cheap_before * profile.drift)
    # Measured entries follow their own observations, not the drift.
    assert profile.estimate(full, CALIBRATION, 1) == pytest.approx(calibrated_full / 2, rel=0.01)
