"""The store conformance suite: every store, ours or a third party's, must pass it.

Use it by subclassing in a pytest module and providing an async ``store`` fixture that
yields a ready store (the suite works in fresh random namespaces, so a shared backend
needs no flushing)::

    from factorial_tokens.testing import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        async def store(self):
            store = MyStore.from_url("my://...")
            yield store
            await store.aclose()

pytest-asyncio must run the tests (``asyncio_mode = "auto"``, or mark them yourself).
Stores with a coarse clock may set ``lease_ttl`` (seconds) on the subclass.

Several processes (or hosts) each open their own instance of a store on one backend, so
the suite also checks two instances against each other: wake-ups, 100 concurrent
acquirers, code claims and replays across instances, and state that outlives an
instance. A subclass opens the second instance in :meth:`StoreConformance.open_peer`
(its ``store`` fixture may keep on ``self`` what that needs: pytest binds both to the
same test instance)::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        async def store(self, tmp_path):
            self.url = f"my://{tmp_path}/db"
            store = MyStore.from_url(self.url)
            yield store
            await store.aclose()

        async def open_peer(self, store):
            return MyStore.from_url(self.url)

A store that lacks something the contract allows it to lack says so with a capability
flag (as SQLAlchemy's ``requirements.py`` does), and the tests of it are skipped:

* ``cross_instance``: a second instance can be opened on the backend and shares every
  lease, fence, record and code claim (False for a store confined to one instance, such
  as ``memory://``);
* ``cross_instance_wakeups``: a write through one instance wakes the watchers and
  ``on_change`` listeners of another (False when other instances' writes are seen only
  by the poll of ``Watch.wait``, e.g. PostgreSQL behind PgBouncer);
* ``announces_notices``: a commit's announcement carries its ``Update.notice`` to another
  instance's watchers (:func:`~factorial_tokens.store.announced`), so a worker woken by
  another's refresh need not read the record (False by default: it reads, as before);
* ``persistent``: what an instance wrote outlives it (the backend keeps it);
* ``throttle``: the store implements :class:`~factorial_tokens.store.Throttle`;
* ``acquire_unless_fresh``: the store implements
  :class:`~factorial_tokens.store.AcquireUnlessFresh` (a store written before it existed
  sets it to False: the manager then reads first).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from .._errors import StoreUnavailable
from ..store import (
    Acquisition,
    ClaimState,
    Freshness,
    Store,
    TenantKey,
    TenantStatus,
    Throttle,
    Update,
    Watch,
    acquires_unless_fresh,
    announced,
    hold_digest,
)

__all__ = ["HOSTILE_TENANTS", "StoreConformance"]

#: Tenant ids that have broken key schemes and queries elsewhere.
HOSTILE_TENANTS = [
    "acme",
    "a'b\"c",
    "back\\slash",
    "{hash}tag",
    "*",
    "a:b:c",
    "%s %d ${x} $(id)",
    "'; DROP TABLE tokens; --",
    "ünïcødé 会社 🏢",
    "x" * 200,
    "  spaced  ",
]


def _update(
    payload: bytes, *, status: TenantStatus = TenantStatus.ACTIVE, expires_at: float | None = None
) -> Update:
    return Update(payload, status, expires_at, time.time())


class StoreConformance:
    """Shared tests of the Store contract. Subclass and provide a ``store`` fixture, and
    :meth:`open_peer` unless the store sets ``cross_instance = False``; see the module
    docstring for the capability flags."""

    lease_ttl = 0.4
    #: How long (seconds) a watcher may wait for a wake-up caused by another instance.
    wakeup_within = 5.0
    #: Capability flags: what the store offers (see the module docstring).
    cross_instance = True
    cross_instance_wakeups = True
    announces_notices = False
    persistent = True
    throttle = True
    acquire_unless_fresh = True

    async def open_peer(self, store: Store) -> Store:
        """Open a second instance on ``store``'s backend (same file, server, schema, prefix),
        as another process would; the suite closes it."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement open_peer(store), or set cross_instance = False "
            "if its store cannot be shared by two instances"
        )

    def require(self, capability: str) -> None:
        """Skip the running test unless the store declares ``capability``."""
        if not getattr(self, capability):
            import pytest  # here: importing factorial_tokens.testing must not need pytest

            pytest.skip(f"{type(self).__name__} declares {capability} = False")

    @asynccontextmanager
    async def peer(self, store: Store) -> AsyncIterator[Store]:
        """A second instance on ``store``'s backend for the block (skips without ``cross_instance``)."""
        self.require("cross_instance")
        other = await self.open_peer(store)
        try:
            yield other
        finally:
            await other.aclose()

    @staticmethod
    def key(tenant: str = "acme", namespace: str | None = None) -> TenantKey:
        """A key in a fresh namespace unless one is given."""
        return TenantKey(namespace or f"conformance-{secrets.token_hex(6)}", tenant)

    async def test_is_a_store(self, store: Store) -> None:
        assert isinstance(store, Store)
        await store.check()

    async def test_read_missing_is_none(self, store: Store) -> None:
        assert await store.read(self.key()) is None

    async def test_replace_then_read(self, store: Store) -> None:
        key = self.key()
        payload = bytes(range(256)) + b"\x00tail"
        await store.replace(key, Update(payload, TenantStatus.ACTIVE, 1234.5, 1000.25))
        record = await store.read(key)
        assert record is not None
        assert record.key == key
        assert record.payload == payload
        assert record.status is TenantStatus.ACTIVE
        assert record.expires_at == 1234.5
        assert record.updated_at == 1000.25
        assert record.version >= 1

    async def test_non_expiring_record(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"x", expires_at=None))
        record = await store.read(key)
        assert record is not None and record.expires_at is None

    async def test_versions_grow_on_every_write(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"1"))
        first = await store.read(key)
        won = await store.acquire(key, "w", self.lease_ttl * 10)
        assert won.lease is not None
        second = await store.commit(won.lease, _update(b"2"))
        await store.replace(key, _update(b"3"))
        third = await store.read(key)
        assert first and second and third
        assert first.version < second.version < third.version
        assert third.payload == b"3"

    async def test_one_lease_at_a_time(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"tokens"))
        first = await store.acquire(key, "one", self.lease_ttl * 10)
        second = await store.acquire(key, "two", self.lease_ttl * 10)
        assert first.lease is not None and first.lease.fence > 0
        assert second.lease is None
        assert first.record is not None and first.record.payload == b"tokens"
        assert second.record is not None and second.record.payload == b"tokens"

    async def test_acquire_without_record(self, store: Store) -> None:
        won = await store.acquire(self.key(), "one", self.lease_ttl)
        assert won.lease is not None and won.record is None

    async def test_concurrent_acquire_has_one_winner(self, store: Store) -> None:
        key = self.key()
        results = await asyncio.gather(*(store.acquire(key, f"o{i}", 30) for i in range(50)))
        winners = [r.lease for r in results if r.lease is not None]
        assert len(winners) == 1

    async def test_expired_lease_is_taken_over_with_a_higher_fence(self, store: Store) -> None:
        key = self.key()
        first = await store.acquire(key, "one", self.lease_ttl)
        await asyncio.sleep(self.lease_ttl * 1.5)
        second = await store.acquire(key, "two", self.lease_ttl)
        assert first.lease is not None and second.lease is not None
        assert second.lease.fence > first.lease.fence

    async def test_fence_only_grows(self, store: Store) -> None:
        key = self.key()
        fences = []
        for i in range(3):
            won = await store.acquire(key, f"o{i}", self.lease_ttl * 10)
            assert won.lease is not None
            fences.append(won.lease.fence)
            assert await store.release(won.lease)
        await store.replace(key, _update(b"x"))
        await store.replace(key, None)
        won = await store.acquire(key, "after-forget", self.lease_ttl * 10)
        assert won.lease is not None
        fences.append(won.lease.fence)
        assert fences == sorted(set(fences)), fences

    async def test_release_is_owner_checked(self, store: Store) -> None:
        key = self.key()
        won = await store.acquire(key, "one", self.lease_ttl * 10)
        assert won.lease is not None
        forged = type(won.lease)(key, "intruder", won.lease.fence)
        assert not await store.release(forged)
        assert (await store.acquire(key, "two", self.lease_ttl)).lease is None
        assert await store.release(won.lease)
        assert await store.release(won.lease)  # a replay: the same answer, nothing changes
        assert (await store.acquire(key, "two", self.lease_ttl)).lease is not None
        assert not await store.release(won.lease)

    async def test_extend_keeps_the_lease(self, store: Store) -> None:
        key = self.key()
        won = await store.acquire(key, "one", self.lease_ttl)
        assert won.lease is not None
        for _ in range(3):
            await asyncio.sleep(self.lease_ttl / 2)
            assert await store.extend(won.lease, self.lease_ttl)
        assert (await store.acquire(key, "two", self.lease_ttl)).lease is None

    async def test_extend_fails_after_takeover(self, store: Store) -> None:
        key = self.key()
        first = await store.acquire(key, "one", self.lease_ttl)
        await asyncio.sleep(self.lease_ttl * 1.5)
        second = await store.acquire(key, "two", self.lease_ttl * 10)
        assert first.lease is not None and second.lease is not None
        assert not await store.extend(first.lease, self.lease_ttl)
        assert not await store.release(first.lease)
        assert (await store.acquire(key, "three", self.lease_ttl)).lease is None

    async def test_commit_writes_and_releases(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"old"))
        won = await store.acquire(key, "one", self.lease_ttl * 10)
        assert won.lease is not None and won.record is not None
        record = await store.commit(won.lease, _update(b"new", expires_at=99.0))
        assert record is not None and record.payload == b"new" and record.version > won.record.version
        assert record.expires_at == 99.0
        read = await store.read(key)
        assert read == record
        assert (await store.acquire(key, "two", self.lease_ttl)).lease is not None

    async def test_fenced_write_refuses_a_paused_holder(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"v1"))
        paused = await store.acquire(key, "paused", self.lease_ttl)
        await asyncio.sleep(self.lease_ttl * 1.5)
        fresh = await store.acquire(key, "fresh", self.lease_ttl * 10)
        assert paused.lease is not None and fresh.lease is not None
        assert await store.commit(fresh.lease, _update(b"v2")) is not None
        assert await store.commit(paused.lease, _update(b"stale")) is None
        record = await store.read(key)
        assert record is not None and record.payload == b"v2"

    async def test_commit_after_release_is_refused(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"v1"))
        won = await store.acquire(key, "one", self.lease_ttl * 10)
        assert won.lease is not None
        assert await store.release(won.lease)
        other = await store.acquire(key, "two", self.lease_ttl * 10)
        assert other.lease is not None
        assert await store.commit(won.lease, _update(b"late")) is None
        record = await store.read(key)
        assert record is not None and record.payload == b"v1"

    async def test_replace_fences_out_the_holder(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"old grant"))
        won = await store.acquire(key, "refresher", self.lease_ttl * 10)
        assert won.lease is not None
        await store.replace(key, _update(b"new grant"))
        assert await store.commit(won.lease, _update(b"refreshed old grant")) is None
        assert not await store.extend(won.lease, self.lease_ttl)
        record = await store.read(key)
        assert record is not None and record.payload == b"new grant"
        assert (await store.acquire(key, "next", self.lease_ttl)).lease is not None

    async def test_needs_reauth_status_is_kept(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"tokens"))
        won = await store.acquire(key, "one", self.lease_ttl * 10)
        assert won.lease is not None
        await store.commit(won.lease, _update(b"tokens", status=TenantStatus.NEEDS_REAUTH))
        record = await store.read(key)
        assert record is not None and record.status is TenantStatus.NEEDS_REAUTH
        await store.replace(key, _update(b"reconnected"))
        record = await store.read(key)
        assert record is not None and record.status is TenantStatus.ACTIVE

    async def test_forget(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"tokens"))
        await store.replace(key, None)
        assert await store.read(key) is None
        assert key.tenant not in [r.key.tenant for r in await store.tenants(key.namespace)]

    async def test_tenants_lists_one_namespace(self, store: Store) -> None:
        ns, other = self.key().namespace, self.key().namespace
        for tenant in ("a", "b", "c"):
            await store.replace(TenantKey(ns, tenant), _update(tenant.encode()))
        await store.replace(TenantKey(other, "z"), _update(b"z"))
        listed = sorted(r.key.tenant for r in await store.tenants(ns))
        assert listed == ["a", "b", "c"]
        assert all(r.key.namespace == ns for r in await store.tenants(ns))

    async def test_namespaces_are_isolated(self, store: Store) -> None:
        one, two = self.key("acme"), self.key("acme")
        await store.replace(one, _update(b"one"))
        assert await store.read(two) is None
        assert (await store.acquire(two, "x", self.lease_ttl)).lease is not None
        assert (await store.acquire(one, "y", self.lease_ttl)).lease is not None

    async def test_hostile_tenant_ids_round_trip_without_crosstalk(self, store: Store) -> None:
        ns = self.key().namespace
        for tenant in HOSTILE_TENANTS:
            await store.replace(TenantKey(ns, tenant), _update(tenant.encode()))
        for tenant in HOSTILE_TENANTS:
            record = await store.read(TenantKey(ns, tenant))
            assert record is not None and record.payload == tenant.encode()
            assert record.key.tenant == tenant
        listed = sorted(r.key.tenant for r in await store.tenants(ns))
        assert listed == sorted(HOSTILE_TENANTS)
        assert await store.read(TenantKey(ns, "ac*")) is None
        assert await store.read(TenantKey(ns, "%")) is None

    async def test_code_claim_first_wins(self, store: Store) -> None:
        key = self.key()
        first = await store.claim_code(key, "code-hash", "one", 30)
        second = await store.claim_code(key, "code-hash", "two", 30)
        assert first.won and first.state is ClaimState.CLAIMED
        assert not second.won and second.state is ClaimState.CLAIMED and not second.expired
        assert second.key == key

    async def test_concurrent_code_claims_have_one_winner(self, store: Store) -> None:
        key = self.key()
        claims = await asyncio.gather(*(store.claim_code(key, "h", f"o{i}", 30) for i in range(50)))
        assert sum(c.won for c in claims) == 1

    async def test_code_claim_reports_the_first_tenant(self, store: Store) -> None:
        acme = self.key("acme")
        evil = TenantKey(acme.namespace, "evil")
        await store.claim_code(acme, "h", "one", 30)
        seen = await store.claim_code(evil, "h", "two", 30)
        assert not seen.won and seen.key == acme

    async def test_code_claims_are_per_namespace(self, store: Store) -> None:
        one, two = self.key(), self.key()
        assert (await store.claim_code(one, "h", "a", 30)).won
        assert (await store.claim_code(two, "h", "b", 30)).won

    async def test_code_claim_steps(self, store: Store) -> None:
        key = self.key()
        claim = await store.claim_code(key, "h", "one", 30)
        assert await store.advance_code(claim, ClaimState.SENT, 30)
        seen = await store.claim_code(key, "h", "two", 30)
        assert seen.state is ClaimState.SENT and not seen.won
        assert await store.advance_code(claim, ClaimState.DONE, 30)
        seen = await store.claim_code(key, "h", "two", 30)
        assert seen.state is ClaimState.DONE and not seen.won and not seen.expired
        assert not await store.advance_code(claim, ClaimState.FAILED, 30, "late")

    async def test_code_claim_failure_outcome(self, store: Store) -> None:
        key = self.key()
        claim = await store.claim_code(key, "h", "one", 30)
        assert await store.advance_code(claim, ClaimState.SENT, 30)
        assert await store.advance_code(claim, ClaimState.FAILED, 30, '{"error": "invalid_grant"}')
        seen = await store.claim_code(key, "h", "two", 30)
        assert seen.state is ClaimState.FAILED and seen.outcome == '{"error": "invalid_grant"}'

    async def test_only_the_owner_advances_a_claim(self, store: Store) -> None:
        key = self.key()
        await store.claim_code(key, "h", "one", 30)
        other = await store.claim_code(key, "h", "two", 30)
        assert not await store.advance_code(other, ClaimState.SENT, 30)

    async def test_expired_claim_before_send_is_taken_over(self, store: Store) -> None:
        key = self.key()
        dead = await store.claim_code(key, "h", "dead", self.lease_ttl)
        await asyncio.sleep(self.lease_ttl * 1.5)
        taken = await store.claim_code(key, "h", "alive", 30)
        assert taken.won and taken.state is ClaimState.CLAIMED
        assert not await store.advance_code(dead, ClaimState.SENT, 30)
        assert await store.advance_code(taken, ClaimState.SENT, 30)

    async def test_expired_claim_after_send_is_never_taken_over(self, store: Store) -> None:
        key = self.key()
        dead = await store.claim_code(key, "h", "dead", 30)
        assert await store.advance_code(dead, ClaimState.SENT, self.lease_ttl)
        await asyncio.sleep(self.lease_ttl * 1.5)
        seen = await store.claim_code(key, "h", "alive", 30)
        assert not seen.won and seen.state is ClaimState.SENT and seen.expired

    # -- a lease only for a due record (the AcquireUnlessFresh capability) ----------------

    #: Records (expires_at, updated_at, status) and rules (margin, share) at the instant
    #: _AT, each with whether the lease is taken: the boundaries of ``Freshness.due``.
    _AT = 1_000_000.0
    _DUE_CASES = (
        # an hour's token: the margin decides
        ((_AT + 100.0, _AT - 3500.0, TenantStatus.ACTIVE), (60.0, 0.5), False),
        ((_AT + 60.5, _AT - 3539.5, TenantStatus.ACTIVE), (60.0, 0.5), False),
        ((_AT + 60.0, _AT - 3540.0, TenantStatus.ACTIVE), (60.0, 0.5), True),  # exactly at it
        ((_AT - 5.0, _AT - 3605.0, TenantStatus.ACTIVE), (60.0, 0.5), True),  # expired
        # a minute's token: the share of its lifetime decides (30 s, then 45 s)
        ((_AT + 40.0, _AT - 20.0, TenantStatus.ACTIVE), (60.0, 0.5), False),
        ((_AT + 40.0, _AT - 20.0, TenantStatus.ACTIVE), (60.0, 0.75), True),
        ((_AT + 30.0, _AT - 30.0, TenantStatus.ACTIVE), (60.0, 0.5), True),
        # updated after its expiry (a lifetime below 0 counts as 0), or never (0: a long one)
        ((_AT + 1.0, _AT + 5.0, TenantStatus.ACTIVE), (60.0, 0.5), False),
        ((_AT + 59.0, 0.0, TenantStatus.ACTIVE), (60.0, 0.5), True),
        # no margin at all: fresh until it expires
        ((_AT + 0.25, _AT - 100.0, TenantStatus.ACTIVE), (0.0, 0.0), False),
        ((_AT, _AT - 100.0, TenantStatus.ACTIVE), (0.0, 0.0), True),
        # never expires; needs re-authorization (nothing to refresh, however old)
        ((None, _AT - 100.0, TenantStatus.ACTIVE), (60.0, 0.5), False),
        ((_AT - 100.0, _AT - 3700.0, TenantStatus.NEEDS_REAUTH), (60.0, 0.5), False),
    )

    async def _acquire_unless_fresh(
        self, store: Store, key: TenantKey, owner: str, rule: Freshness
    ) -> Acquisition:
        self.require("acquire_unless_fresh")
        assert acquires_unless_fresh(store), "the store does not declare acquires_unless_fresh = True"
        return await store.acquire(key, owner, self.lease_ttl * 10, unless_fresh=rule)

    async def test_acquire_unless_fresh_takes_the_lease_exactly_when_due(self, store: Store) -> None:
        for (expires_at, updated_at, status), (margin, share), due in self._DUE_CASES:
            key = self.key()
            await store.replace(key, Update(b"tokens", status, expires_at, updated_at))
            before = await store.read(key)
            assert before is not None
            rule = Freshness(self._AT, margin, share)
            assert rule.due(before) is due, (expires_at, updated_at, status, margin, share)
            won = await self._acquire_unless_fresh(store, key, "one", rule)
            case = f"expires_at={expires_at!r} updated_at={updated_at!r} {status.value} {rule}"
            assert (won.lease is not None) is due, case
            assert won.record == before, case
            assert await store.read(key) == before, case  # no write either way
            other = await store.acquire(key, "two", self.lease_ttl * 10)
            assert (other.lease is None) is due, f"{case}: the lease was taken (or not) anyway"

    async def test_acquire_unless_fresh_leaves_a_fresh_record_unannounced(self, store: Store) -> None:
        key = self.key()
        now = time.time()
        await store.replace(key, Update(b"tokens", TenantStatus.ACTIVE, now + 3600, now))
        seen: list[str | None] = []
        unsubscribe = store.on_change(seen.append)
        try:
            async with store.watch(key) as watch:
                won = await self._acquire_unless_fresh(store, key, "one", Freshness(now, 60.0, 0.5))
                assert won.lease is None and won.record is not None and won.record.payload == b"tokens"
                assert not await _woken(watch, 0.3), "leaving a fresh record alone announced a change"
            assert key.digest not in seen
        finally:
            unsubscribe()

    async def test_acquire_unless_fresh_of_an_absent_record_takes_nothing(self, store: Store) -> None:
        key = self.key()
        won = await self._acquire_unless_fresh(store, key, "one", Freshness(time.time(), 60.0, 0.5))
        assert won == Acquisition(None, None)
        assert await store.read(key) is None
        await store.replace(key, _update(b"x"))
        await store.replace(key, None)  # forgotten: absent again
        won = await self._acquire_unless_fresh(store, key, "one", Freshness(time.time(), 60.0, 0.5))
        assert won == Acquisition(None, None)
        assert (await store.acquire(key, "two", self.lease_ttl)).lease is not None

    async def test_acquire_unless_fresh_is_refused_while_the_lease_is_held(self, store: Store) -> None:
        key = self.key()
        now = time.time()
        await store.replace(key, Update(b"tokens", TenantStatus.ACTIVE, now - 1, now - 3601))
        holder = await store.acquire(key, "holder", self.lease_ttl * 10)
        assert holder.lease is not None
        won = await self._acquire_unless_fresh(store, key, "one", Freshness(now, 60.0, 0.5))
        assert won.lease is None and won.record is not None and won.record.payload == b"tokens"
        committed = await store.commit(holder.lease, Update(b"new", TenantStatus.ACTIVE, now + 3600, now))
        assert committed is not None
        won = await self._acquire_unless_fresh(store, key, "one", Freshness(now, 60.0, 0.5))
        assert won.lease is None and won.record == committed  # refreshed meanwhile: fresh

    async def test_replayed_acquire_unless_fresh_keeps_the_lease(self, store: Store) -> None:
        key = self.key()
        now = time.time()
        await store.replace(key, Update(b"tokens", TenantStatus.ACTIVE, now - 1, now - 3601))
        rule = Freshness(now, 60.0, 0.5)
        first = await self._acquire_unless_fresh(store, key, "one", rule)
        again = await self._acquire_unless_fresh(store, key, "one", rule)
        assert first.lease is not None and again.lease is not None and again.lease.owner == "one"
        assert (await store.acquire(key, "two", self.lease_ttl * 10)).lease is None
        committed = await store.commit(again.lease, Update(b"new", TenantStatus.ACTIVE, now + 3600, now))
        assert committed is not None and committed.payload == b"new"

    # -- replayed primitives: a client resends a command whose reply was lost; the second
    # run must give what the first gave, and leave the store as one run leaves it.

    async def test_replayed_acquire_keeps_the_lease(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"tokens"))
        await store.acquire(key, "one", self.lease_ttl * 10)
        again = await store.acquire(key, "one", self.lease_ttl * 10)
        assert again.lease is not None and again.lease.owner == "one"
        assert again.record is not None and again.record.payload == b"tokens"
        assert (await store.acquire(key, "two", self.lease_ttl * 10)).lease is None
        assert await store.extend(again.lease, self.lease_ttl * 10)
        assert await store.commit(again.lease, _update(b"new")) is not None

    async def test_replayed_extend_and_release(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"tokens"))
        won = await store.acquire(key, "one", self.lease_ttl * 10)
        assert won.lease is not None
        assert await store.extend(won.lease, self.lease_ttl * 10)
        assert await store.extend(won.lease, self.lease_ttl * 10)
        assert await store.release(won.lease)
        assert await store.release(won.lease)
        other = await store.acquire(key, "two", self.lease_ttl * 10)
        assert other.lease is not None
        assert not await store.release(won.lease)

    async def test_replayed_commit_writes_once(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"v1"))
        won = await store.acquire(key, "one", self.lease_ttl * 10)
        assert won.lease is not None
        update = _update(b"v2")
        first = await store.commit(won.lease, update)
        again = await store.commit(won.lease, update)
        assert first is not None and again is not None and again.version == first.version
        record = await store.read(key)
        assert record is not None and record.version == first.version and record.payload == b"v2"
        assert await store.commit(won.lease, _update(b"other")) is None
        other = await store.acquire(key, "two", self.lease_ttl * 10)
        assert other.lease is not None
        assert await store.commit(won.lease, update) is None

    async def test_replayed_replace_writes_once(self, store: Store) -> None:
        key = self.key()
        holder = await store.acquire(key, "holder", self.lease_ttl * 10)
        assert holder.lease is not None
        update = _update(b"grant")
        await store.replace(key, update)
        first = await store.read(key)
        await store.replace(key, update)
        again = await store.read(key)
        assert first is not None and again is not None and again.version == first.version
        assert await store.commit(holder.lease, _update(b"late")) is None
        await store.replace(key, None)
        await store.replace(key, None)
        assert await store.read(key) is None

    async def test_replayed_code_steps(self, store: Store) -> None:
        key = self.key()
        claim = await store.claim_code(key, "h", "one", 30)
        again = await store.claim_code(key, "h", "one", 30)
        assert claim.won and again.won and again.state is ClaimState.CLAIMED
        assert await store.advance_code(claim, ClaimState.SENT, 30)
        assert await store.advance_code(claim, ClaimState.SENT, 30)
        seen = await store.claim_code(key, "h", "two", 30)
        assert seen.state is ClaimState.SENT and not seen.won
        assert await store.advance_code(claim, ClaimState.FAILED, 30, '{"error": "x"}')
        assert await store.advance_code(claim, ClaimState.FAILED, 30, '{"error": "x"}')
        assert not await store.advance_code(claim, ClaimState.DONE, 30)
        seen = await store.claim_code(key, "h", "two", 30)
        assert seen.state is ClaimState.FAILED and seen.outcome == '{"error": "x"}'

    async def test_watch_wakes_on_commit_and_release(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"v1"))
        won = await store.acquire(key, "one", 30)
        assert won.lease is not None
        lease = won.lease

        async def release_soon() -> None:
            await asyncio.sleep(0.05)
            await store.release(lease)

        async with store.watch(key) as watch:
            releaser = asyncio.create_task(release_soon())
            assert await _woken(watch, 5.0)
            await releaser
        won = await store.acquire(key, "two", 30)
        assert won.lease is not None
        async with store.watch(key) as watch:
            await store.commit(won.lease, _update(b"v2"))
            assert await _woken(watch, 5.0)

    async def test_watch_wakes_on_replace_and_claim_steps(self, store: Store) -> None:
        key = self.key()
        async with store.watch(key) as watch:
            await store.replace(key, _update(b"v1"))
            assert await _woken(watch, 5.0)
        claim = await store.claim_code(key, "h", "one", 30)
        async with store.watch(key) as watch:
            await store.advance_code(claim, ClaimState.SENT, 30)
            await store.advance_code(claim, ClaimState.DONE, 30)
            assert await _woken(watch, 5.0)

    async def test_watch_ignores_other_tenants(self, store: Store) -> None:
        key, other = self.key("a"), self.key("b")
        async with store.watch(key) as watch:
            await store.replace(other, _update(b"x"))
            assert not await watch.wait(0.3)

    async def test_on_change_reports_the_digest(self, store: Store) -> None:
        key = self.key()
        seen: list[str | None] = []
        unsubscribe = store.on_change(seen.append)
        try:
            async with store.watch(key) as watch:
                await store.replace(key, _update(b"x"))
                await _woken(watch, 5.0)
            deadline = time.monotonic() + 5
            while key.digest not in seen and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert key.digest in seen
        finally:
            unsubscribe()

    # -- back-pressure (the Throttle capability) ---------------------------------------

    @staticmethod
    def namespace() -> str:
        """A fresh namespace."""
        return f"conformance-{secrets.token_hex(6)}"

    async def test_is_a_throttle(self, store: Store) -> None:
        self.require("throttle")
        assert isinstance(store, Throttle)

    async def test_hold_keeps_the_later_instant(self, store: Store) -> None:
        self.require("throttle")
        assert isinstance(store, Throttle)
        ns, until = self.namespace(), time.time() + 30
        assert await store.hold(ns, 0) == 0
        assert await store.hold(ns, until) == until
        assert await store.hold(ns, until) == until  # a resend
        assert await store.hold(ns, until - 10) == until
        assert await store.hold(ns, 0) == until
        assert await store.hold(self.namespace(), 0) == 0  # namespaces are isolated

    async def test_hold_is_announced(self, store: Store) -> None:
        self.require("throttle")
        assert isinstance(store, Throttle)
        ns = self.namespace()
        seen: list[str | None] = []
        unsubscribe = store.on_change(seen.append)
        try:
            await store.hold(ns, time.time() + 30)
            deadline = time.monotonic() + 5
            while hold_digest(ns) not in seen and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert hold_digest(ns) in seen
        finally:
            unsubscribe()

    async def test_admit_waits_out_the_hold(self, store: Store) -> None:
        self.require("throttle")
        assert isinstance(store, Throttle)
        ns = self.namespace()
        assert await store.admit(ns, secrets.token_hex(8), 0, 1) == 0
        await store.hold(ns, time.time() + 30)
        for interval in (0.0, 1.0):
            assert 20 < await store.admit(ns, secrets.token_hex(8), interval, 5) <= 30.5
        assert await store.admit(self.namespace(), secrets.token_hex(8), 1.0, 5) == 0

    async def test_admit_spends_a_shared_budget(self, store: Store) -> None:
        self.require("throttle")
        assert isinstance(store, Throttle)
        ns, interval = self.namespace(), 60.0
        first, second = secrets.token_hex(8), secrets.token_hex(8)
        assert await store.admit(ns, first, interval, 2) == 0
        assert await store.admit(ns, second, interval, 2) == 0
        assert await store.admit(ns, second, interval, 2) == 0  # a resend takes nothing more
        wait = await store.admit(ns, secrets.token_hex(8), interval, 2)
        assert 50 < wait <= 60.5

    async def test_concurrent_admits_take_one_unit_each(self, store: Store) -> None:
        self.require("throttle")
        assert isinstance(store, Throttle)
        ns = self.namespace()
        waits = await asyncio.gather(*(store.admit(ns, secrets.token_hex(8), 100.0, 5) for _ in range(30)))
        assert sum(1 for wait in waits if wait == 0) == 5
        assert all(wait > 0 for wait in waits if wait != 0)

    # -- a closed store ----------------------------------------------------------------

    async def test_a_closed_store_refuses_every_primitive(self, store: Store) -> None:
        key = self.key()
        await store.replace(key, _update(b"tokens"))
        won = await store.acquire(key, "one", 30)
        claim = await store.claim_code(key, "h", "one", 30)
        assert won.lease is not None
        lease = won.lease
        await store.aclose()
        await store.aclose()  # closing again is allowed (the fixture may close it once more)
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "read": lambda: store.read(key),
            "acquire": lambda: store.acquire(key, "two", 30),
            "extend": lambda: store.extend(lease, 30),
            "release": lambda: store.release(lease),
            "commit": lambda: store.commit(lease, _update(b"late")),
            "replace": lambda: store.replace(key, _update(b"late")),
            "forget": lambda: store.replace(key, None),
            "claim_code": lambda: store.claim_code(key, "h2", "two", 30),
            "advance_code": lambda: store.advance_code(claim, ClaimState.SENT, 30),
            "tenants": lambda: store.tenants(key.namespace),
            "check": store.check,
        }
        if isinstance(store, Throttle):
            calls["hold"] = lambda: store.hold(key.namespace, time.time() + 30)
            calls["admit"] = lambda: store.admit(key.namespace, "ticket", 1.0, 1)
        for name, call in calls.items():
            try:
                await call()
            except StoreUnavailable as exc:
                assert "closed" in str(exc), f"{name} on a closed store: {exc}"
            else:
                raise AssertionError(f"{name} on a closed store did not raise StoreUnavailable")

    # -- two instances on one backend (as two processes have them) -----------------------

    async def test_two_instances_share_state(self, store: Store) -> None:
        key = self.key()
        async with self.peer(store) as peer:
            await store.replace(key, _update(b"v1"))
            seen = await peer.read(key)
            assert seen is not None and seen.payload == b"v1"
            won = await peer.acquire(key, "peer", 30)
            assert won.lease is not None and won.record == seen
            lost = await store.acquire(key, "store", 30)
            assert lost.lease is None and lost.record == seen  # the loser sees the holder's record
            forged = type(won.lease)(key, "store", won.lease.fence)  # the fence, another owner
            assert await store.commit(forged, _update(b"stolen")) is None
            record = await store.commit(won.lease, _update(b"v2"))  # a lease is the backend's
            assert record is not None and await peer.read(key) == record
            assert [r.key for r in await peer.tenants(key.namespace)] == [key]

    async def test_state_outlives_the_instance(self, store: Store) -> None:
        self.require("persistent")
        key = self.key()
        async with self.peer(store) as peer:
            await store.replace(key, _update(b"kept"))
            assert (await store.acquire(key, "holder", 30)).lease is not None
            await store.aclose()
            record = await peer.read(key)
            assert record is not None and record.payload == b"kept"
            assert (await peer.acquire(key, "other", 30)).lease is None

    async def test_a_commit_announces_its_notice(self, store: Store) -> None:
        """A commit's ``Update.notice`` reaches another instance's watcher byte for byte
        (whatever bytes it holds) and is not stored. (That a release and a commit without
        one carry none is checked with the wake-ups, on every store.)"""
        self.require("announces_notices")
        self.require("cross_instance_wakeups")
        key = self.key()
        notice = b"sealed \x00\xff\n " + bytes(range(256))
        within = self.wakeup_within
        async with self.peer(store) as peer:
            await store.replace(key, _update(b"v1"))
            won = await store.acquire(key, "one", 30)
            assert won.lease is not None
            async with peer.watch(key) as watch:
                update = Update(b"v2", TenantStatus.ACTIVE, time.time() + 60, time.time(), notice)
                committed = await store.commit(won.lease, update)
                assert await _woken(watch, within), "a commit did not wake another instance's watcher"
                assert announced(watch) == notice
            assert committed is not None and await peer.read(key) == committed

    async def test_wakes_up_another_instance(self, store: Store) -> None:
        self.require("cross_instance_wakeups")
        key = self.key()
        within = self.wakeup_within
        async with self.peer(store) as peer:
            await store.replace(key, _update(b"v1"))
            won = await store.acquire(key, "one", 30)
            assert won.lease is not None
            async with peer.watch(key) as watch:
                await store.release(won.lease)
                assert await _woken(watch, within), "a release did not wake another instance's watcher"
                assert announced(watch) is None
            won = await store.acquire(key, "two", 30)
            assert won.lease is not None
            async with peer.watch(key) as watch:
                await store.commit(won.lease, _update(b"v2"))
                assert await _woken(watch, within), "a commit did not wake another instance's watcher"
                assert announced(watch) is None  # a commit without a notice carries none
            async with peer.watch(key) as watch:
                await store.replace(key, _update(b"v3"))
                assert await _woken(watch, within), "a replace did not wake another instance's watcher"
            claim = await store.claim_code(key, "h", "one", 30)
            async with peer.watch(key) as watch:
                await store.advance_code(claim, ClaimState.SENT, 30)
                assert await _woken(watch, within), "a claim step did not wake another instance's watcher"

    async def test_on_change_hears_another_instance(self, store: Store) -> None:
        self.require("cross_instance_wakeups")
        key = self.key()
        async with self.peer(store) as peer:
            seen: list[str | None] = []
            unsubscribe = store.on_change(seen.append)
            try:
                async with store.watch(key) as watch:  # the subscription is up before the write
                    await peer.replace(key, _update(b"x"))
                    await _woken(watch, self.wakeup_within)
                assert await _heard(seen, key.digest, self.wakeup_within)
                seen.clear()
                won = await peer.acquire(key, "peer", 30)
                assert won.lease is not None
                await peer.commit(won.lease, _update(b"y"))
                assert await _heard(seen, key.digest, self.wakeup_within), "a commit was not heard"
                if self.throttle and isinstance(peer, Throttle):
                    await peer.hold(key.namespace, time.time() + 30)
                    assert await _heard(seen, hold_digest(key.namespace), self.wakeup_within)
            finally:
                unsubscribe()

    async def test_hundred_acquirers_across_instances(self, store: Store) -> None:
        """Rounds of 100 concurrent acquirers, half on each instance: exactly one holder per
        round, nobody else gets in while it holds, fences strictly increase, and every
        holder's fenced write lands (through either instance)."""
        key = self.key()
        async with self.peer(store) as peer:
            sides = (store, peer)
            await store.replace(key, _update(b"0"))
            fences: list[int] = []
            for round_ in range(1, 4):
                results = await asyncio.gather(
                    *(sides[i % 2].acquire(key, f"r{round_}-{i}", 30) for i in range(100))
                )
                winners = [(i, r.lease) for i, r in enumerate(results) if r.lease is not None]
                assert len(winners) == 1, f"round {round_}: {len(winners)} holders"
                index, lease = winners[0]
                fences.append(lease.fence)
                for side in sides:
                    assert (await side.acquire(key, f"late-{round_}", 30)).lease is None
                record = await sides[(index + 1) % 2].commit(lease, _update(str(round_).encode()))
                assert record is not None and record.payload == str(round_).encode()
            assert fences == sorted(set(fences)), fences
            final = await peer.read(key)
            assert final is not None and final.payload == b"3"

    async def test_code_claims_across_instances(self, store: Store) -> None:
        key = self.key()
        async with self.peer(store) as peer:
            sides = (store, peer)
            claims = await asyncio.gather(
                *(sides[i % 2].claim_code(key, "h", f"o{i}", 30) for i in range(50))
            )
            won = [(i, c) for i, c in enumerate(claims) if c.won]
            assert len(won) == 1
            index, claim = won[0]
            mine, other = sides[index % 2], sides[(index + 1) % 2]
            loser = next(c for c in claims if not c.won)
            assert not await other.advance_code(loser, ClaimState.SENT, 30)
            assert await other.advance_code(claim, ClaimState.SENT, 30)  # the claim is the backend's
            seen = await mine.claim_code(key, "h", "late", 30)
            assert seen.state is ClaimState.SENT and not seen.won and seen.key == key
            assert await mine.advance_code(claim, ClaimState.DONE, 30)
            seen = await other.claim_code(key, "h", "late", 30)
            assert seen.state is ClaimState.DONE and not seen.won

    async def test_replays_through_another_instance(self, store: Store) -> None:
        """A resent command may reach the backend over another connection: every
        primitive's second run, through another instance, answers as the first did."""
        key = self.key()
        async with self.peer(store) as peer:
            update = _update(b"grant")
            await store.replace(key, update)
            await peer.replace(key, update)
            first = await store.read(key)
            assert first is not None and await peer.read(key) == first
            await store.acquire(key, "one", 30)
            won = await peer.acquire(key, "one", 30)  # the answer the caller finally gets
            assert won.lease is not None and won.lease.owner == "one"
            assert (await store.acquire(key, "two", 30)).lease is None
            assert await store.extend(won.lease, 30) and await peer.extend(won.lease, 30)
            written = _update(b"refreshed")
            committed = await store.commit(won.lease, written)
            replayed = await peer.commit(won.lease, written)
            assert committed is not None and replayed is not None
            assert replayed.version == committed.version
            held = await peer.acquire(key, "two", 30)
            assert held.lease is not None
            assert await peer.release(held.lease) and await store.release(held.lease)
            claim = await store.claim_code(key, "h", "one", 30)
            assert (await peer.claim_code(key, "h", "one", 30)).won
            assert await store.advance_code(claim, ClaimState.SENT, 30)
            assert await peer.advance_code(claim, ClaimState.SENT, 30)
            await store.replace(key, None)
            await peer.replace(key, None)
            assert await store.read(key) is None and await peer.read(key) is None


async def _woken(watch: Watch, within: float) -> bool:
    """True if ``watch`` reports a change within ``within`` seconds (poll ticks ignored)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if await watch.wait(left):
            return True
    return False


async def _heard(seen: list[str | None], digest: str, within: float) -> bool:
    """True once ``digest`` is in ``seen`` (filled by an ``on_change`` listener) within ``within``."""
    deadline = time.monotonic() + within
    while digest not in seen and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return digest in seen
