"""The worker pool: N workers, each a dedicated thread with its own backend.

A failing batch fails only its own requests; a worker whose batches keep failing rebuilds its backend,
and a worker that cannot rebuild it is dead. With no live worker, readiness turns 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from models.isr import IsrConfig
from service.workers.backends.base import Backend, BatchOutput

log = logging.getLogger(__name__)

# After this many consecutive failed batches a worker rebuilds its backend (a wedged CUDA context,
# a broken ORT session); one bad input should not cost a rebuild.
REBUILD_AFTER_FAILURES = 3


class Worker:
    def __init__(self, index: int, factory: Callable[[], Backend]) -> None:
        self.index = index
        self._factory = factory
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"segserve-worker-{index}")
        self.backend: Backend | None = factory()
        self.consecutive_failures = 0

    @property
    def alive(self) -> bool:
        return self.backend is not None

    def run(self, images: torch.Tensor, isr: IsrConfig, sizes: Sequence[tuple[int, int]]) -> BatchOutput:
        if self.backend is None:
            raise RuntimeError(f"worker {self.index} has no backend")
        return self.backend.run(images, isr, sizes)

    def record(self, ok: bool) -> None:
        """Count failures; rebuild the backend after several in a row (runs on the worker thread)."""
        if ok:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= REBUILD_AFTER_FAILURES:
            log.error("worker %d failed %d batches in a row; rebuilding its backend", self.index,
                      self.consecutive_failures)
            try:
                self.backend = self._factory()
                self.consecutive_failures = 0
            except Exception:
                log.exception("worker %d could not rebuild its backend; it is out of service", self.index)
                self.backend = None


class WorkerPool:
    """Hands idle workers to the scheduler and runs batches on their threads."""

    def __init__(self, factory: Callable[[], Backend], size: int) -> None:
        self.workers = [Worker(i, factory) for i in range(size)]
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

    async def run(
        self, worker: Worker, images: torch.Tensor, isr: IsrConfig, sizes: Sequence[tuple[int, int]]
    ) -> BatchOutput:
        loop = asyncio.get_running_loop()
        try:
            output = await loop.run_in_executor(worker.executor, worker.run, images, isr, sizes)
        except Exception:
            await loop.run_in_executor(worker.executor, worker.record, False)
            raise
        worker.record(True)
        return output

    def warm_up(self, images: torch.Tensor, isr: IsrConfig) -> None:
        """One batch per worker before serving, so first requests do not pay one-time costs."""
        for worker in self.workers:
            worker.run(images, isr, [tuple(images.shape[-2:])] * images.shape[0])

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.executor.shutdown(wait=False, cancel_futures=True)
