"""Notifier: the in-process fan-out of change announcements every store feeds."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType

from ._contract import ChangeListener, Watch
from ._values import TenantKey

log = logging.getLogger("factorial_tokens")

__all__ = ["Notifier"]

#: Run once a watch is registered, before the block (a store's subscription getting ready).
Ready = Callable[[], Awaitable[None]]


class _EventWatch:
    """One registration's wake-up: a flag, and a future only while someone waits.

    What an ``asyncio.Event`` with ``wait_for`` gives, for less: a manager enters a watch
    for every tenant it refreshes or waits for, thousands at once in a cold start, and
    ``wait_for`` costs a task per wait.

    ``notice``: what the newest announcement carried (a commit's notice), or ``None``."""

    __slots__ = ("_changed", "_poll", "_waiter", "notice")

    def __init__(self, poll: float | None) -> None:
        self._changed = False
        self._poll = poll
        self._waiter: asyncio.Future[None] | None = None
        self.notice: bytes | None = None

    def set(self, notice: bytes | None = None) -> None:
        # An announcement without a notice (a release, a replace) may follow one with: its
        # waiter reads then.
        self.notice = notice
        self._changed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def changed(self) -> bool:
        """True once an announcement came that no ``wait`` has taken yet."""
        return self._changed

    async def wait(self, timeout: float) -> bool:
        if self._poll is not None:
            # Jitter keeps many pollers from hitting the backend in lockstep.
            timeout = min(timeout, self._poll * random.uniform(0.5, 1.5))
        if not self._changed:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(max(timeout, 0.0), _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._changed:
                return False
        self._changed = False
        return True


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Watching:
    """``async with notifier.watch(key)``: registered on entry, removed on exit."""

    __slots__ = ("_digest", "_notifier", "_ready", "_watch")

    def __init__(self, notifier: Notifier, digest: str, ready: Ready | None) -> None:
        self._notifier = notifier
        self._digest = digest
        self._ready = ready
        self._watch = _EventWatch(notifier.poll)

    async def __aenter__(self) -> Watch:
        watchers = self._notifier._watchers.setdefault(self._digest, set())
        watchers.add(self._watch)
        if self._ready is not None:
            try:
                await self._ready()
            except BaseException:
                self._remove()
                raise
        return self._watch

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        watchers = self._notifier._watchers.get(self._digest)
        if watchers is not None:
            watchers.discard(self._watch)
            if not watchers:
                del self._notifier._watchers[self._digest]


class Notifier:
    """In-process fan-out of change announcements, keyed by ``TenantKey.digest``.

    Stores feed it from their push channel (pub/sub, LISTEN/NOTIFY) and from their own
    writes; ``poll`` bounds every wait for stores whose channel can lose messages or
    that have none (SQLite). Must be used from the event loop's thread.
    """

    def __init__(self, poll: float | None = None) -> None:
        self.poll = poll
        self._watchers: dict[str, set[_EventWatch]] = {}
        self._listeners: list[ChangeListener] = []

    def notify(self, digest: str, notice: bytes | None = None) -> None:
        """Wake every watcher of ``digest`` and tell every change listener; ``notice``: what
        the announcement carried (a commit's ``Update.notice``), kept by each watcher."""
        for watch in self._watchers.get(digest, ()):
            watch.set(notice)
        self._tell(digest)

    def notify_all(self) -> None:
        """Wake every watcher and tell every listener that anything may have changed
        (``listener(None)``): after a reconnect, when announcements may have been lost."""
        for watchers in self._watchers.values():
            for watch in watchers:
                watch.set()
        self._tell(None)

    def _tell(self, digest: str | None) -> None:
        """Call every change listener; one that raises is logged and the others still told
        (an application's callback must not starve the manager's, nor the subscription)."""
        for listener in list(self._listeners):
            try:
                listener(digest)
            except Exception:
                log.exception("a change listener failed")

    def watch(self, key: TenantKey, ready: Ready | None = None) -> AbstractAsyncContextManager[Watch]:
        """Register a watcher for ``key`` for the duration of the block; ``ready``, if
        given, is awaited once it is registered, before the block."""
        return _Watching(self, key.digest, ready)

    @property
    def watching(self) -> bool:
        """True while any watcher or listener is registered."""
        return bool(self._watchers or self._listeners)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Register a listener; returns the function that removes it."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe
