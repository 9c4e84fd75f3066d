"""The latency profile: anchors seed every point through the affine GMAC fit, batches refine it, it persists."""

from __future__ import annotations

import json

import pytest

from models.isr import LADDER
from service.points import Point
from service.profile import LatencyProfile, affine_fit, interpolate

FULL, CHEAP = Point("m", LADDER[0], 1.0), Point("m", LADDER[-1], 1.0)
SMALL = Point("m", LADDER[0], 0.5)
MIDDLE = Point("m", LADDER[3], 0.75)
POINTS = [FULL, CHEAP, SMALL, MIDDLE]
REFERENCE = {FULL.name: (100, 100), CHEAP.name: (100, 100), SMALL.name: (50, 50), MIDDLE.name: (75, 75)}
# GMACs: 1e-3 per pixel at full compute, 40% cheaper at the cheapest level, interpolated by rank.
def gmacs(point: Point, shape: tuple[int, int]) -> float:
    return shape[0] * shape[1] * 1e-3 * (1 - 0.08 * point.level.rank)


def seeded_profile() -> LatencyProfile:
    """Anchors measured exactly on t = 5 ms + 2 ms per GMAC (batch 1) and 4x that per batch of 4."""
    profile = LatencyProfile(gmacs)
    for point in POINTS:
        profile.register(point, REFERENCE[point.name])
    truth = {p.name: 0.005 + 0.002 * gmacs(p, REFERENCE[p.name]) for p in POINTS}
    anchors = {p.name: {1: truth[p.name], 4: 4 * truth[p.name]} for p in (FULL, CHEAP, SMALL)}
    profile.seed("m", anchors, POINTS)
    return profile


def test_affine_fit_recovers_fixed_and_per_gmac_cost_or_falls_back_to_proportional() -> None:
    assert affine_fit([(1.0, 0.007), (3.0, 0.011), (5.0, 0.015)]) == pytest.approx((0.005, 0.002))
    assert affine_fit([(2.0, 0.004), (2.0, 0.006)]) == pytest.approx((0.0, 0.0025))  # one GMAC value
    assert affine_fit([(1.0, 0.010), (3.0, 0.002)]) == pytest.approx((0.0, 0.003))  # negative slope is not physical


def test_interpolate_between_and_beyond_known_batch_sizes() -> None:
    row = {1: 0.010, 4: 0.025}
    assert interpolate(row, 2) == pytest.approx(0.015)
    assert interpolate(row, 8) == pytest.approx(0.050)


def test_derived_points_follow_the_fit_through_the_anchors() -> None:
    profile = seeded_profile()
    expected = 0.005 + 0.002 * gmacs(MIDDLE, REFERENCE[MIDDLE.name])  # never measured: derived
    assert profile.estimate(MIDDLE, REFERENCE[MIDDLE.name], 1) == pytest.approx(expected)
    assert profile.estimate(MIDDLE, REFERENCE[MIDDLE.name], 4) == pytest.approx(4 * expected, rel=0.05)
    assert profile.estimate(FULL, (100, 100), 2) == pytest.approx(2 * (0.005 + 0.002 * 10), rel=1e-6)


def test_a_noisy_anchor_does_not_reorder_the_points() -> None:
    """The cheapest level measured 30% slow (one noisy sample) still seeds below the full level: every point
    is seeded from the fit through the anchors, so the order at start follows GMACs."""
    profile = LatencyProfile(gmacs)
    for point in POINTS:
        profile.register(point, REFERENCE[point.name])
    truth = {p.name: 0.005 + 0.002 * gmacs(p, REFERENCE[p.name]) for p in POINTS}
    anchors = {p.name: {1: truth[p.name]} for p in (FULL, CHEAP, SMALL)}
    anchors[CHEAP.name] = {1: 1.3 * truth[CHEAP.name]}  # slower than FULL's 25 ms: 0.0244 * 1.3 = 32 ms
    profile.seed("m", anchors, POINTS)
    assert profile.estimate(CHEAP, REFERENCE[CHEAP.name]) < profile.estimate(FULL, REFERENCE[FULL.name])
    assert profile.estimate(SMALL, REFERENCE[SMALL.name]) < profile.estimate(MIDDLE, REFERENCE[MIDDLE.name])


def test_other_shapes_scale_by_the_fit_not_by_pixels_alone() -> None:
    profile = seeded_profile()
    # 200x100 doubles GMACs (10 -> 20): 5 + 2 * 20 = 45 ms, not 2 x 25 ms: the fixed cost is paid once.
    assert profile.estimate(FULL, (200, 100), 1) == pytest.approx(0.045)


def test_batches_refine_their_entry_and_the_model_drift() -> None:
    profile = seeded_profile()
    before_middle = profile.estimate(MIDDLE, REFERENCE[MIDDLE.name], 1)
    for _ in range(30):  # the machine turns out twice as slow as calibrated, seen on the full point only
        profile.observe(FULL, (100, 100), 1, 2 * 0.025)
    assert profile.estimate(FULL, (100, 100), 1) == pytest.approx(0.050, rel=0.01)
    assert profile.drift["m"] == pytest.approx(2.0, rel=0.01)
    # A point that never ran is corrected by the drift too.
    assert profile.estimate(MIDDLE, REFERENCE[MIDDLE.name], 1) == pytest.approx(2 * before_middle, rel=0.01)


def test_pre_and_postprocessing_scale_with_the_image_not_the_point() -> None:
    profile = LatencyProfile(gmacs, reference_image=(100, 100))
    for point in POINTS:
        profile.register(point, REFERENCE[point.name])
    anchors = {p.name: {1: 0.010, 4: 0.040} for p in (FULL, CHEAP, SMALL)}
    profile.seed("m", anchors, POINTS, io_rate=2.0)  # 2 s per megapixel of image
    big = (1000, 1000)  # a 1-megapixel image: 2 s of resizing and argmax at any point
    forward_small = profile.estimate(SMALL, REFERENCE[SMALL.name], 1)
    assert profile.batch_seconds(SMALL, REFERENCE[SMALL.name], 1, big) == pytest.approx(forward_small + 2.0)
    assert profile.batch_seconds(SMALL, REFERENCE[SMALL.name], 3, big) == pytest.approx(
        profile.estimate(SMALL, REFERENCE[SMALL.name], 3) + 6.0)
    forward_full = profile.estimate(FULL, REFERENCE[FULL.name], 1)
    assert profile.table()[FULL.name][1] == pytest.approx(forward_full + 2.0 * 0.01)  # a calibration-sized image
    for _ in range(40):  # the machine turns out to resize twice as fast
        profile.observe(FULL, REFERENCE[FULL.name], 1, 0.010, io_seconds=1.0, pixels=1_000_000)
    assert profile.io_seconds(FULL, 1_000_000) == pytest.approx(1.0, rel=0.01)


def test_an_uncalibrated_point_raises() -> None:
    profile = LatencyProfile(gmacs)
    profile.register(FULL, (100, 100))
    with pytest.raises(RuntimeError, match="not been calibrated"):
        profile.estimate(FULL, (100, 100))


def test_save_and_load_round_trip_only_under_the_same_key(tmp_path) -> None:
    profile = seeded_profile()
    profile.observe(FULL, (100, 100), 1, 0.030)
    path = tmp_path / "p.json"
    profile.save(path, "m", {"machine": "x"})
    restored = LatencyProfile(gmacs)
    for point in POINTS:
        restored.register(point, REFERENCE[point.name])
    assert not restored.load(path, "m", {"machine": "other"}, POINTS)  # another machine: calibrate again
    assert restored.load(path, "m", {"machine": "x"}, POINTS)
    assert restored.table() == profile.table()
    new_point = Point("m", LADDER[1], 1.0)
    restored.register(new_point, (100, 100))
    assert not restored.load(path, "m", {"machine": "x"}, [*POINTS, new_point])  # a point it never measured
    path.write_text(json.dumps({"version": 1, "key": {"machine": "x"}, "fits": "garbage"}))
    assert not restored.load(path, "m", {"machine": "x"}, POINTS)
