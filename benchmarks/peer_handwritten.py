"""The peer: the pattern teams write by hand, a per-process ``asyncio.Lock`` plus redis-py's
``Lock`` across processes, with the token in Redis.

Written the careful way: read the token; if it is stale, take this process's lock for the
tenant, read again, take the Redis lock (``SET NX PX`` with a TTL, redis-py's
``redis.asyncio.lock.Lock``), read again, refresh, write the new token (expiry from
``expires_in``), release. What it has no answer for: fencing. A holder paused past the
lock's TTL still writes what it gets back, and its release then raises
``LockNotOwnedError``; an ``invalid_grant`` is raised to the caller and the next caller
tries again with the same refresh token.

redis is the Redis plugin's own dependency; nothing here is imported by the library or tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from factorial_tokens import FactorialApp
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import Store, TenantKey

#: Refresh this many seconds before expiry (the same leeway as the other clients).
LEEWAY = 60.0


class RefreshRefused(Exception):
    """The token endpoint refused the refresh; ``error`` is its OAuth error."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"refresh refused: {status} {error}")
        self.error = error


def error_name(exc: BaseException) -> str:
    """The OAuth error of a refused refresh, else the exception type (``LockNotOwnedError``)."""
    if isinstance(exc, RefreshRefused):
        return exc.error
    return type(exc).__name__


def _token_key(prefix: str, tenant: str) -> str:
    return f"{prefix}:token:{tenant}"


async def copy_from_store(
    store: Store, app: FactorialApp, tenants: Sequence[str], redis_url: str, prefix: str
) -> None:
    """Put each tenant's token (as the store holds it) where the pattern keeps it."""
    codec = JsonCodec()
    client = aioredis.Redis.from_url(redis_url)
    try:
        for tenant in tenants:
            key = TenantKey(app.client_id, tenant)
            record = await store.read(key)
            if record is None:
                raise RuntimeError(f"tenant {tenant!r} is not in the store")
            tokens = codec.decode(key, record.payload)
            token = {
                "access_token": tokens.access_token,
                "refresh_token": tokens.refresh_token,
                "expires_at": tokens.expires_at,
            }
            await client.set(_token_key(prefix, tenant), json.dumps(token))
    finally:
        await client.aclose()


async def stored_access_token(redis_url: str, prefix: str, tenant: str) -> tuple[str, bool]:
    """The access token the pattern holds for ``tenant`` now, and whether it takes it for fresh
    (then its next caller gets it without a refresh)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        raw = await client.get(_token_key(prefix, tenant))
    finally:
        await client.aclose()
    if raw is None:
        raise RuntimeError(f"tenant {tenant!r} has no token")
    token = json.loads(raw)
    return str(token["access_token"]), HandWritten.fresh(token)


class HandWritten:
    """One process's share of the pattern: its asyncio locks, its Redis client, its HTTP session."""

    def __init__(self, app: FactorialApp, redis_url: str, prefix: str, lock_ttl: float) -> None:
        self._app = app
        self._prefix = prefix
        self._lock_ttl = lock_ttl
        # A blocking pool, as a careful team would use: redis-py 8's default pool raises
        # MaxConnectionsError when more commands are in flight than it has connections, and
        # that would measure the pool, not the locking pattern.
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=50, timeout=10)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._session: aiohttp.ClientSession | None = None
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def __aenter__(self) -> HandWritten:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
        await self._redis.aclose(close_connection_pool=True)

    async def _read(self, tenant: str) -> dict[str, Any]:
        raw = await self._redis.get(_token_key(self._prefix, tenant))
        if raw is None:
            raise RuntimeError(f"tenant {tenant!r} has no token")
        token: dict[str, Any] = json.loads(raw)
        return token

    @staticmethod
    def fresh(token: dict[str, Any]) -> bool:
        """True when ``token`` is used as it is (not within the leeway of its expiry)."""
        return token["expires_at"] is None or float(token["expires_at"]) - LEEWAY > time.time()

    async def access_token(self, tenant: str) -> str:
        """A token for ``tenant``, refreshed under both locks when stale."""
        token = await self._read(tenant)
        if self.fresh(token):
            return str(token["access_token"])
        async with self._locks[tenant]:
            token = await self._read(tenant)
            if self.fresh(token):
                return str(token["access_token"])
            lock = self._redis.lock(
                f"{self._prefix}:lock:{tenant}", timeout=self._lock_ttl, blocking_timeout=2 * self._lock_ttl
            )
            async with lock:  # LockError if not taken in time; LockNotOwnedError on release if lost
                token = await self._read(tenant)
                if self.fresh(token):
                    return str(token["access_token"])
                new = await self._refresh(str(token["refresh_token"]))
                await self._redis.set(_token_key(self._prefix, tenant), json.dumps(new))
                return str(new["access_token"])

    async def _refresh(self, refresh_token: str) -> dict[str, Any]:
        assert self._session is not None
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self._app.client_id,
            "client_secret": self._app.client_secret,
        }
        async with self._session.post(f"{self._app.base_url}/oauth/token", data=form) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise RefreshRefused(resp.status, str(body.get("error", "unknown")))
        expires_in = body.get("expires_in")
        return {
            "access_token": body["access_token"],
            "refresh_token": body.get("refresh_token", refresh_token),
            "expires_at": time.time() + float(expires_in) if expires_in is not None else None,
        }
