"""The stores a benchmark can run on: each gives a fresh URL per run and cleans up after it.

``memory://`` is one process only; the others are shared by worker processes. Redis and
Postgres runs use a unique key prefix / schema on the shared local servers, so they never
touch anyone else's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from importlib.metadata import entry_points
from pathlib import Path

#: The servers the tests use, overridable with the same variables as the test suite's.
REDIS_URL = os.environ.get("FACTORIAL_TOKENS_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("FT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


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
MULTIPROCESS = ("sqlite", "redis", "postgres")


_SCHEMES = {"memory": "memory", "sqlite": "sqlite", "redis": "redis", "postgres": "postgresql"}


def installed(name: str) -> bool:
    """True when a store for ``name``'s URL scheme is registered (core or plugin installed)."""
    return _SCHEMES[name] in {ep.name for ep in entry_points(group="factorial_tokens.stores")}
