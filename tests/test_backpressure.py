"""Fleet-wide back-pressure: a shared refresh budget keeps cold starts under the provider's
rate limit (counted at the simulator, with its rate window shortened to one second).

The multi-process proof that a 429 holds every process is in ``test_multiprocess.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import attrs
import pytest

from factorial_tokens import ConfigurationError, TokenManager
from factorial_tokens._keepalive import keep_alive_pass
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import (
    Acquisition,
    Freshness,
    Lease,
    MemoryStore,
    Record,
    Store,
    TenantKey,
    Update,
)
from factorial_tokens.testing import CountingStore, FakeFactorial

from .conftest import SimFactory, app_for

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
