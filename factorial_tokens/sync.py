"""SyncTokenManager: the TokenManager for blocking code (Django, Flask, Celery, scripts).

One :class:`~factorial_tokens.TokenManager` runs on an event loop in a background thread
that the facade owns; every method submits a coroutine to that loop and blocks until it
finishes. So the manager's guarantees (single-flight per tenant, leases across processes,
a cached token without I/O) hold across all the threads of a process, and one manager
lives as long as the facade, instead of one per ``asyncio.run`` call.

* Started on first use, stopped by :meth:`SyncTokenManager.close` (or ``with``), or at
  interpreter exit.
* Thread-safe: call it from any number of threads at once.
* Fork-safe: a forked child (a Celery prefork worker, gunicorn) that uses the facade
  starts its own loop thread and its own manager; the parent's connections are left
  untouched, never closed or reused from the child.

* A facade dropped without :meth:`~SyncTokenManager.close` closes its manager and ends its
  thread when it is collected, with a ResourceWarning. A store built by a factory is
  closed with the facade.

Limitations: async event listeners (``on_event``) run on the loop thread and must not
call the facade, ``close`` included (that would wait on itself; it raises RuntimeError
instead); plain listeners run on the events thread and may. A store *instance* cannot
follow a fork, so pass a URL, or a zero-argument factory that builds the store.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread  # registers its exit hook first, so ours runs before it
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ._errors import ManagerClosed
from ._keepalive import DEFAULT_MAX_AGE, KeepAliveReport
from ._manager import TokenManager
from ._models import CallbackResult, Credentials, FactorialApp, TenantInfo, TokenSet, redact_url
from .store import MemoryStore, Store

__all__ = ["SyncTokenManager"]

log = logging.getLogger("factorial_tokens")

T = TypeVar("T")

_LIVE: weakref.WeakSet[SyncTokenManager] = weakref.WeakSet()

#: How long a dropped facade's finalizer waits for its manager to close.
_ABANDON_WAIT = 10.0


class _Runner:
    """One event loop in one daemon thread, with the manager that lives on it.
    ``owns_store``: the manager's store was built for it (by a factory), and is closed
    with it."""

    def __init__(self, build: Callable[[], TokenManager], *, owns_store: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.pid = os.getpid()
        self.owns_store = owns_store
        self.calls: set[asyncio.Task[Any]] = set()  # of callers' threads (loop thread only)
        self.thread = threading.Thread(target=self._run, name="factorial-tokens", daemon=True)
        self.thread.start()
        try:
            self.manager = self.submit(self._open(build)).result()
        except BaseException:
            self.stop()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _open(self, build: Callable[[], TokenManager]) -> TokenManager:
        manager = build()
        try:
            await manager.open()
        except BaseException:
            await self._close(manager)
            raise
        return manager

    async def _close(self, manager: TokenManager) -> None:
        try:
            await manager.aclose()
        finally:
            if self.owns_store:
                await manager.store.aclose()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def call(self, make: Callable[[TokenManager], Awaitable[T]]) -> T:
        """``make(manager)``, counted among the calls in flight that :meth:`finish` awaits."""
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        try:
            return await make(self.manager)
        finally:
            self.calls.discard(task)

    async def finish(self) -> None:
        """Let the calls in flight end (for as long as a caller may wait for a refresh),
        close the manager, then cancel what is left: no caller's thread waits forever."""
        if self.calls:
            await asyncio.wait(set(self.calls), timeout=self.manager.wait_timeout)
        await self._close(self.manager)
        for task in self.calls:
            task.cancel()
        if self.calls:
            await asyncio.wait(set(self.calls), timeout=5.0)

    def stop(self) -> None:
        """End the loop thread (which closes the loop: the caller's thread may run a loop
        of its own, an async view, which forbids run_until_complete there)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    def abandon(self, facade: str) -> None:
        """The facade was dropped without :meth:`close`: close its manager and end the
        thread (waiting for it unless this runs on that very thread), then warn."""
        if self.pid != os.getpid() or self.loop.is_closed():
            return  # a forked child's copy of its parent's runner: not this process's

        async def end() -> None:
            try:
                await self.finish()
            finally:
                self.loop.stop()

        ending = end()
        try:
            self.loop.call_soon_threadsafe(self.loop.create_task, ending)
        except RuntimeError:  # the loop closed meanwhile
            ending.close()
            return
        if threading.current_thread() is not self.thread:
            self.thread.join(_ABANDON_WAIT)
        # Last: a warning turned into an error must not keep the thread running.
        warnings.warn(
            f"unclosed {facade}: close it, or use it in a with block", ResourceWarning, stacklevel=2
        )


class SyncTokenManager:
    """A blocking, thread-safe :class:`~factorial_tokens.TokenManager` (see the module doc).

    Args:
        app: the OAuth application.
        store: a store URL (``sqlite:///path``, ``redis://...``, ``postgresql://...``), or a
            zero-argument callable returning a new Store (called on the facade's loop
            thread, and again in a forked child; the facade closes it). ``memory://`` is
            one process only, as always.
        **options: passed to :class:`~factorial_tokens.TokenManager` (``leeway``,
            ``lease_ttl``, ``keyring``, ``on_event``, ...). ``session`` is refused: an
            aiohttp session belongs to one event loop.

    Raises ConfigurationError (bad time budgets) or TypeError (unknown option) at once.
    Every method raises what its :class:`~factorial_tokens.TokenManager` twin raises, and
    ManagerClosed after :meth:`close`. The manager's own deadlines bound every call.
    """

    def __init__(self, app: FactorialApp, store: str | Callable[[], Store], **options: Any) -> None:
        if "session" in options:
            raise TypeError("SyncTokenManager makes its own HTTP session; do not pass session=")
        if not isinstance(store, str) and not callable(store):
            raise TypeError("store must be a URL or a zero-argument callable returning a Store")
        # Options and time budgets are checked now, not at first use: a probe that is
        # never opened (no store, no session, no loop).
        TokenManager(app, MemoryStore(), **options)
        self.app = app
        self._store = store
        self._options = options
        self._lock = threading.Lock()
        self._runner: _Runner | None = None
        self._abandon: weakref.finalize[Any, Any] | None = None
        self._closed = False
        _LIVE.add(self)

    def __repr__(self) -> str:
        where = redact_url(self._store) if isinstance(self._store, str) else "<factory>"
        return f"SyncTokenManager(client_id={self.app.client_id!r}, store={where!r})"

    def __enter__(self) -> SyncTokenManager:
        self._ensure()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the loop thread -----------------------------------------------------------------

    def _build(self) -> TokenManager:
        store = self._store if isinstance(self._store, str) else self._store()
        return TokenManager(self.app, store, **self._options)

    def _ensure(self) -> _Runner:
        runner = self._runner
        if runner is not None and runner.pid == os.getpid():
            return runner
        with self._lock:
            if self._closed:
                raise ManagerClosed("this SyncTokenManager is closed; create a new one")
            runner = self._runner
            if runner is None or runner.pid != os.getpid():
                # In a forked child the parent's loop thread does not exist: start afresh and
                # leave the parent's loop and connections alone (closing them could tell a
                # server goodbye on the parent's behalf).
                runner = self._runner = _Runner(self._build, owns_store=not isinstance(self._store, str))
                # Dropped without close(), the facade still ends its thread and manager.
                self._abandon = weakref.finalize(self, runner.abandon, repr(self))
            return runner

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork

    def _call(self, make: Callable[[TokenManager], Awaitable[T]]) -> T:
        runner = self._ensure()
        if threading.current_thread() is runner.thread:
            raise RuntimeError("SyncTokenManager called from its own loop thread (an event listener?)")

        try:
            return runner.submit(runner.call(make)).result()
        except concurrent.futures.CancelledError:
            raise ManagerClosed("the SyncTokenManager was closed during this call") from None

    def run(self, fn: Callable[[TokenManager], Awaitable[T]]) -> T:
        """Run ``fn(manager)`` on the facade's loop with the async manager; return its result.

        For what has no blocking twin, e.g. a whole API exchange with ``manager.client``::

            async def employees(tm):
                async with tm.client("acme") as api, api.get("/api/...") as resp:
                    return await resp.json()

            data = stm.run(employees)

        ``fn`` must not keep the manager beyond its own run.
        """
        return self._call(fn)

    def close(self) -> None:
        """Close the manager and stop the loop thread. Calls in flight from other threads
        finish first (for up to the manager's ``wait_timeout``); those still running then
        raise ManagerClosed.

        Idempotent. After it every call raises ManagerClosed.
        """
        runner = self._runner
        if runner is not None and threading.current_thread() is runner.thread:
            raise RuntimeError("SyncTokenManager closed from its own loop thread (an event listener?)")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            runner, self._runner = self._runner, None
            if self._abandon is not None:
                self._abandon.detach()
        if runner is None or runner.pid != os.getpid():
            return
        try:
            runner.submit(runner.finish()).result()
        finally:
            runner.stop()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # -- the TokenManager's API, blocking ------------------------------------------------

    def authorization_url(
        self, tenant: str, *, company: bool = False, scope: str | None = None, binding: str | None = None
    ) -> str:
        """See :meth:`TokenManager.authorization_url`."""

        async def call(tm: TokenManager) -> str:
            return tm.authorization_url(tenant, company=company, scope=scope, binding=binding)

        return self._call(call)

    def connect_link(self, tenant: str, *, ttl: float = 3600.0, base_url: str | None = None) -> str:
        """See :meth:`TokenManager.connect_link`."""

        async def call(tm: TokenManager) -> str:
            return tm.connect_link(tenant, ttl=ttl, base_url=base_url)

        return self._call(call)

    def check_connect_link(self, link: object, tenant: str) -> None:
        """See :meth:`TokenManager.check_connect_link`."""

        async def call(tm: TokenManager) -> None:
            tm.check_connect_link(link, tenant)

        return self._call(call)

    def complete_callback(
        self,
        *,
        state: object,
        code: object = None,
        error: object = None,
        binding: str | None = None,
        allow_company_change: bool = False,
    ) -> CallbackResult:
        """See :meth:`TokenManager.complete_callback`: a framework-neutral OAuth callback
        (signed state, browser binding, single-use state, one exchange per code)."""
        return self._call(
            lambda tm: tm.complete_callback(
                state=state,
                code=code,
                error=error,
                binding=binding,
                allow_company_change=allow_company_change,
            )
        )

    def tenant_from_state(self, state: object) -> str:
        """See :meth:`TokenManager.tenant_from_state`."""

        async def call(tm: TokenManager) -> str:
            return tm.tenant_from_state(state)

        return self._call(call)

    def access_token(self, tenant: str) -> str:
        """See :meth:`TokenManager.access_token`."""
        return self._call(lambda tm: tm.access_token(tenant))

    def token_set(self, tenant: str) -> TokenSet:
        """See :meth:`TokenManager.token_set`."""
        return self._call(lambda tm: tm.token_set(tenant))

    def token_rejected(self, tenant: str, token: str) -> str:
        """See :meth:`TokenManager.token_rejected`."""
        return self._call(lambda tm: tm.token_rejected(tenant, token))

    def refresh(self, tenant: str) -> TokenSet:
        """See :meth:`TokenManager.refresh`."""
        return self._call(lambda tm: tm.refresh(tenant))

    def tokens(self, tenant: str) -> TokenSet:
        """See :meth:`TokenManager.tokens`."""
        return self._call(lambda tm: tm.tokens(tenant))

    def exchange_code(self, tenant: str, code: str, *, allow_company_change: bool = False) -> TokenSet:
        """See :meth:`TokenManager.exchange_code`."""
        return self._call(
            lambda tm: tm.exchange_code(tenant, code, allow_company_change=allow_company_change)
        )

    def credentials(self, tenant: str) -> Credentials:
        """See :meth:`TokenManager.credentials`."""
        return self._call(lambda tm: tm.credentials(tenant))

    def revoke(self, tenant: str) -> None:
        """See :meth:`TokenManager.revoke`."""
        return self._call(lambda tm: tm.revoke(tenant))

    def forget(self, tenant: str) -> None:
        """See :meth:`TokenManager.forget`."""
        return self._call(lambda tm: tm.forget(tenant))

    def tenants(self) -> list[TenantInfo]:
        """See :meth:`TokenManager.tenants`."""
        return self._call(lambda tm: tm.tenants())

    def keep_alive_once(self, *, max_age: float = DEFAULT_MAX_AGE, jitter: float = 0.2) -> KeepAliveReport:
        """One keepalive pass (see :meth:`TokenManager.keep_alive`), e.g. from a Celery beat task."""
        return self._call(lambda tm: tm.keep_alive(max_age=max_age, jitter=jitter, once=True))


def _close_all() -> None:
    for facade in list(_LIVE):
        try:
            facade.close()
        except Exception:  # the others are closed all the same
            log.exception("closing %r at exit failed", facade)


def _reset_in_child() -> None:
    for facade in list(_LIVE):
        facade._after_fork_in_child()


# At exit the facades close before the thread pools that stores use are shut down:
# threading's own exit hooks run (newest first) before those pools stop, and long before
# ``atexit`` handlers, which would find the pools gone. ``concurrent.futures`` uses the
# same hook; plain ``atexit`` is the fallback.
_register = getattr(threading, "_register_atexit", atexit.register)
_register(_close_all)
os.register_at_fork(after_in_child=_reset_in_child)
