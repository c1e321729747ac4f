"""Fleet-wide back-pressure: a shared refresh budget keeps cold starts under the provider's
rate limit (counted at the simulator, with its rate window shortened to one second).

The multi-process proof that a 429 holds every process is in ``test_multiprocess.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import attrs
import pytest

from factorial_tokens import ConfigurationError, ProviderError, TenantInfo, TokenManager, TokenSet
from factorial_tokens._keepalive import keep_alive_pass
from factorial_tokens.sealing import JsonCodec, Keyring
from factorial_tokens.store import (
    Acquisition,
    Freshness,
    Lease,
    MemoryStore,
    Record,
    Store,
    TenantKey,
    Throttle,
    Update,
)
from factorial_tokens.testing import CountingStore, FakeFactorial, Fault

from .conftest import SimFactory, app_for
from .stores import STORES, open_backend

TENANTS = 40
LIMIT = 20  # token requests per one-second window at the simulator


async def expired_tenants(tm: TokenManager, sim: FakeFactorial) -> list[str]:
    """Connect TENANTS tenants (no rate limit yet), then store them as expired."""
    limit, sim.rate_limit_per_minute = sim.rate_limit_per_minute, None
    tenants = [f"cold-{i}" for i in range(TENANTS)]
    for i, tenant in enumerate(tenants):
        tokens = await tm.exchange_code(tenant, sim.issue_code(company_id=500 + i))
        old = attrs.evolve(tokens, expires_at=time.time() - 1, obtained_at=time.time() - 3601)
        key = TenantKey(tm.app.client_id, tenant)
        await tm.store.replace(key, Update(JsonCodec().encode(key, old), expires_at=old.expires_at))
    sim.rate_limit_per_minute = limit
    return tenants


async def cold_start(make_sim: SimFactory, tmp_path: Path, **manager: float) -> FakeFactorial:
    """Two managers (workers) on one store refresh every expired tenant at once."""
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    async with make_sim(access_token_ttl=3600, rate_limit_per_minute=LIMIT, rate_limit_window=1.0) as sim:
        a, b = TokenManager(app_for(sim), url, **manager), TokenManager(app_for(sim), url, **manager)
        async with a, b:
            tenants = await expired_tenants(a, sim)
            got = await asyncio.gather(*(tm.access_token(t) for t in tenants for tm in (a, b)))
        assert all(sim.is_active(token) for token in got)
        return sim


async def test_a_shared_budget_keeps_a_cold_start_under_the_rate_limit(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    # 18 per second (1,080 a minute) against the simulator's 20 per second.
    sim = await cold_start(make_sim, tmp_path, refresh_rate=1080, refresh_burst=1)
    assert sim.stats.rate_limited == 0
    assert sim.stats.refreshes == sim.stats.refresh_attempts == TENANTS
    assert sim.stats.invalid_grant == 0


async def test_without_a_budget_the_same_cold_start_draws_429s(make_sim: SimFactory, tmp_path: Path) -> None:
    """The control: the test above can fail."""
    sim = await cold_start(make_sim, tmp_path)
    assert sim.stats.rate_limited > 0
    assert sim.stats.refreshes == TENANTS and sim.stats.invalid_grant == 0


@pytest.mark.parametrize(
    ("option", "value"), [("refresh_rate", 0), ("refresh_rate", -5), ("refresh_burst", 0)]
)
def test_budget_settings_are_checked(option: str, value: float) -> None:
    from .test_windows import app_for_nothing

    with pytest.raises(ConfigurationError, match=option):
        TokenManager(app_for_nothing(), "memory://", **{option: value})  # type: ignore[arg-type]


class LeaseGauge(CountingStore):
    """Counts the leases held at once (the keepalive's concurrency, seen from the store)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.held = self.most = 0

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        won = await super().acquire(key, owner, ttl, unless_fresh=unless_fresh)
        if won.lease is not None:
            self.held += 1
            self.most = max(self.most, self.held)
        return won

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        self.held -= 1
        return await super().commit(lease, update)

    async def release(self, lease: Lease) -> bool:
        self.held -= 1
        return await super().release(lease)


async def test_keepalive_over_many_tenants_is_concurrent_bounded_and_budgeted(make_sim: SimFactory) -> None:
    store = LeaseGauge(MemoryStore())
    async with make_sim(access_token_ttl=3600, rate_limit_per_minute=LIMIT, rate_limit_window=1.0) as sim:
        async with TokenManager(app_for(sim), store, refresh_rate=1080, refresh_burst=1) as tm:
            sim.rate_limit_per_minute = None
            tenants = [f"idle-{i}" for i in range(TENANTS)]
            for i, tenant in enumerate(tenants):
                await tm.exchange_code(tenant, sim.issue_code(company_id=700 + i))
            sim.rate_limit_per_minute = LIMIT
            later = time.time() + 3 * 3600
            report = await keep_alive_pass(tm, max_age=3600, jitter=0, now=later, concurrency=8)
    assert sorted(report.refreshed) == sorted(tenants) and report.ok
    assert sim.stats.refreshes == sim.stats.refresh_attempts == TENANTS
    assert sim.stats.rate_limited == 0 and sim.stats.invalid_grant == 0
    assert 2 <= store.most <= 8  # concurrent, and bounded


async def test_a_worker_opened_during_a_fleet_hold_honours_it(make_sim: SimFactory, tmp_path: Path) -> None:
    """Worker A is answered 429 Retry-After: 30 and records the hold in the store. Worker B
    starts afterwards (a restart, a scale-out) on the same store: it must not send token
    requests until the hold is over."""
    url = STORES["redis"].url(tmp_path)
    budgets = dict(lease_ttl=6.0, provider_timeout=2.0)
    async with make_sim(access_token_ttl=3600) as sim:
        async with TokenManager(app_for(sim), url, **budgets) as a:
            await a.exchange_code("acme", sim.issue_code(company_id=1))
            sim.inject(Fault.RATE_LIMITED, retry_after=30)
            with pytest.raises(ProviderError):
                await a.refresh("acme")
            assert isinstance(a.store, Throttle)
            async with asyncio.timeout(5):
                while await a.store.hold(a.app.client_id, 0.0) <= time.time() + 20:
                    await asyncio.sleep(0.01)
            sent = sim.stats.token_requests
            async with TokenManager(app_for(sim), url, **budgets) as b:  # opened during the hold
                with contextlib.suppress(ProviderError):
                    await b.refresh("acme")
            assert sim.stats.token_requests == sent, "a worker sent a token request during the fleet's hold"


class _RekeyedAfterListing:
    """The manager as keepalive sees it, with an operator's ``rekey`` (documented as safe
    while workers run) landing between the pass's listing and its refreshes: the version
    rises with the same tokens, and ``refresh(newer_than=listed)`` took it for a refresh."""

    def __init__(self, tm: TokenManager, keyring: Keyring) -> None:
        self.tm, self.keyring = tm, keyring
        self.app = tm.app
        self.got: list[TokenSet] = []

    async def tenants(self) -> list[TenantInfo]:
        infos = await self.tm.tenants()
        assert await self.tm.rekey(self.keyring) == 1
        return infos

    async def refresh(self, tenant: str, *, newer_than: int | None = None) -> TokenSet:
        self.got.append(await self.tm.refresh(tenant, newer_than=newer_than))
        return self.got[-1]


async def test_keepalive_renews_a_tenant_rekeyed_since_the_listing(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    old = Keyring.generate("k1")
    both = old.rotated("k2")
    async with open_backend("redis", tmp_path) as backend:
        async with TokenManager(
            app_for(sim), backend.store, keyring=old, lease_ttl=6.0, provider_timeout=2.0
        ) as tm:
            before = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        async with TokenManager(
            app_for(sim), backend.store, keyring=both, lease_ttl=6.0, provider_timeout=2.0
        ) as tm:
            renewer = _RekeyedAfterListing(tm, both)
            report = await keep_alive_pass(renewer, max_age=3600, jitter=0, now=time.time() + 3 * 3600)
            assert report.refreshed == ("acme",)
            assert (await tm.tokens("acme")).fingerprint != before.fingerprint, (
                "keepalive reported 'refreshed' but the tenant's tokens are those it listed"
            )
    assert sim.stats.refreshes == 1


class _RekeyThenPeerRefreshes:
    def __init__(self, tm: TokenManager, peer: TokenManager, keyring: Keyring) -> None:
        self.tm, self.peer, self.keyring = tm, peer, keyring
        self.app = tm.app

    async def tenants(self) -> list[TenantInfo]:
        infos = await self.tm.tenants()
        assert await self.tm.rekey(self.keyring) == 1  # an operator's rekey after the listing
        return infos

    async def refresh(self, tenant: str, *, newer_than: int | None = None) -> TokenSet:
        if newer_than is None:
            await self.peer.refresh(tenant)  # another worker renews the tenant just now
        return await self.tm.refresh(tenant, newer_than=newer_than)


async def test_keepalive_never_refreshes_what_another_worker_just_refreshed(sim: FakeFactorial) -> None:
    old = Keyring.generate("k1")
    both = old.rotated("k2")
    store = MemoryStore()
    async with TokenManager(app_for(sim), store, keyring=old, lease_ttl=6.0, provider_timeout=2.0) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
    async with (
        TokenManager(app_for(sim), store, keyring=both, lease_ttl=6.0, provider_timeout=2.0) as tm,
        TokenManager(app_for(sim), store, keyring=both, lease_ttl=6.0, provider_timeout=2.0) as peer,
    ):
        renewer = _RekeyThenPeerRefreshes(tm, peer, both)
        report = await keep_alive_pass(renewer, max_age=3600, jitter=0, now=time.time() + 3 * 3600)
        assert report.refreshed == ("acme",)
    assert sim.stats.refreshes == 1, (
        f"{sim.stats.refreshes} refreshes: the pass renewed the peer's fresh tokens"
    )


async def test_a_nan_retry_after_does_not_wedge_every_refresh(sim: FakeFactorial) -> None:
    """A 429 whose ``Retry-After`` reads ``nan`` (a proxy's garbage; Python's ``float``
    takes it) is parsed as NaN by ``_oauth._retry_after`` (``max(nan, 0.0)`` is NaN) and
    ``_provider_held`` makes NaN the worker's ``_not_before``. From then on ``_admitted``
    computes ``wait = nan``: neither ``<= 0`` nor past the deadline, so it calls
    ``asyncio.sleep(nan)``, which returns at once, and loops forever: every later refresh
    of every tenant in the process spins without end (no new 429 can ever reset it)."""
    budgets = dict(lease_ttl=2.0, provider_timeout=1.0, wait_timeout=2.5)
    async with TokenManager(app_for(sim), "memory://", **budgets) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
        await tm.exchange_code("beta", sim.issue_code(company_id=2))
        sim.inject(Fault.RATE_LIMITED, retry_after=float("nan"))
        await tm.refresh("acme")  # the 429 is retried; this refresh goes through
        try:
            async with asyncio.timeout(2):
                await tm.refresh("beta")
        except TimeoutError:
            pytest.fail("a refresh after a 429 with Retry-After: nan never ended (_admitted spins)")
    assert sim.stats.refreshes == 2


@pytest.mark.parametrize(
    "retry_after",
    [float("inf"), 1_800_000_000.0],
    ids=["infinite", "an-epoch-timestamp"],
)
async def test_an_absurd_retry_after_does_not_hold_the_fleet_for_ever(
    make_sim: SimFactory, tmp_path: Path, retry_after: float
) -> None:
    """A 429 with ``Retry-After: inf`` (``float`` takes it) or an absolute Unix timestamp
    sent as delay-seconds (a common proxy mistake: 1.8e9 s, 57 years) is recorded as is:
    ``_retry_after`` caps nothing and ``_provider_held`` shares ``time.time() + seconds``
    with the store, whose ``hold`` only ever raises the instant. Every worker of the fleet,
    and every worker started later, then refuses every refresh for decades (for ever),
    and nothing but editing the store by hand lifts it. The recorded hold must be bounded
    (the provider's limit is per minute)."""
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    async with make_sim(access_token_ttl=3600) as sim:
        async with TokenManager(app_for(sim), url, lease_ttl=6.0, provider_timeout=2.0) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            sim.inject(Fault.RATE_LIMITED, retry_after=retry_after)
            # ("inf" is no Retry-After at all: the 429 is retried after a backoff, and the
            # refresh may go through.)
            with contextlib.suppress(ProviderError):
                await tm.refresh("acme")
            assert isinstance(tm.store, Throttle)
            async with asyncio.timeout(5):
                while await tm.store.hold(tm.app.client_id, 0.0) == 0.0:
                    await asyncio.sleep(0.01)
            held = await tm.store.hold(tm.app.client_id, 0.0)
    assert held < time.time() + 3600, f"one 429 held every worker's refreshes for {held - time.time():.3g}s"


async def test_a_nan_retry_after_does_not_disable_the_fleets_holds_in_postgres(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    """Worker A is answered 429 ``Retry-After: nan``; ``_share_hold`` records NaN in
    Postgres (``hold`` writes ``$3`` when ``coalesce(t.expires_at, 0) < $3``, and
    Postgres orders NaN above every number). From then on no hold is ever recorded again
    (nothing is above NaN) and ``admit`` never sees one: worker B's real 429
    ``Retry-After: 30`` is not shared, and worker C, started during that hold, reads NaN
    (``max(0.0, nan)`` keeps 0.0) and sends token requests at once."""
    url = STORES["postgres"].url(tmp_path)
    budgets = dict(lease_ttl=2.0, provider_timeout=1.0, wait_timeout=2.5)
    async with make_sim(access_token_ttl=3600) as sim:
        async with TokenManager(app_for(sim), url, **budgets) as a:
            await a.exchange_code("acme", sim.issue_code(company_id=1))
            await a.exchange_code("beta", sim.issue_code(company_id=2))
            sim.inject(Fault.RATE_LIMITED, retry_after=float("nan"))
            await a.refresh("acme")  # the 429 is retried; this refresh goes through
        async with TokenManager(app_for(sim), url, **budgets) as b:
            sim.inject(Fault.RATE_LIMITED, retry_after=30)
            with pytest.raises(ProviderError):
                await b.refresh("beta")
        # b's hold was shared before it closed (aclose waits for its tasks)
        sent = sim.stats.token_requests
        async with TokenManager(app_for(sim), url, **budgets) as c:  # opened during b's hold
            with contextlib.suppress(ProviderError):
                await c.refresh("beta")
        assert sim.stats.token_requests == sent, "a worker sent a token request during the fleet's hold"


async def test_a_keepalive_pass_during_a_long_hold_logs_a_line_per_tenant_not_a_traceback(
    sim: FakeFactorial, caplog: pytest.LogCaptureFixture
) -> None:
    """During a provider hold longer than a refresh's deadline every visit of a keepalive
    pass fails with ProviderError(429), an expected outcome; each was logged with a whole
    traceback (10,000 tenants: 10,000 tracebacks a pass)."""
    async with TokenManager(app_for(sim), "memory://", lease_ttl=6.0, provider_timeout=2.0) as tm:
        for number, tenant in enumerate(("a", "b", "c"), start=1):
            await tm.exchange_code(tenant, sim.issue_code(company_id=number))
        sim.inject(Fault.RATE_LIMITED, times=3, retry_after=300)  # the visits start together
        with caplog.at_level(logging.INFO, logger="factorial_tokens.keepalive"):
            report = await tm.keep_alive(max_age=1e-6, jitter=0.0, once=True)
    assert sorted(report.failed) == ["a", "b", "c"]
    failures = [
        r for r in caplog.records if r.name == "factorial_tokens.keepalive" and r.levelno >= logging.WARNING
    ]
    assert len(failures) == 3 and all(r.exc_info is None for r in failures), [
        r.getMessage() for r in failures
    ]
    assert all("429" in r.getMessage() for r in failures)
