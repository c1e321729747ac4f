"""Notifier: the in-process fan-out of change announcements every store feeds."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from ._contract import ChangeListener, Watch
from ._values import TenantKey

__all__ = ["Notifier"]


class _EventWatch:
    __slots__ = ("_event", "_poll")

    def __init__(self, event: asyncio.Event, poll: float | None) -> None:
        self._event = event
        self._poll = poll

    async def wait(self, timeout: float) -> bool:
        if self._poll is not None:
            # Jitter keeps many pollers from hitting the backend in lockstep.
            timeout = min(timeout, self._poll * random.uniform(0.5, 1.5))
        try:
            await asyncio.wait_for(self._event.wait(), max(timeout, 0.0))
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Notifier:
    """In-process fan-out of change announcements, keyed by ``TenantKey.digest``.

    Stores feed it from their push channel (pub/sub, LISTEN/NOTIFY) and from their own
    writes; ``poll`` bounds every wait for stores whose channel can lose messages or
    that have none (SQLite). Must be used from the event loop's thread.
    """

    def __init__(self, poll: float | None = None) -> None:
        self.poll = poll
        self._events: dict[str, set[asyncio.Event]] = {}
        self._listeners: list[ChangeListener] = []

    def notify(self, digest: str) -> None:
        """Wake every watcher of ``digest`` and tell every change listener."""
        for event in self._events.get(digest, ()):
            event.set()
        for listener in list(self._listeners):
            listener(digest)

    def notify_all(self) -> None:
        """Wake every watcher and tell every listener that anything may have changed
        (``listener(None)``): after a reconnect, when announcements may have been lost."""
        for events in self._events.values():
            for event in events:
                event.set()
        for listener in list(self._listeners):
            listener(None)

    @asynccontextmanager
    async def watch(self, key: TenantKey) -> AsyncIterator[Watch]:
        """Register a watcher for ``key`` for the duration of the block."""
        event = asyncio.Event()
        watchers = self._events.setdefault(key.digest, set())
        watchers.add(event)
        try:
            yield _EventWatch(event, self.poll)
        finally:
            watchers.discard(event)
            if not watchers:
                self._events.pop(key.digest, None)

    @property
    def watching(self) -> bool:
        """True while any watcher or listener is registered."""
        return bool(self._events or self._listeners)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Register a listener; returns the function that removes it."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe
