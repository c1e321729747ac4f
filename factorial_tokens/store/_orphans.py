"""OrphanLeases: leases a store won for callers that were cancelled while it asked."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

from .._errors import StoreUnavailable
from ._values import Lease, TenantKey

__all__ = ["OrphanLeases"]


class OrphanLeases:
    """Gives back the leases won for callers that are gone (cancelled after the
    acquisition left), so that no tenant waits out a whole lease for nothing.

    A store wraps each acquisition in :meth:`sending` and hands the lease of an answer that
    found no caller to :meth:`give_back`; ``aclose`` awaits :meth:`wait`. A lease whose
    owner is asking for it again meanwhile is kept: a resend by the owner of a live lease
    gets it back (the contract), and releasing it would take it from under the resend.
    """

    def __init__(self, release: Callable[[Lease], Awaitable[object]], *, store: str) -> None:
        self._release = release
        self._log = logging.getLogger(f"factorial_tokens.{store}")
        self._store = store
        self._sending: Counter[tuple[str, str]] = Counter()  # (digest, owner) acquisitions out
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def sending(self, key: TenantKey, owner: str) -> Iterator[None]:
        """Around one acquisition of ``key`` by ``owner``."""
        sent = (key.digest, owner)
        self._sending[sent] += 1
        try:
            yield
        finally:
            self._sending[sent] -= 1
            if not self._sending[sent]:
                del self._sending[sent]

    def give_back(self, lease: Lease | None) -> None:
        """Release ``lease`` (won for a caller that is gone) in a task of its own."""
        if lease is None:
            return
        task = asyncio.get_running_loop().create_task(self._give_back(lease), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back(self, lease: Lease) -> None:
        if self._sending[(lease.key.digest, lease.owner)]:
            return  # its owner asks again: the resend gets this live lease
        try:
            await self._release(lease)
        except StoreUnavailable as exc:  # it expires on its own
            self._log.info("%s store: could not give back an unclaimed lease: %s", self._store, exc)

    async def wait(self, timeout: float) -> None:
        """Wait, up to ``timeout`` seconds, for the give-backs under way."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
