"""Batcher: the calls of one kind made in one turn of the event loop, sent as one batch.

With thousands of tenants due at once, most of a primitive's client CPU is not the
command but its plumbing: a pool checkout and return, a send, a timer, a task wake-up. A
batch (one statement for many rows in Postgres, one pipeline in Redis) pays it once for
many callers. Alone, a call waits one turn of the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Batcher"]

log = logging.getLogger("factorial_tokens")

I = TypeVar("I")  # noqa: E741  # an item: what one caller asks
R = TypeVar("R")  # its result


class Batcher(Generic[I, R]):
    """Coalesces calls into batches for ``send``, at most ``concurrency`` batches in flight.

    ``send(items)`` returns one outcome per item, in order: a result, or an exception to
    raise to that item's caller (never shared: ``send`` builds one per item). If ``send``
    itself raises, every caller of the batch gets its own copy of the error. Calls made
    while ``concurrency`` batches are in flight wait and leave together in the next one,
    so batches grow with the load. A cancelled caller is left out of a batch not yet sent,
    and its result, if sent, goes to ``orphaned`` (or is dropped), even when it came
    before the cancellation but the caller never ran to see it; the other callers are
    not affected. ``orphaned`` gets the item and its result, so that a lease won for
    nobody can be given back.
    """

    def __init__(
        self,
        send: Callable[[list[I]], Awaitable[Sequence[R | BaseException]]],
        *,
        concurrency: int,
        size: int,
        cancelled: Callable[[], BaseException],
        orphaned: Callable[[I, R], None] | None = None,
    ) -> None:
        self._send = send
        self._orphaned = orphaned  # what to do with a result whose caller is gone
        self._concurrency = concurrency
        self._size = size
        self._cancelled = cancelled  # what callers of a batch whose drainer was cancelled get
        self._queue: deque[tuple[I, asyncio.Future[R]]] = deque()
        self._drainers: set[asyncio.Task[None]] = set()
        # The drainer that will take the queue on its next step (at most one), so calls of
        # one turn start one task, not one each.
        self._collector: asyncio.Task[None] | None = None

    async def __call__(self, item: I) -> R:
        """Send ``item`` in the next batch; its outcome."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled after its answer was set but before it ran again: the answer is
            # as orphaned as one that came after the cancellation.
            if (
                self._orphaned is not None
                and future.done()
                and not future.cancelled()
                and future.exception() is None
            ):
                self._hand_orphan(item, future.result())
            raise

    def _hand_orphan(self, item: I, result: R) -> None:
        """Give a result whose caller is gone to ``orphaned``; its failure is logged, so
        that the batch's other callers are answered all the same."""
        assert self._orphaned is not None
        try:
            self._orphaned(item, result)
        except Exception:
            log.exception("the handler of a result whose caller is gone failed")

    @property
    def in_flight(self) -> set[asyncio.Task[None]]:
        """The tasks sending batches now (a copy)."""
        return set(self._drainers)

    def _kick(self) -> None:
        if self._queue and self._collector is None and len(self._drainers) < self._concurrency:
            # In an empty context: the batch is no one caller's (their log fields stay theirs).
            task = asyncio.get_running_loop().create_task(self._drain(), context=contextvars.Context())
            self._collector = task
            self._drainers.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        # A callback, not a ``finally``: it also runs for a drainer cancelled before it began.
        self._drainers.discard(task)
        if self._collector is task:
            self._collector = None
        self._kick()  # what was queued while every drainer was busy

    async def _drain(self) -> None:
        me = asyncio.current_task()
        while True:
            batch: list[tuple[I, asyncio.Future[R]]] = []
            while self._queue and len(batch) < self._size:
                item, future = self._queue.popleft()
                if not future.done():  # a caller cancelled before its batch left
                    batch.append((item, future))
            if self._collector is me:
                self._collector = None
            if not batch:
                return
            self._kick()  # more than one batch's worth queued: another drainer takes the rest
            await self._run(batch)
            if self._collector is not None or not self._queue:
                return
            self._collector = me

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._send([item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(outcomes)} answers")
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else None
            for _, future in batch:
                if not future.done():
                    future.set_exception(self._cancelled() if failure is None else _own(failure))
            if failure is None:
                raise
            return
        for (item, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                if self._orphaned is not None and not isinstance(outcome, BaseException):
                    self._hand_orphan(item, outcome)
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _own(exc: Exception) -> Exception:
    """A copy of ``exc`` for one caller (same type, message and cause): an exception object
    raised in several tasks would collect all their tracebacks."""
    try:
        mine = copy.copy(exc)
    except Exception:  # an exception type that cannot be rebuilt from its args: shared
        return exc
    mine.__cause__ = exc.__cause__
    mine.__suppress_context__ = True
    return mine.with_traceback(None)
