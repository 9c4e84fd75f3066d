"""The Runtime: everything a running server holds, built once from `Settings`.

Model and classes, the served level ladder, the latency profile, the worker pool and scheduler, the
result cache and the metrics. The app's lifespan builds it; routes and the gRPC servicer receive it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import LADDER, IsrLevel, create_model, level_by_name
from models.datasets import dataset_for
from models.flops import gmacs_for
from models.predict import network_input_size, preprocess
from service import __version__
from service.batching.scheduler import Scheduler
from service.cache import SingleFlight, build_cache
from service.metrics import Metrics
from service.planner import LatencyProfile, Shape
from service.settings import Settings
from service.workers.backends.base import Backend
from service.workers.pool import WorkerPool

log = logging.getLogger(__name__)


def calibration_images(count: int, height: int, width: int) -> torch.Tensor:
    """Preprocessed photo-like inputs (smooth gradients and blobs, mild noise).

    Not white noise: noise makes noisy logits, which send the postprocess down its slow dense path and
    would calibrate every level 2x slower than real images run.
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
        images.append(preprocess(np.clip(rgb, 0, 255).astype(np.uint8), (height, width)))
    return torch.cat(images)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.calibrated = False
        self._threads = settings.threads_per_worker or max(1, (os.cpu_count() or 1) // settings.workers)
        torch.set_num_threads(self._threads)

        if settings.checkpoint is None:
            # Same random weights in every replica, so that replicas sharing a Redis cache under the
            # weights id "random" also share the same masks.
            torch.manual_seed(0)
        self.model = create_model(settings.model, checkpoint=settings.checkpoint, dataset=settings.dataset).eval()
        meta = self.model.meta
        self.model_name = meta.name
        self.num_classes = meta.num_classes
        self.class_names = meta.class_names
        self.palette = meta.palette
        self.weights = meta.weights
        self.weights_id = meta.checkpoint_sha256 or "random"
        self.dataset = dataset_for(meta.dataset, meta.num_classes)
        if settings.resize_scale is not None:
            self.dataset = dataclasses.replace(self.dataset, resize_scale=tuple(settings.resize_scale))
        if self.weights == "random":
            log.warning("=" * 72)
            log.warning("NO CHECKPOINT: %s runs with RANDOMLY INITIALIZED weights; masks are meaningless.",
                        self.model_name)
            log.warning("Set --checkpoint / SEGSERVE_CHECKPOINT to an official EDAFormer checkpoint.")
            log.warning("=" * 72)
        # Everything besides image, model, weights and format that changes the mask or its encoding.
        self.cache_options = f"{self.dataset.name}:{self.dataset.resize_scale}:{self.dataset.align_to}"
        names = [n.strip() for n in settings.levels.split(",")] if settings.levels else None
        chosen = [level_by_name(n) for n in names] if names else list(LADDER)
        # Keep ladder order (best first) whatever order the setting listed them in.
        self.levels: list[IsrLevel] = sorted(chosen, key=lambda level: level.rank)

        self._gmacs_cache: dict[tuple[str, Shape], float] = {}
        self._gmacs_pending: set[tuple[str, Shape]] = set()
        self._gmacs_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segserve-gmacs")
        self._gmacs_lock = threading.Lock()
        self.profile = LatencyProfile(self.levels, tuple(settings.calibration_shape), self.gmacs)
        self.overhead_s = 0.0

        self.pool = WorkerPool(self._backend_factory(), settings.workers)
        self.scheduler = Scheduler(
            self.pool, self.profile, self.metrics, self.model_name,
            max_batch_size=settings.max_batch_size, max_queue_delay_s=settings.max_queue_delay_ms / 1e3,
            max_queue_size=settings.max_queue_size, levels=self.levels, safety_margin=settings.safety_margin,
        )
        self.cache = build_cache(settings, self.metrics)
        self.singleflight = SingleFlight(cancel_when_abandoned=True)
        self._scheduler_task: asyncio.Task | None = None
        self._publish_info()

    # ----- construction helpers -----
    def _backend_factory(self):
        settings = self.settings
        if settings.backend == "onnx":
            from service.workers.backends.onnx_backend import OnnxBackend, export_levels

            paths = export_levels(self.model, self.levels, Path(settings.onnx_cache_dir), self.weights_id)

            def make_onnx() -> Backend:
                return OnnxBackend(paths, self.dataset, settings.device, self._threads)

            return make_onnx
        from service.workers.backends.torch_backend import TorchBackend

        def make_torch() -> Backend:
            return TorchBackend(self.model, self.dataset, settings.device)

        return make_torch

    def _publish_info(self) -> None:
        import onnxruntime

        self.metrics.set_build_info(__version__, torch.__version__, onnxruntime.__version__)
        self.metrics.model_info.labels(self.model_name, self.weights, str(self.num_classes),
                                       self.settings.backend, self.settings.device).set(1)
        self.metrics.workers_alive.labels(self.model_name).set(self.pool.alive_count)

    # ----- lookups used per request -----
    def level(self, name: str) -> IsrLevel:
        return level_by_name(name, tuple(self.levels))

    def predictor_input_size(self, height: int, width: int) -> Shape:
        return network_input_size(height, width, self.dataset)

    def gmacs(self, level: IsrLevel, shape: Shape) -> float:
        """GMACs per image; a new shape is counted in the background, meanwhile scaled by pixel count."""
        key = (level.name, shape)
        if key in self._gmacs_cache:
            return self._gmacs_cache[key]
        calibration = (level.name, tuple(self.settings.calibration_shape))
        with self._gmacs_lock:
            if key not in self._gmacs_pending:
                self._gmacs_pending.add(key)
                self._gmacs_executor.submit(self._count_gmacs, level, shape)
        if calibration[1] == shape or calibration not in self._gmacs_cache:
            return self._count_gmacs(level, shape)
        scale = (shape[0] * shape[1]) / (calibration[1][0] * calibration[1][1])
        return self._gmacs_cache[calibration] * scale

    def _count_gmacs(self, level: IsrLevel, shape: Shape) -> float:
        value = gmacs_for(self.model_name, self.num_classes, shape[0], shape[1], level.isr)
        self._gmacs_cache[(level.name, shape)] = value
        return value

    def observe_overhead(self, seconds: float) -> None:
        self.overhead_s = seconds if self.overhead_s == 0 else 0.8 * self.overhead_s + 0.2 * seconds

    # ----- calibration and lifecycle -----
    def calibrate(self) -> None:
        """Measure each level's batch latency at the calibration shape on a real backend (blocking)."""
        settings = self.settings
        height, width = settings.calibration_shape
        sizes = sorted({b for b in settings.calibration_batch_sizes if b <= settings.max_batch_size} | {1})
        worker = self.pool.workers[0]
        steps = [(level, b) for level in self.levels for b in sizes]
        log.info("calibrating %d levels x batch sizes %s at %dx%d on the %s backend", len(self.levels), sizes,
                 height, width, settings.backend)
        images = calibration_images(max(sizes), height, width)
        with tqdm(steps, desc="calibration", unit="step", file=sys.stderr, mininterval=1.0) as bar:
            for level, batch in bar:
                self._count_gmacs(level, (height, width))
                batch_images = images[:batch]
                worker.run(batch_images, level.isr, [(height, width)] * batch)  # warm-up
                times = []
                for _ in range(settings.calibration_repeats):
                    start = time.perf_counter()
                    worker.run(batch_images, level.isr, [(height, width)] * batch)
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                self.profile.set(level, batch, seconds)
                bar.set_postfix_str(f"{level.name} b={batch} {seconds * 1e3:.0f} ms")
        self.publish_profile()
        self.calibrated = True
        log.info("calibration done: %s", {name: {b: round(s * 1e3, 1) for b, s in row.items()}
                                           for name, row in self.profile.table().items()})

    def publish_profile(self) -> None:
        for name, row in self.profile.table().items():
            for batch, seconds in row.items():
                self.metrics.calibrated_latency.labels(self.model_name, name, str(batch)).set(seconds)

    async def start(self) -> None:
        """Calibrate off the event loop, then start scheduling; readiness follows."""
        await asyncio.to_thread(self.calibrate)
        self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="segserve-scheduler")
        self.update_ready()

    def update_ready(self) -> bool:
        self.ready = self.calibrated and not self.draining and self.pool.alive_count > 0
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
        self.pool.shutdown()
        self._gmacs_executor.shutdown(wait=False, cancel_futures=True)
