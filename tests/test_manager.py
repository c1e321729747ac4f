"""TokenManager against the strict FakeFactorial: the guarantees, proven by counting.

Every test that touches the store runs once per store of the table (``tests/stores``); "two
workers" are two store instances on one backend (``backend.open()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import attrs
import pytest

from factorial_tokens import (
    CodeReused,
    ConfigurationError,
    EventKind,
    ExchangeInDoubt,
    FactorialApp,
    InvalidCallback,
    InvalidState,
    InvalidTenant,
    ManagerClosed,
    ReauthorizationRequired,
    RotationLost,
    StoreUnavailable,
    TenantNotConnected,
    TokenEvent,
    TokenManager,
    TokenSet,
)
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import (
    Acquisition,
    ChangeListener,
    ClaimState,
    CodeClaim,
    Freshness,
    Lease,
    MemoryStore,
    Record,
    Store,
    TenantKey,
    TenantStatus,
    Update,
    Watch,
    acquires_unless_fresh,
)
from factorial_tokens.testing import CountingStore, FakeFactorial, Fault, RefreshMode

from .conftest import CLIENT_ID, SimFactory, app_for
from .stores import STORES, Backend

#: For tests whose subject is refused before any store call: the memory store is enough.
MEMORY_ONLY = pytest.mark.parametrize("backend", ["memory"], indirect=True)
#: The stores with backend connections a test can kill.
KILLABLE = pytest.mark.parametrize(
    "backend", [name for name, kind in STORES.items() if kind.killable], indirect=True
)


@pytest.fixture
async def tm(app: FactorialApp, backend: Backend) -> AsyncIterator[TokenManager]:
    """A manager on a fresh store of each kind, with short budgets so failures surface fast."""
    async with TokenManager(app, backend.store, lease_ttl=6.0, provider_timeout=2.0) as manager:
        yield manager


async def connect(tm: TokenManager, sim: FakeFactorial, tenant: str = "acme", company_id: int = 1) -> str:
    """Connect ``tenant`` through a fresh code; return its access token."""
    tokens = await tm.exchange_code(tenant, sim.issue_code(company_id=company_id))
    return tokens.access_token


async def test_exchange_then_access_token(tm: TokenManager, sim: FakeFactorial) -> None:
    token = await connect(tm, sim)
    assert await tm.access_token("acme") == token
    assert sim.is_active(token)
    assert sim.stats.exchanges == 1 and sim.stats.refreshes == 0


async def test_hot_path_costs_no_store_call(sim: FakeFactorial, backend: Backend) -> None:
    store = CountingStore(backend.store)
    async with TokenManager(app_for(sim), store) as tm:
        await connect(tm, sim)
        await tm.access_token("acme")
        store.reset()
        for _ in range(1000):
            await tm.access_token("acme")
        assert store.calls.total() == 0


async def test_miss_with_fresh_tokens_is_one_round_trip_and_no_lease(
    sim: FakeFactorial, backend: Backend
) -> None:
    """An acquisition that leaves the fresh record alone: no read first, no lease to give back."""
    async with TokenManager(app_for(sim), backend.store) as first:
        await connect(first, sim)
    store = CountingStore(backend.open())
    async with TokenManager(app_for(sim), store) as second:
        store.reset()
        await second.access_token("acme")
        assert dict(store.calls) == {"acquire": 1}


async def age(tm: TokenManager, left: float, tenant: str = "acme") -> TokenSet:
    """Store ``tenant``'s tokens as if they had ``left`` seconds to live (of an hour)."""
    tokens = await tm.tokens(tenant)
    now = time.time()
    aged = attrs.evolve(tokens, expires_at=now + left, obtained_at=now + left - 3600)
    key = TenantKey(tm.app.client_id, tenant)
    await tm.store.replace(
        key, Update(JsonCodec().encode(key, aged), TenantStatus.ACTIVE, aged.expires_at, aged.obtained_at)
    )
    return aged


async def test_a_cold_refresh_is_two_round_trips(sim: FakeFactorial, backend: Backend) -> None:
    """A process with nothing cached (just started, or its cache dropped by an announcement):
    the acquisition, which takes the lease because the record is due, then the commit."""
    async with TokenManager(app_for(sim), backend.store) as first:
        old = await connect(first, sim)
        await age(first, left=5)  # inside min_valid (15 s of the default 60 s leeway)
    store = CountingStore(backend.open())
    async with TokenManager(app_for(sim), store) as cold:
        store.reset()
        token = await cold.access_token("acme")
        assert dict(store.calls) == {"acquire": 1, "commit": 1}
    assert token != old and sim.is_active(token) and sim.stats.refreshes == 1


async def test_a_forced_refresh_in_a_cold_process_is_three_round_trips(
    sim: FakeFactorial, backend: Backend
) -> None:
    """``refresh()`` with nothing cached reads once (to know which version it must beat),
    then the acquisition and the commit: the flight does not read the same record again."""
    async with TokenManager(app_for(sim), backend.store) as first:
        old = await connect(first, sim)
    store = CountingStore(backend.open())
    async with TokenManager(app_for(sim), store) as cold:
        store.reset()
        fresh = await cold.refresh("acme")
        assert dict(store.calls) == {"read": 1, "acquire": 1, "commit": 1}
    assert fresh.access_token != old and sim.is_active(fresh.access_token)
    assert sim.stats.refreshes == 1


class _SlowAnswer(CountingStore):
    """Its first acquisition unless fresh answers 0.3 s late."""

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        first = unless_fresh is not None and not self.calls["acquire"]
        won = await super().acquire(key, owner, ttl, unless_fresh=unless_fresh)
        if first:
            await asyncio.sleep(0.3)
        return won


async def test_a_record_found_fresh_that_is_due_on_arrival_is_asked_for_again(sim: FakeFactorial) -> None:
    """The store left the record alone (fresh at the instant it judged), and the answer
    arrived once the mandatory window had opened: the manager asks again at once, plainly,
    rather than wait for an announcement that will not come."""
    store = _SlowAnswer(MemoryStore())
    async with TokenManager(app_for(sim), store) as tm:
        old = await connect(tm, sim)
        await age(tm, left=15.15)  # min_valid is 15 s: the window opens in 0.15 s
        tm._cache.clear()
        store.reset()
        token = await asyncio.wait_for(tm.access_token("acme"), 5)
        assert dict(store.calls) == {"acquire": 2, "commit": 1}
    assert token != old and sim.stats.refreshes == 1


class _InOrder(CountingStore):
    """Also records the order of reads and acquisitions."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.order: list[str] = []

    async def read(self, key: TenantKey) -> Record | None:
        self.order.append("read")
        return await super().read(key)

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        self.order.append("acquire")
        return await super().acquire(key, owner, ttl, unless_fresh=unless_fresh)


def _refused_then_woken_and_read(order: list[str]) -> bool:
    """The refused acquisition first (no read before it); then, per wake-up, a read and an
    acquisition, and a last read. A wake-up before the commit (a poll tick) whose read
    comes just before the commit has its acquisition find the record fresh: no last read
    then (the refresh counts tell that it took no lease)."""
    body = order[1:]
    woken = ["read", "acquire"] * (len(body) // 2) + ["read"] * (len(body) % 2)
    return order[:1] == ["acquire"] and bool(body) and body == woken


async def test_a_cold_caller_waiting_for_another_workers_refresh_sends_two_commands(
    sim: FakeFactorial, backend: Backend
) -> None:
    """The acquisition (refused: the lease is busy) and, once woken, a read: no read first.
    (A wake-up before the holder commits, a poll tick, costs a read and an acquisition.)"""
    async with TokenManager(app_for(sim), backend.store) as first:
        await connect(first, sim)
        aged = await age(first, left=5)
    key = TenantKey(app_for(sim).client_id, "acme")
    holder = await backend.store.acquire(key, "the-other-worker", 10.0)
    assert holder.lease is not None
    store = _InOrder(backend.open())
    async with TokenManager(app_for(sim), store, lease_ttl=6.0, provider_timeout=2.0) as cold:
        store.reset()
        waiter = asyncio.ensure_future(cold.access_token("acme"))
        for _ in range(500):
            if store.calls["acquire"]:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not waiter.done()
        fresh = attrs.evolve(aged, expires_at=time.time() + 3600, obtained_at=time.time())
        await backend.store.commit(
            holder.lease,
            Update(JsonCodec().encode(key, fresh), TenantStatus.ACTIVE, fresh.expires_at, fresh.obtained_at),
        )
        assert await asyncio.wait_for(waiter, 10) == fresh.access_token
    assert _refused_then_woken_and_read(store.order)
    assert sim.stats.refreshes == 0


async def test_a_caller_waiting_for_another_workers_refresh_takes_its_announcement(
    sim: FakeFactorial, backend: Backend
) -> None:
    """Two workers, one tenant due: the one refused the lease waits for the holder's commit
    and takes the record its announcement carried (sealed under the app's secret): the
    refused acquisition is its one command, no read. On a store whose announcements carry
    no notice, once woken, a read. (A wake-up before the commit, a poll tick, costs a read
    and an acquisition.) One refresh in all."""
    async with TokenManager(app_for(sim), backend.store) as first:
        await connect(first, sim)
        await age(first, left=5)
    holding = CountingStore(backend.open())
    store = _InOrder(backend.open())
    sim.latency = 0.5
    async with (
        TokenManager(app_for(sim), holding, lease_ttl=6.0, provider_timeout=2.0) as holder,
        TokenManager(app_for(sim), store, lease_ttl=6.0, provider_timeout=2.0) as waiter,
    ):
        store.reset()
        refreshing = asyncio.ensure_future(holder.access_token("acme"))
        for _ in range(500):  # until the holder has the lease (its request takes 0.5 s)
            if holding.calls["acquire"]:
                break
            await asyncio.sleep(0.01)
        token = await asyncio.wait_for(waiter.access_token("acme"), 10)
        assert token == await refreshing
    if backend.kind.announces_notices:
        early = (len(store.order) - 1) // 2
        assert store.order == ["acquire", *["read", "acquire"] * early]
    else:
        assert _refused_then_woken_and_read(store.order)
    assert sim.stats.refreshes == 1 and sim.is_active(token)


class _ByTenant(CountingStore):
    """Also records each read and acquisition with its tenant, and the version each read
    of a tenant found."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.order: list[tuple[str, str]] = []
        self.read_versions: dict[str, list[int | None]] = {}

    async def read(self, key: TenantKey) -> Record | None:
        self.order.append(("read", key.tenant))
        record = await super().read(key)
        self.read_versions.setdefault(key.tenant, []).append(record.version if record else None)
        return record

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        self.order.append(("acquire", key.tenant))
        return await super().acquire(key, owner, ttl, unless_fresh=unless_fresh)


@contextlib.asynccontextmanager
async def _only_slot_busy(
    sim: FakeFactorial, backend: Backend, store: Store
) -> AsyncIterator[tuple[TokenManager, TokenManager, asyncio.Future[str]]]:
    """Tenants "acme" and "busy" connected, both due; yields ``other`` (a worker on the
    backend), ``queued`` (a worker on ``store`` with ``max_refreshes=1``) and the refresh
    of "busy" in ``queued`` that holds its only provider slot (the provider answers it in
    3 s), once its request reached the provider."""
    async with TokenManager(app_for(sim), backend.store) as first:
        for tenant, company in (("acme", 1), ("busy", 2)):
            await connect(first, sim, tenant, company)
            await age(first, left=5, tenant=tenant)
    async with (
        TokenManager(app_for(sim), backend.open(), lease_ttl=8.0, provider_timeout=5.0) as other,
        TokenManager(app_for(sim), store, max_refreshes=1, lease_ttl=8.0, provider_timeout=5.0) as queued,
    ):
        sim.latency = 3.0
        requests = sim.stats.token_requests
        busy = asyncio.ensure_future(queued.access_token("busy"))
        for _ in range(500):
            if sim.stats.token_requests > requests:
                break
            await asyncio.sleep(0.01)
        yield other, queued, busy


async def test_a_caller_queued_for_a_provider_slot_takes_another_workers_commit(
    sim: FakeFactorial, backend: Backend
) -> None:
    """A worker whose provider slots are all busy reads a due tenant, then queues for a
    slot; another worker's commit of that tenant, announced meanwhile, ends the wait: the
    caller has the new token at once, without an acquisition (on a store whose
    announcements carry the record, without a read after the commit either), while the worker's own
    slow refresh still holds its only slot. (Through PgBouncer, whose change poll runs every
    half second, the caller either waits for the slot and its acquisition finds the record
    fresh, or the poll ends its wait and it reads the record.) Two refreshes."""
    store = _ByTenant(backend.open())
    async with _only_slot_busy(sim, backend, store) as (other, queued, busy):
        sim.latency = 0.3
        refreshing = asyncio.ensure_future(other.access_token("acme"))
        token = await asyncio.wait_for(queued.access_token("acme"), 10)
        if backend.kind.pushes_changes:  # the slot never came free: the announcement ended the wait
            assert not busy.done()
        assert token == await refreshing
        await busy
    acme = [op for op, tenant in store.order if tenant == "acme"]
    if not backend.kind.pushes_changes:
        assert acme in (["read", "acquire"], ["read", "read"])
    elif backend.kind.announces_notices:
        assert set(acme) == {"read"}
        # The token came from the commit's announcement: every read was answered before the
        # commit. (A late announcement of the set-up's own writes, which a loaded cluster's
        # bus can deliver after the caller queued, ends the wait too and costs one more
        # read, of the old record.)
        committed = await backend.store.read(TenantKey(queued.app.client_id, "acme"))
        assert committed is not None
        assert all(v is not None and v < committed.version for v in store.read_versions["acme"])
    else:
        assert set(acme) == {"read"}
    assert sim.stats.refreshes == 2 and sim.is_active(token)


class _Recorded(CountingStore):
    """Also keeps the notice each commit carried, and makes each acquisition take
    ``acquire_delay`` seconds (a slow round trip)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.notices: list[bytes | None] = []
        self.acquire_delay = 0.0
        self.acquiring = 0  # acquisitions sent (counted before their delay)

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        self.acquiring += 1
        if self.acquire_delay:
            await asyncio.sleep(self.acquire_delay)
        return await super().acquire(key, owner, ttl, unless_fresh=unless_fresh)

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        self.notices.append(update.notice)
        return await super().commit(lease, update)


@MEMORY_ONLY
async def test_a_queued_caller_refuses_a_replayed_notice_after_its_acquisition_aged(
    sim: FakeFactorial, backend: Backend
) -> None:
    """The acquisition judged the record fresh (at its own instant) but it was due by the
    time the answer came: the caller asks again, plainly, and queues for the only slot. A
    replayed notice of an older commit (genuine, sealed: anyone on the channel can send
    it again) ends the wait; it must be refused, as a waiter for a lease refuses it: its
    token was revoked by the refresh after it."""
    store = _Recorded(backend.store)
    async with TokenManager(app_for(sim), store) as first:
        await connect(first, sim)
        await age(first, left=5)
        old = await first.access_token("acme")  # commit: its notice is kept
        await age(first, left=5)
        assert await first.access_token("acme") != old  # revokes ``old``
        replayed = store.notices[0]
        assert replayed is not None and not sim.is_active(old)
    async with TokenManager(app_for(sim), store, max_refreshes=1) as queued:
        # Fresh for 1 s more (min_valid is 15 s): the acquisition below answers later.
        await age(queued, left=16)
        store.acquiring, store.acquire_delay = 0, 1.5
        refreshing = asyncio.ensure_future(queued.access_token("acme"))
        while not store.acquiring:
            await asyncio.sleep(0.01)
        holder = asyncio.ensure_future(queued._slots.__aenter__())  # queued during the acquisition
        for _ in range(500):
            if "acme" in queued._queued:
                break
            await asyncio.sleep(0.01)
        assert "acme" in queued._queued
        await holder
        store.acquire_delay = 0.0
        digest = TenantKey(queued.app.client_id, "acme").digest
        backend.store._notifier.notify(digest, replayed)  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        queued._slots.release()  # the holder's slot
        token = await asyncio.wait_for(refreshing, 10)
    assert token != old and sim.is_active(token)


class _HeldRead(_ByTenant):
    """A read of ``tenant`` is answered by the backend, then held until ``release`` is set."""

    def __init__(self, inner: Store, tenant: str) -> None:
        super().__init__(inner)
        self.tenant = tenant
        self.answered = asyncio.Event()
        self.release = asyncio.Event()

    async def read(self, key: TenantKey) -> Record | None:
        record = await super().read(key)
        if key.tenant == self.tenant and not self.release.is_set():
            self.answered.set()
            await self.release.wait()
        return record


async def _commit_announced_during_the_read(
    sim: FakeFactorial, backend: Backend, *, then_without_notice: bool
) -> None:
    """``queued`` (every provider slot busy) reads "acme"; while that read is on its way
    back, ``other`` commits a refresh of it, announced; with ``then_without_notice``, an
    announcement without a notice follows. The caller must have ``other``'s token at once
    (reads only: no acquisition, no wait for the busy slot)."""
    store = _HeldRead(backend.open(), "acme")
    async with _only_slot_busy(sim, backend, store) as (other, queued, busy):
        sim.latency = 0.0
        asking = asyncio.ensure_future(queued.access_token("acme"))
        await asyncio.wait_for(store.answered.wait(), 5)  # the stale record is on its way
        token = await asyncio.wait_for(other.access_token("acme"), 5)  # committed, announced
        await asyncio.sleep(0.2)  # the announcement reaches the waiting worker (or not)
        if then_without_notice:
            store.inner._notifier.notify(TenantKey(CLIENT_ID, "acme").digest)
        store.release.set()
        assert await asyncio.wait_for(asking, 2) == token
        assert not busy.done()
        await busy
    # A second read when an announcement without a notice followed the commit's.
    assert set(op for op, tenant in store.order if tenant == "acme") == {"read"}
    assert sim.stats.refreshes == 2 and sim.is_active(token)


async def test_a_notice_announced_while_the_read_was_answered_ends_the_queue_before_it_starts(
    sim: FakeFactorial, backend: Backend
) -> None:
    """Another worker's commit announced while this worker's read of the tenant was on its
    way back (the read saw the record before it): with every provider slot busy, the
    caller takes the announced record at once instead of queueing for a slot."""
    if not backend.kind.announces_notices:
        pytest.skip("the store's announcements carry no notice")
    await _commit_announced_during_the_read(sim, backend, then_without_notice=False)


async def test_a_change_announced_during_the_read_without_a_notice_ends_the_queue_too(
    sim: FakeFactorial, backend: Backend
) -> None:
    """Another worker's commit is announced while this worker's read is on its way back,
    then an announcement without a notice follows (a release, a replace; seen on a loaded
    Redis Cluster): the watch keeps no notice, but the read is stale all the same. The
    caller reads again instead of queueing for a slot that a slow refresh holds."""
    await _commit_announced_during_the_read(sim, backend, then_without_notice=True)


async def test_a_refresh_that_outlives_a_third_of_its_lease_has_it_renewed(
    sim: FakeFactorial, backend: Backend
) -> None:
    """The provider answers after 2.6 s of a 6 s lease: the holder's watchdog, due a third
    of the TTL (2 s) into the work, extends the lease; the refresh is committed, and the
    other worker, asking meanwhile, waits for it. (No watchdog task for a refresh that ends
    sooner, as nearly all do.) The provider timeout (4 s) leaves the slow answer 1.4 s of
    room on a loaded machine."""
    async with TokenManager(app_for(sim), backend.store) as first:
        await connect(first, sim)
        await age(first, left=5)
    holding = CountingStore(backend.open())
    async with (
        TokenManager(app_for(sim), holding, lease_ttl=6.0, provider_timeout=4.0) as holder,
        TokenManager(app_for(sim), backend.open(), lease_ttl=6.0, provider_timeout=4.0) as other,
    ):
        sim.latency = 2.6
        requests = sim.stats.token_requests
        refreshing = asyncio.ensure_future(holder.access_token("acme"))
        for _ in range(500):  # until the holder's refresh reached the provider: it has the lease
            if sim.stats.token_requests > requests:
                break
            await asyncio.sleep(0.01)
        token = await asyncio.wait_for(other.access_token("acme"), 10)
        assert token == await refreshing
        assert holding.calls["extend"] >= 1
        quick = holding.calls["extend"]
        sim.latency = 0.0
        await holder.refresh("acme")
        assert holding.calls["extend"] == quick
    assert sim.stats.refreshes == 2 and sim.stats.invalid_grant == 0


class _OldContract:
    """A third party's store written before ``acquire`` took ``unless_fresh``: every
    primitive forwarded, ``acquire`` with its older signature, no capability declared."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    async def read(self, key: TenantKey) -> Record | None:
        return await self.inner.read(key)

    async def acquire(self, key: TenantKey, owner: str, ttl: float) -> Acquisition:
        return await self.inner.acquire(key, owner, ttl)

    async def extend(self, lease: Lease, ttl: float) -> bool:
        return await self.inner.extend(lease, ttl)

    async def release(self, lease: Lease) -> bool:
        return await self.inner.release(lease)

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        return await self.inner.commit(lease, update)

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        await self.inner.replace(key, update)

    async def claim_code(self, key: TenantKey, code_hash: str, owner: str, ttl: float) -> CodeClaim:
        return await self.inner.claim_code(key, code_hash, owner, ttl)

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        return await self.inner.advance_code(claim, state, ttl, outcome)

    async def tenants(self, namespace: str) -> list[Record]:
        return await self.inner.tenants(namespace)

    def watch(self, key: TenantKey) -> AbstractAsyncContextManager[Watch]:
        return self.inner.watch(key)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        return self.inner.on_change(callback)

    async def check(self) -> None:
        await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _OldOverride(MemoryStore):
    """A subclass written before ``unless_fresh``: it inherits the attribute, not the capability."""

    async def acquire(self, key: TenantKey, owner: str, ttl: float) -> Acquisition:
        return await super().acquire(key, owner, ttl)


async def test_a_subclass_overriding_acquire_the_older_way_is_read_first(sim: FakeFactorial) -> None:
    store = _OldOverride()
    assert store.acquires_unless_fresh and not acquires_unless_fresh(store)
    assert acquires_unless_fresh(MemoryStore()) and acquires_unless_fresh(CountingStore(MemoryStore()))
    assert not acquires_unless_fresh(CountingStore(store))
    counting = CountingStore(store)
    async with TokenManager(app_for(sim), counting) as tm:
        old = await connect(tm, sim)
        tm._cache.clear()
        counting.reset()
        assert await tm.access_token("acme") == old
        assert dict(counting.calls) == {"read": 1}
        await age(tm, left=5)
        tm._cache.clear()
        counting.reset()
        assert await tm.access_token("acme") != old
        assert dict(counting.calls) == {"read": 1, "acquire": 1, "commit": 1}


async def test_a_store_written_to_the_older_contract_is_read_first(
    sim: FakeFactorial, backend: Backend
) -> None:
    """Without the capability the manager reads, then acquires: a fresh token one read, a
    cold refresh three round trips, and never an ``unless_fresh`` the store does not take."""
    assert isinstance(_OldContract(backend.store), Store) and not acquires_unless_fresh(
        _OldContract(backend.store)
    )
    async with TokenManager(app_for(sim), backend.store) as first:
        old = await connect(first, sim)
    store = CountingStore(_OldContract(backend.open()))
    async with TokenManager(app_for(sim), store) as cold:
        store.reset()
        assert await cold.access_token("acme") == old
        assert dict(store.calls) == {"read": 1}
    async with TokenManager(app_for(sim), store) as cold:
        await age(cold, left=5)
        store.reset()
        token = await cold.access_token("acme")
        assert dict(store.calls) == {"read": 1, "acquire": 1, "commit": 1}
    assert token != old and sim.is_active(token) and sim.stats.refreshes == 1


async def test_500_callers_on_an_expired_tenant_cause_one_refresh(
    make_sim: SimFactory, backend: Backend
) -> None:
    async with make_sim(access_token_ttl=1) as sim:
        store = CountingStore(backend.store)
        async with TokenManager(app_for(sim), store, lease_ttl=6, provider_timeout=2) as tm:
            old = await connect(tm, sim)
            await asyncio.sleep(1.1)
            store.reset()
            tokens = await asyncio.gather(*(tm.access_token("acme") for _ in range(500)))
        assert set(tokens) != {old} and len(set(tokens)) == 1 and sim.is_active(tokens[0])
        assert sim.stats.refreshes == 1 and sim.stats.refresh_attempts == 1
        assert sim.stats.invalid_grant == 0
        assert sim.stats.families_revoked == 0
        assert store.calls["acquire"] == 1 and store.calls["commit"] == 1
        assert store.calls.total() <= 3


async def test_200_concurrent_exchanges_of_one_code(tm: TokenManager, sim: FakeFactorial) -> None:
    code = sim.issue_code(company_id=7)
    results = await asyncio.gather(*(tm.exchange_code("acme", code) for _ in range(200)))
    assert len({r.access_token for r in results}) == 1
    assert len({r.refresh_token for r in results}) == 1
    assert sim.stats.exchanges == 1
    assert sim.stats.invalid_grant == 0


async def test_retried_callback_gets_the_same_tokens(sim: FakeFactorial, backend: Backend) -> None:
    code = sim.issue_code(company_id=7)
    async with TokenManager(app_for(sim), backend.store) as first:
        original = await first.exchange_code("acme", code)
    async with TokenManager(app_for(sim), backend.open()) as second:  # another worker, same store
        again = await second.exchange_code("acme", code)
    assert again.access_token == original.access_token
    assert sim.stats.exchanges == 1 and sim.stats.token_requests == 1


async def test_a_code_is_refused_for_another_tenant(tm: TokenManager, sim: FakeFactorial) -> None:
    code = sim.issue_code(company_id=7)
    await tm.exchange_code("acme", code)
    with pytest.raises(CodeReused):
        await tm.exchange_code("evil", code)
    concurrent = sim.issue_code(company_id=8)
    results = await asyncio.gather(
        tm.exchange_code("one", concurrent), tm.exchange_code("two", concurrent), return_exceptions=True
    )
    assert sum(isinstance(r, CodeReused) for r in results) == 1
    assert sim.stats.exchanges == 2 and sim.stats.invalid_grant == 0
    with pytest.raises(TenantNotConnected):
        await tm.access_token("evil")


async def test_a_refused_code_gives_every_caller_the_same_error(tm: TokenManager, sim: FakeFactorial) -> None:
    results = await asyncio.gather(
        *(tm.exchange_code("acme", "not-a-real-code") for _ in range(20)), return_exceptions=True
    )
    errors = {(type(e).__name__, getattr(e, "error", None)) for e in results}
    assert errors == {("ProviderError", "invalid_grant")}
    assert sim.stats.token_requests == 1


@MEMORY_ONLY
@pytest.mark.parametrize("code", ["", "x" * 5000, "line\nbreak", None])
async def test_malformed_codes_are_refused_before_any_request(
    tm: TokenManager, sim: FakeFactorial, code: object
) -> None:
    with pytest.raises(InvalidCallback):
        await tm.exchange_code("acme", code)  # type: ignore[arg-type]
    assert sim.stats.token_requests == 0


async def test_forced_refresh_is_single_flight(tm: TokenManager, sim: FakeFactorial) -> None:
    old = await connect(tm, sim)
    results = await asyncio.gather(*(tm.refresh("acme") for _ in range(50)))
    assert {r.access_token for r in results} != {old}
    assert len({r.access_token for r in results}) == 1
    assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0
    assert await tm.access_token("acme") == results[0].access_token


#: Set in a caller's task: its store reads are answered only after a commit.
_LATE = contextvars.ContextVar("late", default=False)


class _LateReads(CountingStore):
    """Reads made by late callers (:data:`_LATE`) are answered after the first commit, as a
    busy connection pool may answer them after another caller's refresh."""

    def __init__(self, inner: MemoryStore) -> None:
        super().__init__(inner)
        self.committed = asyncio.Event()

    async def read(self, key: TenantKey) -> Record | None:
        if _LATE.get():
            await self.committed.wait()
        return await super().read(key)

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        try:
            return await super().commit(lease, update)
        finally:
            self.committed.set()


class _ReadsSentTogether(_LateReads):
    """Every read is sent a turn later, so that every caller has read before the first one
    starts the refresh; a late caller's read sees the record when sent and is answered only
    after the first commit."""

    async def read(self, key: TenantKey) -> Record | None:
        await asyncio.sleep(0)
        record = await self.inner.read(key)
        if _LATE.get():
            await self.committed.wait()
        return record


class _ReadsQueuedBehindTheRefresh(_LateReads):
    """Every read is sent a turn later, and a late caller's read only once the first commit
    landed (queued for a busy pool's connection): it sees the refreshed record."""

    async def read(self, key: TenantKey) -> Record | None:
        await asyncio.sleep(0)
        return await super().read(key)


@pytest.mark.parametrize(
    "wrapper",
    [
        pytest.param(_LateReads, id="reads-answered-after-the-commit"),
        # Seen on Redis Cluster: the refreshed version read must not be taken for an old one.
        pytest.param(_ReadsQueuedBehindTheRefresh, id="reads-sent-after-the-commit"),
        # A caller must beat the version it read, not the newer one cached meanwhile.
        pytest.param(_ReadsSentTogether, id="every-read-sent-before-the-refresh"),
    ],
)
async def test_a_forced_refresh_by_a_cold_manager_is_single_flight(
    sim: FakeFactorial, wrapper: type[_LateReads]
) -> None:
    """Fifty concurrent refreshes on a manager with nothing cached (another worker, or its
    cache emptied by a change announcement): one refresh, even when the other callers' reads
    would be answered after the first caller's refresh committed (seen on Postgres under load),
    and when every caller read before the refresh started. Memory only: the timing is the
    wrapper's."""
    shared = MemoryStore()
    async with TokenManager(app_for(sim), shared) as first:
        old = await connect(first, sim)
    store = wrapper(shared)

    async def late(tm: TokenManager) -> TokenSet:
        _LATE.set(True)  # this caller's task only
        return await tm.refresh("acme")

    async with TokenManager(app_for(sim), store, lease_ttl=6.0, provider_timeout=2.0) as cold:
        results = await asyncio.gather(cold.refresh("acme"), *(late(cold) for _ in range(49)))
    assert {r.access_token for r in results} != {old}
    assert len({r.access_token for r in results}) == 1
    assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


class _DeathAnsweredLate(_LateReads):
    """The commit that marks the tenant dead lands, and its answer arrives only after the
    late callers' reads, sent once it landed, were answered (the reads on another connection,
    or the commit in a Postgres batch that has more work to do before it answers)."""

    def __init__(self, inner: MemoryStore, late_reads: int) -> None:
        super().__init__(inner)
        self.late_reads = late_reads
        self.read_after_death = asyncio.Event()

    async def read(self, key: TenantKey) -> Record | None:
        await asyncio.sleep(0)  # a round trip: the late callers read before any flight starts
        record = await super().read(key)
        if _LATE.get():
            self.late_reads -= 1
            if self.late_reads == 0:
                self.read_after_death.set()  # the callers see this record before the answer
        return record

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        if update.status is not TenantStatus.NEEDS_REAUTH:
            return await super().commit(lease, update)
        stored = await self.inner.commit(lease, update)
        self.calls["commit"] += 1
        self.committed.set()  # landed: the late reads go now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.read_after_death.wait(), 5)
        return stored


async def test_a_caller_whose_read_lands_before_the_death_is_answered_gets_its_cause(
    sim: FakeFactorial,
) -> None:
    """A lost rotation (strict mode) marks the tenant dead. Callers of the same process whose
    store reads see the dead record (before the commit that marked it is even answered to
    the marking flight, as in a Postgres batch) get the same ``RotationLost``, not a vaguer
    ``ReauthorizationRequired`` (seen on Postgres under load), and so does a later caller.
    (Concurrent refreshes join the flight without reading; ``tokens`` reads.)"""
    shared = MemoryStore()
    async with TokenManager(app_for(sim), shared) as first:
        await connect(first, sim)
    store = _DeathAnsweredLate(shared, late_reads=9)
    sim.inject(Fault.DROP_AFTER)

    async def late(tm: TokenManager) -> TokenSet:
        _LATE.set(True)  # this caller's task only
        return await tm.tokens("acme")

    async with TokenManager(app_for(sim), store, lease_ttl=6.0, provider_timeout=2.0) as cold:
        results = await asyncio.gather(
            cold.refresh("acme"), *(late(cold) for _ in range(9)), return_exceptions=True
        )
        assert store.read_after_death.is_set()  # every late read saw the dead record first
        assert all(isinstance(r, RotationLost) for r in results), results
        with pytest.raises(RotationLost):  # and so does a caller that comes later
            await cold.access_token("acme")
    assert sim.stats.refresh_attempts == 2


@KILLABLE
async def test_killed_store_connections_lose_nothing(
    tm: TokenManager, sim: FakeFactorial, backend: Backend
) -> None:
    await connect(tm, sim)
    assert await backend.kill_connections() >= 1
    outcomes: list[TokenSet | StoreUnavailable] = []
    for _ in range(2):  # the next call reconnects, or fails typed and the one after works
        try:
            outcomes.append(await tm.refresh("acme"))
        except StoreUnavailable as exc:
            outcomes.append(exc)
    fresh = outcomes[-1]
    assert isinstance(fresh, TokenSet) and sim.is_active(fresh.access_token)
    assert (await tm.tokens("acme")).access_token == fresh.access_token
    assert sim.stats.invalid_grant == 0 and sim.stats.families_revoked == 0


async def test_short_lifetime_is_not_refreshed_on_every_call(make_sim: SimFactory, backend: Backend) -> None:
    async with make_sim(access_token_ttl=2) as sim:
        async with TokenManager(
            app_for(sim), backend.store, leeway=60, lease_ttl=6, provider_timeout=2
        ) as tm:
            await connect(tm, sim)
            for _ in range(200):
                await tm.access_token("acme")
            assert sim.stats.refreshes == 0


async def test_company_tokens_never_refresh(tm: TokenManager, sim: FakeFactorial) -> None:
    tokens = await tm.exchange_code("acme", sim.issue_code(company_id=3, company_token=True))
    assert tokens.expires_at is None and tokens.refresh_token is None
    assert await tm.access_token("acme") == tokens.access_token
    assert (await tm.refresh("acme")).access_token == tokens.access_token
    assert sim.stats.refreshes == 0


async def test_two_managers_on_one_store_refresh_once(make_sim: SimFactory, backend: Backend) -> None:
    async with make_sim(access_token_ttl=1, latency=0.05) as sim:
        stores = [CountingStore(backend.store), CountingStore(backend.open())]  # two workers
        async with (
            TokenManager(app_for(sim), stores[0], lease_ttl=6, provider_timeout=2) as one,
            TokenManager(app_for(sim), stores[1], lease_ttl=6, provider_timeout=2) as two,
        ):
            old = await connect(one, sim)
            assert await two.access_token("acme") == old
            await asyncio.sleep(1.1)
            for store in stores:
                store.reset()
            calls = [m.access_token("acme") for m in (one, two) for _ in range(100)]
            tokens = await asyncio.gather(*calls)
        assert len(set(tokens)) == 1 and tokens[0] != old and sim.is_active(tokens[0])
        assert sim.stats.refreshes == 1 and sim.stats.refresh_attempts == 1
        assert sim.stats.invalid_grant == 0 and sim.stats.families_revoked == 0
        assert sum(s.calls["commit"] for s in stores) == 1
        assert sum(s.calls["acquire"] for s in stores) <= len(stores)


async def test_a_rolling_deploy_refreshes_once(make_sim: SimFactory, backend: Backend) -> None:
    """Workers of the older contract (read, then acquire) and of the newer (acquire unless
    fresh) on one store, every token expired at once: still one refresh."""
    async with make_sim(access_token_ttl=1, latency=0.05) as sim:
        async with (
            TokenManager(app_for(sim), _OldContract(backend.store), lease_ttl=6, provider_timeout=2) as old,
            TokenManager(app_for(sim), backend.open(), lease_ttl=6, provider_timeout=2) as new,
        ):
            before = await connect(new, sim)
            await asyncio.sleep(1.1)
            calls = [m.access_token("acme") for m in (old, new, old, new) for _ in range(50)]
            tokens = await asyncio.gather(*calls)
        assert len(set(tokens)) == 1 and tokens[0] != before and sim.is_active(tokens[0])
        assert sim.stats.refreshes == 1 and sim.stats.refresh_attempts == 1
        assert sim.stats.invalid_grant == 0 and sim.stats.families_revoked == 0


async def test_dead_grant_needs_reauthorization(make_sim: SimFactory, backend: Backend) -> None:
    events: list[TokenEvent] = []
    async with make_sim(access_token_ttl=1) as sim:
        async with TokenManager(
            app_for(sim), backend.store, on_event=events.append, lease_ttl=6, provider_timeout=2
        ) as tm:
            await connect(tm, sim, company_id=5)
            sim.revoke_company(5)
            await asyncio.sleep(1.1)
            results = await asyncio.gather(
                *(tm.access_token("acme") for _ in range(50)), return_exceptions=True
            )
            assert all(isinstance(r, ReauthorizationRequired) for r in results)
            requests = sim.stats.token_requests
            with pytest.raises(ReauthorizationRequired):
                await tm.access_token("acme")
            assert sim.stats.token_requests == requests  # no hammering
            [info] = await tm.tenants()
            assert info.needs_reauthorization and info.status is TenantStatus.NEEDS_REAUTH
            assert await tm.flush_events()  # listeners run on a background thread
            assert [e.kind for e in events].count(EventKind.REAUTHORIZATION_REQUIRED) == 1
            token = await connect(tm, sim, company_id=5)  # the company connects again
            assert await tm.access_token("acme") == token
            assert not (await tm.tenants())[0].needs_reauthorization


async def test_invalid_grant_after_a_newer_write_is_a_lost_race(
    make_sim: SimFactory, backend: Backend
) -> None:
    async with make_sim(access_token_ttl=1) as sim:
        async with TokenManager(app_for(sim), backend.store, lease_ttl=6, provider_timeout=2) as tm:
            await connect(tm, sim, company_id=5)
            sim.revoke_company(5)
            await asyncio.sleep(1.1)
            sim.inject(Fault.SLOW, delay=0.5)  # the refusal arrives after the reconnection
            pending = asyncio.create_task(tm.access_token("acme"))
            await asyncio.sleep(0.1)  # the refresh is on its way to a revoked grant
            reconnected = await tm.exchange_code("acme", sim.issue_code(company_id=5))
            assert await pending == reconnected.access_token
            assert not (await tm.tenants())[0].needs_reauthorization


async def test_a_cancelled_caller_does_not_cancel_the_refresh(make_sim: SimFactory, backend: Backend) -> None:
    async with make_sim(access_token_ttl=1, latency=0.4) as sim:
        async with TokenManager(app_for(sim), backend.store, lease_ttl=6, provider_timeout=2) as tm:
            await connect(tm, sim)
            await asyncio.sleep(1.2)
            waiting = asyncio.create_task(tm.access_token("acme"))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(tm.access_token("acme"), 0.1)
            token = await waiting
            assert sim.is_active(token)
            assert (await tm.tokens("acme")).access_token == token
            assert sim.stats.refreshes == 1


@pytest.mark.parametrize("revoked", [False, True], ids=["refreshed", "grant-revoked"])
async def test_cancelled_callers_never_cancel_the_refresh_their_joiners_get(
    make_sim: SimFactory, backend: Backend, revoked: bool
) -> None:
    """The caller that started the refresh and half of those that joined it are cancelled:
    the refresh goes on, every other caller gets its one outcome (the token, or the
    refusal), and the cancelled callers leave nothing behind."""
    async with make_sim(access_token_ttl=1, latency=0.3) as sim:
        async with TokenManager(app_for(sim), backend.store, lease_ttl=6, provider_timeout=2) as tm:
            await connect(tm, sim, company_id=5)
            if revoked:
                sim.revoke_company(5)
            await asyncio.sleep(1.1)
            first = asyncio.create_task(tm.access_token("acme"))
            await asyncio.sleep(0)
            assert "acme" in tm._flights  # the first caller started the refresh
            joiners = [asyncio.create_task(tm.access_token("acme")) for _ in range(20)]
            await asyncio.sleep(0.1)
            for task in (first, *joiners[::2]):
                task.cancel()
            results = await asyncio.gather(*joiners[1::2], return_exceptions=True)
            assert first.cancelled() and all(task.cancelled() for task in joiners[::2])
            if revoked:
                assert all(isinstance(r, ReauthorizationRequired) for r in results), results
                assert sim.stats.refreshes == 0
            else:
                assert len(set(results)) == 1 and sim.is_active(results[0])  # type: ignore[arg-type]
                assert sim.stats.refreshes == 1
            assert sim.stats.refresh_attempts == 1
            assert not tm._joined and not tm._flights


async def test_a_cancelled_exchange_still_stores_the_tokens(make_sim: SimFactory, backend: Backend) -> None:
    async with make_sim(latency=0.3) as sim:
        async with TokenManager(app_for(sim), backend.store) as tm:
            exchanged = asyncio.Event()
            tm.add_listener(lambda event: exchanged.set() if event.kind is EventKind.EXCHANGED else None)
            code = sim.issue_code(company_id=1)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(tm.exchange_code("acme", code), 0.1)
            await asyncio.wait_for(exchanged.wait(), 10)
            stored = await tm.tokens("acme")
            assert (await tm.exchange_code("acme", code)).access_token == stored.access_token
            assert sim.stats.exchanges == 1


async def test_client_sends_bearer_and_retries_once_after_401(tm: TokenManager, sim: FakeFactorial) -> None:
    await connect(tm, sim, company_id=9)
    async with tm.client("acme") as api:
        async with api.get(f"/api/{tm.app.api_version}/resources/employees/employees") as resp:
            assert resp.status == 200
        sim.expire_access_tokens(9)
        resp = await api.get(f"/api/{tm.app.api_version}/resources/employees/employees")
        assert resp.status == 200
        resp.release()
    assert sim.stats.refreshes == 1
    with pytest.raises(ConfigurationError):
        await tm.client("acme").get("https://elsewhere.example/steal")


async def test_credentials(tm: TokenManager, sim: FakeFactorial) -> None:
    await tm.exchange_code("acme", sim.issue_code(company_id=42, employee_id=7))
    owner = await tm.credentials("acme")
    assert owner.company_id == "42" and owner.employee_id == "7"
    assert not owner.is_company


async def test_credentials_ids_as_strings_in_2026_versions(sim: FakeFactorial, backend: Backend) -> None:
    async with TokenManager(app_for(sim, api_version="2026-01-01"), backend.store) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=42, company_token=True))
        owner = await tm.credentials("acme")
        assert owner.company_id == "42" and owner.is_company


async def test_revoke_and_forget(tm: TokenManager, sim: FakeFactorial) -> None:
    token = await connect(tm, sim)
    await tm.revoke("acme")
    assert not sim.is_active(token)
    assert sim.stats.revocations == 1
    with pytest.raises(TenantNotConnected):
        await tm.access_token("acme")
    await connect(tm, sim, "other")
    await tm.forget("other")
    assert await tm.tenants() == []


async def test_tenants_lists_status(tm: TokenManager, sim: FakeFactorial) -> None:
    await connect(tm, sim, "b", 2)
    await connect(tm, sim, "a", 1)
    infos = await tm.tenants()
    assert [i.tenant for i in infos] == ["a", "b"]
    assert all(i.status is TenantStatus.ACTIVE and i.expires_at and i.expires_at > time.time() for i in infos)


async def test_two_apps_share_one_store_safely(sim: FakeFactorial, backend: Backend) -> None:
    other_app = FactorialApp(
        client_id="demo-app",
        client_secret="other-secret",
        redirect_uri="http://127.0.0.1/cb",
        base_url=sim.base_url,
    )
    async with (
        TokenManager(app_for(sim), backend.store) as prod,
        TokenManager(other_app, backend.open()) as demo,
    ):
        await connect(prod, sim)
        with pytest.raises(TenantNotConnected):
            await demo.access_token("acme")
        assert await demo.tenants() == []


async def test_events(tm: TokenManager, sim: FakeFactorial) -> None:
    events: list[TokenEvent] = []
    tm.add_listener(events.append)
    tm.add_listener(lambda e: 1 / 0)  # a broken listener must not break anything
    await connect(tm, sim)
    await tm.refresh("acme")
    assert await tm.flush_events()  # listeners run on a background thread
    kinds = [e.kind for e in events]
    assert kinds == [EventKind.EXCHANGED, EventKind.REFRESHED]
    assert all(e.tenant == "acme" and e.fingerprint and e.fingerprint.startswith("sha256:") for e in events)


async def test_state_is_signed_and_bound(tm: TokenManager, sim: FakeFactorial) -> None:
    url = tm.authorization_url("acme ☃")
    callback = await sim.authorize(url)
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(callback).query)
    state = query["state"][0]
    assert tm.tenant_from_state(state) == "acme ☃"
    body, _, mac = state.partition(".")
    for forged in (body + "." + mac[:-2] + "AA", "x" + state, "", "a.b", state + "." + mac, "😀" * 3000):
        with pytest.raises(InvalidState):
            tm.tenant_from_state(forged)
    other = FactorialApp(
        client_id=tm.app.client_id, client_secret="another", redirect_uri=tm.app.redirect_uri
    )
    async with TokenManager(other, "memory://") as foreign:
        with pytest.raises(InvalidState):
            foreign.tenant_from_state(state)
    tokens = await tm.exchange_code("acme ☃", query["code"][0])
    assert sim.is_active(tokens.access_token)


def test_expired_state() -> None:
    from factorial_tokens._state import StateSigner

    signer = StateSigner(FactorialApp(client_id="c", client_secret="s", redirect_uri="https://x/cb"), ttl=10)
    state = signer.sign("acme", now=1000)
    assert signer.verify(state, now=1005)[0] == "acme"
    with pytest.raises(InvalidState, match="expired"):
        signer.verify(state, now=1011)


def test_company_authorization_url(app: FactorialApp) -> None:
    tm = TokenManager(app, "memory://")
    url = tm.authorization_url("acme", company=True, scope="read")
    assert url.startswith(app.base_url + "/oauth/authorize?")
    assert "resource_owner_type=company" in url and "scope=read" in url and "response_type=code" in url


@MEMORY_ONLY
@pytest.mark.parametrize("tenant", ["", "x" * 201, "new\nline", "nul\x00", "\ud800", 42, None])
async def test_hostile_tenant_ids_are_refused(tm: TokenManager, tenant: object) -> None:
    with pytest.raises(InvalidTenant):
        await tm.access_token(tenant)  # type: ignore[arg-type]
    with pytest.raises(InvalidTenant):
        tm.authorization_url(tenant)  # type: ignore[arg-type]


@pytest.mark.parametrize("tenant", ["x" * 200, "ünïcødé 会社", "'; DROP TABLE t; --", "{a}:*"])
async def test_odd_but_valid_tenant_ids_work(tm: TokenManager, sim: FakeFactorial, tenant: str) -> None:
    token = await connect(tm, sim, tenant)
    assert await tm.access_token(tenant) == token
    assert [i.tenant for i in await tm.tenants()] == [tenant]


@pytest.mark.parametrize(
    "options",
    [
        {"lease_ttl": 5, "provider_timeout": 10},
        {"lease_ttl": 5, "refresh_deadline": 6},
        {"lease_ttl": 5, "wait_timeout": 4},
        {"leeway": -1},
    ],
)
def test_time_budgets_must_nest(app: FactorialApp, options: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        TokenManager(app, "memory://", **options)  # type: ignore[arg-type]


def test_unknown_store_scheme_names_the_package(app: FactorialApp) -> None:
    with pytest.raises(ConfigurationError, match="memory://") as info:
        TokenManager(app, "mongodb://x")
    assert "no token store for mongodb://" in str(info.value)
    with pytest.raises(ConfigurationError, match="scheme"):
        TokenManager(app, "just-a-path")


async def test_a_closed_manager_refuses_reuse(
    app: FactorialApp, sim: FakeFactorial, backend: Backend
) -> None:
    tm = TokenManager(app, backend.url)  # a store instance of its own, closed with the manager
    async with tm:
        await connect(tm, sim)
    with pytest.raises(ManagerClosed):
        await tm.access_token("acme")
    with pytest.raises(ManagerClosed):
        await tm.open()
    await tm.aclose()  # idempotent


async def test_revoke_on_first_use_mode_keeps_one_live_pair(make_sim: SimFactory, backend: Backend) -> None:
    async with make_sim(access_token_ttl=1, refresh_mode=RefreshMode.REVOKE_ON_FIRST_USE) as sim:
        async with TokenManager(app_for(sim), backend.store, lease_ttl=6, provider_timeout=2) as tm:
            await connect(tm, sim, company_id=4)
            for _ in range(2):
                await asyncio.sleep(1.1)
                async with tm.client("acme") as api:
                    async with api.get(f"/api/{tm.app.api_version}/resources/employees/employees") as resp:
                        assert resp.status == 200
            assert sim.stats.refreshes == 2 and sim.stats.invalid_grant == 0
            assert sim.live_pairs(4) == 1


# -- store replies lost around an exchange and a revoke (review-exchange) ----------------------


class _LostReplies(CountingStore):
    """A real MemoryStore that loses replies: ``sent_lost`` moves of a code claim to SENT are
    made and then answered StoreUnavailable (a reply lost after the server acted);
    ``deletes_down`` deletes (``replace(key, None)``) fail before acting."""

    sent_lost = 0
    deletes_down = 0

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        done = await super().advance_code(claim, state, ttl, outcome)
        if state is ClaimState.SENT and self.sent_lost:
            self.sent_lost -= 1
            raise StoreUnavailable("the reply was lost (test outage)")
        return done

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        if update is None and self.deletes_down:
            self.deletes_down -= 1
            raise StoreUnavailable("store is down (test outage)")
        await super().replace(key, update)


SHORT = {"lease_ttl": 1.5, "provider_timeout": 0.5}


async def test_a_lost_reply_to_the_sent_step_does_not_burn_a_code_never_sent(sim: FakeFactorial) -> None:
    """The claim's move to SENT is made but its reply is lost: ``_exchange`` lets the
    StoreUnavailable escape (``_exchange.py:152``) without replaying the step (idempotent
    by owner), so the code is never sent, yet the claim says SENT. Every retried callback
    with that code then waits ``wait_timeout`` (a SENT claim's expiry wakes no waiter) and
    gets RefreshTimeout, or ExchangeInDoubt ("the company must connect again") once the
    claim expired, though Factorial never saw the code."""
    store = _LostReplies(MemoryStore())
    async with TokenManager(app_for(sim), store, **SHORT) as tm:
        code = sim.issue_code(company_id=1)
        store.sent_lost = 1
        with contextlib.suppress(StoreUnavailable):
            await tm.exchange_code("acme", code)
        tokens = await tm.exchange_code("acme", code)  # the browser retries the callback
        assert sim.is_active(tokens.access_token) and sim.stats.exchanges == 1


async def test_a_revoke_whose_delete_fails_does_not_keep_serving_the_revoked_token(
    sim: FakeFactorial,
) -> None:
    """``revoke`` revokes the grant at Factorial, then deletes the record once: when that
    delete fails (one store blip) StoreUnavailable escapes before ``_forget_cached``, and
    the grant, dead at Factorial, is still stored ACTIVE and cached: ``access_token``
    keeps serving the revoked token (a stored-but-revoked grant) until it expires."""
    store = _LostReplies(MemoryStore())
    async with TokenManager(app_for(sim), store, **SHORT) as tm:
        token = await connect(tm, sim)
        assert await tm.access_token("acme") == token
        store.deletes_down = 1
        with contextlib.suppress(StoreUnavailable):
            await tm.revoke("acme")
        assert not sim.is_active(token)
        try:
            served = await tm.access_token("acme")
        except TenantNotConnected:
            return
        assert served != token, "a token revoked at Factorial is still served"


async def test_a_reconnection_during_a_refresh_does_not_leak_the_refreshed_pair(sim: FakeFactorial) -> None:
    """A refresh of acme's grant was processed at Factorial (the old pair rotated), its
    answer still on the way, when acme reconnects (same company). The exchange's ``replace``
    fences the refresh out, then revokes the pair it read, already rotated (a no-op); the
    refresh's commit is refused and ``_refresh_holding`` discards the new pair ("they are
    discarded", ``_flight.py``) without revoking it: a live pair of the old grant that no
    store holds (a leaked grant)."""
    async with TokenManager(app_for(sim), "memory://", lease_ttl=6.0, provider_timeout=2.0) as tm:
        await connect(tm, sim)
        sim.inject(Fault.SLOW, endpoint="token", delay=1.0)
        refreshing = asyncio.create_task(tm.refresh("acme"))
        await asyncio.sleep(0.3)  # rotated at Factorial; the answer comes in 0.7 s
        new = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        await asyncio.gather(refreshing, return_exceptions=True)
        assert await tm.tokens("acme") == new and sim.is_active(new.access_token)
        assert sim.live_pairs(1) == 1, "a refreshed pair of the replaced grant is live, stored nowhere"


async def test_a_retried_callback_learns_of_a_dead_exchanger_when_its_claim_expires(
    sim: FakeFactorial,
) -> None:
    """Worker one sent the code and died before the answer (its claim stays SENT). Worker
    two, retrying the callback, waits on the claim with ``watch.wait(remaining)``
    (``_exchange.py:169``): nothing announces a claim's expiry, so it sleeps the whole
    ``wait_timeout`` and raises RefreshTimeout ("took too long", a store problem to retry)
    instead of ExchangeInDoubt at the claim's expiry ("the company must connect again")."""
    store = MemoryStore()
    async with (
        TokenManager(app_for(sim), store, **SHORT) as dead,
        TokenManager(app_for(sim), store, **SHORT) as alive,
    ):
        code = sim.issue_code(company_id=1)
        sim.inject(Fault.SLOW, delay=5.0)
        first = asyncio.create_task(dead.exchange_code("acme", code))
        await asyncio.sleep(0.2)  # the code reached Factorial
        for task in list(dead._tasks):
            task.cancel()  # worker one is killed with its request in flight
        await asyncio.gather(first, return_exceptions=True)
        assert sim.stats.exchanges == 1
        with pytest.raises(ExchangeInDoubt):
            await alive.exchange_code("acme", code)
