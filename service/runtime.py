"""The Runtime: everything a running server holds, built once from `Settings`.

Shared parts (settings, metrics, cache, latency profile, planner, worker pool, scheduler) and the served
models (`ServedModel`), grouped into pools by label space. The app's lifespan builds it; routes and the gRPC
servicer receive it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from service import __version__
from service.batching.scheduler import Scheduler
from service.cache import SingleFlight, build_cache
from service.calibration import calibrate, profile_key, profile_path, warm_up
from service.gmacs import GmacTable
from service.memory import MemoryBudget
from service.metrics import Metrics
from service.planner import Planner
from service.points import UNKNOWN_MARGIN, Point, Pool
from service.profile import LatencyProfile
from service.repository import ConfigError, describe_entries, entries_from_settings
from service.served_model import ServedModel, assign_points, build_served_model
from service.settings import Settings
from service.workers import loader
from service.workers.backends.base import Backend
from service.workers.pool import WorkerPool

log = logging.getLogger(__name__)
Shape = tuple[int, int]


class Ewma:
    """An exponentially weighted average of a duration (seconds), starting at the first sample."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value = 0.0

    def add(self, seconds: float) -> None:
        self.value = seconds if self.value == 0 else (1 - self.alpha) * self.value + self.alpha * seconds


BackendOverride = Callable[[ServedModel], Callable[[], Backend]]


class Runtime:
    """Everything a running server holds.

    Args:
        settings: the one settings object.
        backends: tests only: builds each served model's backend factory instead of the real torch/ONNX one
            (the model is still built, so points, GMACs and the pipeline are real).
    """

    def __init__(self, settings: Settings, backends: BackendOverride | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.calibrated = False
        self.threads = settings.threads_per_worker or max(1, (os.cpu_count() or 1) // settings.workers)
        loader.set_threads(self.threads)
        self.versions = loader.versions()

        entries = entries_from_settings(settings)
        log.info("serving %d model(s): %s", len(entries), describe_entries(entries))
        self.models: dict[str, ServedModel] = {}
        for entry in entries:
            loaded = loader.load_model(entry.architecture, entry.checkpoint, entry.dataset, entry.random_weights)
            served = build_served_model(entry, loaded, settings, self.threads)
            self.models[served.name] = served
            _announce_weights(served)
        self.default_model = entries[0].name
        self.default_task = self.models[self.default_model].task
        cache_dir = Path(settings.profile_dir).expanduser() if settings.profile_dir else None
        self.gmac_table = GmacTable(loader.gmacs, cache_dir.parent / "gmacs.json" if cache_dir else None)
        self.profile = LatencyProfile(self.gmacs, reference_image=tuple(settings.calibration_shape))
        self.pools = self._build_pools()
        self.planner = Planner(self.profile.batch_seconds, self.shape_of, self.fits)
        self.overhead_pre = Ewma()  # header read + decode per request
        self.overhead_post = Ewma()  # encode per request
        factories = {name: backends(m) if backends else m.make_backend for name, m in self.models.items()}
        self.workers = WorkerPool(factories, settings.workers)
        self.scheduler = Scheduler(
            self.workers, self.planner, self.ladder, self.profile.batch_seconds, self.profile.observe, self.metrics,
            max_batch_size=settings.max_batch_size, max_queue_delay_s=settings.max_queue_delay_ms / 1e3,
            max_queue_size=settings.max_queue_size, safety_margin=settings.safety_margin,
            post_overhead_s=lambda: self.overhead_post.value,
        )
        self.memory = MemoryBudget(settings.max_inflight_bytes)
        self.cache = build_cache(settings, self.metrics)
        self.singleflight = SingleFlight(cancel_when_abandoned=True)
        self._scheduler_task: asyncio.Task | None = None
        self._publish_info()

    # ----- construction -----
    def _build_pools(self) -> dict[str, Pool]:
        by_task: dict[str, list[ServedModel]] = defaultdict(list)
        for served in self.models.values():
            by_task[served.task].append(served)
        pools = {}
        for task, members in by_task.items():
            published = [m.spec.published_miou[m.meta.dataset] for m in members
                         if m.meta.dataset in m.spec.published_miou]
            base = min(published) - UNKNOWN_MARGIN if published else None
            for served in members:
                assign_points(served, base, self._precisions())
                self._drop_points_too_deep_for_calibration(served)
                for point in served.points:
                    self.profile.register(point, served.shape_of(point, tuple(self.settings.calibration_shape)))
            points = [p for m in members for p in m.points]
            pools[task] = Pool(task, points, self._reference_latency)
        return pools

    def _precisions(self) -> tuple[str, ...]:
        settings = self.settings
        reduced = [p for p in settings.precisions if p != "fp32"]
        if reduced and (settings.device != "cuda" or settings.backend != "torch"):
            raise ConfigError(f"precisions {', '.join(reduced)} need --device cuda and the torch backend (autocast); "
                              f"this server runs {settings.backend} on {settings.device}")
        return settings.precisions

    def _drop_points_too_deep_for_calibration(self, served: ServedModel) -> None:
        """Points whose knob pools more than a calibration-sized image allows cannot be measured: not offered."""
        size = tuple(self.settings.calibration_shape)
        kept = [p for p in served.points if served.fits(p, served.shape_of(p, size))]
        dropped = [p.name for p in served.points if p not in kept]
        if dropped:
            log.warning("%s: %d point(s) cannot take a %dx%d image at their scale and are not offered: %s "
                        "(a larger --calibration-shape offers them)", served.name, len(dropped), size[1], size[0],
                        ", ".join(dropped))
        if not kept:
            raise ConfigError(f"model {served.name}: no point can take a {size[1]}x{size[0]} image; raise "
                              "calibration_shape or offer larger scales")
        served.points = kept

    def _reference_latency(self, point: Point) -> float:
        image = tuple(self.settings.calibration_shape)
        return self.profile.batch_seconds(point, self.profile.reference_shape(point), 1, image)

    def _publish_info(self) -> None:
        torch_version, ort_version = self.versions
        self.metrics.set_build_info(__version__, torch_version, ort_version)
        for served in self.models.values():
            self.metrics.model_info.labels(served.name, served.spec.name, served.weights, served.task,
                                           str(served.meta.num_classes), self.settings.backend,
                                           self.settings.device).set(1)
        self.metrics.workers_alive.set(self.workers.alive_count)

    # ----- lookups used per request -----
    def served(self, point: Point) -> ServedModel:
        return self.models[point.model]

    def shape_of(self, point: Point, image_size: Shape) -> Shape:
        return self.models[point.model].shape_of(point, image_size)

    def fits(self, point: Point, shape: Shape) -> bool:
        return self.models[point.model].fits(point, shape)

    def ladder(self, task: str, model: str | None = None) -> list[Point]:
        return self.pools[task].ladder(model)

    def gmacs(self, point: Point, shape: Shape) -> float:
        served = self.models[point.model]
        reference = self.profile.reference_shape(point)
        num_classes = served.meta.num_classes
        if shape == reference:
            return self.gmac_table.exact(served.spec.name, num_classes, shape, point.level)
        return self.gmac_table.estimate(served.spec.name, num_classes, shape, point.level, reference)

    # ----- calibration and lifecycle -----
    def _profile_location(self, served: ServedModel) -> tuple[dict[str, object], Path | None]:
        key = profile_key(served, self.settings, self.threads, self.versions)
        return key, profile_path(self.settings, served, key)

    def calibrate(self) -> None:
        """Load each model's saved profile, or measure its anchors on a real worker (blocking)."""
        worker = self.workers.workers[0]
        for served in self.models.values():
            key, path = self._profile_location(served)
            if path is not None and self.profile.load(path, served.name, key, served.points):
                log.info("%s: latency profile loaded from %s (no calibration needed)", served.name, path)
                warm_up(served, self.profile, worker, self.settings)
                continue
            calibrate(served, self.profile, worker, self.settings)
            if path is not None:
                self.profile.save(path, served.name, key)
        for pool in self.pools.values():
            pool.invalidate()
            log.info("pool %s: ladder %s", pool.task, ", ".join(
                f"{p.name} ({p.quality:.1f}, {self._reference_latency(p) * 1e3:.0f} ms)" for p in pool.ladder()))
        self.gmac_table.save()
        self.publish_profile()
        self.calibrated = True

    def save_profiles(self) -> None:
        for served in self.models.values():
            key, path = self._profile_location(served)
            if path is not None and self.calibrated:
                try:
                    self.profile.save(path, served.name, key)
                except OSError as exc:
                    log.warning("could not save the latency profile %s: %s", path, exc)

    def publish_profile(self) -> None:
        for name, row in self.profile.table().items():
            model = name.split("/", 1)[0]
            for batch, seconds in row.items():
                self.metrics.calibrated_latency.labels(model, name, str(batch)).set(seconds)

    async def start(self) -> None:
        """Calibrate off the event loop, then start scheduling; readiness follows."""
        await asyncio.to_thread(self.calibrate)
        self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="segserve-scheduler")
        self.update_ready()

    def update_ready(self) -> bool:
        self.ready = self.calibrated and not self.draining and self.workers.alive_count > 0
        self.metrics.ready.set(1 if self.ready else 0)
        return self.ready

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work (readiness 503), finish accepted work within `grace_s`."""
        self.draining = True
        self.update_ready()
        log.info("draining: finishing accepted work (grace %.1f s)", grace_s)
        finished = await self.scheduler.drain(grace_s)
        log.info("drain %s", "complete" if finished else "timed out; abandoning queued work")
        return finished

    async def close(self) -> None:
        self.scheduler.stop()
        if self._scheduler_task is not None:
            await asyncio.gather(self._scheduler_task, return_exceptions=True)
        await self.cache.close()
        self.workers.shutdown()
        self.save_profiles()
        self.gmac_table.close()


def _announce_weights(served: ServedModel) -> None:
    if served.weights == "random":
        log.warning("=" * 72)
        log.warning("NO CHECKPOINT: %s runs with RANDOMLY INITIALIZED weights; masks are meaningless.", served.name)
        log.warning("Give it a checkpoint (--checkpoint, --model NAME:PATH or the config file).")
        log.warning("=" * 72)
    elif served.weights == "demo":
        log.warning("DEMO WEIGHTS: %s serves weights trained on SYNTHETIC SCENES (%d demo classes: %s), not on a "
                    "real dataset; give it a checkpoint for real images.", served.name, served.meta.num_classes,
                    ", ".join(served.meta.class_names))
