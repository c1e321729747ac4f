"""Third review: reproductions of bugs left by the fixes in 5d9bc9c..main."""

from __future__ import annotations

import asyncio
import collections
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from factorial_tokens import ConfigurationError, StoreUnavailable, TokenManager, TokenSealError
from factorial_tokens._events import EventDispatcher, EventKind, TokenEvent
from factorial_tokens.sealing import Keyring
from factorial_tokens.store import TenantKey
from factorial_tokens.store.sqlite import SQLiteStore
from factorial_tokens.testing import FakeFactorial

from .conftest import app_for

BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}


async def test_an_event_published_as_the_events_thread_stops_is_not_stranded() -> None:
    """The events thread checks ``_pending`` under ``_lock``, but ``_put`` reads
    ``_thread`` without it: an event published between that check and
    ``self._thread = None`` sets ``_woken`` and queues a wake-up for a thread that is
    about to return. Nothing starts another one: that event, and every later one
    (``_woken`` stays set), is never delivered, and ``flush`` says all was."""
    dispatcher = EventDispatcher()
    got: list[str] = []
    dispatcher.add(lambda event: got.append(event.tenant))
    raced: list[bool] = []
    armed: list[bool] = []

    class Pending(collections.deque):  # type: ignore[type-arg]
        def __bool__(self) -> bool:
            answer = len(self) > 0
            stopping = threading.current_thread().name == "factorial-tokens-events" and dispatcher._lock.locked()
            if stopping and armed and not raced:
                raced.append(True)
                # Another thread (or the loop, while aclose awaits the join) publishes now.
                other = threading.Thread(
                    target=dispatcher.publish, args=(TokenEvent(EventKind.REFRESHED, "during-stop"),)
                )
                other.start()
                other.join()
            return answer

    dispatcher._pending = Pending()
    dispatcher.publish(TokenEvent(EventKind.REFRESHED, "before"))
    assert await dispatcher.flush(2.0)
    armed.append(True)  # from here the lock is taken only on the stop path
    await dispatcher.aclose()
    assert raced, "the stop path was not reached"
    dispatcher.publish(TokenEvent(EventKind.REFRESHED, "after"))
    assert await dispatcher.flush(2.0)
    for _ in range(100):
        if "after" in got:
            break
        await asyncio.sleep(0.02)
    assert got == ["before", "during-stop", "after"], got


async def test_an_unreadable_dsn_with_min_size_is_a_configuration_error() -> None:
    """``ValueError`` from asyncpg's DSN reading is mapped to ConfigurationError only
    around ``pool.acquire``; with ``min_size`` > 0 ``create_pool`` connects (and reads
    the DSN) first, outside that mapping, and the caller gets a bare ValueError."""
    from factorial_tokens_postgres import PostgresStore

    store = PostgresStore(dsn="postgresql://postgres:hunter2@fe80::1:5432/test", min_size=1)
    try:
        with pytest.raises(ConfigurationError):
            await store.read(TenantKey("ns", "acme"))
    finally:
        await store.aclose()


async def test_rekey_does_not_report_success_over_a_row_it_could_not_read(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    """``rekey`` promises TokenSealError naming every record it could not open, so an
    operator never retires a key some record still needs. ``tenants()`` now drops a
    tampered row with a log line, so rekey never sees it and answers success: the row
    (its payload still sealed under k1) is left behind silently."""
    path = tmp_path / "tokens.db"
    raw = os.urandom(32)
    k1 = Keyring([("k1", raw)])
    both = Keyring([("k2", os.urandom(32)), ("k1", raw)])
    async with TokenManager(app_for(sim), SQLiteStore(path), keyring=k1, **BUDGETS) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=111))
        await tm.exchange_code("broken", sim.issue_code(company_id=222))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE tenants SET updated_at = 'yesterday' WHERE tenant = 'broken'")
    conn.commit()
    conn.close()
    async with TokenManager(app_for(sim), SQLiteStore(path), keyring=both, **BUDGETS) as tm:
        with pytest.raises(TokenSealError, match="broken"):
            await tm.rekey(both)


async def test_a_tampered_row_is_reported_as_a_seal_error_event(sim: FakeFactorial, tmp_path: Path) -> None:
    """A row that cannot be read back is now a TokenSealError "as a payload that cannot
    be opened"; but only the payload case emits ``seal_error`` (in ``_usable``). The row
    case raises from ``acquire``/``read`` before that: the caller gets TokenSealError and
    the listeners (alerting) hear nothing."""
    path = tmp_path / "tokens.db"
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=111))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE tenants SET status = 'bogus' WHERE tenant = 'acme'")
    conn.commit()
    conn.close()
    seen: list[TokenEvent] = []
    async with TokenManager(app_for(sim), SQLiteStore(path), on_event=seen.append, **BUDGETS) as tm:
        with pytest.raises(TokenSealError):
            await tm.access_token("acme")
        await tm.flush_events()
    assert [event.kind for event in seen] == [EventKind.SEAL_ERROR], seen


async def test_a_piece_of_a_refresh_token_with_spaces_is_redacted() -> None:
    """Refresh tokens may now hold spaces (VSCHAR), but the piece rule looks only inside
    runs of token characters, which a space ends: a 16-character echo of such a token,
    made of words under 8 characters, is kept whole in the error."""
    from aiohttp import web

    from factorial_tokens import FactorialApp, ProviderError
    from factorial_tokens._oauth import OAuthClient

    refresh = "rt0 kq7 zx9 mw2 plv ytr " + "f" * 40

    async def token(request: web.Request) -> web.StreamResponse:
        piece = str((await request.post())["refresh_token"])[:16]
        return web.json_response(
            {"error": "invalid_grant", "error_description": f"token {piece} was revoked"}, status=400
        )

    server = web.Application()
    server.router.add_post("/oauth/token", token)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    app = FactorialApp(
        client_id="id",
        client_secret="secret-4f9d2b7e1c",
        redirect_uri="https://example.com/cb",
        base_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
    )
    client = OAuthClient(app, timeout=5.0)
    try:
        with pytest.raises(ProviderError) as info:
            await client.refresh(refresh, deadline=asyncio.get_running_loop().time() + 5)
    finally:
        await client.aclose()
        await runner.cleanup()
    assert refresh[:12] not in f"{info.value} {info.value!r} {info.value.description}", info.value.description

