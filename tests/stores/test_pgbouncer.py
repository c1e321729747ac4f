"""PostgresStore through a real PgBouncer in transaction pooling (``?pgbouncer=true``).

The PgBouncers are throwaway (``tests/pgbouncer_server.py``): own port, own temp dir, in
front of the tests' PostgreSQL. The conformance suite, schema creation by many starters,
poll-only wake-ups, NOTIFY still reaching a worker connected directly, and the control that
shows why the mode exists: the default mode's prepared statements break as soon as PgBouncer
hands the next transaction to another server. TokenManager stampedes run on every store in
``tests/test_manager.py``.

Never skipped: without a ``pgbouncer`` binary (``scripts/ensure-services.sh`` installs it)
these tests fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from factorial_tokens_postgres import SCHEMA_VERSION, PostgresStore

from factorial_tokens import StoreUnavailable, TokenManager
from factorial_tokens.store import Store, TenantKey, TenantStatus, Update, store_from_url
from factorial_tokens.testing import FakeFactorial, StoreConformance

from .. import postgres_server
from ..pgbouncer_server import TempPgBouncer, store_url
from .test_postgres import mixed_acquire_batch, mixed_batch

POOL_SIZE = 4  # server connections PgBouncer may open to PostgreSQL


@pytest.fixture(scope="module")
def bouncer() -> Iterator[TempPgBouncer]:
    with TempPgBouncer(pool_size=POOL_SIZE) as running:
        yield running


@pytest.fixture(scope="module")
def module_url(bouncer: TempPgBouncer) -> str:
    return store_url(bouncer, max_size="4")


def _update(payload: bytes) -> Update:
    return Update(payload, TenantStatus.ACTIVE, None, time.time())


def _schema(url: str) -> str:
    return url.split("schema=")[1].split("&")[0]


def _pgbouncer_store(url: str) -> PostgresStore:
    store = store_from_url(url)
    assert isinstance(store, PostgresStore) and store.pgbouncer
    return store


class TestPostgresStoreThroughPgBouncer(StoreConformance):
    # No LISTEN through PgBouncer: other instances' writes are seen by the poll only.
    cross_instance_wakeups = False

    @pytest.fixture
    async def store(self, module_url: str) -> AsyncIterator[PostgresStore]:
        self.url = module_url
        store = _pgbouncer_store(module_url)
        yield store
        await store.aclose()
        assert store.listens == 0  # never LISTENed

    async def open_peer(self, store: Store) -> Store:
        return _pgbouncer_store(self.url)


async def test_traffic_is_multiplexed_by_transaction_pooling(bouncer: TempPgBouncer) -> None:
    """Three stores with four connections each share at most POOL_SIZE server connections:
    every statement is its own transaction, handed to whichever server is free."""
    url = store_url(bouncer, max_size="4")
    stores = [_pgbouncer_store(url) for _ in range(3)]
    before = int(bouncer.stats().get("total_xact_count", "0"))
    try:
        keys = [TenantKey("pooling", f"t{i}") for i in range(24)]

        async def work(store: PostgresStore, key: TenantKey) -> bytes | None:
            await store.replace(key, _update(key.tenant.encode()))
            record = await store.read(key)
            return None if record is None else record.payload

        payloads = await asyncio.gather(*(work(stores[i % 3], key) for i, key in enumerate(keys)))
        assert payloads == [key.tenant.encode() for key in keys]
        pool = bouncer.pool()
        clients = int(pool["cl_active"]) + int(pool["cl_waiting"])
        servers = sum(int(pool[k]) for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
        assert pool["pool_mode"] == "transaction"
        assert clients > POOL_SIZE >= servers >= 1, pool
        # One transaction per replace; the reads of one turn of the loop go as one batch.
        assert int(bouncer.stats()["total_xact_count"]) - before >= len(keys) + len(stores)
    finally:
        for store in stores:
            await store.aclose()


async def test_a_mixed_batch_gives_each_caller_its_own_answer(module_url: str) -> None:
    """Batched reads, commits and releases (one statement each, arrays as parameters, no
    statement cache) through transaction pooling: each caller gets its own answer."""
    store = _pgbouncer_store(module_url)
    try:
        await mixed_batch(store, f"batch-{secrets.token_hex(4)}")
    finally:
        await store.aclose()


async def test_many_starters_create_the_schema_once(bouncer: TempPgBouncer) -> None:
    """Six stores start at once on an empty schema, three times over the same (warm) server
    connections: the migration's transaction-level advisory lock works through transaction
    pooling, and a starter that waited never trips over the schema another one created."""
    for _ in range(3):
        url = store_url(bouncer, max_size="2")
        schema = _schema(url)
        stores = [_pgbouncer_store(url) for _ in range(6)]
        try:
            await asyncio.gather(*(store.check() for store in stores))
            await asyncio.gather(
                *(s.replace(TenantKey("starters", f"w{i}"), _update(b"x")) for i, s in enumerate(stores))
            )
        finally:
            for store in stores:
                await store.aclose()
        con = await asyncpg.connect(bouncer.target, timeout=5)  # directly, not through PgBouncer
        try:
            tables = await con.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
            assert sorted(r["table_name"] for r in tables) == ["code_claims", "meta", "tenants"]
            meta = await con.fetch(f'SELECT name, value FROM "{schema}".meta')
            assert [(r["name"], r["value"]) for r in meta] == [("schema_version", SCHEMA_VERSION)]
            assert await con.fetchval(f'SELECT count(*) FROM "{schema}".tenants') == 6
        finally:
            await con.close()


async def test_without_listen_a_waiter_is_woken_by_the_poll(bouncer: TempPgBouncer) -> None:
    """Another process's write is never announced here (no LISTEN): the poll ends the wait
    early (``wait`` returns False), and the waiter's re-read finds the write."""
    url = store_url(bouncer, poll="0.2")
    one, two = _pgbouncer_store(url), _pgbouncer_store(url)  # two processes' stores
    key = TenantKey("wake", "acme")
    try:
        await one.replace(key, _update(b"first"))
        async with one.watch(key) as watch:
            await two.replace(key, _update(b"second"))
            async with asyncio.timeout(30):  # only a poll tick can end a 60 s wait early
                assert await watch.wait(60) is False
            record = await one.read(key)
            assert record is not None and record.payload == b"second"
        assert one.listens == two.listens == 0 and not one.listening
    finally:
        await one.aclose()
        await two.aclose()


async def test_notify_sent_through_pgbouncer_reaches_a_direct_listener(bouncer: TempPgBouncer) -> None:
    """A worker connected to PostgreSQL directly still gets push wake-ups (its poll is 60 s,
    so only NOTIFY can wake it) for writes made through PgBouncer."""
    url = store_url(bouncer)
    direct = PostgresStore.from_url(
        postgres_server.store_url(bouncer.target, schema=_schema(url), poll="60", pgbouncer="false")
    )
    bounced = _pgbouncer_store(url)
    key = TenantKey("notify", "acme")
    try:
        await bounced.replace(key, _update(b"first"))
        async with direct.watch(key) as watch:
            assert direct.listening
            await bounced.replace(key, _update(b"second"))
            assert await watch.wait(10), "no NOTIFY through PgBouncer"
        record = await direct.read(key)
        assert record is not None and record.payload == b"second"
    finally:
        await direct.aclose()
        await bounced.aclose()


@pytest.mark.parametrize("pgbouncer", [False, True], ids=["default-mode", "pgbouncer-mode"])
async def test_why_the_mode_exists(pgbouncer: bool) -> None:
    """The control: the default mode caches named prepared statements per connection, which
    live on ONE server connection; once PgBouncer runs the next transaction on another
    server, the statement is gone. Deterministic: the only idle server is taken by a
    transaction held open, so the next read must run on a second, fresh server."""
    with TempPgBouncer(pool_size=2) as own:
        url = store_url(own, pgbouncer=str(pgbouncer).lower(), max_size="2")
        store = PostgresStore.from_url(url)
        assert store.pgbouncer is pgbouncer
        key = TenantKey("control", "acme")
        blocker = await asyncpg.connect(own.url, statement_cache_size=0, timeout=5)
        try:
            await store.replace(key, _update(b"x"))  # migrates, then writes: server one
            record = await store.read(key)  # server one again (the only one)
            assert record is not None and record.payload == b"x"
            async with blocker.transaction():
                await blocker.execute("SELECT 1")  # holds server one
                if pgbouncer:
                    record = await store.read(key)
                    assert record is not None and record.payload == b"x"
                else:
                    with pytest.raises(StoreUnavailable) as failed:
                        await store.read(key)
                    assert isinstance(failed.value.__cause__, asyncpg.exceptions.InvalidSQLStatementNameError)
                pool = own.pool()
                assert int(pool["cl_active"]) == 2  # the store's one connection and the blocker
                assert int(pool["sv_active"]) + int(pool["sv_idle"]) + int(pool["sv_used"]) == 2
        finally:
            await blocker.close()
            await store.aclose()


async def test_a_mixed_acquire_batch_gives_each_caller_its_own_answer(module_url: str) -> None:
    """Batched plain and conditional acquisitions through transaction pooling: each caller
    gets what the same call alone would."""
    store = _pgbouncer_store(module_url)
    try:
        await mixed_acquire_batch(store, f"acq-{secrets.token_hex(4)}")
    finally:
        await store.aclose()


# -- found by a reviewer: what other workers announce never reaches a PgBouncer worker ------


@contextlib.asynccontextmanager
async def _two_workers(
    bouncer: TempPgBouncer,
) -> AsyncIterator[tuple[FakeFactorial, TokenManager, TokenManager, PostgresStore]]:
    """A simulator and two managers, each on a PgBouncer-mode store of its own (poll 0.25 s,
    the change poll every ~0.5 s); also the first manager's store."""
    from ..conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, app_for

    url = store_url(bouncer)
    async with FakeFactorial(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI, access_token_ttl=3600
    ) as sim:
        one, two = _pgbouncer_store(url), _pgbouncer_store(url)
        try:
            async with (
                TokenManager(app_for(sim), one, lease_ttl=6.0, provider_timeout=2.0) as a,
                TokenManager(app_for(sim), two, lease_ttl=6.0, provider_timeout=2.0) as b,
            ):
                yield sim, a, b, one
        finally:
            await one.aclose()
            await two.aclose()


async def test_another_workers_forget_evicts_a_pgbouncer_workers_cache(bouncer: TempPgBouncer) -> None:
    """Worker B (PgBouncer mode) caches a tenant's token; worker A forgets the tenant. With
    no LISTEN, B's ``on_change`` listeners only ever hear B's own writes, and the mode's
    poll bounds the waits of watchers only: nothing drops B's cached entry, so B serves the
    forgotten (still valid at Factorial) token for its whole lifetime, an hour here, where
    the other stores evict it at once. Not even after eight of the mode's poll periods."""
    from factorial_tokens import TenantNotConnected

    async with _two_workers(bouncer) as (sim, a, b, _):  # poll: 0.25 s
        token = (await a.exchange_code("acme", sim.issue_code(company_id=1))).access_token
        assert await b.access_token("acme") == token  # cached by B
        await a.forget("acme")
        deadline = time.monotonic() + 8 * 0.25
        while time.monotonic() < deadline:
            try:
                served = await b.access_token("acme")
            except TenantNotConnected:
                return
            assert served == token
            await asyncio.sleep(0.05)
        pytest.fail("worker B still serves the forgotten tenant's token 2 s after the forget")


async def test_a_pgbouncer_worker_honours_another_workers_429_hold(bouncer: TempPgBouncer) -> None:
    """Worker A is answered 429 Retry-After: 30 and records the fleet's hold in the store
    (and announces it). Worker B, in PgBouncer mode, was open already: it learns a hold only
    from announcements (``_on_change`` of the hold digest) or at ``open()``, and without a
    ``refresh_rate`` its refreshes never ask the store. So B sends its own token request
    during the hold, when the fleet's back-pressure says no worker may (the other stores
    hold B within one announcement)."""
    from factorial_tokens import ProviderError
    from factorial_tokens.testing import Fault

    from ..conftest import CLIENT_ID

    async with _two_workers(bouncer) as (sim, a, b, one):
        await a.exchange_code("acme", sim.issue_code(company_id=1))
        sim.inject(Fault.RATE_LIMITED, retry_after=30)
        with pytest.raises(ProviderError):
            await a.refresh("acme")
        async with asyncio.timeout(5):
            while await one.hold(CLIENT_ID, 0.0) <= time.time() + 20:
                await asyncio.sleep(0.01)
        await asyncio.sleep(4 * 0.25)  # four of the mode's poll periods
        sent = sim.stats.token_requests
        with contextlib.suppress(ProviderError):
            await b.refresh("acme")
        assert sim.stats.token_requests == sent, "worker B sent a token request during the fleet's hold"


# -- found by a reviewer: the change poll compares with what the store saw, not what was cached --


async def test_reading_a_tenant_outside_the_cache_hides_another_workers_change(
    bouncer: TempPgBouncer,
) -> None:
    """Worker B caches a tenant's token; worker A connects the tenant again (a new grant,
    the old one revoked at Factorial). Before B's change poll runs, B reads the tenant
    through ``tm.tokens()``, which does not touch the cache; ``PostgresStore.read`` calls
    ``_ChangePoll.saw`` with the new version all the same, so ``_seen`` now matches the
    database and the poll never announces the change: B's cache keeps the old grant's
    access token for its whole lifetime (an hour here). Without the ``tokens()`` call the
    poll evicts it within two of its periods."""

    async with _two_workers(bouncer) as (sim, a, b, _):  # poll: 0.25 s, change poll every ~0.5 s
        # Three tenants one after the other: a poll round that happens to fall
        # between A's write and B's read (a few ms of its 0.5 s) evicts that one.
        tokens: dict[str, tuple[str, str]] = {}
        for tenant in ("acme", "globex", "initech"):
            old = (await a.exchange_code(tenant, sim.issue_code(company_id=1))).access_token
            assert await b.access_token(tenant) == old  # cached by B
            new = (await a.exchange_code(tenant, sim.issue_code(company_id=1))).access_token
            assert new != old
            assert (await b.tokens(tenant)).access_token == new  # B reads, does not cache
            tokens[tenant] = (old, new)
        await asyncio.sleep(8 * 0.25)  # four rounds of the change poll
        stale: dict[str, str] = {}
        for tenant, (_old, new) in tokens.items():
            served = await b.access_token(tenant)
            if served != new:
                stale[tenant] = f"old grant's token, active at Factorial: {sim.is_active(served)}"
        assert not stale, f"2 s after the change worker B still serves {stale}"


async def test_a_damaged_hold_instant_is_announced_on_every_poll(bouncer: TempPgBouncer) -> None:
    """The fleet's hold row holds NaN (a damaged value: the manager's ``_learn_hold``
    already treats a non-finite hold as none). ``_ChangePoll.poll`` compares instants with
    ``!=``, and NaN != NaN: the hold digest is announced on every round (~2 a second) in
    every PgBouncer worker for ever, and each announcement makes every manager on the store
    run ``_learn_hold`` (one more statement). Nothing changed: one announcement at most."""
    from factorial_tokens.store import hold_digest

    url = store_url(bouncer)
    namespace = f"ns-{secrets.token_hex(4)}"
    store = _pgbouncer_store(url)
    heard: list[str | None] = []
    try:
        await store.hold(namespace, 1.0)  # the row exists (and the schema)
        con = await asyncpg.connect(bouncer.target)
        try:
            await con.execute(
                f"UPDATE {store._names.tenants} SET expires_at = 'NaN' WHERE namespace = $1 AND tenant = ''",
                namespace,
            )
        finally:
            await con.close()
        store.on_change(heard.append)
        await store.hold(namespace, 0.0)  # seen: NaN
        await asyncio.sleep(2.5)  # about four rounds of the change poll
        told = heard.count(hold_digest(namespace))
        assert told <= 1, f"the unchanged hold was announced {told} times in 2.5 s"
    finally:
        await store.aclose()
