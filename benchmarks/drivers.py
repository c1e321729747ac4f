"""The clients a benchmark drives: this library and its peers, each used as its own users use it.

A driver turns a tenant name into an access token, the way a caller of that client gets
one just before sending an API request:

- ``factorial-tokens``: one ``TokenManager`` per process, ``await tm.access_token(t)``;
- ``authlib``: one ``AsyncOAuth2Client`` per tenant per process (``peer_authlib``);
- ``factorialhr``: one ``RefreshTokenAuth`` per tenant in one process, or one
  ``RefreshTokenAuthFile`` per tenant loaded by every process from a shared JSON file
  (``peer_factorialhr``);
- ``handwritten``: a per-process ``asyncio.Lock`` plus redis-py's ``Lock`` across
  processes, the token in Redis (``peer_handwritten``).

Peers are imported only when driven: their packages are in ``benchmarks/requirements.txt``,
never in the library or its tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from factorial_tokens import FactorialApp, TokenManager
from factorial_tokens.store import Store

FACTORIAL = "factorial-tokens"
AUTHLIB = "authlib"
FACTORIALHR = "factorialhr"
HANDWRITTEN = "handwritten"
DRIVERS = (AUTHLIB, FACTORIALHR, HANDWRITTEN, FACTORIAL)

#: The packages whose versions a peer run records (the peers and what they run on).
PEER_PACKAGES = ("authlib", "httpx2", "factorialhr", "httpx", "pydantic", "redis", "aiohttp")

Getter = Callable[[str], Awaitable[str]]


@dataclass(frozen=True)
class Place:
    """Where the peers keep their own state, and the lease/lock lifetimes (sent to workers)."""

    #: factorialhr's shared JSON files (one per tenant)
    workdir: str = ""
    #: the hand-written pattern's Redis and its key prefix (unique per run)
    redis_url: str = ""
    redis_prefix: str = ""
    #: the hand-written pattern's lock TTL (redis-py ``Lock(timeout=...)``)
    lock_ttl: float = 10.0
    #: factorial-tokens' lease TTL
    lease_ttl: float = 30.0


def versions() -> dict[str, str]:
    """The installed version of every peer package (``-`` when it is not installed)."""
    found = {}
    for name in PEER_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def storage(driver: str, store: str) -> str:
    """Where a driver keeps its tokens in a run, for the tables."""
    if driver == FACTORIALHR:
        return "JSON file per tenant" if store != "memory" else "in memory"
    if driver == HANDWRITTEN:
        return "redis"
    return store


def manager_for(app: FactorialApp, store: Store, place: Place) -> TokenManager:
    """This library's manager with the run's lease TTL (provider timeout within its budget)."""
    provider_timeout = min(10.0, place.lease_ttl / 2)
    return TokenManager(app, store, lease_ttl=place.lease_ttl, provider_timeout=provider_timeout)


@contextlib.asynccontextmanager
async def process_state(driver: str, app: FactorialApp, store: Store, place: Place) -> AsyncIterator[Any]:
    """What one process keeps for the whole run: a TokenManager, the hand-written
    pattern's locks and connections, or nothing (the other peers build per-round clients)."""
    if driver == FACTORIAL:
        async with manager_for(app, store, place) as tm:
            yield tm
    elif driver == HANDWRITTEN:
        from .peer_handwritten import HandWritten

        async with HandWritten(app, place.redis_url, place.redis_prefix, place.lock_ttl) as hw:
            yield hw
    else:
        yield None


@contextlib.asynccontextmanager
async def token_getter(
    driver: str,
    app: FactorialApp,
    store: Store,
    tenants: Sequence[str],
    state: Any,
    place: Place,
    shared: bool,
) -> AsyncIterator[Getter]:
    """A token getter for one round's ``tenants`` (``shared``: several processes)."""
    if driver == FACTORIAL:
        assert isinstance(state, TokenManager)
        yield state.access_token
    elif driver == HANDWRITTEN:
        yield state.access_token
    elif driver == AUTHLIB:
        from .peer_authlib import authlib_getter

        async with authlib_getter(app, store, tenants) as get:
            yield get
    elif driver == FACTORIALHR:
        from .peer_factorialhr import factorialhr_getter

        async with factorialhr_getter(app, store, tenants, place.workdir if shared else None) as get:
            yield get
    else:
        raise ValueError(f"unknown driver {driver!r}")


async def prepare(
    driver: str, store: Store, app: FactorialApp, tenants: Sequence[str], place: Place, shared: bool
) -> None:
    """In the parent, after the tenants' tokens are in ``store``: put them where the peer keeps them."""
    if driver == FACTORIALHR and shared:
        from .peer_factorialhr import write_files

        await write_files(store, app, tenants, place.workdir)
    elif driver == HANDWRITTEN:
        from .peer_handwritten import copy_from_store

        await copy_from_store(store, app, tenants, place.redis_url, place.redis_prefix)


def error_name(driver: str, exc: BaseException) -> str:
    """A short label for a failed call: the OAuth error when the peer says which, else the type."""
    if driver == AUTHLIB:
        from .peer_authlib import error_name as authlib_error

        return authlib_error(exc)
    if driver == FACTORIALHR:
        from .peer_factorialhr import error_name as factorialhr_error

        return factorialhr_error(exc)
    if driver == HANDWRITTEN:
        from .peer_handwritten import error_name as handwritten_error

        return handwritten_error(exc)
    return type(exc).__name__
