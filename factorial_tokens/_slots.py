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
import random
from types import TracebackType


class Slots:
    """``async with slots:`` holds one of ``size`` slots; a released slot passes to a
    waiter picked at random."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        # Cancelled waiters, and those set to False, stay until picked and are skipped then.
        self._waiters: list[asyncio.Future[bool]] = []

    def locked(self) -> bool:
        """True when no slot is free (a caller would wait)."""
        return self._free == 0

    def take_free(self) -> bool:
        """Take a free slot (True); False when none is free."""
        if self._free > 0:  # a free slot means nobody waits: released slots pass to waiters
            self._free -= 1
            return True
        return False

    def queue(self) -> asyncio.Future[bool]:
        """Queue for a slot: the future turns True once a released slot is handed to it.
        Whoever no longer wants it sets it to False (it is skipped then); awaited with
        :meth:`wait`, which passes on a slot handed to a waiter that was cancelled."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def wait(self, waiter: asyncio.Future[bool]) -> bool:
        """Await a :meth:`queue` future: True when it was handed a slot."""
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # handed a slot, then cancelled: pass it on
            raise

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
        if not self.take_free():
            await self.wait(self.queue())

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
