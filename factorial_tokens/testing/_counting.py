"""CountingStore: wraps a store and counts the calls (round trips) per primitive."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from ..store import (
    Acquisition,
    ChangeListener,
    ClaimState,
    CodeClaim,
    Freshness,
    Lease,
    Record,
    Store,
    TenantKey,
    Update,
    Watch,
    acquire_lease,
    acquires_unless_fresh,
    throttles,
)

__all__ = ["CountingStore"]


class CountingStore:
    """A Store that forwards to ``inner`` and counts each call in ``calls``.

    Every primitive of our stores is one round trip, so ``calls.total()`` is the number of
    round trips the manager made. ``watch`` and ``on_change`` are not counted (they
    register locally; their backend subscription is shared per process).
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"CountingStore({self.inner!r})"

    def reset(self) -> None:
        """Zero the counters."""
        self.calls.clear()

    async def read(self, key: TenantKey) -> Record | None:
        self.calls["read"] += 1
        return await self.inner.read(key)

    @property
    def acquires_unless_fresh(self) -> bool:
        """The inner store's answer: a lease taken only when the record is due."""
        return acquires_unless_fresh(self.inner)

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        self.calls["acquire"] += 1
        return await acquire_lease(self.inner, key, owner, ttl, unless_fresh=unless_fresh)

    async def extend(self, lease: Lease, ttl: float) -> bool:
        self.calls["extend"] += 1
        return await self.inner.extend(lease, ttl)

    async def release(self, lease: Lease) -> bool:
        self.calls["release"] += 1
        return await self.inner.release(lease)

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        self.calls["commit"] += 1
        return await self.inner.commit(lease, update)

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        self.calls["replace"] += 1
        await self.inner.replace(key, update)

    async def claim_code(self, key: TenantKey, code_hash: str, owner: str, ttl: float) -> CodeClaim:
        self.calls["claim_code"] += 1
        return await self.inner.claim_code(key, code_hash, owner, ttl)

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        self.calls["advance_code"] += 1
        return await self.inner.advance_code(claim, state, ttl, outcome)

    async def tenants(self, namespace: str) -> list[Record]:
        self.calls["tenants"] += 1
        return await self.inner.tenants(namespace)

    def __getattr__(self, name: str) -> Any:
        # ``hold`` and ``admit`` (the Throttle capability) exist only when the inner store
        # has them: a manager asks ``throttles(store)``, and must hear the truth.
        inner = self.__dict__.get("inner")
        if name not in ("hold", "admit") or not throttles(inner):
            raise AttributeError(name)
        primitive = getattr(inner, name)

        async def counted(*args: Any) -> Any:
            self.calls[name] += 1
            return await primitive(*args)

        return counted

    def watch(self, key: TenantKey) -> AbstractAsyncContextManager[Watch]:
        return self.inner.watch(key)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        return self.inner.on_change(callback)

    async def check(self) -> None:
        self.calls["check"] += 1
        await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()
