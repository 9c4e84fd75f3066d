"""Coalesce identical concurrent work: one computation per key, its outcome shared by every caller.

Used in front of the model so that N clients posting the same image at once (a retry storm, a
thundering herd after a cache eviction) cost one forward pass, not N.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    """One shared computation and how many callers still wait for it."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[T]) -> None:
        self.task = task
        self.waiters = 0


class SingleFlight(Generic[T]):
    """`do(key, factory)`: the first caller for a key starts `factory()`; callers arriving while it
    runs await the same Task and get the same result or the same exception. The key is forgotten once
    the computation ends, so later calls start afresh (the result cache is what remembers results).

    The computation runs as its own Task, so a caller that is cancelled (client gone, deadline) stops
    waiting without cancelling it for the others. When the last waiter is gone the computation is
    cancelled too, since nobody is left to use it, unless `cancel_when_abandoned` is False (e.g. when
    the work also fills a cache worth filling).
    """

    def __init__(self, *, cancel_when_abandoned: bool = True) -> None:
        self.cancel_when_abandoned = cancel_when_abandoned
        self._flights: dict[str, _Flight[T]] = {}

    def __len__(self) -> int:
        """Computations in flight."""
        return len(self._flights)

    def waiters(self, key: str) -> int:
        """Callers currently awaiting the computation for `key` (0 when none runs)."""
        flight = self._flights.get(key)
        return flight.waiters if flight else 0

    async def do(self, key: str, coro_factory: Callable[[], Awaitable[T]]) -> T:
        """The outcome of the computation for `key`, started with `coro_factory()` if none is running."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                flight = _Flight(asyncio.ensure_future(coro_factory()))
                self._flights[key] = flight
                flight.task.add_done_callback(lambda task, key=key: self._finished(key, task))
            flight.waiters += 1
            try:
                # shield: cancelling this caller must not cancel the task the other callers await.
                return await asyncio.shield(flight.task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling() == 0 and flight.task.cancelled():
                    # Not this caller's cancellation: the computation it joined was abandoned by the others
                    # (cancelled an instant before it ended). Compute afresh rather than fail a live request.
                    continue
                if flight.waiters == 1 and self.cancel_when_abandoned and not flight.task.done():
                    flight.task.cancel()
                    # Forget it now, not when the cancellation lands: a caller arriving in between must start
                    # a fresh computation, not join one that is about to end cancelled.
                    if self._flights.get(key) is flight:
                        del self._flights[key]
                raise
            finally:
                flight.waiters -= 1

    def _finished(self, key: str, task: asyncio.Task[T]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]
        if not task.cancelled():
            # Mark an exception as retrieved: every waiter has it already through its shield, and when all
            # waiters left, asyncio would otherwise log "Task exception was never retrieved".
            task.exception()
