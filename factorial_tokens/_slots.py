"""The provider slots of one process: at most ``max_refreshes`` refreshes at once, the
waiting ones started in random order.

Random, not first come first served: several workers handed the same burst of due
tenants in the same order (a cold start, a cron fanning out) would otherwise reach each
tenant at the same moment, and for every tenant one worker's lease would be refused and
it would wait for the other's announcement and read again. In random order a worker
mostly reaches a tenant after another worker committed it, and its acquisition answers
with the fresh record (two store round trips for the pair less per tenant, and no
wake-up). Every waiter's expected wait stays what it was.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import random
from types import TracebackType


def _give_up(waiter: asyncio.Future[bool], _: object) -> None:
    if not waiter.done():
        waiter.set_result(False)  # stays in the list, skipped when picked


class Slots:
    """``async with slots:`` holds one of ``size`` slots; a released slot passes to a
    waiter picked at random."""

    __slots__ = ("_free", "_quiet", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        # The context ``_give_up`` runs in (asyncio would copy the caller's for each
        # callback); one per instance: a context is entered by one thread at a time.
        self._quiet = contextvars.Context()
        # Cancelled waiters, and those that gave up, stay until picked and are skipped then.
        self._waiters: list[asyncio.Future[bool]] = []

    def locked(self) -> bool:
        """True when no slot is free (a caller would wait)."""
        return self._free == 0

    async def take(self, stop: asyncio.Future[None] | None = None) -> bool:
        """Take a slot (True), waiting for one if none is free; or give up waiting (False,
        no slot taken) once ``stop`` is done."""
        if self._free > 0:  # a free slot means nobody waits: released slots pass to waiters
            self._free -= 1
            return True
        if stop is not None and stop.done():
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)

        give_up = functools.partial(_give_up, waiter)
        if stop is not None:
            stop.add_done_callback(give_up, context=self._quiet)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # handed a slot, then cancelled: pass it on
            raise
        finally:
            if stop is not None:
                stop.remove_done_callback(give_up)

    def release(self) -> None:
        """Give a taken slot back: to a waiter picked at random, or free."""
        waiters = self._waiters
        while waiters:
            index = random.randrange(len(waiters))
            waiter = waiters[index]
            waiters[index] = waiters[-1]
            waiters.pop()
            if not waiter.done():
                waiter.set_result(True)  # the slot is the waiter's now
                return
        self._free += 1

    async def __aenter__(self) -> None:
        await self.take()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
