"""Events the manager emits: for alerts (a company must reconnect) and audit trails.

Listeners run off the refresh path: :class:`EventDispatcher` hands each event to one
background thread per manager, which calls the listeners in order. A slow listener
delays only the events after it, a failing one is logged; neither delays nor breaks a
refresh. A listener that returns a coroutine has it scheduled on the manager's loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["EventKind", "TokenEvent"]

log = logging.getLogger("factorial_tokens.events")


class EventKind(enum.Enum):
    """What happened to a tenant's tokens."""

    EXCHANGED = "exchanged"  # a code became tokens
    REFRESHED = "refreshed"  # this process refreshed the tenant's tokens
    REAUTHORIZATION_REQUIRED = "reauthorization_required"  # the grant is dead
    REVOKED = "revoked"  # revoked at Factorial and forgotten
    FORGOTTEN = "forgotten"  # removed from the store
    SEAL_ERROR = "seal_error"  # a stored record could not be opened
    REFRESH_FAILED = "refresh_failed"  # a refresh this process made failed (``error``)
    RATE_LIMITED = "rate_limited"  # Factorial answered 429 (``retry_after``)
    STALE_SERVED = "stale_served"  # the store was down: a cached, still valid token was served
    LEASE_LOST = "lease_lost"  # a refresher lost its lease (renewal refused or fenced out)
    REFRESH_TIMEOUT = "refresh_timeout"  # a caller gave up waiting for another worker's refresh
    RECONNECTED = "reconnected"  # a new grant replaced the tenant's previous one (revoked)
    COMPANY_MISMATCH = "company_mismatch"  # a grant of another company was refused and revoked


@attrs.frozen
class TokenEvent:
    """One event. ``fingerprint`` identifies the access token without revealing it.

    ``duration``: seconds the operation took, where it has one (a refresh from lease
    acquired to commit, an exchange, a wait); ``error``: the error's type and message
    (never a token); ``retry_after``: the seconds Factorial asked to wait (429).
    ``company_id`` is the grant's company where known (``exchanged``, ``reconnected``,
    ``company_mismatch``); ``previous_company_id`` the company of the replaced or kept grant.
    """

    kind: EventKind
    tenant: str
    fingerprint: str | None = None
    version: int | None = None
    detail: str = ""
    at: float = attrs.field(factory=time.time)
    duration: float | None = None
    error: str | None = None
    retry_after: float | None = None

    company_id: str | None = None
    previous_company_id: str | None = None


#: Called with each event; may return a coroutine (scheduled on the manager's loop).
Listener = Callable[[TokenEvent], object]

_STOP = object()
_WAKE = object()
#: Seconds a stopping thread, kept by an event that came as it stopped, waits for more.
_IDLE = 0.5


class EventDispatcher:
    """Delivers events to listeners on one background thread, in the order emitted."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        # Events wait here; the thread is woken only when it may be asleep (``_woken``
        # unset): a burst of events (a cold start emits thousands) costs one wake-up,
        # not one each.
        self._pending: collections.deque[tuple[TokenEvent, list[Listener]]] = collections.deque()
        self._woken = False
        self._closed = False  # aclose was called: its threads stop once idle
        self._listener_task: asyncio.Task[Any] | None = None  # an async listener running

    def add(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def publish(self, event: TokenEvent) -> None:
        """Queue ``event`` for the listeners; returns at once."""
        if not self._listeners:
            return
        if self._loop is None:
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()
        self._pending.append((event, list(self._listeners)))
        if not self._woken:
            self._woken = True
            self._put(_WAKE)

    def _put(self, item: object) -> None:
        self._queue.put(item)
        # Under the lock, always (once per burst): a thread stopping decides under it too,
        # so either it sees this item's event, or this sees it gone and starts another.
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="factorial-tokens-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        stopping = self._closed  # a thread started by an event published after aclose
        while True:
            try:
                # Once stopping, a thread with nothing to do goes (a late event starts another).
                item = self._queue.get(timeout=_IDLE if stopping else None)
            except queue.Empty:
                item = _STOP
            # Unset before taking the events: one published from now on wakes the thread again.
            self._woken = False
            while self._pending:
                event, listeners = self._pending.popleft()
                for listener in listeners:
                    if listener not in self._listeners:
                        continue  # removed since the event was published
                    try:
                        result = listener(event)
                        if inspect.iscoroutine(result):
                            self._schedule(result)
                    except Exception:
                        log.exception(
                            "event listener failed on %s",
                            event.kind.value,
                            extra={"event": "listener_failed"},
                        )
            if item is _STOP:
                stopping = True
                with self._lock:
                    # An event published since the look above (its wake-up is queued) is
                    # delivered before the thread goes; otherwise the next event starts a
                    # new thread, never while this one still runs. Unset before the look:
                    # a publisher that comes after it must wake a thread (a wake-up queued
                    # for what was just delivered is stale).
                    self._woken = False
                    if not self._pending:
                        self._thread = None
                        return
            if isinstance(item, threading.Event):
                item.set()  # a flush: every event published before it was delivered above

    def _schedule(self, coro: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            log.warning("an async event listener could not be scheduled: no running loop")
            return
        future = asyncio.run_coroutine_threadsafe(self._listening(coro), loop)
        future.add_done_callback(_log_failure)
        # Its end is awaited, as a plain listener's return is: one event at a time, in
        # order, and a flush counts it delivered once it ran. (So an async listener must
        # not await flush_events: that would wait for itself, until flush's timeout.)
        while True:
            try:
                future.result(timeout=_IDLE)
                return
            except concurrent.futures.TimeoutError:
                if loop.is_closed():
                    future.cancel()  # its loop is gone: it never runs
                    return
                # (A loop only paused between two run_until_complete runs it later.)
            except BaseException:  # it failed: _log_failure logs it
                return

    async def _listening(self, coro: Any) -> None:
        """Run an async listener's coroutine, known as such while it runs: the events
        thread waits for it, so a flush it asks for cannot wait for that thread."""
        self._listener_task = asyncio.current_task()
        try:
            await coro
        finally:
            self._listener_task = None

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event published so far was handed to the listeners.

        Returns False if that took longer than ``timeout`` (a listener is stuck), and at
        once when an async listener asks (the events thread is waiting for it).
        """
        if self._thread is None:
            return True
        if asyncio.current_task() is self._listener_task:
            return False
        done = threading.Event()
        self._queue.put(done)
        return await asyncio.to_thread(done.wait, timeout)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (for up to ``timeout``), then stop the thread.

        A thread stuck in a listener is left to finish: it stops after delivering what
        was published meanwhile, and no other thread calls the listeners until then."""
        thread = self._thread
        if thread is None:
            return
        await self.flush(timeout)
        self._closed = True
        self._queue.put(_STOP)
        if asyncio.current_task() is self._listener_task:
            return  # an async listener closes: the thread stops once it returns
        await asyncio.to_thread(thread.join, 1.0)
        if thread.is_alive():
            log.warning("an event listener is still running; its events are delivered when it returns")


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        failure = future.exception()
        log.error("an async event listener failed: %r", failure, extra={"event": "listener_failed"})
