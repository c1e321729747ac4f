"""PostgresStore against a real PostgreSQL: the conformance suite (PgBouncer mode runs it
through a real PgBouncer in ``test_pgbouncer.py``), schema migration, wake-ups, adversity
(killed backends, a restarted server), many workers starting at once, and hostile tenant ids.

Never skipped: without a server on 127.0.0.1:5432 a throwaway cluster is started, and if
that fails the tests fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
from factorial_tokens_postgres import SCHEMA_VERSION, PostgresStore

from factorial_tokens import (
    ConfigurationError,
    FactorialTokensError,
    InvalidTenant,
    RefreshTimeout,
    StoreUnavailable,
    TokenManager,
    TokenSet,
)
from factorial_tokens.store import (
    Acquisition,
    ClaimState,
    Freshness,
    Lease,
    Record,
    Store,
    TenantKey,
    TenantStatus,
    Update,
    store_from_url,
)
from factorial_tokens.testing import HOSTILE_TENANTS, FakeFactorial, Fault, StoreConformance

from .. import postgres_server
from ..conftest import SimFactory, app_for
from ..postgres_server import TempCluster, store_url
from ..tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def base_url() -> str:
    return postgres_server.server_url()


@pytest.fixture(scope="module")
def module_url(base_url: str) -> Iterator[str]:
    """A store URL on a schema for this module, dropped afterwards."""
    yield store_url(base_url, max_size="4")  # the shared server allows 100 clients in all


class TestPostgresStore(StoreConformance):
    announces_notices = True

    @pytest.fixture
    async def store(self, module_url: str) -> AsyncIterator[PostgresStore]:
        self.url = module_url
        store = store_from_url(module_url)
        assert isinstance(store, PostgresStore) and not store.pgbouncer
        yield store
        await store.aclose()

    async def open_peer(self, store: Store) -> Store:
        return store_from_url(self.url)  # a pool and a LISTEN connection of its own


async def _fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    con = await asyncpg.connect(url.split("?")[0], timeout=5)
    try:
        return list(await con.fetch(query, *args))
    finally:
        await con.close()


def _update(payload: bytes) -> Update:
    return Update(payload, TenantStatus.ACTIVE, None, time.time())


# -- configuration and schema ----------------------------------------------------------


def test_names_are_validated(base_url: str) -> None:
    for bad in (
        'x"; DROP SCHEMA public; --',
        "1abc",
        "",
        "a" * 41,
        "semi;colon",
        "dotted.name",
        "pg_catalog",
    ):
        with pytest.raises(ConfigurationError):
            PostgresStore.from_url(f"{base_url}?schema={bad}")
    with pytest.raises(ConfigurationError):
        PostgresStore(dsn=base_url, table_prefix='t"')
    with pytest.raises(ConfigurationError):
        PostgresStore.from_url(f"{base_url}?pgbouncer=maybe")
    with pytest.raises(ConfigurationError):
        PostgresStore()
    store = PostgresStore.from_url(f"{base_url}?schema=Mixed_Case_1&table_prefix=app_&poll=0.5")
    assert store.schema == "Mixed_Case_1"
    assert "postgres@" not in repr(store) and "Mixed_Case_1" in repr(store)


def test_the_plugin_is_registered_typed_and_exports_its_all() -> None:
    import importlib.metadata
    import importlib.resources

    import factorial_tokens_postgres

    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="factorial_tokens.stores")}
    assert found["postgresql"] == found["postgres"] == "factorial_tokens_postgres:PostgresStore"
    public = {n for n in dir(factorial_tokens_postgres) if not n.startswith("_")} - {"annotations"}
    assert public == set(factorial_tokens_postgres.__all__)
    assert importlib.resources.files("factorial_tokens_postgres").joinpath("py.typed").is_file()
    assert importlib.metadata.requires("factorial-tokens-postgres") is not None


async def test_schema_is_created_versioned_and_idempotent(base_url: str) -> None:
    url = store_url(base_url, table_prefix="app_")
    schema = url.split("schema=")[1].split("&")[0]
    stores = [PostgresStore.from_url(url) for _ in range(3)]
    try:
        for store in stores:
            await store.check()
        rows = await _fetch(
            base_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
        assert sorted(r["table_name"] for r in rows) == ["app_code_claims", "app_meta", "app_tenants"]
        meta = await _fetch(base_url, f'SELECT name, value FROM "{schema}"."app_meta"')
        assert [(r["name"], r["value"]) for r in meta] == [("schema_version", SCHEMA_VERSION)]
        # room on each page for the two updates of every refresh (HOT, no index entry each)
        options = await _fetch(
            base_url, "SELECT reloptions FROM pg_class WHERE oid = $1::regclass", f'"{schema}"."app_tenants"'
        )
        assert options[0]["reloptions"] == ["fillfactor=50"]
        # a newer schema than this package knows is refused, not silently used
        await _fetch(base_url, f'UPDATE "{schema}"."app_meta" SET value = {SCHEMA_VERSION + 1}')
        newer = PostgresStore.from_url(url)
        with pytest.raises(ConfigurationError):
            await newer.check()
        await newer.aclose()
    finally:
        for store in stores:
            await store.aclose()


async def test_migrate_false_reads_a_missing_schema_as_empty_and_creates_nothing(base_url: str) -> None:
    url = store_url(base_url, migrate="false")
    schema = url.split("schema=")[1].split("&")[0]
    key = TenantKey("app", "acme")
    store = PostgresStore.from_url(url)
    try:
        await store.check()
        assert await store.read(key) is None
        assert await store.tenants("app") == []
        with pytest.raises(StoreUnavailable, match="migrate=false"):
            await store.acquire(key, "me", 5.0)
        # Taking a lease only for a due record writes nothing when there is none.
        assert await store.acquire(key, "me", 5.0, unless_fresh=Freshness(time.time(), 1.0)) == Acquisition(
            None, None
        )
        found = await _fetch(base_url, "SELECT nspname FROM pg_namespace WHERE nspname = $1", schema)
        assert found == []
        # Once a migrating store has made it, the read-only one uses it.
        writer = PostgresStore.from_url(url.replace("migrate=false", "migrate=true"))
        await writer.check()
        await writer.aclose()
        assert await store.tenants("app") == []
        assert (await store.acquire(key, "me", 5.0)).lease is not None
    finally:
        await store.aclose()
    # A schema at another version is refused, not migrated.
    await _fetch(base_url, f'UPDATE "{schema}"."meta" SET value = {SCHEMA_VERSION - 1}')
    old = PostgresStore.from_url(url)
    try:
        with pytest.raises(ConfigurationError, match="version"):
            await old.check()
    finally:
        await old.aclose()


async def test_url_options_do_not_reach_asyncpg(base_url: str) -> None:
    url = store_url(base_url, pgbouncer="false", poll="2", command_timeout="5", max_size="3")
    store = PostgresStore.from_url(url + "&application_name=ft_options_test")
    try:
        await store.check()
        rows = await _fetch(
            base_url, "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'ft_options_test'"
        )
        assert rows[0]["n"] >= 1  # asyncpg got the DSN's own options, and not ours
    finally:
        await store.aclose()


async def test_an_injected_pool_is_not_closed(base_url: str) -> None:
    pool = await asyncpg.create_pool(base_url, min_size=0, max_size=4)
    try:
        schema = postgres_server.unique_schema()
        store_url(base_url, schema=schema)  # registers it for dropping
        store = PostgresStore(pool, schema=schema)
        key = TenantKey("inject", "acme")
        async with store.watch(key):
            await store.replace(key, _update(b"x"))
        await store.aclose()
        assert await pool.fetchval("SELECT 1") == 1
        with pytest.raises(StoreUnavailable):
            await store.read(key)
        owned = PostgresStore.from_url(store_url(base_url))
        await owned.check()
        inner = owned._pool
        await owned.aclose()
        assert inner.is_closing()
    finally:
        await pool.close()


async def test_nul_in_a_tenant_id_is_a_bad_id_not_an_outage(module_url: str) -> None:
    store = PostgresStore.from_url(module_url)
    try:
        with pytest.raises(InvalidTenant):
            await store.read(TenantKey("ns", "a\x00b"))
    finally:
        await store.aclose()


async def test_finished_claims_are_pruned_after_the_retention(base_url: str) -> None:
    url = store_url(base_url)
    schema = url.split("schema=")[1].split("&")[0]
    first = PostgresStore.from_url(url)
    key = TenantKey(f"prune-{secrets.token_hex(4)}", "acme")
    try:
        for code in ("old-done", "old-failed", "fresh-done"):
            claim = await first.claim_code(key, code, "one", 30)
            assert await first.advance_code(claim, ClaimState.SENT, 30)
            assert await first.advance_code(claim, ClaimState.DONE, 30)
        # Age two of them beyond the retention (the database clock decides).
        await _fetch(
            base_url,
            f"UPDATE \"{schema}\".code_claims SET expires = clock_timestamp() - interval '25 hours' "
            "WHERE code_hash LIKE 'old-%'",
        )
        # An old finished claim no longer blocks its code (memory store semantics)...
        again = await first.claim_code(key, "old-done", "two", 30)
        assert again.won and again.state is ClaimState.CLAIMED
        # ...and a fresh process prunes the rest on its first claim.
        second = PostgresStore.from_url(url)
        try:
            assert (await second.claim_code(key, "fresh-done", "three", 30)).state is ClaimState.DONE
        finally:
            await second.aclose()
        rows = await _fetch(base_url, f'SELECT code_hash FROM "{schema}".code_claims ORDER BY 1')
        assert [r["code_hash"] for r in rows] == ["fresh-done", "old-done"]
    finally:
        await first.aclose()


async def test_eight_pools_race_for_one_lease_and_one_code(module_url: str) -> None:
    """200 acquires and 200 claims from 8 separate pools at once: one winner each, and
    after the winner releases, fences keep growing."""
    stores = [PostgresStore.from_url(module_url + "&max_size=3") for _ in range(8)]
    key = TenantKey(f"race-{secrets.token_hex(4)}", "acme")
    try:
        await asyncio.gather(*(s.check() for s in stores))
        results = await asyncio.gather(
            *(stores[i % 8].acquire(key, f"o{i}", 30) for i in range(200)),
        )
        leases = [r.lease for r in results if r.lease is not None]
        assert len(leases) == 1
        claims = await asyncio.gather(
            *(stores[i % 8].claim_code(key, "one-code", f"c{i}", 30) for i in range(200)),
        )
        assert sum(c.won for c in claims) == 1
        assert {c.state for c in claims} == {ClaimState.CLAIMED}
        assert await stores[3].release(leases[0])
        again = await asyncio.gather(*(stores[i].acquire(key, f"n{i}", 30) for i in range(8)))
        fences = [r.lease.fence for r in again if r.lease is not None]
        assert len(fences) == 1 and fences[0] > leases[0].fence
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))


# -- hostile tenant ids ----------------------------------------------------------------


async def test_hostile_tenant_ids_are_stored_exactly(base_url: str) -> None:
    url = store_url(base_url)
    schema = url.split("schema=")[1].split("&")[0]
    hostile = [
        *HOSTILE_TENANTS,
        "quote ' double \" back \\ slash \\\\ end",
        "$1 $$ $tag$ ; -- /* */",
        "%_ like wildcards _%",
        "🏢" * 200,
        "ü" * 199 + "'",
        "\u202etxt.exe",
    ]
    assert all(len(t) <= 200 and "\x00" not in t for t in hostile)
    store = PostgresStore.from_url(url)
    ns = f"hostile-{secrets.token_hex(4)}"
    try:
        for i, tenant in enumerate(hostile):
            await store.replace(TenantKey(ns, tenant), _update(f"payload-{i}".encode()))
        for i, tenant in enumerate(hostile):
            record = await store.read(TenantKey(ns, tenant))
            assert record is not None and record.key.tenant == tenant
            assert record.payload == f"payload-{i}".encode()
        rows = await _fetch(
            base_url, f'SELECT tenant, payload FROM "{schema}".tenants WHERE namespace = $1', ns
        )
        assert sorted((r["tenant"], bytes(r["payload"])) for r in rows) == sorted(
            (t, f"payload-{i}".encode()) for i, t in enumerate(hostile)
        )
        for probe in ("%", "_", "?", "acme'", "' OR '1'='1", "x" * 199, "🏢" * 199, "ACME"):
            assert await store.read(TenantKey(ns, probe)) is None
        lease = (await store.acquire(TenantKey(ns, "a'b\"c"), "one", 30)).lease
        assert lease is not None
        assert (await store.acquire(TenantKey(ns, "a'b\"c"), "two", 30)).lease is None
        assert (await store.acquire(TenantKey(ns, "a'b"), "two", 30)).lease is not None
        assert await store.commit(lease, _update(b"changed")) is not None
        untouched = await store.read(TenantKey(ns, "acme"))
        assert untouched is not None and untouched.payload == b"payload-0"
        # all of them in one batch of each kind (one statement, every key in one parameter)
        keys = [TenantKey(ns, tenant) for tenant in hostile]
        records = await asyncio.gather(*(store.read(key) for key in keys))
        assert [r.key.tenant if r else None for r in records] == hostile
        won = await asyncio.gather(*(store.acquire(key, secrets.token_hex(8), 30) for key in keys))
        leases = [w.lease for w in won]
        assert all(lease is not None for lease in leases[2:])  # [1]: "a'b\"c" was committed
        written = await asyncio.gather(
            *(store.commit(lease, _update(f"batch-{i}".encode())) for i, lease in enumerate(leases) if lease)
        )
        assert all(record is not None for record in written)
        rows = await _fetch(
            base_url, f'SELECT tenant, payload FROM "{schema}".tenants WHERE namespace = $1', ns
        )
        stored = {r["tenant"]: r["payload"] for r in rows}
        assert all(stored[t] == f"batch-{i}".encode() for i, t in enumerate(hostile) if leases[i])
    finally:
        await store.aclose()


# -- wake-ups --------------------------------------------------------------------------


async def _until(predicate: Callable[[], bool], within: float) -> bool:
    """True as soon as ``predicate()`` holds, False if it never did within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_another_store_wakes_us_through_listen_notify(module_url: str) -> None:
    """A write through another pool (another process, in effect) wakes our watcher by
    NOTIFY, with the poll fallback set far beyond the wait."""
    ours = PostgresStore.from_url(module_url + "&poll=60")
    theirs = PostgresStore.from_url(module_url)
    key = TenantKey(f"wake-{secrets.token_hex(4)}", "acme")
    try:
        async with ours.watch(key) as watch:
            assert await _until(lambda: ours.listening, 10)
            while await watch.wait(0.05):  # drain the wake-up sent when LISTEN started
                pass
            started = time.monotonic()
            await theirs.replace(key, _update(b"v1"))
            assert await watch.wait(10), "no NOTIFY within 10s"
            assert time.monotonic() - started < 10
        seen: list[str] = []
        unsubscribe = ours.on_change(seen.append)
        won = await theirs.acquire(key, "w", 30)
        assert won.lease is not None
        await theirs.commit(won.lease, _update(b"v2"))
        assert await _until(lambda: key.digest in seen, 10)
        unsubscribe()
        assert ours.listens == 1
    finally:
        await ours.aclose()
        await theirs.aclose()


async def test_own_writes_are_announced_once(module_url: str) -> None:
    """A store announces its own writes locally at once and ignores their NOTIFY echo
    (which would evict the cache entry its manager just filled)."""
    ours = PostgresStore.from_url(module_url)
    theirs = PostgresStore.from_url(module_url)
    ns = f"echo-{secrets.token_hex(4)}"
    mine, marker = TenantKey(ns, "mine"), TenantKey(ns, "marker")
    seen: list[str] = []
    unsubscribe = ours.on_change(seen.append)
    try:
        async with ours.watch(mine):
            assert await _until(lambda: ours.listening, 10)
            seen.clear()
            await ours.replace(mine, _update(b"x"))
            assert seen == [mine.digest]  # announced locally, before the call returned
            # Notifications arrive in commit order: once theirs is in, an echo of ours
            # would have been too.
            await theirs.replace(marker, _update(b"y"))
            assert await _until(lambda: marker.digest in seen, 10)
        assert seen == [mine.digest, marker.digest]
    finally:
        unsubscribe()
        await ours.aclose()
        await theirs.aclose()


async def test_pgbouncer_mode_wakes_by_polling(module_url: str) -> None:
    """No LISTEN in PgBouncer mode: another process's write reaches no watcher by
    notification, but every wait ends at the next (jittered) poll tick, and the re-read
    that follows finds the write."""
    ours = PostgresStore.from_url(module_url + "&pgbouncer=true&poll=0.1")
    theirs = PostgresStore.from_url(module_url + "&pgbouncer=true")
    key = TenantKey(f"poll-{secrets.token_hex(4)}", "acme")
    try:
        async with ours.watch(key) as watch:
            # A wait far longer than the test's patience still ends: the poll bounds it.
            assert not await asyncio.wait_for(watch.wait(3600), 30)
            await theirs.replace(key, _update(b"v1"))
            assert not await asyncio.wait_for(watch.wait(3600), 30)  # a tick, not a notification
            record = await ours.read(key)
        assert record is not None and record.payload == b"v1"
        assert not ours.listening and ours.listens == 0
    finally:
        await ours.aclose()
        await theirs.aclose()


# -- many workers at once --------------------------------------------------------------


def test_eight_processes_start_at_once_on_an_empty_schema(base_url: str) -> None:
    url = store_url(base_url)
    schema = url.split("schema=")[1].split("&")[0]
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=postgres_server.migrate_worker, args=(url, i, start, results)) for i in range(8)
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # let them all import and block on the start signal
    start.set()
    outcomes: dict[int, str] = {}
    deadline = time.monotonic() + 90
    while len(outcomes) < len(workers) and time.monotonic() < deadline:
        try:
            index, outcome = results.get(timeout=0.5)
            outcomes[index] = outcome
        except queue.Empty:
            if not any(w.is_alive() for w in workers) and results.empty():
                break  # a worker died without reporting
    for worker in workers:
        worker.join(30)
    exits = [w.exitcode for w in workers]
    assert outcomes == {i: "ok" for i in range(8)}, (outcomes, exits)
    assert exits == [0] * 8

    async def inspect() -> None:
        tables = await _fetch(
            base_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
        assert sorted(r["table_name"] for r in tables) == ["code_claims", "meta", "tenants"]
        meta = await _fetch(base_url, f'SELECT name, value FROM "{schema}".meta')
        assert [(r["name"], r["value"]) for r in meta] == [("schema_version", SCHEMA_VERSION)]
        rows = await _fetch(base_url, f'SELECT tenant FROM "{schema}".tenants ORDER BY tenant')
        assert [r["tenant"] for r in rows] == [f"w{i}" for i in range(8)]

    asyncio.run(inspect())


# -- adversity -------------------------------------------------------------------------


async def _connect(tm: TokenManager, sim: FakeFactorial, tenant: str, company_id: int) -> TokenSet:
    return await tm.exchange_code(tenant, sim.issue_code(company_id=company_id))


async def _versions(store: PostgresStore, namespace: str, tenants: list[str]) -> dict[str, int]:
    out = {}
    for tenant in tenants:
        record = await store.read(TenantKey(namespace, tenant))
        assert record is not None
        out[tenant] = record.version
    return out


async def test_nothing_is_held_across_a_provider_call(sim: FakeFactorial, base_url: str) -> None:
    """While the refresh request is inside Factorial, the store holds no pooled connection
    (but the LISTEN one) and no transaction is open."""
    app_name = f"ft_hold_{secrets.token_hex(4)}"
    url = store_url(base_url, application_name=app_name)
    async with TokenManager(app_for(sim), url, lease_ttl=12.0, provider_timeout=4.0) as tm:
        await _connect(tm, sim, "acme", 1)
        store = tm.store
        assert isinstance(store, PostgresStore)
        assert await _until(lambda: store.listening, 10)
        sim.reset_stats()
        sim.inject(Fault.SLOW, delay=1.5)  # processed at once, answered 1.5 s later
        refresh = asyncio.create_task(tm.refresh("acme"))
        assert await _until(lambda: sim.stats.refreshes == 1, 10)
        assert not refresh.done()  # the answer is still on its way
        pool = store._pool
        assert pool.get_size() - pool.get_idle_size() == 1  # the LISTEN connection only
        rows = await _fetch(
            base_url, "SELECT state FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        assert rows and not [r for r in rows if (r["state"] or "").startswith("idle in transaction")]
        new = await refresh
        assert sim.is_active(new.access_token)
        assert (await tm.tokens("acme")).access_token == new.access_token


async def test_backends_killed_mid_refresh(make_sim: SimFactory, base_url: str) -> None:
    """pg_terminate_backend on every connection of the workers' stores, over and over,
    while two workers refresh through TokenManager: only typed errors, recovery without
    restarting anything, and every token the provider issued is the one stored."""
    app_name = f"ft_kill_{secrets.token_hex(4)}"
    url = store_url(base_url, application_name=app_name, max_size="4")
    tenants = [f"tenant-{i}" for i in range(4)]
    async with make_sim(latency=0.15) as sim:
        app = app_for(sim)
        async with (
            TokenManager(app, url, lease_ttl=4.0, provider_timeout=2.0) as one,
            TokenManager(app, url, lease_ttl=4.0, provider_timeout=2.0) as two,
        ):
            for i, tenant in enumerate(tenants):
                await _connect(one, sim, tenant, 100 + i)
            store = one.store
            assert isinstance(store, PostgresStore)
            before = await _versions(store, app.client_id, tenants)
            sim.reset_stats()
            stop = asyncio.Event()
            kills = 0

            async def killer() -> None:
                nonlocal kills
                con = await asyncpg.connect(base_url, timeout=5)
                try:
                    while not stop.is_set():
                        await asyncio.sleep(random.uniform(0.05, 0.25))
                        killed = await con.fetchval(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = $1",
                            app_name,
                        )
                        kills += int(killed)
                finally:
                    await con.close()

            outcomes: list[object] = []

            async def worker(tm: TokenManager) -> None:
                while not stop.is_set():
                    try:
                        outcomes.append(await tm.refresh(random.choice(tenants)))
                    except (StoreUnavailable, RefreshTimeout) as exc:
                        outcomes.append(exc)
                        await asyncio.sleep(0.05)

            killing = asyncio.create_task(killer())
            working = [asyncio.create_task(worker(tm)) for tm in (one, two, one, two)]
            await asyncio.sleep(4.0)
            stop.set()
            await asyncio.gather(killing, *working)

            refreshed = [o for o in outcomes if isinstance(o, TokenSet)]
            errors = [o for o in outcomes if not isinstance(o, TokenSet)]
            assert all(isinstance(e, StoreUnavailable | RefreshTimeout) for e in errors)
            assert kills >= 5, f"only {kills} backends killed"
            assert len(refreshed) >= 5, f"{len(refreshed)} refreshes, {len(errors)} errors"
            # Recovery without restart: both workers serve every tenant with a live token
            # (caches catch up once the LISTEN connections are back: lost notifications
            # are replayed for every tenant a worker knows).
            for tm in (one, two):
                for tenant in tenants:
                    assert sim.is_active((await tm.tokens(tenant)).access_token)
            stores = [s for s in (one.store, two.store) if isinstance(s, PostgresStore)]
            assert len(stores) == 2 and await _until(lambda: all(s.listening for s in stores), 15)
            deadline = time.monotonic() + 10
            while True:
                tokens = [await tm.access_token(t) for tm in (one, two) for t in tenants]
                if all(sim.is_active(t) for t in tokens) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert all(sim.is_active(t) for t in tokens)
            after = await _versions(store, app.client_id, tenants)
            for tenant in tenants:
                new = await one.refresh(tenant)
                assert sim.is_active(new.access_token)
                assert (await two.tokens(tenant)).access_token == new.access_token
            final = await _versions(store, app.client_id, tenants)
        # Zero tokens lost: every refresh Factorial performed was committed (one version
        # each), no rotated token was ever presented again, no grant died.
        assert sum(after[t] - before[t] for t in tenants) + len(tenants) == sim.stats.refreshes
        assert all(final[t] == after[t] + 1 for t in tenants)
        assert sim.stats.invalid_grant == 0 and sim.stats.families_revoked == 0
        print(f"killed {kills} backends; {len(refreshed)} refreshes; errors: {[str(e) for e in errors]}")


async def test_server_restart_mid_run(make_sim: SimFactory) -> None:
    """A throwaway cluster stopped and started again under two running workers."""
    with TempCluster() as cluster:
        url = store_url(cluster.url, poll="60")
        async with make_sim(latency=0.05) as sim:
            app = app_for(sim)
            async with (
                TokenManager(app, url, lease_ttl=4.0, provider_timeout=2.0) as one,
                TokenManager(app, url, lease_ttl=4.0, provider_timeout=2.0) as two,
            ):
                first = await _connect(one, sim, "acme", 1)
                await _connect(one, sim, "globex", 2)
                store_one, store_two = one.store, two.store
                assert isinstance(store_one, PostgresStore) and isinstance(store_two, PostgresStore)
                await asyncio.sleep(0.5)  # let the exchanges' notifications land first
                for tm in (one, two):
                    assert await tm.access_token("acme") == first.access_token  # now cached in both
                assert await _until(lambda: store_one.listening and store_two.listening, 10)
                before = await _versions(store_one, app.client_id, ["acme", "globex"])
                sim.reset_stats()

                cluster.stop()
                with pytest.raises(StoreUnavailable):
                    await store_one.read(TenantKey(app.client_id, "acme"))
                with pytest.raises(StoreUnavailable):
                    await two.refresh("acme")
                with pytest.raises(StoreUnavailable):
                    await two.access_token("globex")  # never cached in this worker
                # cached tokens keep serving while the store is down
                assert await one.access_token("acme") == first.access_token
                assert await two.access_token("acme") == first.access_token
                assert await _until(lambda: not store_one.listening, 10)
                assert sim.stats.refreshes == 0

                cluster.start()
                # recovery without restarting the workers
                refreshed = await two.refresh("acme")
                assert sim.is_active(refreshed.access_token)
                assert (await one.tokens("acme")).access_token == refreshed.access_token
                assert sim.is_active(await two.access_token("globex"))
                # both LISTEN connections came back by themselves...
                assert await _until(lambda: store_one.listening and store_two.listening, 20)
                assert store_one.listens >= 2 and store_two.listens >= 2
                # ...and deliver: a write by worker two wakes worker one's watcher, with the
                # poll at 60s, so only NOTIFY can do it
                key = TenantKey(app.client_id, "initech")
                async with store_one.watch(key) as watch:
                    while await watch.wait(0.05):
                        pass
                    await store_two.replace(key, _update(b"x"))
                    assert await watch.wait(15), "no wake-up after the restart"
                after = await _versions(store_one, app.client_id, ["acme", "globex"])
        assert sum(after[t] - before[t] for t in after) == sim.stats.refreshes
        assert sim.stats.invalid_grant == 0 and sim.stats.families_revoked == 0


async def test_store_down_from_the_start_is_a_typed_error() -> None:
    store = PostgresStore.from_url(f"postgresql://postgres@127.0.0.1:{postgres_server._free_port()}/x")
    try:
        with pytest.raises(StoreUnavailable):
            await store.check()
        with pytest.raises(StoreUnavailable):
            await store.read(TenantKey("ns", "acme"))
    finally:
        await store.aclose()


async def test_a_pool_with_no_free_connection_is_a_typed_error_not_an_endless_wait(base_url: str) -> None:
    # An application's own pool, every connection of it busy elsewhere: each store call
    # (the first one, which migrates, included) gives up after acquire_timeout.
    pool = await asyncpg.create_pool(base_url, min_size=0, max_size=2)
    schema = postgres_server.unique_schema()
    store_url(base_url, schema=schema)  # registers it for dropping
    store = PostgresStore(pool, schema=schema, acquire_timeout=0.3)
    key = TenantKey("busy", "acme")
    held = [await pool.acquire() for _ in range(2)]
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            store.check,  # the first use: the migration's own connection
            lambda: store.read(key),
            lambda: store.acquire(key, "me", 5.0),
            lambda: store.replace(key, _update(b"x")),
            lambda: store.tenants("busy"),
            lambda: store.hold("busy", time.time() + 5),
            lambda: store.claim_code(key, "c" * 64, "me", 5.0),
        ]
        for call in calls:
            with pytest.raises(
                StoreUnavailable, match=r"got no connection from the pool in time \(acquire_timeout=0\.3 s\)"
            ):
                await asyncio.wait_for(call(), 10.0)
    finally:
        for con in held:
            await pool.release(con)
    try:
        await store.replace(key, _update(b"x"))
        acquisition = await store.acquire(key, "me", 5.0)
        assert acquisition.lease is not None
        held = [await pool.acquire() for _ in range(2)]
        try:
            with pytest.raises(StoreUnavailable, match="commit got no connection from the pool"):
                await asyncio.wait_for(store.commit(acquisition.lease, _update(b"y")), 10.0)
        finally:
            for con in held:
                await pool.release(con)
        assert await store.commit(acquisition.lease, _update(b"y")) is not None
    finally:
        await store.aclose()
        await pool.close()


async def test_concurrent_first_calls_on_an_exhausted_pool_each_wait_at_most_acquire_timeout(
    base_url: str,
) -> None:
    # The promise of acquire_timeout: a call waits at most that long for a pool connection.
    # On first use every call migrates under the store's init lock, so with the pool
    # exhausted N concurrent calls each wait their turn for the lock and then
    # acquire_timeout again: the last one gives up only after N * acquire_timeout.
    pool = await asyncpg.create_pool(base_url, min_size=0, max_size=1)
    schema = postgres_server.unique_schema()
    store_url(base_url, schema=schema)  # registers it for dropping
    store = PostgresStore(pool, schema=schema, acquire_timeout=1.0)
    held = await pool.acquire()
    try:

        async def timed() -> float:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="got no connection from the pool in time"):
                await asyncio.wait_for(store.check(), 30.0)
            return time.monotonic() - started

        waits = await asyncio.gather(*(timed() for _ in range(8)))
        # One acquire_timeout for the first call, the same answer at once for those queued
        # behind it (the margin is for a loaded machine; queued in turn, the last waits 8 s).
        assert max(waits) < 2.5, f"waits for a pool connection: {sorted(round(w, 2) for w in waits)}"
    finally:
        await pool.release(held)
        await store.aclose()
        await pool.close()


async def test_a_connect_timeout_is_not_reported_as_an_exhausted_pool() -> None:
    # Each connection attempt to a silent server ends at connect_timeout (0.5 s), long
    # before acquire_timeout (30 s). asyncpg opens
    # the connection inside pool.acquire, and _connection turns its TimeoutError into "got
    # no connection from the pool in time (acquire_timeout=30 s): all are busy".
    async with _silent_server() as (port, sockets):
        store = PostgresStore.from_url(
            f"postgresql://postgres@127.0.0.1:{port}/test?connect_timeout=0.5&acquire_timeout=30"
        )
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await asyncio.wait_for(store.check(), 20.0)
            elapsed = time.monotonic() - started
            message = str(caught.value)
            assert elapsed < 30.0
            assert "acquire_timeout" not in message and "all are busy" not in message, (
                f"after {elapsed:.1f} s and {len(sockets)} connection attempt(s): {message}"
            )
        finally:
            await store.aclose()


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A server that accepts TCP connections and never answers (each connection attempt
    ends at connect_timeout): its port, and the connections it accepted."""
    sockets: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sockets.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], sockets
    finally:
        server.close()
        for writer in sockets:
            writer.close()


@pytest.mark.parametrize(
    "dsn",
    [
        "host=127.0.0.1 user=postgres password=s3cret dbname=test",  # libpq keyword form
        "postgresql://postgres:12/s3cret@127.0.0.1/test",  # a '/' left unescaped in the password
    ],
)
async def test_errors_never_carry_the_dsn_password(dsn: str) -> None:
    # _where() (in every StoreUnavailable, the new "got no connection" one included) takes
    # the path of urlsplit(dsn): for these DSNs that path holds the password.
    # The keyword form is refused when the store is made; the mangled URL when it connects.
    with pytest.raises((StoreUnavailable, ConfigurationError)) as caught:
        store = PostgresStore(dsn=dsn, acquire_timeout=1.0)
        try:
            await asyncio.wait_for(store.check(), 20.0)
        finally:
            await store.aclose()
    assert "s3cret" not in str(caught.value) and ":12/" not in str(caught.value), str(caught.value)


def test_acquire_timeout_is_a_url_option() -> None:
    store = PostgresStore.from_url("postgresql://u@h/db?acquire_timeout=2.5")
    assert store._acquire_timeout == 2.5
    with pytest.raises(ConfigurationError):
        PostgresStore.from_url("postgresql://u@h/db?acquire_timeout=0")


# -- batching: the calls of one turn of the loop go as one statement per kind -----------


async def _leases(store: PostgresStore, ns: str, count: int) -> tuple[list[TenantKey], list[Lease]]:
    """``count`` tenants of ``ns`` written as ``old-<i>``, each leased by its own owner."""
    keys = [TenantKey(ns, f"t{i}") for i in range(count)]
    for key in keys:
        await store.replace(key, _update(f"old-{key.tenant}".encode()))
    won = await asyncio.gather(*(store.acquire(key, f"owner-{key.tenant}", 60) for key in keys))
    leases = [w.lease for w in won]
    assert all(lease is not None for lease in leases)
    return keys, [lease for lease in leases if lease is not None]


async def mixed_batch(store: PostgresStore, ns: str) -> None:
    """Commits, fenced-out commits, releases and reads (a key twice, unknown keys) of 60
    tenants issued in one turn: each caller gets exactly its own answer, and every write
    that landed is announced. Also run through PgBouncer (``test_pgbouncer.py``)."""
    keys, leases = await _leases(store, ns, 60)
    versions = {k: r.version for k in keys if (r := await store.read(k)) is not None}
    announced: list[str] = []
    unsubscribe = store.on_change(announced.append)
    try:
        calls: list[Awaitable[object]] = []
        for i, lease in enumerate(leases):
            if i % 3 == 0:
                calls.append(store.commit(lease, _update(f"new-{lease.key.tenant}".encode())))
            elif i % 3 == 1:
                calls.append(store.release(lease))
            else:  # a stale lease: fenced out
                stale = Lease(lease.key, lease.owner, lease.fence - 1)
                calls.append(store.commit(stale, _update(b"never")))
        unknown = [TenantKey(ns, f"unknown-{i}") for i in range(5)]
        reads = [*keys, *keys[:10], *unknown]
        outcomes = await asyncio.gather(*calls, *(store.read(k) for k in reads))
    finally:
        unsubscribe()
    for i, (key, outcome) in enumerate(zip(keys, outcomes[: len(keys)], strict=True)):
        if i % 3 == 0:
            assert isinstance(outcome, Record) and outcome.key == key
            assert outcome.payload == f"new-{key.tenant}".encode()
            assert outcome.version == versions[key] + 1
        elif i % 3 == 1:
            assert outcome is True
        else:
            assert outcome is None
    for key, read in zip(reads, outcomes[len(keys) :], strict=True):
        if key in unknown:
            assert read is None
        else:
            assert isinstance(read, Record) and read.key == key
            assert read.payload in (f"old-{key.tenant}".encode(), f"new-{key.tenant}".encode())
    for i, key in enumerate(keys):
        record = await store.read(key)
        assert record is not None
        written = i % 3 == 0
        assert record.payload == (f"new-{key.tenant}" if written else f"old-{key.tenant}").encode()
        assert record.version == versions[key] + written
    assert {k.digest for i, k in enumerate(keys) if i % 3 != 2} <= set(announced)
    assert not {k.digest for i, k in enumerate(keys) if i % 3 == 2} & set(announced)
    # The released leases are free; the fenced-out ones are still held.
    for i, key in enumerate(keys):
        again = await store.acquire(key, "next", 60)
        assert (again.lease is not None) == (i % 3 != 2)


async def test_a_mixed_batch_gives_each_caller_its_own_answer(module_url: str) -> None:
    store = PostgresStore.from_url(module_url)
    try:
        await mixed_batch(store, f"batch-{secrets.token_hex(4)}")
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def _proxied(base_url: str, **options: str) -> AsyncIterator[tuple[TcpProxy, PostgresStore]]:
    parts = urlsplit(base_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = base_url.replace(
            parts.netloc, f"{parts.username + '@' if parts.username else ''}127.0.0.1:{proxy.port}"
        )
        store = PostgresStore.from_url(store_url(proxied, **options))
        try:
            yield proxy, store
        finally:
            await store.aclose()


async def test_a_caller_cancelled_during_a_stalled_statement_is_cancelled_not_retried(base_url: str) -> None:
    """A caller cancelled while its statement's reply is stalled: asyncpg's release waits
    for the server to acknowledge the cancellation, for at most the acquire timeout (it
    is the release's default), then raises TimeoutError. Raised in _connection's finally,
    that TimeoutError replaces the caller's CancelledError, and _call takes it for a lost
    connection: the statement runs again and the cancelled call returns a result."""
    async with _proxied(base_url, max_size="3", acquire_timeout="0.3", command_timeout="30") as (
        proxy,
        store,
    ):
        ns = f"cancel-{secrets.token_hex(4)}"
        await store.hold(ns, time.time() + 1)  # migrated; the statement prepared
        proxy.drop_reply(1, stall=True)
        task = asyncio.create_task(store.hold(ns, time.time() + 60))
        await asyncio.sleep(0.5)
        assert proxy.dropped == 1 and not task.done()
        task.cancel()
        await asyncio.wait({task}, timeout=10.0)
        assert task.done()
        assert task.cancelled(), (
            f"the cancelled call ended with {task.exception() if task.exception() else task.result()!r}"
        )


async def test_reads_and_commits_of_one_turn_go_as_one_statement_each(base_url: str) -> None:
    """200 reads, 100 commits, 100 releases, each kind issued at once: one statement on the
    wire per kind, not one per call."""
    async with _proxied(base_url, max_size="3") as (proxy, store):
        ns = f"wire-{secrets.token_hex(4)}"
        keys, leases = await _leases(store, ns, 100)
        before = proxy.requests
        reads = await asyncio.gather(*(store.read(k) for k in keys + keys))
        assert [r.key for r in reads if r is not None] == keys + keys
        # At most a prepare and an execute; no type introspection (which bigint[], bytea[]
        # or float8[] parameters would cost on every new connection: 6 more requests).
        assert proxy.requests - before <= 2
        before = proxy.requests
        commits = await asyncio.gather(*(store.commit(lease, _update(b"new")) for lease in leases))
        assert [c.key for c in commits if c is not None] == keys
        assert proxy.requests - before <= 2
        keys, leases = await _leases(store, ns + "-2", 100)
        before = proxy.requests
        assert all(await asyncio.gather(*(store.release(lease) for lease in leases)))
        assert proxy.requests - before <= 2


async def test_a_reply_lost_mid_batch_is_replayed_for_every_caller(base_url: str) -> None:
    """The connection drops after the server ran a batch of commits: the replay finds each
    commit done, and each caller gets its own new version, written once."""
    async with _proxied(base_url, max_size="2") as (proxy, store):
        ns = f"lost-{secrets.token_hex(4)}"
        keys, leases = await _leases(store, ns, 30)
        # Prepare the batched statement on the connection first (its reply is not the one lost).
        first = await asyncio.gather(*(store.commit(lease, _update(b"one")) for lease in leases[:2]))
        assert all(r is not None for r in first)
        versions = {k: r.version for k in keys if (r := await store.read(k)) is not None}
        proxy.drop_reply(1)
        outcomes = await asyncio.gather(
            *(store.commit(lease, _update(f"two-{lease.key.tenant}".encode())) for lease in leases[2:])
        )
        assert proxy.dropped == 1
        for lease, outcome in zip(leases[2:], outcomes, strict=True):
            assert outcome is not None and outcome.key == lease.key
            assert outcome.payload == f"two-{lease.key.tenant}".encode()
            assert outcome.version == versions[lease.key] + 1
            record = await store.read(lease.key)
            assert record is not None and record.version == outcome.version


@contextlib.asynccontextmanager
async def _rows_locked(base_url: str, schema: str, ns: str, tenant: str | None = None) -> AsyncIterator[None]:
    """An open transaction holding every row of ``ns`` (or only ``tenant``'s) for the block:
    writes to them wait till it ends."""
    con = await asyncpg.connect(base_url, timeout=5)
    try:
        await con.execute("BEGIN")
        if tenant is None:
            await con.execute(f'SELECT 1 FROM "{schema}".tenants WHERE namespace = $1 FOR UPDATE', ns)
        else:
            await con.execute(
                f'SELECT 1 FROM "{schema}".tenants WHERE namespace = $1 AND tenant = $2 FOR UPDATE',
                ns,
                tenant,
            )
        yield
    finally:
        await con.execute("ROLLBACK")
        await con.close()


async def test_connections_killed_mid_batch_fail_every_caller_and_lose_nothing(base_url: str) -> None:
    """A batch of commits blocked on locked rows while its connection is killed, again and
    again until it gives up: every caller gets StoreUnavailable, none another's answer; no
    commit landed, and each one sent again lands once. Reads meanwhile get their own
    records or a typed error."""
    app_name = f"ft_batch_{secrets.token_hex(4)}"
    url = store_url(base_url, application_name=app_name, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    store = PostgresStore.from_url(url)
    ns = f"kill-{secrets.token_hex(4)}"
    try:
        keys, leases = await _leases(store, ns, 40)
        versions = {k: r.version for k in keys if (r := await store.read(k)) is not None}
        async with _rows_locked(base_url, schema, ns):
            commits = [
                asyncio.ensure_future(store.commit(lease, _update(f"new-{lease.key.tenant}".encode())))
                for lease in leases
            ]
            reads = [asyncio.ensure_future(store.read(k)) for k in keys]
            killer = await asyncpg.connect(base_url, timeout=5)
            kills = 0
            try:
                while not all(c.done() for c in commits):
                    await asyncio.sleep(0.1)
                    kills += await killer.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = $1 AND wait_event_type = 'Lock'",
                        app_name,
                    )
            finally:
                await killer.close()
            assert kills >= 2
            for commit in commits:
                assert isinstance(commit.exception(), StoreUnavailable)
            for key, read in zip(keys, await asyncio.gather(*reads, return_exceptions=True), strict=True):
                assert isinstance(read, StoreUnavailable) or (isinstance(read, Record) and read.key == key)
        for key in keys:
            record = await store.read(key)
            assert record is not None and record.payload == f"old-{key.tenant}".encode()
            assert record.version == versions[key]
        again = await asyncio.gather(
            *(store.commit(lease, _update(f"new-{lease.key.tenant}".encode())) for lease in leases)
        )
        for lease, record in zip(leases, again, strict=True):
            assert record is not None and record.version == versions[lease.key] + 1
            assert record.payload == f"new-{lease.key.tenant}".encode()
    finally:
        await store.aclose()


async def test_a_cancelled_caller_leaves_the_others_answers_alone(base_url: str) -> None:
    """One commit cancelled before its batch leaves is not sent; one cancelled while its
    batch waits on the database is still written and announced; every other caller of
    both batches gets its own record."""
    url = store_url(base_url, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    store = PostgresStore.from_url(url)
    ns = f"cancel-{secrets.token_hex(4)}"
    announced: list[str] = []
    unsubscribe = store.on_change(announced.append)
    try:
        keys, leases = await _leases(store, ns, 20)
        versions = {k: r.version for k in keys if (r := await store.read(k)) is not None}

        def commit(lease: Lease) -> asyncio.Task[Record | None]:
            update = _update(f"new-{lease.key.tenant}".encode())
            return asyncio.ensure_future(store.commit(lease, update))

        # Cancelled after queueing, before the batch was taken.
        first = [commit(lease) for lease in leases[:10]]
        await asyncio.sleep(0)  # every call queued; the batch not yet taken
        first[3].cancel()
        done = await asyncio.gather(*first, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        record = await store.read(keys[3])
        assert record is not None and record.version == versions[keys[3]]  # never sent
        # Cancelled while its batch waits on a lock.
        async with _rows_locked(base_url, schema, ns):
            second = [commit(lease) for lease in leases[10:]]
            await asyncio.sleep(0.3)
            second[4].cancel()
            await asyncio.sleep(0.1)
        later = await asyncio.gather(*second, return_exceptions=True)
        assert isinstance(later[4], asyncio.CancelledError)
        record = await store.read(keys[14])
        assert record is not None and record.version == versions[keys[14]] + 1  # it was sent
        assert keys[14].digest in announced
        for i, (lease, outcome) in enumerate(zip(leases, [*done, *later], strict=True)):
            if i in (3, 14):
                continue
            assert isinstance(outcome, Record) and outcome.key == lease.key
            assert outcome.payload == f"new-{lease.key.tenant}".encode()
            assert outcome.version == versions[lease.key] + 1
    finally:
        unsubscribe()
        await store.aclose()


async def test_a_value_the_database_refuses_fails_only_its_own_caller(module_url: str) -> None:
    """A commit whose key the database refuses (a NUL byte, in a lease made by hand) in a
    batch with others: the batch is split, that caller gets StoreUnavailable, the others
    their records."""
    store = PostgresStore.from_url(module_url)
    try:
        ns = f"bad-{secrets.token_hex(4)}"
        keys, leases = await _leases(store, ns, 10)
        bad = Lease(TenantKey(ns, "bad\x00id"), "owner", 1)
        outcomes = await asyncio.gather(
            *(store.commit(lease, _update(b"new")) for lease in [*leases[:5], bad, *leases[5:]]),
            return_exceptions=True,
        )
        assert isinstance(outcomes[5], StoreUnavailable)
        good = outcomes[:5] + outcomes[6:]
        assert [r.key for r in good if isinstance(r, Record)] == keys
    finally:
        await store.aclose()


# -- batched acquisitions ----------------------------------------------------------------


def _due(
    payload: bytes, *, expires_in: float | None = 10.0, status: TenantStatus = TenantStatus.ACTIVE
) -> Update:
    now = time.time()
    return Update(payload, status, None if expires_in is None else now + expires_in, now - 3600)


async def _lease_row(url: str, schema: str, key: TenantKey) -> tuple[int, str | None] | None:
    rows = await _fetch(
        url,
        f'SELECT fence, lease_owner FROM "{schema}".tenants WHERE namespace = $1 AND tenant = $2',
        key.namespace,
        key.tenant,
    )
    return None if not rows else (int(rows[0]["fence"]), rows[0]["lease_owner"])


async def mixed_acquire_batch(store: PostgresStore, ns: str) -> None:
    """Plain and conditional acquisitions of due, fresh, never-expiring, NEEDS_REAUTH,
    absent, forgotten, held, expired-lease and self-held (a replay) records, some keys
    twice, issued in one turn: each caller gets exactly what the same call alone would.
    Also run through PgBouncer (``test_pgbouncer.py``)."""
    rule = Freshness(at=time.time(), margin=100.0, share=1.0)
    k = {
        name: TenantKey(ns, name)
        for name in (
            "due",
            "fresh",
            "forever",
            "reauth",
            "absent",
            "forgotten",
            "held",
            "expired",
            "mine",
            "twice",
            "new",
            "new-twice",
            "plain-free",
            "plain-held",
            "plain-mine",
            "plain-expired",
        )
    }
    for name in (
        "due",
        "held",
        "expired",
        "mine",
        "twice",
        "plain-free",
        "plain-held",
        "plain-mine",
        "plain-expired",
    ):
        await store.replace(k[name], _due(name.encode()))
    await store.replace(k["fresh"], _due(b"fresh", expires_in=1000.0))
    await store.replace(k["forever"], _due(b"forever", expires_in=None))
    await store.replace(k["reauth"], _due(b"reauth", status=TenantStatus.NEEDS_REAUTH))
    await store.replace(k["forgotten"], _due(b"forgotten"))
    await store.replace(k["forgotten"], None)
    held = {
        name: (await store.acquire(k[name], f"holder-{name}", 60)).lease
        for name in ("held", "plain-held", "mine", "plain-mine")
    }
    expired = {
        name: (await store.acquire(k[name], f"holder-{name}", 0.05)).lease
        for name in ("expired", "plain-expired")
    }
    assert all(lease is not None for lease in (*held.values(), *expired.values()))
    await asyncio.sleep(0.2)  # the short leases expire (by the database clock)

    def cond(name: str, owner: str | None = None) -> Awaitable[Acquisition]:
        return store.acquire(k[name], owner or f"c-{name}", 60, unless_fresh=rule)

    def plain(name: str, owner: str | None = None) -> Awaitable[Acquisition]:
        return store.acquire(k[name], owner or f"p-{name}", 60)

    calls = {
        "due": cond("due"),
        "fresh": cond("fresh"),
        "forever": cond("forever"),
        "reauth": cond("reauth"),
        "absent": cond("absent"),
        "forgotten": cond("forgotten"),
        "held": cond("held"),
        "expired": cond("expired"),
        "mine": cond("mine", "holder-mine"),
        "twice-1": cond("twice", "first"),
        "twice-2": cond("twice", "second"),
        "new": plain("new"),
        "new-twice-1": plain("new-twice", "first"),
        "new-twice-2": plain("new-twice", "second"),
        "plain-free": plain("plain-free"),
        "plain-held": plain("plain-held"),
        "plain-mine": plain("plain-mine", "holder-plain-mine"),
        "plain-expired": plain("plain-expired"),
    }
    got = dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))

    def won(name: str, key: str | None = None) -> int:
        lease = got[name].lease
        assert lease is not None and lease.key == k[key or name], name
        return lease.fence

    def lost(name: str) -> None:
        assert got[name].lease is None, name

    for name in ("due", "expired", "plain-free", "plain-expired"):
        won(name)
        record = got[name].record
        assert record is not None and record.key == k[name] and record.payload == name.encode(), name
    for name in ("fresh", "forever", "reauth", "held", "plain-held"):
        lost(name)
        record = got[name].record
        assert record is not None and record.key == k[name] and record.payload == name.encode(), name
    assert got["absent"] == Acquisition(None, None)
    assert await store.read(k["absent"]) is None
    lost("forgotten")
    assert got["forgotten"].record is None
    # A replay by the holder itself takes its live lease again, with a new fence.
    assert won("mine") == held["mine"].fence + 1  # type: ignore[union-attr]
    assert won("plain-mine") == held["plain-mine"].fence + 1  # type: ignore[union-attr]
    assert won("expired") == expired["expired"].fence + 1  # type: ignore[union-attr]
    # A new tenant: its first fence; the same key twice: one winner, the other sees it held.
    assert won("new") == 1 and got["new"].record is None
    for pair in ("twice", "new-twice"):
        first, second = got[f"{pair}-1"], got[f"{pair}-2"]
        assert (first.lease is None) != (second.lease is None), pair
    # What each winner holds is what the database says.
    for name, acquisition in got.items():
        if acquisition.lease is not None:
            again = await store.acquire(acquisition.lease.key, "someone-else", 60)
            assert again.lease is None, name
            assert await store.release(acquisition.lease), name


async def test_a_mixed_acquire_batch_gives_each_caller_its_own_answer(module_url: str) -> None:
    store = PostgresStore.from_url(module_url)
    try:
        await mixed_acquire_batch(store, f"acq-{secrets.token_hex(4)}")
    finally:
        await store.aclose()


async def test_acquisitions_of_one_turn_go_as_one_statement_each(base_url: str) -> None:
    """100 plain and 100 conditional acquisitions, each kind issued at once: one statement
    on the wire per kind."""
    async with _proxied(base_url, max_size="3") as (proxy, store):
        ns = f"wire-acq-{secrets.token_hex(4)}"
        keys = [TenantKey(ns, f"t{i}") for i in range(100)]
        for key in keys[:50]:
            await store.replace(key, _due(b"x"))
        before = proxy.requests
        won = await asyncio.gather(*(store.acquire(key, f"o-{key.tenant}", 60) for key in keys))
        assert [w.lease.key for w in won if w.lease is not None] == keys
        assert proxy.requests - before <= 2
        assert all(await asyncio.gather(*(store.release(w.lease) for w in won if w.lease is not None)))
        rule = Freshness(at=time.time(), margin=100.0, share=1.0)
        before = proxy.requests
        won = await asyncio.gather(
            *(store.acquire(key, f"c-{key.tenant}", 60, unless_fresh=rule) for key in keys)
        )
        assert [w.lease.key for w in won if w.lease is not None] == keys[:50]
        assert proxy.requests - before <= 2


async def test_two_stores_race_for_many_keys_one_lease_each(
    module_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two stores (two pools) acquire 40 keys, half never written, four callers per key
    (plain and conditional on each), six rounds: exactly one lease per key per round, the
    database holds the winner's fence and owner, and fences strictly increase. Every batch
    locks the rows it shares with another in the same order: no deadlock to retry."""
    stores = [PostgresStore.from_url(module_url), PostgresStore.from_url(module_url)]
    schema = module_url.split("schema=")[1].split("&")[0]
    ns = f"race-many-{secrets.token_hex(4)}"
    keys = [TenantKey(ns, f"t{i}") for i in range(40)]
    try:
        for key in keys[:20]:
            await stores[0].replace(key, _due(b"first"))
        last = dict.fromkeys(keys, 0)
        for round_ in range(6):
            rule = Freshness(at=time.time(), margin=100.0, share=1.0)
            calls: list[tuple[TenantKey, Awaitable[Acquisition]]] = []
            for key in keys:
                for s, store in enumerate(stores):
                    calls.append((key, store.acquire(key, f"r{round_}-s{s}-plain-{key.tenant}", 60)))
                    calls.append(
                        (key, store.acquire(key, f"r{round_}-s{s}-cond-{key.tenant}", 60, unless_fresh=rule))
                    )
            random.shuffle(calls)
            outcomes = await asyncio.gather(*(call for _, call in calls))
            winners: dict[TenantKey, list[Lease]] = {key: [] for key in keys}
            for (key, _), outcome in zip(calls, outcomes, strict=True):
                if outcome.lease is not None:
                    assert outcome.lease.key == key
                    winners[key].append(outcome.lease)
            for key in keys:
                assert len(winners[key]) == 1, (round_, key, winners[key])
                lease = winners[key][0]
                assert lease.fence > last[key]
                last[key] = lease.fence
                assert await _lease_row(module_url, schema, key) == (lease.fence, lease.owner)
            done = await asyncio.gather(
                *(
                    stores[i % 2].commit(winners[key][0], _due(f"r{round_}".encode()))
                    for i, key in enumerate(keys)
                )
            )
            assert all(record is not None for record in done)
        assert not [r for r in caplog.records if "Deadlock" in r.getMessage()]
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))


async def test_a_deadlock_victim_is_retried_and_logged_as_one(
    module_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that deadlocks with another transaction (here a client's own, locking the
    rows in the other order) is rolled back whole by Postgres and sent again: both
    acquisitions win, and the warning names the deadlock, not a lost connection."""
    store = PostgresStore.from_url(module_url)
    schema = module_url.split("schema=")[1].split("&")[0]
    ns = f"deadlock-{secrets.token_hex(4)}"
    first, second = TenantKey(ns, "a"), TenantKey(ns, "b")
    lock = f'SELECT 1 FROM "{schema}".tenants WHERE namespace = $1 AND tenant = $2 FOR UPDATE'
    blocked = "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
    other = await asyncpg.connect(module_url.split("?")[0], timeout=5)
    try:
        for key in (first, second):
            await store.replace(key, _due(b"x"))
        async with other.transaction():
            await other.execute("SET LOCAL deadlock_timeout = '30s'")  # the batch is the victim
            await other.fetch(lock, ns, "b")
            batch = asyncio.gather(store.acquire(first, "o1", 60), store.acquire(second, "o2", 60))
            async with asyncio.timeout(10):
                while not await other.fetchval(blocked):
                    await asyncio.sleep(0.02)  # the batch holds row a and waits for row b
            await other.fetch(lock, ns, "a")  # a cycle: Postgres breaks it after a second
        won = await batch
        assert [w.lease is not None for w in won] == [True, True]
        warnings = [r.getMessage() for r in caplog.records if r.name == "factorial_tokens.postgres"]
        assert any("deadlock's victim" in m for m in warnings), warnings
        assert not any("lost its connection" in m for m in warnings), warnings
    finally:
        await other.close()
        await store.aclose()


async def test_a_reply_lost_mid_acquire_batch_is_replayed_for_every_caller(base_url: str) -> None:
    """The connection drops after the server ran a batch of acquisitions (plain, then
    conditional): the replay takes each caller's own lease again, and what each caller
    holds is what the database holds."""
    async with _proxied(base_url, max_size="2") as (proxy, store):
        ns = f"lost-acq-{secrets.token_hex(4)}"
        schema = store._names.schema
        keys = [TenantKey(ns, f"t{i}") for i in range(30)]
        for key in keys[:20]:
            await store.replace(key, _due(b"x"))
        rule = Freshness(at=time.time(), margin=100.0, share=1.0)
        # Prepare both statements on the connection first (their replies are not the ones lost).
        for warm in await asyncio.gather(
            store.acquire(TenantKey(ns, "warm"), "w", 60),
            store.acquire(TenantKey(ns, "warm-c"), "w", 60, unless_fresh=rule),
        ):
            if warm.lease is not None:
                await store.release(warm.lease)
        for kind in ("plain", "cond"):
            proxy.drop_reply(1)
            won = await asyncio.gather(
                *(
                    store.acquire(
                        key, f"{kind}-{key.tenant}", 60, unless_fresh=rule if kind == "cond" else None
                    )
                    for key in (keys if kind == "plain" else keys[:20])
                )
            )
            assert proxy.dropped == (1 if kind == "plain" else 2)
            for w in won:
                assert w.lease is not None
                assert await _lease_row(base_url, schema, w.lease.key) == (w.lease.fence, w.lease.owner)
            assert all(await asyncio.gather(*(store.release(w.lease) for w in won if w.lease is not None)))


async def test_connections_killed_mid_acquire_batch_are_retried(base_url: str) -> None:
    """Batches of acquisitions blocked on locked rows while their connections are killed:
    the retry (a replay) answers every caller with its own lease, one per key, which is
    what the database holds."""
    app_name = f"ft_acq_{secrets.token_hex(4)}"
    url = store_url(base_url, application_name=app_name, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    store = PostgresStore.from_url(url)
    ns = f"kill-acq-{secrets.token_hex(4)}"
    try:
        keys = [TenantKey(ns, f"t{i}") for i in range(40)]
        for key in keys:
            await store.replace(key, _due(b"x"))
        rule = Freshness(at=time.time(), margin=100.0, share=1.0)
        async with _rows_locked(base_url, schema, ns):
            calls = [
                asyncio.ensure_future(
                    store.acquire(key, f"o-{key.tenant}", 60, unless_fresh=rule if i % 2 else None)
                )
                for i, key in enumerate(keys)
            ]
            killer = await asyncpg.connect(base_url, timeout=5)
            try:
                kills = 0
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    kills += await killer.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = $1 AND wait_event_type = 'Lock'",
                        app_name,
                    )
                    if kills:
                        break
                assert kills >= 1
            finally:
                await killer.close()
            await asyncio.sleep(0.3)  # the retry is blocked again
        won = await asyncio.gather(*calls)
        for key, w in zip(keys, won, strict=True):
            assert w.lease is not None and w.lease.key == key
            assert await _lease_row(url, schema, key) == (w.lease.fence, w.lease.owner)
    finally:
        await store.aclose()


async def test_a_cancelled_acquirer_leaves_the_others_answers_alone(base_url: str) -> None:
    """An acquisition cancelled while its batch waits on a lock: every other caller gets
    its own lease, and the one won for the cancelled caller is given back at once."""
    url = store_url(base_url, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    store = PostgresStore.from_url(url)
    ns = f"cancel-acq-{secrets.token_hex(4)}"
    try:
        keys = [TenantKey(ns, f"t{i}") for i in range(10)]
        for key in keys:
            await store.replace(key, _due(b"x"))
        async with _rows_locked(base_url, schema, ns):
            calls = [asyncio.ensure_future(store.acquire(key, f"o-{key.tenant}", 60)) for key in keys]
            await asyncio.sleep(0.3)
            calls[4].cancel()
            await asyncio.sleep(0.1)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcomes[4], asyncio.CancelledError)

        async def given_back() -> bool:
            row = await _lease_row(url, schema, keys[4])
            return row is not None and row[1] is None

        deadline = time.monotonic() + 5
        while not await given_back():
            assert time.monotonic() < deadline, "the orphaned lease was not given back"
            await asyncio.sleep(0.05)
        assert (await store.acquire(keys[4], "next", 60)).lease is not None
        for i, (key, outcome) in enumerate(zip(keys, outcomes, strict=True)):
            if i != 4:
                assert isinstance(outcome, Acquisition) and outcome.lease is not None
                assert await _lease_row(url, schema, key) == (outcome.lease.fence, outcome.lease.owner)
    finally:
        await store.aclose()


async def test_two_batches_on_the_same_rows_lock_them_in_one_order(
    base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain batch waits on a row locked halfway down its keys (holding the rows before
    it) while another store's conditional batch on the same keys arrives: the second waits
    for the first row instead of taking the rows from the end (the table holds them in
    reverse order): no deadlock, and one lease per key."""
    url = store_url(base_url, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    stores = [PostgresStore.from_url(url), PostgresStore.from_url(url)]
    ns = f"order-{secrets.token_hex(4)}"
    keys = [TenantKey(ns, f"t{i:02}") for i in range(20)]
    try:
        for key in reversed(keys):
            await stores[0].replace(key, _due(b"x"))
        async with _rows_locked(base_url, schema, ns, keys[10].tenant):
            rule = Freshness(at=time.time(), margin=100.0, share=1.0)
            plain = [asyncio.ensure_future(stores[0].acquire(key, f"p-{key.tenant}", 60)) for key in keys]
            await asyncio.sleep(0.3)
            cond = [
                asyncio.ensure_future(stores[1].acquire(key, f"c-{key.tenant}", 60, unless_fresh=rule))
                for key in keys
            ]
            await asyncio.sleep(0.3)
        outcomes = await asyncio.gather(*plain, *cond)
        for i, key in enumerate(keys):
            won = [o.lease for o in (outcomes[i], outcomes[len(keys) + i]) if o.lease is not None]
            assert len(won) == 1 and won[0].key == key
            assert await _lease_row(url, schema, key) == (won[0].fence, won[0].owner)
        assert not [r for r in caplog.records if "Deadlock" in r.getMessage()]
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))


async def _given_back(url: str, schema: str, key: TenantKey, within: float = 5.0) -> bool:
    """Whether ``key``'s lease is free (given back) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        row = await _lease_row(url, schema, key)
        if row is not None and row[1] is None:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def test_a_caller_cancelled_after_its_answer_came_gives_its_lease_back(base_url: str) -> None:
    """Two acquisitions answered by one batch; the first caller, on waking, cancels the
    second (a task group whose sibling failed, a ``wait(FIRST_COMPLETED)``): the second's
    answer is already set but never seen by it, so the lease won for it is given back
    rather than held, unused, until it expires."""
    url = store_url(base_url, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    store = PostgresStore.from_url(url)
    ns = f"late-cancel-{secrets.token_hex(4)}"
    keys = [TenantKey(ns, "first"), TenantKey(ns, "second")]
    try:
        second: asyncio.Task[Acquisition] | None = None

        async def first() -> Acquisition:
            won = await store.acquire(keys[0], "o-first", 60)
            assert second is not None
            second.cancel()  # its answer is set; it has not run since
            return won

        one = asyncio.ensure_future(first())
        second = asyncio.ensure_future(store.acquire(keys[1], "o-second", 60))
        outcomes = await asyncio.gather(one, second, return_exceptions=True)
        assert isinstance(outcomes[0], Acquisition) and outcomes[0].lease is not None
        assert isinstance(outcomes[1], asyncio.CancelledError)
        assert await _given_back(url, schema, keys[1]), "the lease of a caller that never saw it is held"
        assert (await store.acquire(keys[1], "next", 60)).lease is not None
    finally:
        await store.aclose()


async def test_aclose_gives_back_the_leases_of_cancelled_callers_first(base_url: str) -> None:
    """``aclose`` right after a caller was cancelled with a lease won for it: the lease is
    still given back (``aclose`` waits for it) rather than refused as "closed"."""
    url = store_url(base_url, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    store = PostgresStore.from_url(url)
    ns = f"close-orphan-{secrets.token_hex(4)}"
    keys = [TenantKey(ns, "first"), TenantKey(ns, "second")]
    second: asyncio.Task[Acquisition] | None = None
    closing: list[asyncio.Future[None]] = []

    async def first() -> Acquisition:
        won = await store.acquire(keys[0], "o-first", 60)
        assert second is not None
        second.cancel()  # a shutdown: cancel the work, then close the store
        closing.append(asyncio.ensure_future(store.aclose()))
        return won

    try:
        one = asyncio.ensure_future(first())
        second = asyncio.ensure_future(store.acquire(keys[1], "o-second", 60))
        outcomes = await asyncio.gather(one, second, return_exceptions=True)
        assert isinstance(outcomes[1], asyncio.CancelledError)
        await closing[0]
    finally:
        await store.aclose()
    assert await _given_back(base_url, schema, keys[1], within=1.0), "aclose dropped a lease being given back"


@pytest.mark.parametrize("write", ["commit", "release"])
async def test_a_write_batch_and_an_acquire_batch_lock_shared_rows_in_one_order(
    base_url: str, caplog: pytest.LogCaptureFixture, write: str
) -> None:
    """A plain acquisition batch waits on a row locked halfway down its keys (holding the
    rows before it, held leases included) while another store commits (or releases) the
    leases it holds on the same keys, issued in reverse order and stored in reverse
    order: the write waits for the first row instead of taking the rows from the end, so
    no deadlock (a second's stall, then a replay) and every write lands."""
    url = store_url(base_url, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    acquirer, holder = PostgresStore.from_url(url), PostgresStore.from_url(url)
    ns = f"order-w-{secrets.token_hex(4)}"
    keys = [TenantKey(ns, f"t{i:02}") for i in range(20)]
    try:
        for key in reversed(keys):
            await holder.replace(key, _due(b"x"))
        leases = [(await holder.acquire(key, f"h-{key.tenant}", 60)).lease for key in reversed(keys)]
        assert all(lease is not None for lease in leases)
        async with _rows_locked(base_url, schema, ns, keys[10].tenant):
            plain = [asyncio.ensure_future(acquirer.acquire(key, f"p-{key.tenant}", 60)) for key in keys]
            await asyncio.sleep(0.3)
            writes: list[asyncio.Future[object]] = [
                asyncio.ensure_future(
                    holder.commit(lease, _due(b"y")) if write == "commit" else holder.release(lease)
                )
                for lease in leases
                if lease is not None
            ]
            await asyncio.sleep(0.3)
        await asyncio.gather(*plain)
        assert all(done is not None and done is not False for done in await asyncio.gather(*writes))
        assert not [r for r in caplog.records if "Deadlock" in r.getMessage()]
    finally:
        await asyncio.gather(acquirer.aclose(), holder.aclose())


# -- opening through a connection that drops, and DSNs that would show a password --------


@contextlib.asynccontextmanager
async def _flaky_front(host: str, port: int, drop_first: int) -> AsyncIterator[dict[str, int]]:
    """Forwards to host:port, except that the first ``drop_first`` connections are closed
    as soon as they are accepted (a database restarting, a load balancer's hiccup)."""
    seen = {"connections": 0, "port": 0}
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        writers.append(writer)
        if seen["connections"] <= drop_first:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(host, port)
        writers.append(up_writer)
        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.get_running_loop().create_task(coro)
            tasks.add(task)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    seen["port"] = server.sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        server.close()
        for writer in writers:
            writer.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_calls_queued_behind_an_opening_that_is_retried_are_not_failed(base_url: str) -> None:
    """The first connection the store opens is dropped (a transient, retryable failure):
    the call that opens the store retries it and succeeds, but every call queued behind
    it on the init lock is handed the opener's first failure (``_open_failed``) as a
    StoreUnavailable, which _call does not retry, although the database answers."""
    parts = urlsplit(base_url)
    async with _flaky_front(parts.hostname or "127.0.0.1", parts.port or 5432, drop_first=1) as front:
        proxied = base_url.replace(
            parts.netloc, f"{parts.username + '@' if parts.username else ''}127.0.0.1:{front['port']}"
        )
        store = PostgresStore.from_url(store_url(proxied, sslmode="disable"))
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(store.check() for _ in range(4)), return_exceptions=True), 30.0
            )
        finally:
            await store.aclose()
    failed = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    assert not failed, f"{len(failed)} of 4 concurrent first calls failed: {failed[0]}"


@pytest.mark.parametrize(
    "dsn",
    [
        # A password with an unescaped '@' then '#' or '?': urllib takes what lies between
        # them for the host, and _where() shows it ("at s3cretpiece:5432/?").
        "postgresql://postgres:abc@s3cretpiece#x@127.0.0.1/test",
        "postgresql://postgres:abc@s3cretpiece?x@127.0.0.1/test",
        # An unescaped '?' early in the password: asyncpg's ValueError, untyped, quotes the
        # rest of the password ("bad query field: 'cdefgh5ecret@127.0.0.1/test'").
        "postgresql://postgres:ab?cdefgh5ecret@127.0.0.1/test",
        # An unclosed '[': PostgresStore's new keyword-form check calls urlsplit itself,
        # and its ValueError escapes the constructor untyped (store_from_url maps it).
        "postgresql://postgres:pw-s3cretpiece@[::1:5432/test",
    ],
)
@pytest.mark.parametrize("via", ["dsn", "url"])
async def test_a_mangled_password_never_reaches_an_error(dsn: str, via: str) -> None:
    with pytest.raises(FactorialTokensError) as caught:
        store = (
            PostgresStore(dsn=dsn, connect_timeout=1.0, acquire_timeout=2.0)
            if via == "dsn"
            else PostgresStore.from_url(dsn + ("&" if "?" in dsn else "?") + "connect_timeout=1")
        )
        try:
            await asyncio.wait_for(store.check(), 20.0)
        finally:
            await store.aclose()
    text = f"{caught.value} {caught.value!r}"
    assert "s3cretpiece" not in text and "cdefgh5ecret" not in text, text


async def test_an_unreadable_dsn_with_min_size_is_a_configuration_error() -> None:
    """``ValueError`` from asyncpg's DSN reading is mapped to ConfigurationError only
    around ``pool.acquire``; with ``min_size`` > 0 ``create_pool`` connects (and reads
    the DSN) first, outside that mapping, and the caller gets a bare ValueError."""
    store = PostgresStore(dsn="postgresql://postgres:hunter2@fe80::1:5432/test", min_size=1)
    try:
        with pytest.raises(ConfigurationError):
            await store.read(TenantKey("ns", "acme"))
    finally:
        await store.aclose()


async def test_calls_queued_behind_a_first_connect_that_times_out_get_its_answer() -> None:
    """A connect that timed out was retried (TimeoutError is an OSError) by the first call,
    then by every call queued behind it, one after the other under the opening lock: 8
    callers made 24 connection attempts and the last waited 12 s with acquire_timeout=2.
    The calls queued while the first one's attempts failed now get its answer."""
    async with _silent_server() as (port, sockets):
        store = PostgresStore.from_url(
            f"postgresql://postgres@127.0.0.1:{port}/test?connect_timeout=0.5&acquire_timeout=2"
        )
        try:

            async def failing() -> None:
                with pytest.raises(StoreUnavailable):
                    await asyncio.wait_for(store.check(), 60.0)

            await asyncio.gather(*(failing() for _ in range(8)))
            assert len(sockets) <= 3, f"{len(sockets)} connection attempts"  # the first call's
        finally:
            await store.aclose()


async def test_aclose_during_the_first_call_closes_every_connection(base_url: str) -> None:
    """``aclose`` while the first call opened the pool (``min_size`` > 0 connects then)
    found no pool to close: the call then finished on the closed store and its
    connections stayed open."""
    app = f"rv_{secrets.token_hex(4)}"
    store = PostgresStore.from_url(store_url(base_url, min_size="2", application_name=app))
    task = asyncio.create_task(store.check())
    await asyncio.sleep(0.005)  # the first call is opening the pool
    await store.aclose()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.5)
    con = await asyncpg.connect(base_url, timeout=5)
    try:
        left = await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app)
    finally:
        await con.close()
    assert left == 0, f"{left} connection(s) of a closed store still open (task: {task!r})"


async def test_a_caller_cancelled_during_a_stalled_migration_is_cancelled(base_url: str) -> None:
    """The migration's transaction rolls back on the way out and waits for the server,
    which never answers, until ``command_timeout``: that TimeoutError replaced the
    cancellation, and the cancelled caller got StoreUnavailable."""
    # The first call's migration: its reply to the statement inside the migration's
    # transaction (pg_advisory_xact_lock) never comes. The caller is cancelled.

    async with TcpProxy("127.0.0.1", urlsplit(base_url).port or 5432) as proxy:
        app = f"rv_{secrets.token_hex(4)}"
        url = store_url(
            f"postgresql://postgres@127.0.0.1:{proxy.port}/test",
            application_name=app,
            command_timeout="2",
            max_size="3",
        )
        store = PostgresStore.from_url(url)
        try:
            proxy.drop_reply(6, stall=True)  # startup, ..., BEGIN, the lock statement
            task = asyncio.create_task(store.check())
            await asyncio.sleep(0.5)
            con = await asyncpg.connect(base_url, timeout=5)
            try:
                query = await con.fetchval(
                    "SELECT query FROM pg_stat_activity WHERE application_name = $1", app
                )
            finally:
                await con.close()
            assert proxy.dropped == 1 and not task.done() and "pg_advisory_xact_lock" in query, query
            task.cancel()
            await asyncio.wait({task}, timeout=10.0)
            assert task.done()
            assert task.cancelled(), f"the cancelled call ended with {task.exception()!r}"
        finally:
            await store.aclose()


@pytest.mark.parametrize("port", ["99999", "0", "54x"])
def test_a_port_out_of_range_is_a_configuration_error(port: str) -> None:
    """asyncpg's socket connect raised a raw OverflowError for a port above 65535: the DSN
    is refused when the store is built, without quoting it."""
    for build in (
        lambda: PostgresStore.from_url(f"postgresql://postgres:s3cret@127.0.0.1:{port}/test"),
        lambda: PostgresStore(dsn=f"postgresql://postgres:s3cret@[::1]:{port},127.0.0.1:5432/test"),
    ):
        with pytest.raises(ConfigurationError, match="port") as caught:
            build()
        assert "s3cret" not in str(caught.value)
    PostgresStore(dsn="postgresql://postgres@[::1]:5432,127.0.0.1:5433,localhost/test")  # well-formed


async def test_aclose_gives_back_a_lease_won_in_flight_for_a_cancelled_caller(base_url: str) -> None:
    """A lease won by a batch answered after ``aclose`` began, for a caller cancelled at
    shutdown, was kept until its TTL: ``_give_back`` did nothing once closed, and ``aclose``
    waited only for the give-backs already started."""
    # A shutdown: the worker's acquire is in flight (its row locked by someone else for a
    # moment), the worker is cancelled, then the store is closed.
    from factorial_tokens.store import TenantKey, TenantStatus, Update

    url = store_url(base_url, max_size="4")
    schema = url.split("schema=")[1].split("&")[0]
    store = PostgresStore.from_url(url)
    key = TenantKey(f"inflight-{secrets.token_hex(4)}", "acme")
    await store.replace(key, Update(b"x", TenantStatus.ACTIVE, None, time.time()))
    locker = await asyncpg.connect(base_url, timeout=5)
    try:
        await locker.execute("BEGIN")
        await locker.execute(
            f'SELECT 1 FROM "{schema}".tenants WHERE namespace = $1 AND tenant = $2 FOR UPDATE',
            key.namespace,
            key.tenant,
        )
        task = asyncio.create_task(store.acquire(key, "worker", 60))
        await asyncio.sleep(0.3)  # the acquire batch waits for the row
        task.cancel()
        closing = asyncio.create_task(store.aclose())
        await asyncio.sleep(0.1)
        await locker.execute("ROLLBACK")
        await asyncio.wait_for(closing, 10.0)
        await asyncio.sleep(0.5)
        owner = await locker.fetchval(
            f'SELECT lease_owner FROM "{schema}".tenants WHERE namespace = $1 AND tenant = $2',
            key.namespace,
            key.tenant,
        )
    finally:
        await locker.close()
        await store.aclose()
    assert owner is None, f"lease won for a cancelled caller still held by {owner!r} after aclose"


async def test_an_admit_that_queued_on_the_throttle_row_is_not_admitted_for_free(base_url: str) -> None:
    """Every admit updates the app's one throttle row, so under load admits queue on its
    row lock. The queued ``admit`` statement judges the budget by its
    ``statement_timestamp()`` (when it started), finds no room and takes nothing; the
    fallback that follows re-judges the row by ``clock_timestamp()`` (now, the interval
    elapsed), computes a wait of 0 with ``ThrottleState.admit`` and returns 0.0 without
    writing: the caller is admitted and no unit was taken, so the next caller is admitted
    on the same unit. Here two admissions land together on a budget of one per interval."""
    schema = postgres_server.unique_schema()
    url = store_url(base_url, schema=schema)
    store = store_from_url(url)
    assert isinstance(store, PostgresStore)
    ns, interval = f"budget-{secrets.token_hex(4)}", 0.5
    con = await asyncpg.connect(base_url.split("?")[0], timeout=5)
    try:
        assert await store.admit(ns, secrets.token_hex(8), interval, 1) == 0  # the row exists
        async with con.transaction():
            await con.execute(
                f'SELECT 1 FROM "{schema}"."tenants" WHERE namespace = $1 AND tenant = \'\' FOR UPDATE', ns
            )
            queued = asyncio.create_task(store.admit(ns, secrets.token_hex(8), interval, 1))
            await asyncio.sleep(2 * interval)  # another admit's transaction holds the row; the unit frees
        first = await queued
        second = await store.admit(ns, secrets.token_hex(8), interval, 1)
        assert [first, second].count(0.0) == 1, (
            f"two admissions at once on a budget of one per {interval}s (waits {first}, {second})"
        )
    finally:
        await con.close()
        await store.aclose()
