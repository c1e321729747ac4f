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

import attrs

from factorial_tokens import MemoryStore, Store

#: Every backend the security tests run on; the plugins join when installed.
BACKENDS = ["memory", "sqlite"]


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
        from factorial_tokens._sqlite import SQLiteStore

        path = tmp_path / "tokens.db"
        sqlite = SQLiteStore(path)

        async def dump_file() -> bytes:
            files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
            return b"".join(f.read_bytes() for f in files if f.exists())

        try:
            yield Backend(name, sqlite, dump_file)
        finally:
            await sqlite.aclose()
    else:  # pragma: no cover
        raise ValueError(f"unknown backend {name}")
