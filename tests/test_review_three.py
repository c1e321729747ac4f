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
