"""The worker pool: N workers, each a dedicated thread with one backend per served model.

Workers execute what the scheduler decided: a `BatchJob` (a model, a knob level, a network input shape and
the decoded images) runs on that model's backend, preprocessing included, off the event loop. A failing batch
fails only its own requests; a worker whose batches keep failing rebuilds its backends, and a worker that
cannot rebuild them is dead. With no live worker, readiness turns 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from models.spec import Level
from service.workers.backends.base import Backend, BatchOutput

log = logging.getLogger(__name__)

# After this many consecutive failed batches a worker rebuilds its backends (a wedged CUDA context,
# a broken ORT session); one bad input should not cost a rebuild.
REBUILD_AFTER_FAILURES = 3
Shape = tuple[int, int]


@dataclass(frozen=True)
class BatchJob:
    """One batch to run: every image is preprocessed to `shape` and run at `level` on `model`'s backend."""

    model: str
    level: Level
    shape: Shape  # network input (H, W)
    pixels: list[np.ndarray]  # RGB uint8 (h, w, 3), any size: resized to `shape` in the worker
    original_sizes: list[Shape]  # (H, W) of each mask to return
    precision: str = "fp32"  # "fp32", or "bf16"/"fp16" (CUDA autocast)


class Worker:
    def __init__(self, index: int, factories: Mapping[str, Callable[[], Backend]]) -> None:
        self.index = index
        self._factories = dict(factories)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"segserve-worker-{index}")
        self.backends: dict[str, Backend] | None = {name: make() for name, make in self._factories.items()}
        self.consecutive_failures = 0

    @property
    def alive(self) -> bool:
        return self.backends is not None

    def run(self, job: BatchJob) -> BatchOutput:
        if self.backends is None:
            raise RuntimeError(f"worker {self.index} has no backend")
        return self.backends[job.model].run(job.pixels, job.shape, job.level, job.original_sizes, job.precision)

    def record(self, ok: bool) -> None:
        """Count failures; rebuild the backends after several in a row (runs on the worker thread)."""
        if ok:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= REBUILD_AFTER_FAILURES:
            log.error("worker %d failed %d batches in a row; rebuilding its backends", self.index,
                      self.consecutive_failures)
            try:
                self.backends = {name: make() for name, make in self._factories.items()}
                self.consecutive_failures = 0
            except Exception:
                log.exception("worker %d could not rebuild its backends; it is out of service", self.index)
                self.backends = None


class WorkerPool:
    """Hands idle workers to the scheduler and runs batches on their threads."""

    def __init__(self, factories: Mapping[str, Callable[[], Backend]], size: int) -> None:
        self.workers = [Worker(i, factories) for i in range(size)]
        self._idle: list[Worker] = list(self.workers)

    @property
    def alive_count(self) -> int:
        return sum(worker.alive for worker in self.workers)

    def has_idle(self) -> bool:
        return any(worker.alive for worker in self._idle)

    def acquire(self) -> Worker:
        worker = next(w for w in self._idle if w.alive)
        self._idle.remove(worker)
        return worker

    def release(self, worker: Worker) -> None:
        self._idle.append(worker)

    async def run(self, worker: Worker, job: BatchJob) -> BatchOutput:
        loop = asyncio.get_running_loop()
        try:
            output = await loop.run_in_executor(worker.executor, worker.run, job)
        except Exception:
            await loop.run_in_executor(worker.executor, worker.record, False)
            raise
        worker.record(True)
        return output

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.executor.shutdown(wait=False, cancel_futures=True)
