"""The batching scheduler with the real worker pool over a fake backend (the scheduling is under test).

The fake backend records every batch it runs (which requests, which level, which shape) and can be held
busy on a gate, so tests decide exactly when the single worker is free.
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
import torch

from models.isr import LADDER, IsrLevel
from service.batching.scheduler import Scheduler, WorkItem
from service.errors import DeadlineExpired, InferenceFailed, QueueFull, Unavailable
from service.metrics import Metrics
from service.planner import LatencyProfile
from service.workers.backends.base import BatchOutput
from service.workers.pool import WorkerPool

pytestmark = pytest.mark.anyio

SHAPE = (32, 48)
OTHER_SHAPE = (48, 32)
FULL, CHEAP = LADDER[0], LADDER[-1]
MODEL = "edaformer-t"
FORWARD_S, POSTPROCESS_S = 0.004, 0.001


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

    def run(self, images: torch.Tensor, isr, sizes) -> BatchOutput:
        ids = tuple(int(images[i, 0, 0, 0]) for i in range(images.shape[0]))
        level = next(level.name for level in LADDER if level.isr == isr)
        self.recorder.batches.append((level, ids, (int(images.shape[-2]), int(images.shape[-1]))))
        self.recorder.started.set()
        if not self.recorder.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        if level in self.recorder.fail_levels:
            raise RuntimeError("boom")
        labels = [np.full(size, i, dtype=np.uint8) for i, size in zip(ids, sizes, strict=True)]
        return BatchOutput(labels, FORWARD_S, POSTPROCESS_S)


def make_profile(ms: float = 50.0) -> LatencyProfile:
    profile = LatencyProfile(LADDER, SHAPE, lambda level, shape: float(shape[0] * shape[1]))
    for level in LADDER:
        for batch in (1, 2, 4):
            profile.set(level, batch, ms * (1 + 0.5 * (batch - 1)) / 1e3)
    return profile


@dataclass
class Harness:
    scheduler: Scheduler
    recorder: Recorder
    metrics: Metrics
    profile: LatencyProfile

    def item(self, request_id: int, level: IsrLevel = FULL, shape: tuple[int, int] = SHAPE,
             budget_s: float | None = None, hard_s: float = 30.0) -> WorkItem:
        now = time.monotonic()
        return WorkItem(
            images=torch.full((1, 3, *shape), float(request_id)), original_size=(shape[0] + 1, shape[1] + 2),
            level=level, budget_deadline=None if budget_s is None else now + budget_s, hard_deadline=now + hard_s,
            future=asyncio.get_running_loop().create_future(),
        )

    def submit(self, *args, **kwargs) -> WorkItem:
        item = self.item(*args, **kwargs)
        self.scheduler.submit(item)
        return item

    def rejected(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("segserve_rejected_total",
                                                      {"model": MODEL, "reason": reason}) or 0.0

    async def busy(self) -> WorkItem:
        """Occupy the (first) worker with request 0 until the gate opens."""
        self.recorder.gate.clear()
        self.recorder.started.clear()
        item = self.submit(0, level=CHEAP, shape=OTHER_SHAPE)
        await until(self.recorder.started.is_set)
        return item


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(workers: int = 1, **options) -> AsyncIterator[Harness]:
    """A running scheduler over `workers` fake-backed workers (max batch 4, 20 ms queue delay unless given)."""
    recorder = Recorder()
    recorder.gate.set()
    pool = WorkerPool(lambda: FakeBackend(recorder), workers)
    metrics, profile = Metrics(), make_profile()
    settings = {"max_batch_size": 4, "max_queue_delay_s": 0.02, "max_queue_size": 64, **options}
    scheduler = Scheduler(pool, profile, metrics, MODEL, **settings)
    task = asyncio.create_task(scheduler.run())
    try:
        yield Harness(scheduler, recorder, metrics, profile)
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

async def test_requests_with_the_same_plan_share_one_batch(h: Harness) -> None:
    items = [h.submit(i) for i in range(1, 5)]
    await asyncio.gather(*(item.future for item in items))
    assert h.recorder.batches == [(FULL.name, (1, 2, 3, 4), SHAPE)]
    for i, item in enumerate(items, start=1):
        result = item.future.result()
        assert labels_of(item) == i  # each request gets its own mask back
        assert result.batch_size == 4
        assert result.compute_s == pytest.approx(FORWARD_S + POSTPROCESS_S)
    assert h.metrics.registry.get_sample_value(
        "segserve_batch_size_sum", {"model": MODEL, "level": FULL.name}) == 4


async def test_a_batch_closes_at_the_maximum_size(h: Harness) -> None:
    await h.busy()
    items = [h.submit(i) for i in range(1, 7)]
    h.recorder.gate.set()
    await asyncio.gather(*(item.future for item in items))
    sizes = [len(ids) for level, ids, _ in h.recorder.batches if level == FULL.name]
    assert sizes == [4, 2]
    assert sorted(h.recorder.computed_ids()) == list(range(7))


async def test_levels_and_shapes_never_share_a_batch(h: Harness) -> None:
    await h.busy()
    items = [h.submit(1), h.submit(2, level=CHEAP), h.submit(3, shape=OTHER_SHAPE), h.submit(4),
             h.submit(5, level=CHEAP), h.submit(6, shape=OTHER_SHAPE)]
    h.recorder.gate.set()
    await asyncio.gather(*(item.future for item in items))
    batches = {(level, shape): ids for level, ids, shape in h.recorder.batches[1:]}
    assert batches == {(FULL.name, SHAPE): (1, 4), (CHEAP.name, SHAPE): (2, 5), (FULL.name, OTHER_SHAPE): (3, 6)}
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


async def test_ready_batches_go_earliest_deadline_first() -> None:
    async with running(max_queue_delay_s=0.0) as h:
        await h.busy()
        late = h.submit(1, level=FULL, budget_s=20.0)
        early = h.submit(2, level=LADDER[1], budget_s=10.0)
        no_budget = h.submit(3, level=LADDER[2], hard_s=25.0)
        h.recorder.gate.set()
        await asyncio.gather(late.future, early.future, no_budget.future)
        # Budgeted requests of one shape share a queue whatever their admission level (the level is bound
        # at dispatch), ordered earliest deadline first; the unbudgeted one keeps its own queue and goes last.
        assert [ids for _, ids, _ in h.recorder.batches[1:]] == [(2, 1), (3,)]


async def test_within_a_queue_the_earliest_deadlines_go_first(h: Harness) -> None:
    await h.busy()
    items = [h.submit(i, budget_s=10.0 - i) for i in range(1, 7)]  # later ids have earlier deadlines
    h.recorder.gate.set()
    await asyncio.gather(*(item.future for item in items))
    assert [ids for _, ids, _ in h.recorder.batches[1:]] == [(6, 5, 4, 3), (2, 1)]


async def test_two_workers_run_two_batches_at_once() -> None:
    async with running(workers=2, max_queue_delay_s=0.0) as h:
        h.recorder.gate.clear()
        first, second = h.submit(1), h.submit(2, level=CHEAP)
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
    h.recorder.fail_levels.add(FULL.name)
    await h.busy()
    failing = [h.submit(1), h.submit(2)]
    fine = h.submit(3, level=LADDER[1])
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


# ----- backlog, observation, drain -----

async def test_backlog_counts_running_and_queued_work(h: Harness) -> None:
    assert h.scheduler.backlog_s() == 0.0
    h.profile.set(CHEAP, 1, 5.0)  # the running batch is predicted to take 5 s (the other shape has as many pixels)
    await h.busy()
    running = h.scheduler.backlog_s()
    assert 4.0 < running <= 5.0
    h.submit(1)
    h.submit(2)
    queued = h.scheduler.backlog_s()
    assert queued - running == pytest.approx(h.profile.estimate(FULL, SHAPE, 2), abs=0.01)
    h.recorder.gate.set()
    await until(lambda: h.scheduler.queued() == 0 and h.scheduler.in_flight() == 0)
    assert h.scheduler.backlog_s() == 0.0


async def test_observed_batches_refine_the_profile(h: Harness) -> None:
    before = h.profile.table()[FULL.name][1]
    item = h.submit(1)
    await item.future
    after = h.profile.table()[FULL.name][1]
    assert after < before  # 5 ms observed against 50 ms predicted
    assert after == pytest.approx(0.8 * before + 0.2 * (FORWARD_S + POSTPROCESS_S))


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


# ----- late binding: the level is re-planned when the batch is dispatched -----

BIG = (256, 320)  # every level of the ladder can pool an input this size (SHAPE fits the full level only)


def ladder_profile(harness: Harness, full_ms: float = 200.0, step_ms: float = 30.0) -> None:
    """Distinct latencies per level at BIG: full 200 ms, then 30 ms cheaper per rank (cheapest 50 ms)."""
    # smoothing 0: the fake backend's instant batches must not teach the profile anything here.
    profile = LatencyProfile(LADDER, BIG, lambda level, shape: 1.0, smoothing=0.0)
    for level in LADDER:
        for batch in (1, 2, 4):
            profile.set(level, batch, (full_ms - step_ms * level.rank) * batch / 1e3)
    harness.scheduler.profile = harness.profile = profile


async def test_a_batch_that_would_miss_its_budget_is_downgraded_at_dispatch(h: Harness) -> None:
    ladder_profile(h)
    await h.busy()
    # Planned at full when admitted; by the time the worker frees up only ~120 ms of budget are left.
    item = h.submit(1, level=FULL, shape=BIG, budget_s=0.25)
    await asyncio.sleep(0.13)
    h.recorder.gate.set()
    result = await item.future
    assert result.level.rank > FULL.rank
    assert h.recorder.batches[-1][0] == result.level.name
    # 200 - 30 * rank must fit the remaining ~120 ms (no margin configured): rank >= 3.
    assert result.level.rank >= 3


async def test_a_request_whose_backlog_cleared_is_upgraded_at_dispatch(h: Harness) -> None:
    ladder_profile(h)
    item = h.submit(1, level=CHEAP, shape=BIG, budget_s=5.0)  # planned cheap (say, behind a backlog that then cleared)
    result = await item.future
    assert result.level == FULL


async def test_re_planning_respects_the_quality_cap_and_explicit_levels(h: Harness) -> None:
    ladder_profile(h)
    capped = h.item(1, level=CHEAP, shape=BIG, budget_s=5.0)
    capped.best_rank = 2
    h.scheduler.submit(capped)
    assert (await capped.future).level.rank == 2  # may go up, but not above its quality cap
    pinned = h.item(2, level=CHEAP, shape=BIG, budget_s=5.0)
    pinned.pinned = True
    h.scheduler.submit(pinned)
    assert (await pinned.future).level == CHEAP
    no_budget = h.submit(3, level=LADDER[2], shape=BIG)
    assert (await no_budget.future).level == LADDER[2]  # without a deadline the admission plan stands


async def test_a_batch_is_cut_to_the_urgent_requests_when_a_full_one_would_be_late(h: Harness) -> None:
    ladder_profile(h)  # cheapest level: 50 ms per image, 200 ms for a batch of 4
    await h.busy()
    urgent = h.submit(1, level=FULL, shape=BIG, budget_s=0.2)
    relaxed = [h.submit(i, level=FULL, shape=BIG, budget_s=5.0) for i in (2, 3, 4)]
    h.recorder.gate.set()
    await asyncio.gather(urgent.future, *(item.future for item in relaxed))
    first = h.recorder.batches[1]
    assert first[1][0] == 1 and len(first[1]) < 4  # the urgent one went first, in a smaller batch
    assert urgent.future.result().level.rank > 0
