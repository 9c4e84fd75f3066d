"""Start-up calibration: measure a few anchor points per model, derive the rest, persist the profile.

Measuring every point at every batch size would take minutes on 2 cores. Instead, per model:

1. anchors: the training level at scale 1, the cheapest level at scale 1, and the training level at the
   smallest scale (fewer when they coincide), each at the smallest and largest calibration batch size, on
   photo-like images of the calibration size, through the real worker path (preprocess, forward, postprocess);
2. every other point is derived from a per-model affine fit of time on GMACs (`LatencyProfile.seed`);
3. the profile is saved under a key of machine, backend, model and weights, so a restart with the same key
   loads it and is ready at once; every executed batch refines it online (and it is saved again on shutdown).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.points import Point
from service.profile import LatencyProfile, group_of
from service.served_model import ServedModel
from service.settings import Settings
from service.workers.pool import BatchJob, Worker

log = logging.getLogger(__name__)
Shape = tuple[int, int]


def calibration_images(count: int, height: int, width: int) -> list[np.ndarray]:
    """Photo-like RGB uint8 images (smooth gradients and blobs, mild noise).

    Not white noise: noise makes noisy logits, which send the postprocess down its slow dense path and
    would calibrate every point 2x slower than real images run.
    """
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for index in range(count):
        phase = index * 0.7
        rgb = np.stack([
            127 + 120 * np.sin(xx / (37 + 5 * index) + phase),
            127 + 120 * np.cos(yy / (29 + 3 * index) - phase),
            255 * (xx + yy) / (height + width),
        ], axis=-1) + rng.normal(0, 6, (height, width, 3))
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return images


def anchor_points(points: list[Point]) -> list[Point]:
    """The points of one group measured directly: the extremes of the knob at the largest scale, and the best
    level at the smallest scale."""
    levels = sorted({p.level for p in points}, key=lambda level: level.rank)
    scales = [p.scale for p in points]
    by_key = {(p.level.name, p.scale): p for p in points}
    best, cheapest = levels[0], levels[-1]
    wanted = [(best.name, max(scales)), (cheapest.name, max(scales)), (best.name, min(scales))]
    return [by_key[key] for key in dict.fromkeys(wanted) if key in by_key]


def machine_id() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return f"{platform.machine()} {cpu} x{os.cpu_count()}"


def profile_key(served: ServedModel, settings: Settings, threads: int, versions: tuple[str, str]) -> dict[str, object]:
    """What a saved profile is valid for: same machine, backend, model, weights, pipeline and batch sizes."""
    return {
        "machine": machine_id(), "threads": threads, "workers": settings.workers, "backend": settings.backend,
        "device": settings.device, "architecture": served.spec.name, "weights": served.weights_id,
        "pipeline": served.cache_options, "calibration_shape": list(settings.calibration_shape),
        "batch_sizes": sorted(_batch_sizes(settings)), "torch": versions[0], "onnxruntime": versions[1],
    }


def profile_path(settings: Settings, served: ServedModel, key: dict[str, object]) -> Path | None:
    if not settings.profile_dir:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(settings.profile_dir).expanduser() / f"{served.name}-{digest}.json"


def _batch_sizes(settings: Settings) -> set[int]:
    sizes = {b for b in settings.calibration_batch_sizes if b <= settings.max_batch_size} | {1}
    return {min(sizes), max(sizes)}


def _time(worker: Worker, job: BatchJob, repeats: int) -> tuple[float, float]:
    """Median forward seconds and median pre/postprocessing seconds of a batch."""
    worker.run(job)  # warm-up: first calls pay allocation and kernel selection
    forward, io = [], []
    for _ in range(repeats):
        output = worker.run(job)
        forward.append(output.forward_s)
        io.append(output.preprocess_s + output.postprocess_s)
    return statistics.median(forward), statistics.median(io)


def calibrate(served: ServedModel, profile: LatencyProfile, worker: Worker, settings: Settings) -> None:
    """Measure the anchors of one model on a real worker and seed every point of it (blocking).

    Each numeric precision is its own group: its own anchors and its own fit of time on GMACs.
    """
    groups: dict[str, list[Point]] = {}
    for point in served.points:
        groups.setdefault(group_of(point), []).append(point)
    for group, points in groups.items():
        _calibrate_group(served, group, points, profile, worker, settings)


def _calibrate_group(served: ServedModel, group: str, points: list[Point], profile: LatencyProfile, worker: Worker,
                     settings: Settings) -> None:
    height, width = settings.calibration_shape
    sizes = sorted(_batch_sizes(settings))
    anchors = anchor_points(points)
    images = calibration_images(max(sizes), height, width)
    steps = [(p, b) for p in anchors for b in sizes]
    log.info("calibrating %s: %d anchor points x batch sizes %s on %dx%d images (the other %d points are derived)",
             group, len(anchors), sizes, width, height, len(points) - len(anchors))
    measured: dict[str, dict[int, float]] = {}
    io_rates = []
    # A bar where a person watches a terminal; none in a log file or in JSON logs (disable=None: not a tty).
    with tqdm(steps, desc=f"calibration {group}", unit="step", file=sys.stderr, mininterval=1.0, disable=None) as bar:
        for point, batch in bar:
            shape = profile.reference_shape(point)
            job = BatchJob(served.name, point.level, shape, images[:batch], [(height, width)] * batch, point.precision)
            seconds, io_seconds = _time(worker, job, settings.calibration_repeats)
            measured.setdefault(point.name, {})[batch] = seconds
            io_rates.append(io_seconds / (batch * height * width / 1e6))
            bar.set_postfix_str(f"{point.level.name}@{point.scale:g} b={batch} {(seconds + io_seconds) * 1e3:.0f} ms")
    profile.seed(group, measured, points, statistics.median(io_rates))


def warm_up(served: ServedModel, profile: LatencyProfile, worker: Worker, settings: Settings) -> None:
    """One small batch per model after a profile was loaded, so the first request pays no one-time costs."""
    height, width = settings.calibration_shape
    point = served.points[0]
    job = BatchJob(served.name, point.level, profile.reference_shape(point), calibration_images(1, height, width),
                   [(height, width)], point.precision)
    worker.run(job)
