"""PushListener: one push channel per store (pub/sub, LISTEN/NOTIFY) feeding its Notifier.

A store that can be told of other processes' writes subclasses it and writes only
:meth:`PushListener.listen`: connect, subscribe, call ``connected()``, then hand each
message to :meth:`PushListener.deliver` until the connection is lost. The base class owns
the rest, the same for every backend:

* started lazily (on the first ``watch`` or ``on_change``), once per event loop;
* a lost connection is retried with a jittered, doubling backoff;
* a first-try gate: the first ``watch`` waits (bounded) until the first subscription was
  made or failed, so an announcement made between the watch and its read is not missed,
  and an unreachable backend slows nobody down after that;
* announcements carry the writer's ``origin`` (``"<digest> <origin>"``); the store
  notifies its own writes locally at once, so their echo is skipped (it would only drop
  the cache entry the manager just filled);
* a commit's announcement may go on with its ``Update.notice`` (``"<digest> <origin>
  <notice>"``, in the form :meth:`PushListener.notice_of` reads): the watchers of the
  tenant keep it, so that a worker waiting for that refresh need not read the record;
* after a reconnect (or a first subscription that followed a failure) every watcher is
  woken with ``notify_all()``, since announcements may have been lost meanwhile. The
  Notifier's jittered poll bounds every wait in the meantime.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import logging
import random
import secrets
from collections.abc import Callable

from ._notifier import Notifier

__all__ = ["PushListener"]


class PushListener(abc.ABC):
    """The base of a store's single push subscription; see the module docstring.

    Args:
        notifier: the store's Notifier, fed with every digest announced by others.
        name: names the listener task and its log lines (``"redis"``, ``"postgres"``).
        log: where a lost connection is reported.
        origin: this store's tag in announcements (random when not given).
        backoff: the first and the longest wait (seconds) between two attempts.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        name: str,
        log: logging.Logger,
        origin: str | None = None,
        backoff: tuple[float, float] = (0.05, 1.0),
    ) -> None:
        self.notifier = notifier
        self.name = name
        self.origin = origin or secrets.token_hex(8)
        self._log = log
        self._backoff = backoff
        self._task: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()  # set once the first attempt has finished, either way
        self._failed_once = False
        self._gave_up = False  # a ready() timed out before the first subscription
        self._stopping = False
        self._listening = False
        #: How many times the subscription was (re)made; for health checks and tests.
        self.connections = 0

    @abc.abstractmethod
    async def listen(self, connected: Callable[[], None]) -> None:
        """Connect and subscribe, call ``connected()`` once the subscription is confirmed,
        then :meth:`deliver` every message until the connection is lost (raise) or
        :attr:`stopping` turns True (return). Close what it opened before leaving."""

    def message(self, digest: str) -> str:
        """The announcement of a change of ``digest`` by this store."""
        return f"{digest} {self.origin}"

    def notice_of(self, text: bytes) -> bytes:
        """A notice from its form in an announcement: as it is (a channel that carries only
        text overrides this, e.g. with hex)."""
        return text

    def deliver(self, data: bytes | str) -> None:
        """Hand an announcement to the Notifier, unless it is this store's own echo."""
        raw = data.encode() if isinstance(data, str) else data
        parts = raw.split(b" ", 2)
        origin = parts[1].decode("ascii", "replace") if len(parts) > 1 else ""
        if origin == self.origin:
            return
        notice = None
        if len(parts) == 3:
            try:
                notice = self.notice_of(parts[2])
            except ValueError:
                notice = None  # unreadable: its watchers read the record instead
        self.notifier.notify(parts[0].decode("ascii", "replace"), notice)

    @property
    def started(self) -> bool:
        """True once the listener task runs."""
        return self._task is not None

    @property
    def settled(self) -> bool:
        """True once the listener task runs on the running loop and its first attempt to
        subscribe finished: :meth:`ready` would return at once, and :meth:`start` would do
        nothing (a store's watch can skip both)."""
        task = self._task
        if task is None or not self._tried.is_set():
            return False
        try:
            return task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:  # no running loop
            return False

    @property
    def stopping(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._stopping

    @property
    def listening(self) -> bool:
        """True while the subscription is up."""
        return self._listening

    def start(self) -> None:
        """Start the listener task unless it runs (needs a running loop: RuntimeError otherwise)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and task.get_loop() is not loop and task.get_loop().is_closed():
            self._task = None  # its loop is gone (a new asyncio.run): start over on this one
            self._tried = asyncio.Event()
        if self._task is None and not self._stopping:
            # Its own context: it outlives the caller who started it (and its log fields).
            self._task = loop.create_task(
                self._run(), name=f"factorial-tokens-{self.name}", context=contextvars.Context()
            )

    async def ready(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the first attempt to subscribe to finish."""
        if self._tried.is_set():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._tried.wait()), timeout)
        except TimeoutError:
            # The caller goes on unsubscribed (it reads, caches): what is announced before
            # the subscription is in effect is lost, so its first connection tells all.
            self._gave_up = True

    def _connected(self) -> None:
        self.connections += 1
        self._listening = True
        if self.connections > 1 or self._failed_once or self._gave_up:
            self.notifier.notify_all()  # announcements may have been lost while away
        self._tried.set()

    async def _run(self) -> None:
        first, longest = self._backoff
        delay = first
        while not self._stopping:
            before = self.connections
            try:
                try:
                    await self.listen(self._connected)
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if self._stopping or task is None or task.cancelling():
                        raise
                    # Not this task's cancellation: a driver's own (a read cut short on a
                    # dropped connection), a failure like any other.
                    raise ConnectionError("the subscription was cancelled from within") from exc
            except Exception as exc:  # the listener must outlive any failure: retry
                self._failed_once = True
                if not self._stopping:
                    # The class only: a driver's message may carry a host or a user name.
                    self._log.warning(
                        "%s change subscription lost (%s); resubscribing", self.name, type(exc).__name__
                    )
            finally:
                self._listening = False
                self._tried.set()
            if self._stopping:
                return
            if self.connections > before:
                delay = first  # it was up: start the backoff over
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, longest)

    async def aclose(self) -> None:
        """Stop the listener task (its ``listen`` closes the connection)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5.0)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: it was logged already
