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


MULTIPROCESS_STORES: dict[str, Callable[[Path], str]] = {
    "sqlite": _sqlite,
}
