"""Dynamic batching: bounded queues per plan key, batches closed on size, wait or deadline.

Requests with a budget and the same input shape share a queue (their level is chosen at dispatch); those
without a budget, or with an explicit level, queue by (level, shape). A queue's batch is ready when it is full,
when its oldest request has waited `max_queue_delay`, or when its earliest budget deadline minus the
predicted batch compute is now. Ready batches go to idle workers, earliest deadline first. A request
whose hard deadline passes while queued is answered 504 and never computed; one whose caller went away
(its future was cancelled) is dropped without compute.

The level is bound late: the admission plan is a forecast, and when a batch is dispatched the scheduler
picks, from what it knows then, the best level at which every budgeted member is predicted to finish in
time (never better than a member's quality cap, never changing an explicitly requested level). A burst
that arrived after admission therefore downgrades the queued work instead of making it late, and a
backlog that cleared up upgrades it.

The scheduler decides; workers execute: `run()` reads schedule -> dispatch -> wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from models.isr import IsrLevel
from service.errors import DeadlineExpired, InferenceFailed, QueueFull, Unavailable
from service.metrics import Metrics
from service.planner import LatencyProfile, Shape
from service.workers.pool import Worker, WorkerPool

log = logging.getLogger(__name__)
_sequence = itertools.count()


@dataclass
class ItemResult:
    labels: np.ndarray
    level: IsrLevel  # the level the batch actually ran at
    queue_s: float
    compute_s: float  # the whole batch's forward + postprocess
    batch_size: int


@dataclass(eq=False)
class WorkItem:
    images: torch.Tensor  # (1, 3, H, W), preprocessed
    original_size: tuple[int, int]
    level: IsrLevel  # planned at admission; the batch may run at another (see module docstring)
    budget_deadline: float | None  # monotonic; soft: closes batches early, decides budget_met
    hard_deadline: float  # monotonic; past it the request is answered 504 without compute
    future: asyncio.Future = field(repr=False)
    best_rank: int = 0  # the quality cap: the best level this request may run at
    pinned: bool = False  # an explicitly requested level: never re-planned
    enqueued_at: float = field(default_factory=time.monotonic)
    order: int = field(default_factory=lambda: next(_sequence))

    @property
    def shape(self) -> Shape:
        return (int(self.images.shape[-2]), int(self.images.shape[-1]))

    @property
    def queue_key(self) -> tuple[str, Shape]:
        """Budgeted requests batch by shape alone: the dispatch picks one level that suits them all."""
        late_bound = self.budget_deadline is not None and not self.pinned
        return ("auto" if late_bound else self.level.name, self.shape)

    @property
    def sort_deadline(self) -> float:
        return self.budget_deadline if self.budget_deadline is not None else self.hard_deadline


class Scheduler:
    def __init__(
        self,
        pool: WorkerPool,
        profile: LatencyProfile,
        metrics: Metrics,
        model_name: str,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        levels: list[IsrLevel] | None = None,
        safety_margin: float = 0.0,
    ) -> None:
        self.pool = pool
        self.profile = profile
        self.metrics = metrics
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.levels = sorted(levels or profile.levels, key=lambda level: level.rank)
        self.safety_margin = safety_margin
        self._queues: dict[tuple[str, Shape], deque[WorkItem]] = {}
        self._running_until: dict[int, float] = {}  # batch id -> predicted end (monotonic)
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._stopped = False
        self._accepting = True

    # ----- admission -----
    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def in_flight(self) -> int:
        return len(self._running_until)

    def backlog_s(self) -> float:
        """Predicted seconds until a newly queued request reaches a worker."""
        now = time.monotonic()
        remaining = sum(max(0.0, end - now) for end in self._running_until.values())
        for (_, shape), queue in self._queues.items():
            if queue:
                level = queue[0].level
                batches = math.ceil(len(queue) / self.max_batch_size)
                per_batch = min(len(queue), self.max_batch_size)
                remaining += batches * self.profile.estimate(level, shape, per_batch)
        return remaining / max(1, self.pool.alive_count)

    def submit(self, item: WorkItem) -> None:
        if not self._accepting:
            self.metrics.rejected.labels(self.model_name, "draining").inc()
            raise Unavailable("the server is shutting down; retry on another replica", retry_after_s=1.0,
                              code="shutting_down")
        if self.queued() >= self.max_queue_size:
            self.metrics.rejected.labels(self.model_name, "queue_full").inc()
            raise QueueFull(f"the queue is full ({self.max_queue_size} requests); retry shortly",
                            retry_after_s=max(1.0, math.ceil(self.backlog_s())))
        self._queues.setdefault(item.queue_key, deque()).append(item)
        self._publish_depth()
        self._wake.set()

    # ----- the loop -----
    async def run(self) -> None:
        while not self._stopped:
            now = time.monotonic()
            self._drop_dead(now)
            while self.pool.has_idle():
                key = self._next_ready(now)
                if key is None:
                    break
                self._dispatch(key)
            self._wake.clear()
            timeout = self._next_wake(now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _drop_dead(self, now: float) -> None:
        for key, queue in self._queues.items():
            kept = deque()
            for item in queue:
                if item.future.done():  # cancelled: the caller went away
                    self.metrics.rejected.labels(self.model_name, "client_gone").inc()
                elif now >= item.hard_deadline:
                    self.metrics.rejected.labels(self.model_name, "deadline_expired").inc()
                    item.future.set_exception(DeadlineExpired(
                        f"the request's deadline passed after {1e3 * (now - item.enqueued_at):.0f} ms in the "
                        "queue; it was not computed"))
                else:
                    kept.append(item)
            self._queues[key] = kept
        self._publish_depth()

    def _batch_estimate(self, key: tuple[str, Shape], queue: deque[WorkItem]) -> float:
        return self.profile.estimate(queue[0].level, key[1], min(len(queue), self.max_batch_size))

    def _ready_at(self, key: tuple[str, Shape], queue: deque[WorkItem]) -> float:
        """When this queue's next batch should close."""
        if len(queue) >= self.max_batch_size:
            return -math.inf
        oldest = min(item.enqueued_at for item in queue)
        ready = oldest + self.max_queue_delay_s
        deadlines = [item.budget_deadline for item in queue if item.budget_deadline is not None]
        if deadlines:
            ready = min(ready, min(deadlines) - self._batch_estimate(key, queue))
        return ready

    def _next_ready(self, now: float) -> tuple[str, Shape] | None:
        ready = [
            (min(item.sort_deadline for item in queue), min(item.order for item in queue), key)
            for key, queue in self._queues.items()
            if queue and self._ready_at(key, queue) <= now
        ]
        return min(ready)[2] if ready else None

    def _next_wake(self, now: float) -> float | None:
        """When the loop must look again by itself; a finishing batch or a new request wakes it earlier."""
        # With every worker busy a ready batch cannot go anywhere: only hard deadlines need a timer then
        # (a batch that finishes sets the wake event), so the loop sleeps instead of polling.
        times = []
        if self.pool.has_idle():
            times = [self._ready_at(key, queue) for key, queue in self._queues.items() if queue]
        times += [item.hard_deadline for queue in self._queues.values() for item in queue]
        if not times:
            return None
        return max(0.0005, min(times) - now)

    def _dispatch(self, key: tuple[str, Shape]) -> None:
        queue = self._queues[key]
        ordered = sorted(queue, key=lambda item: (item.sort_deadline, item.order))
        batch, level = self._form_batch(ordered[: self.max_batch_size], key[1], time.monotonic())
        self._queues[key] = deque(item for item in queue if item not in batch)
        self._publish_depth()
        worker = self.pool.acquire()
        batch_id = next(_sequence)
        self._running_until[batch_id] = time.monotonic() + self.profile.estimate(level, key[1], len(batch))
        task = asyncio.create_task(self._execute(worker, batch, batch_id, level))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _form_batch(self, candidates: list[WorkItem], shape: Shape, now: float) -> tuple[list[WorkItem], IsrLevel]:
        """The largest deadline-ordered prefix that some level finishes in time, and the best such level.

        A full batch is the most efficient, but a batch of 4 can take longer than the tightest member's
        remaining budget; then fewer, more urgent requests go first. When no prefix can make it, the whole
        batch runs at the cheapest allowed level: it is late anyway, and that frees the worker soonest.
        """
        for size in range(len(candidates), 0, -1):
            level, feasible = self._dispatch_level(candidates[:size], shape, now)
            if feasible:
                return candidates[:size], level
        return candidates, self._dispatch_level(candidates, shape, now)[0]

    def _dispatch_level(self, batch: list[WorkItem], shape: Shape, now: float) -> tuple[IsrLevel, bool]:
        """The best level at which every budgeted member is predicted to finish by its deadline."""
        planned = batch[0].level
        if any(item.pinned for item in batch):
            return planned, True
        deadlines = [item.budget_deadline for item in batch if item.budget_deadline is not None]
        if not deadlines:
            return planned, True
        slack = min(deadlines) - now
        cap = max(item.best_rank for item in batch)
        allowed = [level for level in self.levels if level.rank >= cap and level.isr.fits(*shape)] or [planned]
        for level in allowed:
            if self.profile.estimate(level, shape, len(batch)) * (1 + self.safety_margin) <= slack:
                return level, True
        return allowed[-1], False

    async def _execute(self, worker: Worker, batch: list[WorkItem], batch_id: int, level: IsrLevel) -> None:
        shape = batch[0].shape
        started = time.monotonic()
        try:
            images = torch.cat([item.images for item in batch]) if len(batch) > 1 else batch[0].images
            output = await self.pool.run(worker, images, level.isr, [item.original_size for item in batch])
        except Exception as exc:
            log.exception("batch of %d at level %s failed on worker %d", len(batch), level.name, worker.index)
            self.metrics.worker_failures.labels(self.model_name).inc()
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}"))
        else:
            compute_s = output.forward_s + output.postprocess_s
            self.profile.observe(level, shape, len(batch), compute_s)
            refined = self.profile.estimate(level, self.profile.calibration_shape, len(batch))
            self.metrics.calibrated_latency.labels(self.model_name, level.name, str(len(batch))).set(refined)
            self.metrics.batch_size.labels(self.model_name, level.name).observe(len(batch))
            self.metrics.stage.labels("forward").observe(output.forward_s)
            self.metrics.stage.labels("postprocess").observe(output.postprocess_s)
            for item, labels in zip(batch, output.labels, strict=True):
                if not item.future.done():
                    item.future.set_result(
                        ItemResult(labels, level, started - item.enqueued_at, compute_s, len(batch)))
        finally:
            self._running_until.pop(batch_id, None)
            self.pool.release(worker)
            self.metrics.workers_alive.labels(self.model_name).set(self.pool.alive_count)
            self._wake.set()

    def _publish_depth(self) -> None:
        self.metrics.queue_depth.labels(self.model_name).set(self.queued())

    # ----- lifecycle -----
    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting work and wait for queued and running batches; True if all finished in time."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while (self.queued() or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not (self.queued() or self._tasks)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
