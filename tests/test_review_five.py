"""Fifth review: bugs left or introduced by the fixes in 51c6b37..main (each test fails
on the code its docstring names)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

import pytest

from factorial_tokens import (
    EventKind,
    FactorialApp,
    ProviderError,
    ReauthorizationRequired,
    TokenEvent,
    TokenManager,
)
from factorial_tokens._events import EventDispatcher
from factorial_tokens.store import TenantKey, TenantStatus
from factorial_tokens.testing import FakeFactorial, RefreshMode

from .conftest import CLIENT_ID, REDIRECT_URI
from .stores import open_backend

BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}


# -- a short client secret: its characters are not an error code's ---------------------------


@pytest.mark.parametrize("name", ["postgres", "redis"])
@pytest.mark.parametrize("secret", ["a", "grant"])
async def test_a_short_client_secret_does_not_hide_invalid_grant(name: str, secret: str, tmp_path: Path) -> None:
    """``_without_pieces`` redacts a secret shorter than 8 characters by matching the whole
    of it anywhere, and ``_error_code`` drops any code it "shares a piece" with: with a
    client secret ``a`` (or ``grant``) the provider's ``invalid_grant`` is dropped and read
    as ``invalid_response``. A dead grant is then never marked: the tenant stays ACTIVE and
    every caller asks Factorial again."""
    async with FakeFactorial(
        client_id=CLIENT_ID,
        client_secret=secret,
        redirect_uri=REDIRECT_URI,
        refresh_mode=RefreshMode.REVOKE_AT_REFRESH,
        reuse_detection=True,
    ) as sim:
        app = FactorialApp(
            client_id=CLIENT_ID, client_secret=secret, redirect_uri=REDIRECT_URI, base_url=sim.base_url
        )
        async with open_backend(name, tmp_path) as backend:
            async with TokenManager(app, backend.store, **BUDGETS) as tm:
                await tm.exchange_code("acme", sim.issue_code(company_id=1))
                sim.revoke_company(1)
                with pytest.raises((ReauthorizationRequired, ProviderError)) as info:
                    await tm.refresh("acme")
                stored = await backend.store.read(TenantKey(CLIENT_ID, "acme"))
                assert isinstance(info.value, ReauthorizationRequired), repr(info.value)
                assert stored is not None and stored.status is TenantStatus.NEEDS_REAUTH


# -- the events thread ---------------------------------------------------------------------


def _ev(name: str) -> TokenEvent:
    return TokenEvent(EventKind.REFRESHED, name)


async def test_a_thread_started_by_an_event_after_close_stops_too() -> None:
    """``_run`` times out only once it saw a ``_STOP`` (``stopping``): a late event published
    after ``aclose`` stopped the thread (a cancelled refresh emits while the manager closes
    its store) starts a new thread, whose ``stopping`` is False: it blocks on the queue for
    good, and the closed manager never calls ``aclose`` again (a leaked thread per manager)."""
    dispatcher = EventDispatcher()
    seen: list[str] = []
    dispatcher.add(lambda event: seen.append(event.tenant))
    dispatcher.publish(_ev("first"))
    await dispatcher.aclose()
    assert dispatcher._thread is None
    dispatcher.publish(_ev("late"))  # after close
    late = dispatcher._thread
    assert late is not None
    for _ in range(300):
        if not late.is_alive():
            break
        await asyncio.sleep(0.01)
    assert seen == ["first", "late"]
    assert not late.is_alive(), "the thread started by an event after close never stops"


def test_an_event_published_by_a_listener_as_the_thread_stops_does_not_strand_later_ones() -> None:
    """An event published while the stopping thread drains (``_woken`` was just unset, so it
    sets it and queues a wake-up) is delivered by that same drain; the thread then finds
    nothing pending and goes, leaving ``_woken`` set and a stale wake-up queued. The next
    event sees ``_woken`` set: it queues nothing, starts no thread, is never delivered, and
    ``flush`` (no thread) says all was. Here the publish racing the stop is forced: it comes
    as the thread takes ``_STOP`` (aclose), and its listener emits one more event."""
    from factorial_tokens._events import _STOP

    dispatcher = EventDispatcher()
    seen: list[str] = []

    def listener(event: TokenEvent) -> None:
        seen.append(event.tenant)
        if event.tenant == "racing":
            dispatcher.publish(_ev("echo"))  # a listener that acts, and so emits

    dispatcher.add(listener)
    fired: list[bool] = []

    class Queue(queue.SimpleQueue):  # type: ignore[type-arg]
        def get(self, block: bool = True, timeout: float | None = None) -> object:
            item = super().get(block, timeout)
            if item is _STOP and not fired:
                fired.append(True)
                # another thread publishes just as the thread wakes with _STOP
                other = threading.Thread(target=dispatcher.publish, args=(_ev("racing"),))
                other.start()
                other.join(5)
            return item

    dispatcher._queue = Queue()
    dispatcher.publish(_ev("first"))
    asyncio.run(dispatcher.aclose())
    assert fired
    deadline = time.monotonic() + 3
    while dispatcher._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    dispatcher.publish(_ev("after"))
    assert asyncio.run(dispatcher.flush(2.0))
    deadline = time.monotonic() + 2
    while "after" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["first", "racing", "echo", "after"], seen
