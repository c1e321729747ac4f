"""Stores that several processes can share, for the multi-process harness.

``MULTIPROCESS_STORES`` maps a store name to a function that, given a fresh temporary
directory, returns the URL of a fresh, empty store (its own file, key prefix or schema),
or calls ``pytest.skip`` when the store's server is not available. Adding a store to the
harness is one entry here.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["MULTIPROCESS_STORES"]


def _sqlite(tmp: Path) -> str:
    return f"sqlite:///{tmp / f'tokens-{secrets.token_hex(4)}.db'}"


def _postgres(tmp: Path) -> str:
    from ..postgres_server import store_url

    return store_url(max_size="4")  # a fresh schema (ft_<random>), dropped at exit; never skipped


def _redis(tmp: Path) -> str:
    from ..redis_server import store_url

    return store_url()  # a unique key prefix (ft-test-<random>), its keys deleted at exit; never skipped


MULTIPROCESS_STORES: dict[str, Callable[[Path], str]] = {
    "postgres": _postgres,
    "redis": _redis,
    "sqlite": _sqlite,
}
