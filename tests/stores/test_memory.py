"""The conformance suite on MemoryStore."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from factorial_tokens.store import MemoryStore, store_from_url
from factorial_tokens.testing import StoreConformance


class TestMemoryStore(StoreConformance):
    # One process, one instance: nothing to share with a second one.
    cross_instance = False
    cross_instance_wakeups = False
    persistent = False

    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryStore]:
        store = store_from_url("memory://")
        assert isinstance(store, MemoryStore)
        yield store
        await store.aclose()
