"""The batching scheduler with the real worker pool and planner over a fake backend (the scheduling is under test).

The fake backend records every batch it runs (which requests, which level, which network shape) and can be
held busy on a gate, so tests decide exactly when the single worker is free. Latencies come from a table, so
the planner's choices are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from models.isr import LADDER
from service.batching.scheduler import Scheduler, WorkItem
from service.errors import DeadlineExpired, InferenceFailed, QueueFull, Unavailable
from service.metrics import Metrics
from service.planner import Plan, Planner, PlanReason
from service.points import Point
from service.workers.backends.base import BatchOutput
from service.workers.pool import WorkerPool

pytestmark = pytest.mark.anyio

MODEL = "m"
SIZE, OTHER_SIZE = (32, 48), (48, 32)  # image sizes; the fake network input is the image size times the scale
FORWARD_S = 0.005
# Quality falls by 1 per level down the ladder; the cheapest point runs at scale 0.5.
POINTS = [Point(MODEL, level, 1.0, quality=50.0 - level.rank) for level in LADDER]
CHEAP_SMALL = Point(MODEL, LADDER[-1], 0.5, quality=40.0)
LADDER_POINTS = [*POINTS, CHEAP_SMALL]
FULL, CHEAP = POINTS[0], CHEAP_SMALL


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Recorder:
    """What the fake backend ran, shared by every worker's backend."""

    batches: list[tuple[str, tuple[int, ...], tuple[int, int]]] = field(default_factory=list)  # level, ids, shape
    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    fail_levels: set[str] = field(default_factory=set)

    def computed_ids(self) -> list[int]:
        return [i for _, ids, _ in self.batches for i in ids]


class FakeBackend:
    """Each image carries its request id in every pixel; the label map returned is that id everywhere."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def run(self, pixels, shape, level, sizes, precision="fp32") -> BatchOutput:
        ids = tuple(int(p[0, 0, 0]) for p in pixels)
        self.recorder.batches.append((level.name, ids, tuple(shape)))
        self.recorder.started.set()
        if not self.recorder.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        if level.name in self.recorder.fail_levels:
            raise RuntimeError("boom")
        labels = [np.full(size, i, dtype=np.uint8) for i, size in zip(ids, sizes, strict=True)]
        return BatchOutput(labels, 0.0, FORWARD_S, 0.0)


class TableProfile:
    """Seconds per batch: `per_image[point name] * batch`, for every shape; records what batches were observed."""

    def __init__(self, per_image_ms: dict[str, float]) -> None:
        self.per_image = {name: ms / 1e3 for name, ms in per_image_ms.items()}
        self.observed: list[tuple[str, int, float]] = []

    def estimate(self, point: Point, shape: tuple[int, int], batch: int = 1, image: tuple[int, int] = SIZE) -> float:
        return self.per_image[point.name] * batch

    def observe(self, point: Point, shape: tuple[int, int], batch: int, seconds: float, io_seconds: float = 0.0,
                pixels: int = 0) -> None:
        self.observed.append((point.name, batch, seconds))


def flat_profile(ms: float = 50.0) -> TableProfile:
    return TableProfile({p.name: ms for p in LADDER_POINTS})


def stepped_profile(full_ms: float = 200.0, step_ms: float = 25.0) -> TableProfile:
    """Full 200 ms per image, then 25 ms cheaper per ladder step (the scale-0.5 point cheapest: 25 ms)."""
    return TableProfile({p.name: full_ms - step_ms * i for i, p in enumerate(LADDER_POINTS)})


def shape_of(point: Point, size: tuple[int, int]) -> tuple[int, int]:
    return int(size[0] * point.scale), int(size[1] * point.scale)


@dataclass
class Harness:
    scheduler: Scheduler
    recorder: Recorder
    metrics: Metrics
    profile: TableProfile
    planner: Planner

    def item(self, request_id: int, *, size: tuple[int, int] = SIZE, budget_s: float | None = None,
             hard_s: float = 30.0, quality: float | None = None, explicit: Point | None = None,
             admitted: Point = FULL) -> WorkItem:
        now = time.monotonic()
        plan = Plan(admitted, shape_of(admitted, size), PlanReason.DEFAULT, 0.0, True)
        return WorkItem(
            pixels=np.full((*size, 3), request_id, dtype=np.uint8), original_size=size, pool="task", model=None,
            admitted=plan, budget_deadline=None if budget_s is None else now + budget_s, hard_deadline=now + hard_s,
            future=asyncio.get_running_loop().create_future(), quality=quality, explicit=explicit,
        )

    def submit(self, request_id: int, **kwargs) -> WorkItem:
        item = self.item(request_id, **kwargs)
        self.scheduler.submit(item)
        return item

    def rejected(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("segserve_rejected_total",
                                                      {"model": MODEL, "reason": reason}) or 0.0

    async def busy(self) -> WorkItem:
        """Occupy the (first) worker with request 0 until the gate opens."""
        self.recorder.gate.clear()
        self.recorder.started.clear()
        item = self.submit(0, size=OTHER_SIZE, explicit=CHEAP)
        await until(self.recorder.started.is_set)
        return item


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(workers: int = 1, profile: TableProfile | None = None, **options) -> AsyncIterator[Harness]:
    """A running scheduler over `workers` fake-backed workers (max batch 4, 20 ms queue delay unless given)."""
    recorder = Recorder()
    recorder.gate.set()
    pool = WorkerPool({MODEL: lambda: FakeBackend(recorder)}, workers)
    metrics, profile = Metrics(), profile or flat_profile()
    planner = Planner(profile.estimate, shape_of, lambda point, shape: True)
    settings = {"max_batch_size": 4, "max_queue_delay_s": 0.02, "max_queue_size": 64, **options}
    scheduler = Scheduler(pool, planner, lambda task, model: LADDER_POINTS, profile.estimate, profile.observe,
                          metrics, **settings)
    task = asyncio.create_task(scheduler.run())
    try:
        yield Harness(scheduler, recorder, metrics, profile, planner)
    finally:
        recorder.gate.set()
        scheduler.stop()
        await task
        pool.shutdown()


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with running() as harness:
        yield harness


def labels_of(item: WorkItem) -> int:
    result = item.future.result()
    values = np.unique(result.labels)
    assert values.size == 1 and result.labels.shape == item.original_size
    return int(values[0])


# ----- batching -----

async def test_requests_of_one_size_share_one_batch(h: Harness) -> None:
    items = [h.submit(i) for i in range(1, 5)]
    await asyncio.gather(*(item.future for item in items))
    assert h.recorder.batches == [(FULL.level.name, (1, 2, 3, 4), SIZE)]
    for i, item in enumerate(items, start=1):
        result = item.future.result()
        assert labels_of(item) == i  # each request gets its own mask back
        assert result.batch_size == 4
        assert result.plan.point == FULL and result.plan.reason == PlanReason.DEFAULT
        assert result.compute_s == pytest.approx(FORWARD_S)
    assert h.metrics.registry.get_sample_value(
        "segserve_batch_size_sum", {"model": MODEL, "point": FULL.name}) == 4
    assert h.profile.observed == [(FULL.name, 4, pytest.approx(FORWARD_S))]  # the batch taught the profile


async def test_a_batch_closes_at_the_maximum_size(h: Harness) -> None:
    await h.busy()
    items = [h.submit(i) for i in range(1, 7)]
    h.recorder.gate.set()
    await asyncio.gather(*(item.future for item in items))
    sizes = [len(ids) for level, ids, _ in h.recorder.batches[1:]]
    assert sizes == [4, 2]
    assert sorted(h.recorder.computed_ids()) == list(range(7))


async def test_sizes_explicit_points_and_budgeted_requests_never_share_a_batch(h: Harness) -> None:
    await h.busy()
    items = [h.submit(1), h.submit(2, explicit=POINTS[2]), h.submit(3, size=OTHER_SIZE), h.submit(4),
             h.submit(5, explicit=POINTS[2]), h.submit(6, size=OTHER_SIZE), h.submit(7, budget_s=20.0)]
    h.recorder.gate.set()
    await asyncio.gather(*(item.future for item in items))
    batches = sorted(ids for _, ids, _ in h.recorder.batches[1:])
    assert batches == [(1, 4), (2, 5), (3, 6), (7,)]
    assert all(labels_of(item) == i for i, item in enumerate(items, start=1))


async def test_a_lone_request_waits_for_the_maximum_queue_delay() -> None:
    async with running(max_queue_delay_s=0.3) as h:
        item = h.submit(1)
        await asyncio.wait_for(item.future, 5.0)
        assert item.future.result().queue_s >= 0.28  # it waited for company first


async def test_a_budget_deadline_closes_the_batch_before_the_queue_delay() -> None:
    async with running(max_queue_delay_s=10.0) as h:
        # Predicted compute of a batch of 1 is 50 ms: the batch must close at 300 - 50 = 250 ms.
        item = h.submit(1, budget_s=0.3)
        await asyncio.wait_for(item.future, 5.0)  # far sooner than the 10 s queue delay
        assert item.future.result().queue_s >= 0.2


async def test_within_a_queue_the_earliest_deadlines_go_first(h: Harness) -> None:
    await h.busy()
    items = [h.submit(i, budget_s=10.0 - i) for i in range(1, 7)]  # later ids have earlier deadlines
    h.recorder.gate.set()
    await asyncio.gather(*(item.future for item in items))
    assert [ids for _, ids, _ in h.recorder.batches[1:]] == [(6, 5, 4, 3), (2, 1)]


async def test_ready_batches_go_earliest_deadline_first() -> None:
    async with running(max_queue_delay_s=0.0) as h:
        await h.busy()
        late = h.submit(1, budget_s=20.0, size=(40, 40))
        early = h.submit(2, budget_s=10.0)
        no_budget = h.submit(3, hard_s=25.0, size=OTHER_SIZE)
        h.recorder.gate.set()
        await asyncio.gather(late.future, early.future, no_budget.future)
        assert [ids for _, ids, _ in h.recorder.batches[1:]] == [(2,), (1,), (3,)]


async def test_two_workers_run_two_batches_at_once() -> None:
    async with running(workers=2, max_queue_delay_s=0.0) as h:
        h.recorder.gate.clear()
        first, second = h.submit(1), h.submit(2, size=OTHER_SIZE)
        await until(lambda: len(h.recorder.batches) == 2)  # both started while the gate is closed
        h.recorder.gate.set()
        await asyncio.gather(first.future, second.future)


# ----- admission and refusals -----

async def test_a_full_queue_refuses_with_retry_after() -> None:
    async with running(max_queue_size=2) as h:
        await h.busy()  # running, so not queued
        queued = [h.submit(1), h.submit(2)]
        with pytest.raises(QueueFull) as refused:
            h.submit(3)
        assert refused.value.http_status == 429 and refused.value.retry_after_s >= 1
        assert h.rejected("queue_full") == 1
        h.recorder.gate.set()
        await asyncio.gather(*(item.future for item in queued))
        assert 3 not in h.recorder.computed_ids()
        h.submit(4)  # room again once the queue drained


async def test_a_request_past_its_hard_deadline_gets_504_without_compute(h: Harness) -> None:
    await h.busy()
    expiring = h.submit(1, hard_s=0.1)
    with pytest.raises(DeadlineExpired) as expired:
        await asyncio.wait_for(expiring.future, 3.0)  # answered while the worker is still busy
    assert expired.value.http_status == 504
    assert h.rejected("deadline_expired") == 1
    h.recorder.gate.set()
    later = h.submit(2)
    await later.future
    assert h.recorder.computed_ids() == [0, 2]


async def test_a_request_predicted_to_finish_past_its_hard_deadline_is_never_dispatched() -> None:
    # Every point takes at least 25 ms; a request with 10 ms of hard deadline left cannot finish in time.
    async with running(profile=stepped_profile(), max_queue_delay_s=0.0) as h:
        hopeless = h.submit(1, hard_s=0.01, budget_s=0.01)
        with pytest.raises(DeadlineExpired, match="could not finish before its deadline"):
            await asyncio.wait_for(hopeless.future, 3.0)
        assert h.recorder.batches == []


async def test_a_batch_never_makes_a_member_late_past_its_hard_deadline() -> None:
    # Explicit full point, 200 ms per image: a batch of 4 takes 800 ms; member 1 has 500 ms of hard deadline.
    async with running(profile=stepped_profile(), max_queue_delay_s=0.0) as h:
        await h.busy()
        urgent = h.submit(1, explicit=FULL, hard_s=0.5)
        others = [h.submit(i, explicit=FULL, hard_s=30.0) for i in (2, 3, 4)]
        h.recorder.gate.set()
        await asyncio.gather(urgent.future, *(item.future for item in others))
        first = h.recorder.batches[1][1]
        assert first[0] == 1 and len(first) <= 2  # at most 400 ms: within the urgent member's 500 ms


async def test_an_already_expired_request_is_not_computed_even_with_an_idle_worker(h: Harness) -> None:
    item = h.submit(1, hard_s=-0.001)
    with pytest.raises(DeadlineExpired):
        await asyncio.wait_for(item.future, 3.0)
    assert h.recorder.batches == []


async def test_a_cancelled_request_is_dropped_without_compute(h: Harness) -> None:
    await h.busy()
    gone, kept = h.submit(1), h.submit(2)
    gone.future.cancel()  # what the pipeline's task does when the client disconnects
    await until(lambda: h.rejected("client_gone") == 1)
    h.recorder.gate.set()
    await kept.future
    assert h.recorder.computed_ids() == [0, 2]


async def test_a_failing_batch_fails_only_its_own_requests(h: Harness) -> None:
    h.recorder.fail_levels.add(FULL.level.name)
    await h.busy()
    failing = [h.submit(1), h.submit(2)]
    fine = h.submit(3, explicit=POINTS[1])
    h.recorder.gate.set()
    for item in failing:
        with pytest.raises(InferenceFailed, match="boom") as failed:
            await item.future
        assert failed.value.http_status == 500
    await fine.future
    assert labels_of(fine) == 3
    assert h.metrics.registry.get_sample_value("segserve_worker_failures_total", {"model": MODEL}) == 1
    h.recorder.fail_levels.clear()
    again = h.submit(4)
    await again.future  # the worker carries on
    assert labels_of(again) == 4


# ----- backlog and drain -----

async def test_backlog_counts_running_and_queued_work(h: Harness) -> None:
    assert h.scheduler.backlog_s() == 0.0
    h.profile.per_image[CHEAP.name] = 5.0  # the running batch is predicted to take 5 s
    await h.busy()
    running_s = h.scheduler.backlog_s()
    assert 4.0 < running_s <= 5.0
    h.submit(1)
    h.submit(2)
    queued = h.scheduler.backlog_s()
    assert queued - running_s == pytest.approx(h.profile.estimate(FULL, SIZE, 2), abs=0.01)
    h.recorder.gate.set()
    await until(lambda: h.scheduler.queued() == 0 and h.scheduler.in_flight() == 0)
    assert h.scheduler.backlog_s() == 0.0


async def test_drain_finishes_accepted_work_then_refuses(h: Harness) -> None:
    await h.busy()
    items = [h.submit(i) for i in range(1, 4)]
    drained = asyncio.create_task(h.scheduler.drain(5.0))
    await asyncio.sleep(0.05)
    with pytest.raises(Unavailable) as refused:
        h.submit(9)
    assert refused.value.code == "shutting_down"
    h.recorder.gate.set()
    assert await drained
    assert all(item.future.done() and not item.future.exception() for item in items)
    assert h.rejected("draining") == 1


async def test_a_ready_batch_waits_for_a_worker_without_polling(h: Harness) -> None:
    await h.busy()
    h.submit(1)
    await asyncio.sleep(0.05)  # past the queue delay: the batch is ready, the worker is not
    loops = 0
    drop_dead = h.scheduler._drop_dead

    def counting(now: float) -> None:
        nonlocal loops
        loops += 1
        drop_dead(now)

    h.scheduler._drop_dead = counting  # type: ignore[method-assign]
    await asyncio.sleep(0.5)
    assert loops < 20, f"{loops} scheduler loops in 0.5 s while waiting for a busy worker"


# ----- late binding: the point is re-planned by the same planner when the batch is dispatched -----

async def test_a_batch_that_would_miss_its_budget_moves_to_a_cheaper_point_at_dispatch() -> None:
    async with running(profile=stepped_profile(), max_queue_delay_s=0.0) as h:
        await h.busy()
        # Admitted at full; by the time the worker frees up only ~120 ms of the budget are left.
        item = h.submit(1, budget_s=0.25)
        await asyncio.sleep(0.13)
        h.recorder.gate.set()
        result = await item.future
        # 200 - 25 * step must fit the remaining ~120 ms (no margin configured): step >= 4.
        assert LADDER_POINTS.index(result.plan.point) >= 4
        assert result.plan.reason == PlanReason.BUDGET
        assert h.recorder.batches[-1][0] == result.plan.point.level.name
        assert h.recorder.batches[-1][2] == shape_of(result.plan.point, SIZE)  # preprocessed for that point


async def test_a_request_whose_backlog_cleared_gets_the_best_point_at_dispatch() -> None:
    async with running(profile=stepped_profile()) as h:
        item = h.submit(1, budget_s=5.0, admitted=CHEAP)  # admitted cheap (behind a backlog that then cleared)
        assert (await item.future).plan.point == FULL


async def test_re_planning_respects_the_quality_cap_and_explicit_points() -> None:
    async with running(profile=stepped_profile()) as h:
        capped = h.submit(1, budget_s=5.0, quality=0.5)  # qualities 40..50: the cap is 45
        assert (await capped.future).plan.point.quality <= 45.0
        assert (await capped.future).plan.point == POINTS[5]  # the best at or under the cap
        pinned = h.submit(2, budget_s=5.0, explicit=CHEAP)
        assert (await pinned.future).plan.point == CHEAP
        no_budget = h.submit(3)
        assert (await no_budget.future).plan.point == FULL  # no deadline: the best point


async def test_a_batch_is_cut_to_the_urgent_requests_when_a_full_one_would_be_late() -> None:
    async with running(profile=stepped_profile(), max_queue_delay_s=0.0) as h:
        await h.busy()
        urgent = h.submit(1, budget_s=0.2)
        relaxed = [h.submit(i, budget_s=5.0) for i in (2, 3, 4)]
        h.recorder.gate.set()
        await asyncio.gather(urgent.future, *(item.future for item in relaxed))
        first = h.recorder.batches[1]
        assert first[1][0] == 1 and len(first[1]) < 4  # the urgent one went first, in a smaller batch
        assert urgent.future.result().plan.point != FULL
