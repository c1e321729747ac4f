"""The one table of stores every test (and benchmark) runs on.

``STORES`` maps a name to a :class:`StoreKind`: ``memory``, ``sqlite``, ``redis``,
``redis-cluster``, ``postgres`` and ``pgbouncer`` (Postgres behind a PgBouncer in transaction
pooling, the store in ``pgbouncer=true`` mode). For each kind:

* :meth:`StoreKind.url` is the URL of a fresh, empty store: its own SQLite file, Redis key
  prefix or Postgres schema, deleted when the test run exits;
* :func:`open_backend` opens one for a test (the ``backend`` fixture of ``tests/conftest.py``
  runs a test once per kind): :attr:`Backend.store`, :meth:`Backend.open` for a second
  instance on the same backend (a second worker; for ``memory``, the same store, as memory
  is one process's only), :meth:`Backend.kill_connections` to kill the backend connections
  of this backend's stores (Redis ``CLIENT KILL``, Postgres ``pg_terminate_backend``; nothing
  for the in-process stores, see :attr:`StoreKind.killable`) and :attr:`Backend.dump` (every
  byte the backend holds, as an attacker with a copy would see it);
* :attr:`StoreKind.multiprocess` says whether several processes can share one backend.

Servers are never skipped: a server that is not there is started (a throwaway Redis,
Postgres cluster, PgBouncer or 3-master Redis Cluster, stopped at exit). The environment
variables, read here and only here (by the tests and ``benchmarks/``):

``FT_TEST_REDIS_URL``
    A Redis the tests share, never flushed (default ``redis://127.0.0.1:6379/0``; when it
    does not answer and the variable is unset, a throwaway ``redis-server`` is started).
``FT_TEST_POSTGRES_URL``
    A PostgreSQL database the tests share, trust auth (default
    ``postgresql://postgres@127.0.0.1:5432/test``; when it does not answer, a throwaway
    cluster is started). PgBouncers the tests start point at it.

The Redis Cluster and the PgBouncer are always throwaway ones of the test run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from factorial_tokens.store import Store

__all__ = [
    "BACKENDS",
    "MULTIPROCESS_STORES",
    "POSTGRES_URL",
    "POSTGRES_URL_ENV",
    "REDIS_URL",
    "REDIS_URL_ENV",
    "STORES",
    "Backend",
    "StoreKind",
    "open_backend",
]

REDIS_URL_ENV = "FT_TEST_REDIS_URL"
POSTGRES_URL_ENV = "FT_TEST_POSTGRES_URL"
REDIS_URL = os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(POSTGRES_URL_ENV, "postgresql://postgres@127.0.0.1:5432/test")


@attrs.frozen
class StoreKind:
    """One row of the table: how to make a fresh store of this kind and what it can do."""

    name: str
    #: Several processes can share one backend (``memory`` is one process's only).
    multiprocess: bool
    #: :meth:`Backend.kill_connections` kills something (False: in-process, no connection).
    killable: bool
    _url: Callable[[Path], str] = attrs.field(alias="url")
    #: A commit's announcement carries its notice (the record, sealed by the manager) to
    #: the watchers of other instances (of the same one, for ``memory``): a woken waiter
    #: does not read the record.
    announces_notices: bool = True
    #: Another instance's write wakes this one's watchers and change listeners at once
    #: (PgBouncer: no LISTEN; watchers poll, change listeners hear of it within a second).
    pushes_changes: bool = True

    def url(self, tmp: Path | None = None) -> str:
        """The URL of a fresh, empty store (a file under ``tmp`` for SQLite), cleaned at exit."""
        return self._url(tmp or Path(tempfile.mkdtemp(prefix="ft-store-")))


def _memory(tmp: Path) -> str:
    return "memory://"


def _sqlite(tmp: Path) -> str:
    return f"sqlite:///{tmp / f'tokens-{secrets.token_hex(4)}.db'}"


def _redis(tmp: Path) -> str:
    from ..redis_server import store_url

    return store_url()  # a unique key prefix (ft-test-<hex>), its keys deleted at exit


def _redis_cluster(tmp: Path) -> str:
    from ..redis_server import shared_cluster, store_url

    return store_url(shared_cluster().url)


def _postgres(tmp: Path) -> str:
    from ..postgres_server import store_url, unique_schema

    schema = unique_schema()  # dropped at exit; its connections are named after it
    return store_url(schema=schema, application_name=schema, max_size="4")


def _pgbouncer(tmp: Path) -> str:
    from ..pgbouncer_server import store_url

    return store_url(max_size="4")  # through the run's PgBouncer, pgbouncer=true, own schema


STORES: dict[str, StoreKind] = {
    kind.name: kind
    for kind in (
        StoreKind("memory", multiprocess=False, killable=False, url=_memory),
        StoreKind("sqlite", multiprocess=True, killable=False, url=_sqlite, announces_notices=False),
        StoreKind("redis", multiprocess=True, killable=True, url=_redis),
        StoreKind("redis-cluster", multiprocess=True, killable=True, url=_redis_cluster),
        StoreKind("postgres", multiprocess=True, killable=True, url=_postgres),
        StoreKind(
            "pgbouncer",
            multiprocess=True,
            killable=True,
            url=_pgbouncer,
            announces_notices=False,
            pushes_changes=False,
        ),
    )
}

#: The stores the security tests dump byte for byte (and memory, which has no bytes).
BACKENDS = ["memory", "sqlite", "redis", "postgres"]

#: The multi-process storms' stores: each storm is among the suite's heaviest tests, so they
#: run on one store per backend (Redis Cluster and PgBouncer run the manager suite instead).
MULTIPROCESS_STORES = ("postgres", "redis", "sqlite")


@attrs.define
class Backend:
    """A fresh store of one kind for one test, and what the test may do to its backend."""

    kind: StoreKind
    url: str
    store: Store
    #: Every byte the backend holds for this store (None for memory: it has no backend).
    dump: Callable[[], Awaitable[bytes]] | None = None
    _kill: Callable[[], Awaitable[int]] | None = attrs.field(default=None, alias="kill")
    _opened: list[Store] = attrs.field(factory=list, alias="opened")

    @property
    def name(self) -> str:
        """The kind's name in :data:`STORES`."""
        return self.kind.name

    def open(self) -> Store:
        """Another store instance on the same backend (a second worker), closed with this
        backend; for ``memory``, the one store itself."""
        if self.kind.name == "memory":
            return self.store
        from factorial_tokens.store import store_from_url

        another = store_from_url(self.url)
        self._opened.append(another)
        return another

    async def kill_connections(self) -> int:
        """Kill every backend connection of this backend's stores; how many were killed
        (always 0 for stores that have none, see :attr:`StoreKind.killable`)."""
        return 0 if self._kill is None else await self._kill()

    async def aclose(self) -> None:
        """Close every store this backend opened."""
        for store in [self.store, *self._opened]:
            await store.aclose()


@contextlib.asynccontextmanager
async def open_backend(name: str, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh, isolated store of kind ``name``, closed (and cleaned up) afterwards."""
    from factorial_tokens.store import store_from_url

    kind = STORES[name]
    url = kind.url(tmp_path)
    backend = Backend(kind, url, store_from_url(url))
    if name == "sqlite":
        backend.dump = _sqlite_dump(Path(url.removeprefix("sqlite:///")))
    elif name in ("redis", "redis-cluster"):
        backend.dump, backend._kill = _redis_tools(url)
    elif name in ("postgres", "pgbouncer"):
        backend.dump, backend._kill = _postgres_tools(url, bouncer=name == "pgbouncer")
    try:
        yield backend
    finally:
        await backend.aclose()


def _sqlite_dump(path: Path) -> Callable[[], Awaitable[bytes]]:
    async def dump() -> bytes:
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        return b"".join(f.read_bytes() for f in files if f.exists())

    return dump


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


def _query(url: str) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(url).query))


def _redis_tools(url: str) -> tuple[Callable[[], Awaitable[bytes]], Callable[[], Awaitable[int]]]:
    """``dump`` and ``kill`` for a store URL of :func:`tests.redis_server.store_url`."""
    import redis.asyncio as aioredis

    from ..redis_server import node_urls

    prefix, name = _query(url)["prefix"], _query(url)["client_name"]

    async def dump() -> bytes:
        parts: list[bytes] = []
        for node in node_urls(url):
            client = aioredis.Redis.from_url(node)
            try:
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
            finally:
                await client.aclose()
        return b"\n".join(parts)

    async def kill() -> int:
        killed = 0
        for node in node_urls(url):
            client = aioredis.Redis.from_url(node)
            try:
                for info in await client.client_list():
                    if info.get("name") == name:
                        killed += int(await client.client_kill_filter(_id=info["id"]))
            finally:
                await client.aclose()
        return killed

    return dump, kill


def _postgres_tools(
    url: str, *, bouncer: bool
) -> tuple[Callable[[], Awaitable[bytes]], Callable[[], Awaitable[int]]]:
    """``dump`` and ``kill`` for a store URL of :func:`tests.postgres_server.store_url`
    (``bouncer``: through :func:`tests.pgbouncer_server.shared`)."""
    import asyncio

    import asyncpg

    from .. import pgbouncer_server, postgres_server

    base, schema = postgres_server.server_url(), _query(url)["schema"]
    application = _query(url).get("application_name")

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

    async def kill() -> int:
        argument: object
        if bouncer:  # PgBouncer's server connections (it does not pass application_name on)
            servers = await asyncio.to_thread(pgbouncer_server.shared().admin, "SHOW SERVERS")
            pids = [int(row["remote_pid"]) for row in servers if row.get("remote_pid", "0") != "0"]
            where, argument = "pid = ANY($1::int[])", pids
        else:
            where, argument = "application_name = $1", application
        query = f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {where}"
        conn = await asyncpg.connect(base, timeout=5)
        try:
            return int(await conn.fetchval(query, argument))
        finally:
            await conn.close()

    return dump, kill
