"""Real stores for the security tests, each with a way to dump every byte it holds.

``open_backend(name, tmp_path)`` yields a fresh, isolated store (a temp SQLite file, a
unique Redis prefix, a unique Postgres schema) and ``dump()``, which returns what an
attacker with a copy of the backend would have: the SQLite file bytes (with its WAL),
every Redis key under the prefix (HGETALL/GET/... and DUMP), every row of the store's
Postgres tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs

from factorial_tokens.store import MemoryStore, Store, store_from_url

#: Every backend the security tests run on (the plugins are installed by ``make test``).
BACKENDS = ["memory", "sqlite", "redis", "postgres"]


@attrs.define
class Backend:
    """A store under test plus a raw dump of everything its backend holds for it."""

    name: str
    store: Store
    dump: Callable[[], Awaitable[bytes]] | None = None


@contextlib.asynccontextmanager
async def open_backend(name: str, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh, isolated store of kind ``name``, closed (and cleaned up) afterwards."""
    if name == "memory":
        store = MemoryStore()
        yield Backend(name, store)
    elif name == "sqlite":
        from factorial_tokens.store.sqlite import SQLiteStore

        path = tmp_path / "tokens.db"
        sqlite = SQLiteStore(path)

        async def dump_file() -> bytes:
            files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
            return b"".join(f.read_bytes() for f in files if f.exists())

        try:
            yield Backend(name, sqlite, dump_file)
        finally:
            await sqlite.aclose()
    elif name == "redis":
        async with _redis() as backend:
            yield backend
    elif name == "postgres":
        async with _postgres() as backend:
            yield backend
    else:  # pragma: no cover
        raise ValueError(f"unknown backend {name}")


def _flatten(value: Any) -> bytes:
    """Every byte of a (nested) value as an attacker reading it would see it."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        return b"\n".join(_flatten(k) + b"=" + _flatten(v) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return b"\n".join(_flatten(v) for v in value)
    return str(value).encode()


@contextlib.asynccontextmanager
async def _redis() -> AsyncIterator[Backend]:
    import redis.asyncio as aioredis

    from .redis_server import shared_redis_url, unique_prefix

    with shared_redis_url() as url:
        async with _redis_on(aioredis.Redis.from_url(url), url, unique_prefix()) as backend:
            yield backend


@contextlib.asynccontextmanager
async def _redis_on(client: Any, url: str, prefix: str) -> AsyncIterator[Backend]:
    store = store_from_url(f"{url}?prefix={prefix}")

    async def dump() -> bytes:
        parts: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=500):
            kind = (await client.type(key)).decode()
            if kind == "hash":
                value: Any = await client.hgetall(key)
            elif kind == "string":
                value = await client.get(key)
            elif kind == "set":
                value = await client.smembers(key)
            elif kind == "zset":
                value = await client.zrange(key, 0, -1, withscores=True)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            else:
                value = kind
            parts += [key, _flatten(value), await client.dump(key) or b""]
        return b"\n".join(parts)

    try:
        yield Backend("redis", store, dump)
    finally:
        await store.aclose()
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.unlink(*keys)
        await client.aclose()


@contextlib.asynccontextmanager
async def _postgres() -> AsyncIterator[Backend]:
    import asyncpg

    from .postgres_server import drop_schema, server_url, unique_schema

    base, schema = server_url(), unique_schema()
    store = store_from_url(f"{base}?schema={schema}")

    async def dump() -> bytes:
        conn = await asyncpg.connect(base)
        try:
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
            assert tables, "the store created no table"
            parts: list[bytes] = []
            for table in tables:
                name = f'"{schema}"."{table["table_name"]}"'
                for row in await conn.fetch(f"SELECT * FROM {name}"):
                    parts.append(_flatten(dict(row)))
                for row in await conn.fetch(f"SELECT t::text AS row FROM {name} t"):
                    parts.append(row["row"].encode())
            return b"\n".join(parts)
        finally:
            await conn.close()

    try:
        yield Backend("postgres", store, dump)
    finally:
        await store.aclose()
        await drop_schema(base, schema)
