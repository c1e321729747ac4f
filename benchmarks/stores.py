"""The stores a benchmark can run on: each gives a fresh URL per run and cleans up after it.

``memory://`` is one process only; the others are shared by worker processes. Redis and
Postgres runs use a unique key prefix / schema on the shared local servers, so they never
touch anyone else's data.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlsplit

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def _memory() -> Iterator[str]:
    yield "memory://"


@contextlib.contextmanager
def _sqlite() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'tokens.db'}"


@contextlib.contextmanager
def _redis() -> Iterator[str]:
    yield f"{REDIS_URL}?prefix=ftbench-{secrets.token_hex(4)}"


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    yield f"{POSTGRES_URL}?schema=ftbench_{secrets.token_hex(4)}"


#: name -> a context manager giving a fresh store URL for one benchmark run.
STORES: dict[str, Callable[[], AbstractContextManager[str]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "postgres": _postgres,
}

#: Stores shared by several processes (memory is one process only).
MULTIPROCESS = ("sqlite", "redis", "postgres")


def installed(name: str) -> bool:
    """True when a store for ``name``'s URL scheme is registered (core or plugin installed)."""
    with STORES[name]() as url:
        scheme = urlsplit(url).scheme
    return scheme in {ep.name for ep in entry_points(group="factorial_tokens.stores")}
