"""Unit tests for service/cache/singleflight.py: one computation per key, shared outcome, safe cancel."""

from __future__ import annotations

import asyncio
import gc

import pytest

from service.cache.singleflight import SingleFlight

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Computation:
    """A factory that counts its runs and finishes only when released (so callers really overlap)."""

    def __init__(self, result: object = "mask", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.runs = 0
        self.cancelled = False
        self.release = asyncio.Event()

    async def __call__(self) -> object:
        self.runs += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return self.result


async def wait_for_waiters(flight: SingleFlight, key: str, count: int) -> None:
    for _ in range(100):
        if flight.waiters(key) == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"expected {count} waiters on {key!r}, have {flight.waiters(key)}")


async def test_concurrent_identical_calls_run_the_factory_once():
    flight: SingleFlight[object] = SingleFlight()
    computation = Computation(result=object())
    callers = [asyncio.ensure_future(flight.do("k", computation)) for _ in range(20)]
    await wait_for_waiters(flight, "k", 20)
    computation.release.set()
    results = await asyncio.gather(*callers)
    assert computation.runs == 1
    assert all(result is computation.result for result in results)
    assert len(flight) == 0  # forgotten once done


async def test_a_later_call_computes_again():
    flight: SingleFlight[object] = SingleFlight()
    computation = Computation()
    computation.release.set()
    assert await flight.do("k", computation) == "mask"
    assert await flight.do("k", computation) == "mask"
    assert computation.runs == 2


async def test_different_keys_do_not_share():
    flight: SingleFlight[object] = SingleFlight()
    first, second = Computation("a"), Computation("b")
    callers = [asyncio.ensure_future(flight.do("a", first)), asyncio.ensure_future(flight.do("b", second))]
    await wait_for_waiters(flight, "b", 1)
    assert len(flight) == 2
    first.release.set()
    second.release.set()
    assert await asyncio.gather(*callers) == ["a", "b"]
    assert (first.runs, second.runs) == (1, 1)


async def test_every_waiter_gets_the_same_exception():
    flight: SingleFlight[object] = SingleFlight()
    computation = Computation(error=RuntimeError("worker died"))
    callers = [asyncio.ensure_future(flight.do("k", computation)) for _ in range(5)]
    await wait_for_waiters(flight, "k", 5)
    computation.release.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert computation.runs == 1
    assert all(outcome is computation.error for outcome in outcomes)
    assert len(flight) == 0


async def test_a_cancelled_waiter_does_not_cancel_the_others():
    flight: SingleFlight[object] = SingleFlight()
    computation = Computation()
    callers = [asyncio.ensure_future(flight.do("k", computation)) for _ in range(3)]
    await wait_for_waiters(flight, "k", 3)
    callers[0].cancel()
    await wait_for_waiters(flight, "k", 2)
    computation.release.set()
    assert await asyncio.gather(*callers[1:]) == ["mask", "mask"]
    assert callers[0].cancelled()
    assert not computation.cancelled
    assert computation.runs == 1


async def test_work_nobody_waits_for_is_cancelled():
    flight: SingleFlight[object] = SingleFlight()
    computation = Computation()
    callers = [asyncio.ensure_future(flight.do("k", computation)) for _ in range(2)]
    await wait_for_waiters(flight, "k", 2)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    for _ in range(10):  # let the shared task see its cancellation
        await asyncio.sleep(0)
    assert computation.cancelled
    assert len(flight) == 0


async def test_a_caller_arriving_as_the_work_is_abandoned_gets_a_fresh_computation():
    """The last waiter leaves (deadline, client gone) and cancels the work; a caller arriving before that
    cancellation lands must not inherit it: it once surfaced as a CancelledError, a 500, on a live request."""
    flight: SingleFlight[object] = SingleFlight()
    first = Computation()
    leaving = asyncio.ensure_future(flight.do("k", first))
    await wait_for_waiters(flight, "k", 1)
    leaving.cancel()
    await asyncio.sleep(0)  # the leaving caller cancels the work; the cancellation has not landed yet
    second = Computation(result="fresh")
    arriving = asyncio.ensure_future(flight.do("k", second))
    await wait_for_waiters(flight, "k", 1)
    second.release.set()
    assert await arriving == "fresh"
    assert first.cancelled and second.runs == 1
    await asyncio.gather(leaving, return_exceptions=True)


async def test_a_live_caller_of_a_cancelled_computation_computes_again():
    """Defence in depth: if the shared work ends cancelled while a caller that was not cancelled awaits it,
    that caller starts the computation again instead of failing."""
    flight: SingleFlight[object] = SingleFlight()
    calls = 0

    async def factory() -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError  # the work's own cancellation, not the caller's
        return "again"

    assert await flight.do("k", factory) == "again"
    assert calls == 2


async def test_abandoned_work_can_be_kept_running():
    flight: SingleFlight[object] = SingleFlight(cancel_when_abandoned=False)
    computation = Computation()
    caller = asyncio.ensure_future(flight.do("k", computation))
    await wait_for_waiters(flight, "k", 1)
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    assert len(flight) == 1  # still computing
    # A new caller joins the computation that is still running instead of starting another.
    joiner = asyncio.ensure_future(flight.do("k", computation))
    await wait_for_waiters(flight, "k", 1)
    computation.release.set()
    assert await joiner == "mask"
    assert (computation.runs, computation.cancelled) == (1, False)


async def test_a_failure_nobody_waits_for_is_not_reported_as_unretrieved():
    reported: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        flight: SingleFlight[object] = SingleFlight(cancel_when_abandoned=False)
        computation = Computation(error=RuntimeError("nobody listens"))
        caller = asyncio.ensure_future(flight.do("k", computation))
        await wait_for_waiters(flight, "k", 1)
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        computation.release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(flight) == 0
        del caller
        gc.collect()  # an unretrieved exception is reported when its task is collected
    finally:
        loop.set_exception_handler(None)
    assert reported == []
