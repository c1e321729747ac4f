"""Store replies lost on the wire, through a TCP proxy, on Redis and Postgres.

For every request of a code exchange and a refresh, in turn, the proxy drops the reply
after the server executed the request: the client (redis-py with its default retries, the
plugin's own client without them, asyncpg) sees a dropped connection. Each call must end
by its deadline with the right result or a typed error, the provider must see each code
at most once, and no grant may be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from factorial_tokens import FactorialTokensError, TokenManager
from factorial_tokens.store import Store

from . import postgres_server, redis_server
from .conftest import SimFactory, app_for
from .tcp_proxy import TcpProxy

#: Requests covered after arming: a code exchange and a refresh take about a dozen
#: round trips on either store (the pub/sub or LISTEN connection's too).
STEPS = 14


@contextlib.asynccontextmanager
async def _redis_store(kind: str) -> AsyncIterator[tuple[TcpProxy, Store]]:
    import redis.asyncio as aioredis
    from factorial_tokens_redis import RedisStore
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    with redis_server.shared_redis_url() as url:
        parts = urlsplit(url)
        async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
            prefix = redis_server.unique_prefix()
            target = f"redis://127.0.0.1:{proxy.port}{parts.path or '/0'}"
            if kind == "retrying":
                # A client that retries on connection errors, so it resends a command whose
                # reply was lost: redis-py's default Redis(...) since 6.0, given explicitly for
                # the 5.x it still supports (from_url has no retries by default).
                db = int((parts.path or "/0").strip("/") or 0)
                client = aioredis.Redis(
                    host="127.0.0.1",
                    port=proxy.port,
                    db=db,
                    socket_timeout=2,
                    retry=Retry(ExponentialBackoff(), 3),
                )
                assert client.get_retry() is not None
                store: Any = RedisStore(client, prefix=prefix, poll=0.2)
            else:
                store = RedisStore.from_url(f"{target}?prefix={prefix}&poll=0.2&socket_timeout=2")
                client = None
            try:
                yield proxy, store
            finally:
                await store.aclose()
                if client is not None:
                    await client.aclose()
                admin = aioredis.Redis.from_url(url)
                keys = [k async for k in admin.scan_iter(match=f"{prefix}:*")]
                if keys:
                    await admin.delete(*keys)
                await admin.aclose()


@contextlib.asynccontextmanager
async def _postgres_store(kind: str) -> AsyncIterator[tuple[TcpProxy, Store]]:
    from factorial_tokens_postgres import PostgresStore

    base = postgres_server.server_url()
    parts = urlsplit(base)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = base.replace(
            parts.netloc, f"{parts.username + '@' if parts.username else ''}127.0.0.1:{proxy.port}"
        )
        url = postgres_server.store_url(proxied, poll="0.2", command_timeout="2")
        store = PostgresStore.from_url(url)
        try:
            yield proxy, store
        finally:
            await store.aclose()


STORES: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[tuple[TcpProxy, Store]]]] = {
    "redis-retrying-client": lambda: _redis_store("retrying"),
    "redis-plugin-client": lambda: _redis_store("own"),
    "postgres": lambda: _postgres_store("own"),
}


async def _ends(coro: Any, budget: float) -> tuple[str, Any]:
    """Run ``coro``; ('ok', result) or ('error', typed error). Fails if it outlives ``budget``."""
    try:
        return "ok", await asyncio.wait_for(coro, budget)
    except FactorialTokensError as exc:
        return "error", exc


@pytest.mark.parametrize("name", list(STORES))
async def test_a_lost_store_reply_at_every_step(make_sim: SimFactory, name: str) -> None:
    async with make_sim(access_token_ttl=3600) as sim, STORES[name]() as (proxy, store):
        app = app_for(sim)
        budget = 20.0  # the manager's own deadlines are far shorter (wait_timeout=6)
        async with TokenManager(app, store, lease_ttl=3.0, provider_timeout=1.0, wait_timeout=6.0) as tm:
            outcomes = []
            for step in range(1, STEPS + 1):
                tenant = f"t{step}"
                code = sim.issue_code(company_id=step)
                proxy.drop_reply(step)
                exchanged = await _ends(tm.exchange_code(tenant, code), budget)
                if exchanged[0] == "ok":
                    # A retried callback gets the same tokens (or the same typed error).
                    again = await _ends(tm.exchange_code(tenant, code), budget)
                    assert again[0] == "error" or again[1].access_token == exchanged[1].access_token
                    refreshed = await _ends(tm.refresh(tenant), budget)
                    if refreshed[0] == "ok":
                        assert sim.is_active(refreshed[1].access_token)
                    final = await _ends(tm.access_token(tenant), budget)
                    if final[0] == "ok":
                        assert sim.is_active(final[1])
                proxy.disarm()
                outcomes.append((step, exchanged[0] if exchanged[0] == "ok" else repr(exchanged[1])[:90]))
                assert sim.stats.exchange_attempts_by_code.get(code, 0) <= 1
            # Some steps lie past the end of a shortened sequence (an exchange that ended in
            # an error sends fewer requests); most must really have lost a reply.
            assert proxy.dropped >= STEPS * 2 // 3, (proxy.dropped, outcomes)
        stats = sim.stats
        assert stats.max_attempts_per_code <= 1
        assert stats.families_revoked == 0 and stats.invalid_grant == 0, stats.invalid_grant_by_cause
        assert sum(1 for _, kind in outcomes if kind == "ok") >= STEPS // 2, outcomes


@pytest.mark.parametrize("name", ["redis-retrying-client", "postgres"])
async def test_a_stalled_store_reply_ends_by_the_deadline(make_sim: SimFactory, name: str) -> None:
    """A reply that never comes (the connection stays open, silent): the client's own timeout
    fires, and the exchange ends with the tokens or a typed error; the code is sent once."""
    async with make_sim(access_token_ttl=3600) as sim, STORES[name]() as (proxy, store):
        async with TokenManager(
            app_for(sim), store, lease_ttl=3.0, provider_timeout=1.0, wait_timeout=6.0
        ) as tm:
            for step in (3,):
                code = sim.issue_code(company_id=step)
                proxy.drop_reply(step, stall=True)
                kind, result = await _ends(tm.exchange_code(f"s{step}", code), 20.0)
                proxy.disarm()
                if kind == "ok":
                    assert sim.is_active(result.access_token)
                assert sim.stats.exchange_attempts_by_code.get(code, 0) <= 1
            assert proxy.dropped == 1
        assert sim.stats.families_revoked == 0 and sim.stats.invalid_grant == 0
