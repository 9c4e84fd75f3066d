"""Dynamic batching: bounded queues of compatible requests, batches closed on size, wait or deadline.

Queued requests hold decoded pixels; nothing is preprocessed until dispatch, because only then is the point
decided. Requests queue together when one batch can serve them: the same pool (or model restriction), the
same explicit point if any, budgeted or not, and the same image size (so every member has the same network
input at whatever point is chosen). A queue's batch is ready when it is full, when its oldest request has
waited `max_queue_delay`, or when its earliest budget deadline minus the predicted batch compute is now.
Ready batches go to idle workers, earliest deadline first.

At dispatch the planner (the same one that planned admission) picks the point for the batch from what is
known then: the best point at which every budgeted member is predicted to finish by its budget. A full batch
is the most efficient, but it can take longer than the tightest member has left; then the largest
deadline-ordered prefix that fits goes first. No member is ever dispatched when it is predicted to finish past
its hard deadline (`timeout_ms`): it is answered 504 without compute. A request whose hard deadline passes
while queued is answered 504; one whose caller went away is dropped without compute.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExpired, InferenceFailed, QueueFull, Unavailable
from service.metrics import Metrics
from service.planner import Demand, Load, NoPointFits, Plan, Planner
from service.points import Point
from service.workers.pool import BatchJob, Worker, WorkerPool

log = logging.getLogger(__name__)
_sequence = itertools.count()
Shape = tuple[int, int]
QueueKey = tuple[str, str, str, bool, Shape]  # pool, model restriction, explicit point, budgeted, image size


@dataclass
class ItemResult:
    labels: np.ndarray
    plan: Plan  # the dispatch plan the batch ran at
    queue_s: float
    compute_s: float  # the whole batch's preprocess + forward + postprocess
    batch_size: int
    stats: dict[str, list[float]] = field(default_factory=dict)


@dataclass(eq=False)
class WorkItem:
    pixels: np.ndarray  # decoded RGB uint8 (h, w, 3); may be smaller than the original (reduced decoding)
    original_size: Shape  # (H, W) of the image and of the mask to return
    pool: str
    model: str | None  # restrict to this served model (None: any model of the pool)
    admitted: Plan  # the admission forecast: the backlog estimate counts this item at this point
    budget_deadline: float | None  # monotonic; soft: closes batches early, decides budget_met
    hard_deadline: float  # monotonic; past it (or predicted past it) the request is answered 504 uncomputed
    future: asyncio.Future = field(repr=False)
    quality: float | None = None  # the quality cap, 0..1
    explicit: Point | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    order: int = field(default_factory=lambda: next(_sequence))

    @property
    def queue_key(self) -> QueueKey:
        explicit = self.explicit.name if self.explicit else ""
        return (self.pool, self.model or "", explicit, self.budget_deadline is not None, self.original_size)

    @property
    def sort_deadline(self) -> float:
        return self.budget_deadline if self.budget_deadline is not None else self.hard_deadline


class Scheduler:
    def __init__(
        self,
        pool: WorkerPool,
        planner: Planner,
        ladder: Callable[[str, str | None], list[Point]],
        estimate: Callable[[Point, Shape, int, Shape], float],
        observe: Callable[[Point, Shape, int, float, float, int], None],
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        safety_margin: float = 0.0,
        post_overhead_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.pool = pool
        self.planner = planner
        self._ladder = ladder
        self._estimate = estimate
        self._observe = observe
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.safety_margin = safety_margin
        self._post_overhead_s = post_overhead_s
        self._queues: dict[QueueKey, deque[WorkItem]] = {}
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
        for queue in self._queues.values():
            if queue:
                plan = queue[0].admitted
                batches = math.ceil(len(queue) / self.max_batch_size)
                per_batch = min(len(queue), self.max_batch_size)
                remaining += batches * self._estimate(plan.point, plan.shape, per_batch, queue[0].original_size)
        return remaining / max(1, self.pool.alive_count)

    def submit(self, item: WorkItem) -> None:
        if not self._accepting:
            self.metrics.rejected.labels(item.admitted.point.model, "draining").inc()
            raise Unavailable("the server is shutting down; retry on another replica", retry_after_s=1.0,
                              code="shutting_down")
        if self.queued() >= self.max_queue_size:
            self.metrics.rejected.labels(item.admitted.point.model, "queue_full").inc()
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

    def _expire(self, item: WorkItem, now: float, why: str) -> None:
        self.metrics.rejected.labels(item.admitted.point.model, "deadline_expired").inc()
        item.future.set_exception(DeadlineExpired(
            f"{why} after {1e3 * (now - item.enqueued_at):.0f} ms in the queue; it was not computed"))

    def _drop_dead(self, now: float) -> None:
        for key, queue in self._queues.items():
            kept = deque()
            for item in queue:
                if item.future.done():  # cancelled: the caller went away
                    self.metrics.rejected.labels(item.admitted.point.model, "client_gone").inc()
                elif now >= item.hard_deadline:
                    self._expire(item, now, "the request's deadline passed")
                else:
                    kept.append(item)
            self._queues[key] = kept
        self._publish_depth()

    def _cheapest_estimate(self, key: QueueKey, queue: deque[WorkItem]) -> float:
        """Compute of the next batch at the queue's admission point: when to close it before its deadline."""
        plan = queue[0].admitted
        return self._estimate(plan.point, plan.shape, min(len(queue), self.max_batch_size), key[4])

    def _ready_at(self, key: QueueKey, queue: deque[WorkItem]) -> float:
        """When this queue's next batch should close."""
        if len(queue) >= self.max_batch_size:
            return -math.inf
        oldest = min(item.enqueued_at for item in queue)
        ready = oldest + self.max_queue_delay_s
        deadlines = [item.budget_deadline for item in queue if item.budget_deadline is not None]
        if deadlines:
            ready = min(ready, min(deadlines) - self._cheapest_estimate(key, queue))
        return ready

    def _next_ready(self, now: float) -> QueueKey | None:
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

    # ----- dispatch -----
    def _demand(self, items: list[WorkItem], now: float) -> Demand:
        head = items[0]
        budgets = [item.budget_deadline for item in items if item.budget_deadline is not None]
        caps = [item.quality for item in items if item.quality is not None]
        return Demand(
            candidates=self._ladder(head.pool, head.model), image_size=head.original_size, batch_size=len(items),
            slack_s=min(budgets) - now if budgets else None, quality=min(caps) if caps else None,
            explicit=head.explicit,
        )

    def _within_hard_deadline(self, items: list[WorkItem], plan: Plan, now: float) -> bool:
        return plan.predicted_s <= min(item.hard_deadline for item in items) - now

    def _form_batch(self, items: list[WorkItem], now: float) -> tuple[list[WorkItem], Plan] | None:
        """The largest deadline-ordered prefix that some point finishes in time, and the plan for it.

        When no prefix makes its budget, the whole batch runs at the fallback (cheapest) point: it is late
        anyway, and that frees the worker soonest; but never past a member's hard deadline. None when even one
        request alone cannot finish before its hard deadline (it is then answered 504).
        """
        load = Load(0.0, self._post_overhead_s(), self.safety_margin)
        fallback: tuple[list[WorkItem], Plan] | None = None
        for size in range(len(items), 0, -1):
            prefix = items[:size]
            plan = self.planner.plan(self._demand(prefix, now), load)
            if not self._within_hard_deadline(prefix, plan, now):
                continue
            if plan.feasible:
                return prefix, plan
            if fallback is None:
                fallback = (prefix, plan)
        return fallback

    def _dispatch(self, key: QueueKey) -> None:
        queue = self._queues[key]
        now = time.monotonic()
        ordered = sorted(queue, key=lambda item: (item.sort_deadline, item.order))
        try:
            formed = self._form_batch(ordered[: self.max_batch_size], now)
        except NoPointFits as exc:  # cannot happen after admission checked it; fail the requests, not the loop
            formed = None
            for item in ordered[: self.max_batch_size]:
                queue.remove(item)
                item.future.set_exception(InferenceFailed(str(exc)))
            self._publish_depth()
            return
        if formed is None:  # the most urgent request cannot finish before its hard deadline at any point
            head = ordered[0]
            queue.remove(head)
            self._expire(head, now, "the request could not finish before its deadline at any point")
            self._publish_depth()
            return
        batch, plan = formed
        self._queues[key] = deque(item for item in queue if item not in batch)
        self._publish_depth()
        worker = self.pool.acquire()
        batch_id = next(_sequence)
        self._running_until[batch_id] = now + self._estimate(plan.point, plan.shape, len(batch), key[4])
        task = asyncio.create_task(self._execute(worker, batch, batch_id, plan))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, worker: Worker, batch: list[WorkItem], batch_id: int, plan: Plan) -> None:
        point = plan.point
        started = time.monotonic()
        job = BatchJob(point.model, point.level, plan.shape, [item.pixels for item in batch],
                       [item.original_size for item in batch], point.precision)
        try:
            output = await self.pool.run(worker, job)
        except Exception as exc:
            log.exception("batch of %d at %s failed on worker %d", len(batch), point.name, worker.index)
            self.metrics.worker_failures.labels(point.model).inc()
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}"))
        else:
            compute_s = output.compute_s
            pixels = sum(height * width for height, width in job.original_sizes)
            self._observe(point, plan.shape, len(batch), output.forward_s, output.preprocess_s + output.postprocess_s,
                          pixels)
            self.metrics.batch_size.labels(point.model, point.name).observe(len(batch))
            for stage, seconds in (("preprocess", output.preprocess_s), ("forward", output.forward_s),
                                   ("postprocess", output.postprocess_s)):
                self.metrics.stage.labels(stage).observe(seconds)
            for index, (item, labels) in enumerate(zip(batch, output.labels, strict=True)):
                if not item.future.done():
                    stats = {key: values[index] for key, values in output.stats.items()}
                    item.future.set_result(ItemResult(labels, plan, started - item.enqueued_at, compute_s,
                                                      len(batch), stats))
        finally:
            self._running_until.pop(batch_id, None)
            self.pool.release(worker)
            self.metrics.workers_alive.set(self.pool.alive_count)
            self._wake.set()

    def _publish_depth(self) -> None:
        self.metrics.queue_depth.set(self.queued())

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
