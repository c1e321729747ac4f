"""The two windows (advisory and mandatory), as botocore's refreshable credentials have.

Tokens are put inside a window by rewriting the stored expiry of a real token (the
simulator's own tokens live an hour), so no test sleeps until a window opens.
"""

from __future__ import annotations

import asyncio
import time

import attrs
import pytest

from factorial_tokens import (
    ConfigurationError,
    EventKind,
    FactorialApp,
    ProviderError,
    TokenEvent,
    TokenManager,
    TokenSet,
)
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import MemoryStore, TenantKey, Update
from factorial_tokens.testing import CountingStore, FakeFactorial, Fault

from .conftest import SimFactory, app_for

LEEWAY = 60.0  # min_valid defaults to 15 s


async def place(tm: TokenManager, sim: FakeFactorial, left: float, tenant: str = "acme") -> TokenSet:
    """Connect ``tenant`` and store its tokens as if they had ``left`` seconds to live
    (of a one-hour lifetime); returns the stored token set."""
    tokens = await tm.exchange_code(tenant, sim.issue_code(company_id=1))
    now = time.time()
    aged = attrs.evolve(tokens, expires_at=now + left, obtained_at=now + left - 3600)
    key = TenantKey(tm.app.client_id, tenant)
    await tm.store.replace(key, Update(JsonCodec().encode(key, aged), expires_at=aged.expires_at))
    return aged


async def settle(tm: TokenManager) -> None:
    """Wait until the manager's background work is done."""
    for _ in range(500):
        if not tm._flights:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a background refresh never ended")


async def test_advisory_window_returns_the_current_token_and_refreshes_once_behind(
    sim: FakeFactorial,
) -> None:
    async with TokenManager(app_for(sim), "memory://", leeway=LEEWAY) as tm:
        old = await place(tm, sim, left=40)  # inside the leeway, above min_valid
        got = await asyncio.gather(*(tm.access_token("acme") for _ in range(200)))
        assert set(got) == {old.access_token}  # nobody waited for the refresh
        await settle(tm)
        assert sim.stats.refreshes == sim.stats.refresh_attempts == 1
        fresh = await tm.access_token("acme")
        assert fresh != old.access_token and sim.is_active(fresh)
        assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


async def test_advisory_hit_costs_no_store_call(make_sim: SimFactory) -> None:
    """Inside the advisory window, callers after the first one cost no store I/O either."""
    store = CountingStore(MemoryStore())
    async with make_sim(access_token_ttl=3600, latency=0.5) as sim:
        async with TokenManager(app_for(sim), store, leeway=LEEWAY) as tm:
            old = await place(tm, sim, left=40)
            assert await tm.access_token("acme") == old.access_token  # starts the background refresh
            while store.calls["acquire"] == 0:  # ... which now holds the lease and waits on HTTP
                await asyncio.sleep(0.005)
            store.reset()
            for _ in range(200):
                assert await tm.access_token("acme") == old.access_token
            assert store.calls.total() == 0
            await settle(tm)


async def test_mandatory_window_waits_for_the_refresh(sim: FakeFactorial) -> None:
    async with TokenManager(app_for(sim), "memory://", leeway=LEEWAY) as tm:
        old = await place(tm, sim, left=10)  # below min_valid (15 s)
        got = await asyncio.gather(*(tm.access_token("acme") for _ in range(100)))
        assert len(set(got)) == 1 and old.access_token not in got
        assert sim.stats.refreshes == sim.stats.refresh_attempts == 1


async def test_outage_inside_the_advisory_window_reaches_no_caller(sim: FakeFactorial) -> None:
    events: list[TokenEvent] = []
    async with TokenManager(
        app_for(sim),
        "memory://",
        leeway=LEEWAY,
        lease_ttl=3,
        provider_timeout=0.5,
        refresh_deadline=0.5,
        on_event=events.append,
    ) as tm:
        old = await place(tm, sim, left=40)
        sim.unavailable = True
        errors = 0
        for _ in range(60):  # about 1.2 s of callers while every refresh fails
            try:
                assert await tm.access_token("acme") == old.access_token
            except ProviderError:
                errors += 1
            await asyncio.sleep(0.02)
        await settle(tm)
        await tm.flush_events()
        failed = [e for e in events if e.kind is EventKind.REFRESH_FAILED]
        assert errors == 0
        assert failed and all(e.tenant == "acme" and "ProviderError" in (e.error or "") for e in failed)
        # Backed off: far fewer background attempts than callers.
        assert 1 <= len(failed) <= 5, len(failed)
        sim.unavailable = False
        tm._backoff.clear()  # skip the backoff's wait, then the next caller retries
        assert await tm.access_token("acme") == old.access_token
        await settle(tm)
        assert await tm.access_token("acme") != old.access_token
        assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


async def test_outage_in_the_mandatory_window_reaches_the_caller(sim: FakeFactorial) -> None:
    async with TokenManager(
        app_for(sim), "memory://", leeway=LEEWAY, lease_ttl=3, provider_timeout=0.5, refresh_deadline=0.5
    ) as tm:
        await place(tm, sim, left=10)
        sim.unavailable = True
        with pytest.raises(ProviderError):
            await tm.access_token("acme")
        sim.unavailable = False


async def test_refresh_still_forces_and_waits(sim: FakeFactorial) -> None:
    async with TokenManager(app_for(sim), "memory://", leeway=LEEWAY) as tm:
        old = await place(tm, sim, left=40)
        new = await tm.refresh("acme")
        assert new.access_token != old.access_token
        assert sim.stats.refreshes == 1


async def test_short_lived_tokens_scale_both_windows() -> None:
    """A token shorter than twice the leeway is due at half its lifetime; min_valid shrinks
    in proportion (here an eighth of the lifetime before expiry)."""
    async with TokenManager(app_for_nothing(), "memory://", leeway=60) as tm:
        now = time.time()
        entry = tm._entry_of(TokenSet("a", "r", expires_at=now + 40, obtained_at=now), 1)
        assert entry.due == pytest.approx(now + 20) and entry.must == pytest.approx(now + 35)
        entry = tm._entry_of(TokenSet("a", "r", expires_at=now + 3600, obtained_at=now), 1)
        assert entry.due == pytest.approx(now + 3540) and entry.must == pytest.approx(now + 3585)


def app_for_nothing() -> FactorialApp:
    return FactorialApp(client_id="c", client_secret="s", redirect_uri="https://example.com/cb")


@pytest.mark.parametrize("min_valid", [-1, 61])
def test_min_valid_must_fit_in_the_leeway(min_valid: float) -> None:
    with pytest.raises(ConfigurationError, match="min_valid"):
        TokenManager(app_for_nothing(), "memory://", leeway=60, min_valid=min_valid)


async def test_a_refresh_this_process_knows_is_due_is_two_round_trips(sim: FakeFactorial) -> None:
    """Acquire (which returns the record) and the fenced commit; no read, no extend (no
    watchdog for a refresh that ends within a third of the lease)."""
    store = CountingStore(MemoryStore())
    async with TokenManager(app_for(sim), store, leeway=LEEWAY) as tm:
        await place(tm, sim, left=3000)
        await tm.access_token("acme")  # cached now
        store.reset()
        await tm.refresh("acme")
        assert dict(store.calls) == {"acquire": 1, "commit": 1}
        await place(tm, sim, left=40, tenant="beta")
        tm._cache.pop("beta", None)
        store.reset()
        # A cold miss: one acquisition, which leaves the record alone (in the leeway, above
        # min_valid); then the background refresh: acquire and commit only.
        await tm.access_token("beta")
        await settle(tm)
        assert dict(store.calls) == {"acquire": 2, "commit": 1}


async def test_a_caller_that_joined_a_background_refresh_which_gave_up_refreshes_itself(
    make_sim: SimFactory,
) -> None:
    """The background refresh stops retrying once the mandatory window opens. A caller who
    joined it there (it must wait) gets a refresh of its own, not the background one's error.
    Found by the outage benchmark; this test failed before the fix (ProviderError 503)."""
    budgets = {"leeway": LEEWAY, "lease_ttl": 8.0, "provider_timeout": 3.0, "refresh_deadline": 5.0}
    async with make_sim(access_token_ttl=3600, latency=1.0) as sim:
        async with TokenManager(app_for(sim), "memory://", **budgets) as tm:
            old = await place(tm, sim, left=15.3)  # mandatory window in 0.3 s
            sim.unavailable = True
            assert await tm.access_token("acme") == old.access_token  # the background refresh starts
            await asyncio.sleep(0.6)  # past min_valid; its first answer (a 503) comes at 1.0 s
            waiter = asyncio.ensure_future(tm.access_token("acme"))  # joins it, must wait
            await asyncio.sleep(0.5)
            sim.unavailable = False  # after that 503: the background refresh gave up on it
            fresh = await waiter
        assert fresh != old.access_token and sim.is_active(fresh)
        assert sim.stats.refreshes == 1 and sim.stats.unavailable == 1


class _ReadsAfterTheFlight:
    """A store whose reads, once armed with a flight, answer as soon as that flight has
    ended, before its done callbacks run (a reply that lands in that very turn)."""

    def __init__(self, inner: MemoryStore, sim: FakeFactorial) -> None:
        self.inner = inner
        self.sim = sim
        self.flight: asyncio.Task[object] | None = None
        self.crossed = False  # an armed read was answered in the turn its flight ended

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read(self, key: TenantKey) -> object:
        flight, self.flight = self.flight, None
        if flight is not None:
            while not flight.done():  # each turn re-queues this step before the flight's callbacks
                await asyncio.sleep(0)
            self.crossed = True
            self.sim.unavailable = False
        return await self.inner.read(key)


async def test_a_caller_whose_read_lands_as_the_background_refresh_gives_up_refreshes_itself(
    make_sim: SimFactory,
) -> None:
    """As above, but the mandatory caller's store read is answered after the background
    refresh ended and before its landing ran: the ended flight is still registered, and the
    caller got its error (ProviderError 503) instead of starting a refresh of its own. Seen
    as a few ProviderErrors in the outage benchmark; this test failed before the fix."""
    budgets = {"leeway": LEEWAY, "lease_ttl": 8.0, "provider_timeout": 3.0, "refresh_deadline": 5.0}
    async with make_sim(access_token_ttl=3600, latency=2.0) as sim:
        store = _ReadsAfterTheFlight(MemoryStore(), sim)
        async with TokenManager(app_for(sim), store, **budgets) as tm:  # type: ignore[arg-type]
            old = await place(tm, sim, left=15.3)  # mandatory window in 0.3 s
            sim.unavailable = True
            assert await tm.access_token("acme") == old.access_token  # the background refresh starts
            store.flight = tm._flights["acme"]  # its first answer (a 503, and it gives up) at 2 s
            await asyncio.sleep(0.35)  # past min_valid: the next caller must wait
            tm._forget_cached("acme")  # as an announcement does: that caller reads the store
            fresh = await tm.access_token("acme")
            assert store.crossed  # that caller's read was answered as the refresh gave up
        assert fresh != old.access_token and sim.is_active(fresh)
        assert sim.stats.refreshes == 1 and sim.stats.unavailable >= 1


class _HeldReads:
    """A store whose reads, once :meth:`hold` is called, see the record when sent but
    answer only after :meth:`answer`: a read that crosses a refresh on the wire."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.sent = asyncio.Event()
        self._open: asyncio.Event | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def hold_reads(self) -> None:  # not ``hold``: that is the Throttle capability's name
        self._open = asyncio.Event()

    def answer(self) -> None:
        assert self._open is not None
        self._open.set()
        self._open = None

    async def read(self, key: TenantKey) -> object:
        record = await self.inner.read(key)
        gate = self._open
        if gate is not None:
            self.sent.set()
            await gate.wait()
        return record


async def test_a_read_answered_after_a_newer_refresh_never_brings_the_older_token_back(
    make_sim: SimFactory,
) -> None:
    """The flaky wire storm's 401 after its retry: a caller's read, sent before a background
    refresh committed and answered after it, put the older (revoked) token back in the
    cache over the newer one; callers (a 401's retry among them) were then handed it."""
    store = _HeldReads(MemoryStore())
    async with make_sim(access_token_ttl=3600, latency=0.2) as sim:
        async with TokenManager(app_for(sim), store, leeway=LEEWAY) as tm:  # type: ignore[arg-type]
            old = await place(tm, sim, left=40)
            sent = sim.stats.token_requests
            assert await tm.access_token("acme") == old.access_token  # starts the background refresh
            while sim.stats.token_requests == sent:  # ... which now waits on HTTP
                await asyncio.sleep(0.005)
            store.hold_reads()
            tm._forget_cached("acme")  # as another worker's announcement does
            late = asyncio.create_task(tm.access_token("acme"))  # reads the old record ...
            await store.sent.wait()
            await settle(tm)  # ... and the refresh commits before that read answers
            store.answer()
            got = await late
            new = await tm.access_token("acme")
            assert new != old.access_token and sim.is_active(new)
            assert got == new
            assert sim.stats.refreshes == 1


async def test_a_background_refresh_makes_its_last_try_as_the_mandatory_window_opens(
    sim: FakeFactorial,
) -> None:
    """A failed try whose backoff would end past the mandatory window's start is followed
    by one more try at that start, not by giving up: an outage that is over by then costs
    no caller a wait. Found by the outage benchmark (the outage ends as the window opens);
    this test failed before the fix (the background refresh gave up after its first 503)."""
    events: list[TokenEvent] = []
    async with TokenManager(app_for(sim), "memory://", leeway=LEEWAY, on_event=events.append) as tm:
        tm._oauth.backoff = 10.0  # a first backoff of 5-10 s: far past the window's start
        old = await place(tm, sim, left=16.0)  # mandatory window in 1 s
        sent = sim.stats.token_requests
        sim.inject(Fault.HTTP_503)
        assert await tm.access_token("acme") == old.access_token  # the background refresh starts
        await settle(tm)
        await tm.flush_events()
        assert sim.stats.token_requests - sent == 2  # the 503, then the try at the window's start
        assert sim.stats.refreshes == 1
        assert not [e for e in events if e.kind is EventKind.REFRESH_FAILED]
        fresh = await tm.access_token("acme")  # from the cache, refreshed without a caller waiting
        assert fresh != old.access_token and sim.is_active(fresh)


async def test_a_retry_after_past_the_mandatory_window_is_not_cut_short(sim: FakeFactorial) -> None:
    """The last try at the mandatory window's start never cuts a Retry-After hold short:
    the background refresh gives up, and the whole fleet holds its refreshes."""
    events: list[TokenEvent] = []
    async with TokenManager(app_for(sim), "memory://", leeway=LEEWAY, on_event=events.append) as tm:
        old = await place(tm, sim, left=16.0)  # mandatory window in 1 s
        sent = sim.stats.token_requests
        sim.inject(Fault.RATE_LIMITED, retry_after=5.0)
        assert await tm.access_token("acme") == old.access_token
        await settle(tm)
        await tm.flush_events()
        assert sim.stats.token_requests - sent == 1 and sim.stats.refreshes == 0
        assert [e.kind for e in events if e.kind is EventKind.REFRESH_FAILED] == [EventKind.REFRESH_FAILED]
        assert tm._not_before > time.time() + 3.0


async def test_a_caller_in_the_mandatory_window_joins_the_background_refresh_without_a_read(
    make_sim: SimFactory,
) -> None:
    """A caller whose cached token reached the mandatory window while the background
    refresh flies waits for that refresh and reads nothing: its cache was not dropped (no
    announcement came), so the store holds nothing newer. This test failed before the fix
    (one store read per such caller, a round trip added to every mandatory wait)."""
    store = CountingStore(MemoryStore())
    async with make_sim(access_token_ttl=3600, latency=1.5) as sim:
        async with TokenManager(app_for(sim), store, leeway=LEEWAY) as tm:
            old = await place(tm, sim, left=15.3)  # mandatory window in 0.3 s
            assert await tm.access_token("acme") == old.access_token  # starts the background refresh
            await asyncio.sleep(0.4)  # past min_valid; the refresh's answer comes at 1.5 s
            store.reset()
            got = await asyncio.gather(*(tm.access_token("acme") for _ in range(20)))
            assert len(set(got)) == 1 and old.access_token not in got
            assert store.calls["read"] == 0
            assert sim.stats.refreshes == sim.stats.refresh_attempts == 1


async def test_a_successful_refresh_ends_the_background_backoff(sim: FakeFactorial) -> None:
    """Background refreshes failed a few times (backing off to seconds); then a caller who
    had to wait refreshed the tenant. The backoff was forgotten only when a background
    refresh itself succeeded: the first background failure of a later episode waited the
    old episode's 4-8 s instead of starting again from 0.25-0.5 s."""
    failures: list[TokenEvent] = []
    async with TokenManager(
        app_for(sim),
        "memory://",
        leeway=60.0,
        lease_ttl=3,
        provider_timeout=0.5,
        refresh_deadline=0.5,
        on_event=lambda event: failures.append(event) if event.kind is EventKind.REFRESH_FAILED else None,
    ) as tm:
        await place(tm, sim, left=40)
        sim.unavailable = True
        async with asyncio.timeout(20):
            while len(failures) < 3:  # three background failures: the next retry is 1-2 s away
                await tm.access_token("acme")
                await asyncio.sleep(0.02)
                await tm.flush_events()
        assert tm._backoff["acme"][0] >= 3
        sim.unavailable = False
        await place(tm, sim, left=10)  # mandatory: this caller waits for a refresh, which succeeds
        assert sim.is_active(await tm.access_token("acme"))
        assert "acme" not in tm._backoff
