"""Shared pieces of the benchmarks: the simulated provider, the app, tenants, statistics."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import math
import os
import secrets
import socket
import statistics
import time
from collections.abc import Iterator, Sequence

import aiohttp
import attrs

from factorial_tokens import FactorialApp, TokenManager, TokenSet
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import Store, TenantKey, TenantStatus, Update
from factorial_tokens.testing import FakeFactorial, RefreshMode

CLIENT_SECRET = "bench-client-secret-0f3a9c"
REDIRECT_URI = "http://127.0.0.1:8765/oauth/callback"

#: Setting up tenants sends this many code exchanges at once.
SETUP_CONCURRENCY = 64


#: Set to a directory to profile every worker process (cProfile, one ``.prof`` file each).
PROFILE_ENV = "FT_BENCH_PROFILE"


@contextlib.contextmanager
def profiled(what: str) -> Iterator[None]:
    """Profile the block with cProfile into ``$FT_BENCH_PROFILE/<what>-<pid>.prof`` when that
    variable names a directory; otherwise do nothing (the figures are taken unprofiled)."""
    folder = os.environ.get(PROFILE_ENV)
    if not folder:
        yield
        return
    profile = cProfile.Profile(time.process_time)  # CPU, not wall: the load of others stays out
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(os.path.join(folder, f"{what}-{os.getpid()}.prof"))


def new_client_id() -> str:
    """A fresh OAuth client id: also the store namespace, so runs never see each other's tenants."""
    return f"bench-{secrets.token_hex(4)}"


@contextlib.contextmanager
def strict_sim(
    client_id: str,
    host: str = "127.0.0.1",
    port: int = 0,
    refresh_mode: RefreshMode = RefreshMode.REVOKE_AT_REFRESH,
) -> Iterator[FakeFactorial]:
    """The strictest simulator (revoke at refresh, reuse detection), served from a thread
    on ``host:port`` (port 0: a free one). ``refresh_mode=REVOKE_ON_FIRST_USE`` gives
    Factorial's documented mode instead (reuse detection stays on).

    It starts with no latency (set-up is fast); a storm sets ``sim.latency`` before it starts.
    """
    sim = FakeFactorial(
        client_id=client_id,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        refresh_mode=refresh_mode,
        reuse_detection=True,
        access_token_ttl=3600,
        latency=0.0,
        host=host,
        port=port,
    )
    with sim.serve_in_thread() as running:
        yield running


def app_for(client_id: str, base_url: str) -> FactorialApp:
    """The benchmark's app, pointed at the simulator."""
    return FactorialApp(
        client_id=client_id, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI, base_url=base_url
    )


async def connect_tenants(
    tm: TokenManager, sim: FakeFactorial, tenants: Sequence[str], first_company: int
) -> None:
    """Connect every tenant through a real code exchange (company ids from ``first_company``)."""
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(index: int, tenant: str) -> None:
        async with gate:
            await tm.exchange_code(tenant, sim.issue_code(company_id=first_company + index))

    await asyncio.gather(*(one(i, t) for i, t in enumerate(tenants)))


async def expire_tenants(store: Store, namespace: str, tenants: Sequence[str]) -> None:
    """Rewrite each tenant's record with an access token that expired a minute ago.

    The tokens stay the real ones the simulator issued (their refresh tokens are live);
    only the stored expiry moves, through the store's own ``replace`` and the manager's
    codec, so every worker sees the whole fleet expired at the same instant.
    """
    codec = JsonCodec()
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)
    now = time.time()

    async def one(tenant: str) -> None:
        key = TenantKey(namespace, tenant)
        async with gate:
            record = await store.read(key)
            if record is None:
                raise RuntimeError(f"tenant {tenant!r} was not connected")
            tokens = codec.decode(key, record.payload)
            expired = attrs.evolve(tokens, expires_at=now - 60, obtained_at=now - 3660)
            update = Update(codec.encode(key, expired), TenantStatus.ACTIVE, expired.expires_at, now - 3660)
            await store.replace(key, update)

    await asyncio.gather(*(one(t) for t in tenants))


async def mint_expired_tenants(
    store: Store,
    sim: FakeFactorial,
    app: FactorialApp,
    tenants: Sequence[str],
    first_company: int,
    *,
    expired: bool = True,
) -> None:
    """Give every tenant real tokens that the store says expired a minute ago.

    With ``expired=False`` the tokens keep the expiry the simulator gave them (``expires_in``).

    Each tenant's code is exchanged at the simulator over HTTP (a real grant, with a live
    refresh token); the token set goes into the store through its own ``replace`` and the
    manager's codec, with ``expires_at`` in the past, so every worker sees the whole fleet
    expired at the same instant. One store round trip per tenant, so 10,000 tenants set up
    in seconds.
    """
    codec = JsonCodec()
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=SETUP_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int, tenant: str) -> None:
            form = {
                "grant_type": "authorization_code",
                "code": sim.issue_code(company_id=first_company + index),
                "redirect_uri": app.redirect_uri,
                "client_id": app.client_id,
                "client_secret": app.client_secret,
            }
            async with gate:
                async with session.post(f"{app.base_url}/oauth/token", data=form) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(
                            f"exchange for {tenant!r} failed: {resp.status} {body.get('error')}"
                        )
                now = time.time()
                lifetime = float(body["expires_in"])
                expires_at = now - 60 if expired else now + lifetime
                tokens = TokenSet(
                    access_token=body["access_token"],
                    refresh_token=body["refresh_token"],
                    token_type=body.get("token_type", "Bearer"),
                    scope=body.get("scope"),
                    expires_at=expires_at,
                    obtained_at=expires_at - lifetime,
                    created_at=body.get("created_at"),
                )
                key = TenantKey(app.client_id, tenant)
                update = Update(
                    codec.encode(key, tokens), TenantStatus.ACTIVE, tokens.expires_at, tokens.obtained_at
                )
                await store.replace(key, update)

        await asyncio.gather(*(one(i, t) for i, t in enumerate(tenants)))


def port80_host() -> tuple[str | None, str]:
    """A loopback address whose port 80 is free, for peers that drop the port of the URL
    they are given (factorialhr posts its refresh to ``scheme://host/oauth/token``).

    Returns ``(host, "")``, or ``(None, why)`` when no such address can be bound here.
    """
    why = ""
    for last in range(16, 32):
        host = f"127.0.16.{last}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, 80))
            except PermissionError:
                return None, "binding port 80 needs root (or CAP_NET_BIND_SERVICE) on this machine"
            except OSError as exc:
                why = f"port 80 is taken on 127.0.16.16-31 ({exc.strerror})"
                continue
        return host, ""
    return None, why


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else math.nan
