"""The stores a benchmark can run on: each gives a fresh URL per run and cleans up after it.

``memory://`` is one process only; the others are shared by worker processes. Redis and
Postgres runs use a unique key prefix / schema on the servers of the tests' table of stores
(``tests/stores``: ``$FT_TEST_REDIS_URL``, ``$FT_TEST_POSTGRES_URL``), so they never touch
anyone else's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from importlib.metadata import entry_points
from pathlib import Path

from tests.stores import POSTGRES_URL, REDIS_URL
from tests.stores import STORES as TABLE  # the tests' servers: one set of variables


@contextlib.contextmanager
def _memory() -> Iterator[str]:
    yield "memory://"


@contextlib.contextmanager
def _sqlite() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'tokens.db'}"


@contextlib.contextmanager
def _redis() -> Iterator[str]:
    prefix = f"ftbench-{secrets.token_hex(4)}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        import redis  # the redis plugin's own dependency

        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(REDIS_URL)
            try:
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for start in range(0, len(keys), 1000):
                    client.delete(*keys[start : start + 1000])
            finally:
                client.close()


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    schema = f"ftbench_{secrets.token_hex(4)}"
    try:
        yield f"{POSTGRES_URL}?schema={schema}"
    finally:
        import asyncpg  # type: ignore[import-untyped]  # the postgres plugin's own dependency

        async def drop() -> None:
            conn = await asyncpg.connect(POSTGRES_URL)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        with contextlib.suppress(OSError, asyncpg.PostgresError):
            asyncio.run(drop())


#: name -> a context manager giving a fresh store URL for one benchmark run.
STORES: dict[str, Callable[[], AbstractContextManager[str]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "postgres": _postgres,
}

#: Stores shared by several processes (memory is one process only).
MULTIPROCESS = tuple(name for name in STORES if TABLE[name].multiprocess)


_SCHEMES = {"memory": "memory", "sqlite": "sqlite", "redis": "redis", "postgres": "postgresql"}


def installed(name: str) -> bool:
    """True when a store for ``name``'s URL scheme is registered (core or plugin installed)."""
    return _SCHEMES[name] in {ep.name for ep in entry_points(group="factorial_tokens.stores")}
