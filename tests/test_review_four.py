"""Adversarial review four: each test failed on main (cb82dae) when written."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from factorial_tokens import FactorialApp, Keyring, ProviderError, TokenManager, TokenSealError
from factorial_tokens._oauth import OAuthClient
from factorial_tokens.store import TenantKey, Update
from factorial_tokens.testing import FakeFactorial

from .conftest import CLIENT_ID, REDIRECT_URI, app_for
from .stores import open_backend

BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}


async def _tamper_status(name: str, backend: Any, tenant: str) -> None:
    """Someone with write access but no key sets a column the store cannot read."""
    key = TenantKey(CLIENT_ID, tenant)
    if name == "sqlite":
        import sqlite3

        conn = sqlite3.connect(backend.url.removeprefix("sqlite:///"))
        try:
            conn.execute("UPDATE tenants SET status = 'bogus' WHERE tenant = ?", (tenant,))
            conn.commit()
        finally:
            conn.close()
    else:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
        try:
            await client.hset(backend.store._rec(key.digest), "status", "bogus")
        finally:
            await client.aclose()


@pytest.mark.parametrize("name", ["sqlite", "redis"])
async def test_keepalive_does_not_report_an_unreadable_record_as_healthy(
    name: str, sim: FakeFactorial, tmp_path: Path
) -> None:
    """``unreadable_record`` lists a tampered row as ACTIVE with no expiry: keepalive files
    it under ``non_expiring`` (company tokens that never expire), never tries it, and its
    report is ``ok`` (the CLI's ``keepalive --once`` exits 0). A record sealed under a
    missing key, equally unopenable, lands in ``failed``: the tampered one must not look
    healthier than that."""
    async with open_backend(name, tmp_path) as backend:
        async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
            await tm.exchange_code("broken", sim.issue_code(company_id=1))
            await _tamper_status(name, backend, "broken")
            with pytest.raises(TokenSealError):  # the manager itself knows it cannot be opened
                await tm.access_token("broken")
            report = await tm.keep_alive(max_age=0.01, jitter=0, once=True)
            assert "broken" not in report.non_expiring, report
            assert report.ok is False, report


async def test_an_echoed_short_client_secret_is_redacted(raw_server: Any) -> None:
    """``_excerpt`` used to replace every given secret whole; now only 8-character pieces
    are looked for, so a secret shorter than 8 characters (``FactorialApp`` accepts any
    non-empty client secret) echoed by the provider reaches the ProviderError verbatim."""
    short = "hunter2"
    app = FactorialApp(
        client_id=CLIENT_ID, client_secret=short, redirect_uri=REDIRECT_URI, base_url=raw_server["base_url"]
    )

    async def answer(request: web.Request) -> web.StreamResponse:
        sent = str((await request.post())["client_secret"])
        return web.Response(status=500, text=f"<h1>Internal error</h1> bad client secret {sent}")

    raw_server["handler"] = answer
    client = OAuthClient(app, timeout=5.0)
    try:
        with pytest.raises(ProviderError) as info:
            await client.refresh("r" * 40, deadline=asyncio.get_running_loop().time() + 5)
    finally:
        await client.aclose()
    texts = f"{info.value} {info.value!r} {info.value.description}"
    assert short not in texts, texts


def test_an_event_published_as_the_events_thread_stops_does_not_keep_it_forever() -> None:
    """On ``_STOP`` the thread stops "after delivering what was published meanwhile"; but an
    event published between its last look and its stop check makes it go round again, and
    the ``_STOP`` it consumed is gone: it delivers the event, then blocks on the queue
    forever (a leaked thread per closed manager; ``aclose`` warns a listener is stuck)."""
    import threading

    from factorial_tokens._events import _STOP, EventDispatcher, EventKind, TokenEvent

    seen: list[str] = []
    dispatcher = EventDispatcher()
    dispatcher.add(lambda event: seen.append(event.tenant))
    dispatcher.publish(TokenEvent(EventKind.FORGOTTEN, "first"))
    thread = dispatcher._thread
    assert thread is not None
    with dispatcher._lock:  # hold the thread at its stop check
        dispatcher._queue.put(_STOP)
        time.sleep(0.3)
        late = threading.Thread(target=dispatcher.publish, args=(TokenEvent(EventKind.FORGOTTEN, "late"),))
        late.start()
        time.sleep(0.3)  # "late" is pending, its wake-up queued; publish waits for the lock
    late.join(5)
    thread.join(5)
    assert seen == ["first", "late"]
    assert not thread.is_alive(), "the events thread outlived its _STOP"
