"""The manager when its store goes away: cached tokens serve until they expire, then a
typed error, and recovery without a restart once the store is back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from factorial_tokens import StoreUnavailable, TokenManager
from factorial_tokens.store import MemoryStore
from factorial_tokens.testing import CountingStore, FakeFactorial

from .conftest import SimFactory, app_for
from .stores import open_backend


class OutageStore(CountingStore):
    """A real MemoryStore behind a switch that makes every primitive fail like a lost server."""

    down = False

    def __getattribute__(self, name: str) -> object:
        attribute = super().__getattribute__(name)
        primitives = {
            "read",
            "acquire",
            "extend",
            "release",
            "commit",
            "replace",
            "claim_code",
            "advance_code",
        }
        if name in primitives and object.__getattribute__(self, "down"):

            async def unavailable(*args: object, **kwargs: object) -> None:
                raise StoreUnavailable("store is down (test outage)")

            return unavailable
        return attribute


async def test_cached_tokens_serve_through_an_outage(make_sim: SimFactory) -> None:
    async with make_sim(access_token_ttl=2) as sim:
        store = OutageStore(MemoryStore())
        async with TokenManager(app_for(sim), store, lease_ttl=3, provider_timeout=1) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            token = await tm.access_token("acme")  # now cached
            store.down = True
            assert await tm.access_token("acme") == token  # fresh: the hot path needs no store
            await asyncio.sleep(1.1)  # due for refresh (half its lifetime), not yet expired
            assert await tm.access_token("acme") == token
            await asyncio.sleep(1.0)  # expired now
            with pytest.raises(StoreUnavailable):
                await tm.access_token("acme")
            assert sim.stats.refresh_attempts == 0  # fail closed: no refresh without the lease
            store.down = False
            fresh = await tm.access_token("acme")
            assert fresh != token and sim.is_active(fresh)
            assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


async def _outage_while_the_provider_answers(store: OutageStore, sim: FakeFactorial, seconds: float) -> None:
    """Take the store down once the provider has the request, bring it back ``seconds`` later."""
    while sim.stats.token_requests < 2:  # the exchange, then the request in flight
        await asyncio.sleep(0.01)
    store.down = True
    await asyncio.sleep(seconds)
    store.down = False


async def test_tokens_issued_during_an_outage_are_not_lost(make_sim: SimFactory) -> None:
    async with make_sim(latency=0.3) as sim:
        store = OutageStore(MemoryStore())
        async with TokenManager(app_for(sim), store, lease_ttl=3, provider_timeout=1) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            outage = asyncio.create_task(_outage_while_the_provider_answers(store, sim, 0.8))
            fresh = await tm.refresh("acme")  # its answer arrives while the store is down
            await outage
            assert (await tm.tokens("acme")).access_token == fresh.access_token
            assert sim.is_active(fresh.access_token)
            assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0
            assert store.calls["commit"] == 1  # the calls that failed never reached the store


async def test_cached_tokens_still_serve_an_outage_after_a_resubscription(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    """A flapping Redis: the change subscription drops and comes back (announcements may
    have been lost), then the store goes away. A token cached a moment ago, fresh for an hour,
    must still be served until it expires."""
    async with open_backend("redis", tmp_path) as backend:
        store = OutageStore(backend.store)
        async with TokenManager(app_for(sim), store, lease_ttl=6.0, provider_timeout=2.0) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            token = await tm.access_token("acme")  # cached, an hour to live
            resubscribed = asyncio.Event()
            stop = backend.store.on_change(lambda digest: digest is None and resubscribed.set())
            assert await backend.kill_connections() > 0
            await asyncio.wait_for(resubscribed.wait(), 15)
            stop()
            store.down = True  # ... and now the store goes away
            try:
                assert await tm.access_token("acme") == token
            finally:
                store.down = False
