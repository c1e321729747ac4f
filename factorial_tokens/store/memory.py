"""MemoryStore: the store contract in a dict, for one process.

Limitations: nothing is shared between processes and nothing survives a restart. Use it
for tests, scripts and single-process services; use ``sqlite:///`` for several processes
on one host, Redis or Postgres across hosts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import attrs

from ._contract import ChangeListener, Watch, closed_error
from ._notifier import Notifier
from ._values import (
    CLAIM_RETENTION,
    Acquisition,
    ClaimState,
    CodeClaim,
    Freshness,
    Lease,
    Record,
    TenantKey,
    ThrottleState,
    Update,
    hold_digest,
)

__all__ = ["MemoryStore"]


@attrs.define
class _Slot:
    record: Record | None = None
    version: int = 0
    fence: int = 0
    lease_owner: str | None = None
    lease_expires: float = 0.0


@attrs.define
class _Claim:
    key: TenantKey
    owner: str
    state: ClaimState
    expires: float
    outcome: str | None = None


class MemoryStore:
    """A token store held in this process's memory (``memory://``). One process only.

    After :meth:`aclose` every primitive raises StoreUnavailable, as every store does.
    """

    acquires_unless_fresh = True

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._claims: dict[tuple[str, str], _Claim] = {}
        self._throttles: dict[str, ThrottleState] = {}
        self._notifier = Notifier()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """Build from ``memory://`` (the URL carries no options)."""
        return cls()

    def __repr__(self) -> str:
        return f"MemoryStore(tenants={len(self._slots)})"

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error("memory")

    def _slot(self, key: TenantKey) -> _Slot:
        return self._slots.setdefault(key.digest, _Slot())

    async def read(self, key: TenantKey) -> Record | None:
        self._check_open()
        slot = self._slots.get(key.digest)
        return slot.record if slot else None

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        self._check_open()
        if unless_fresh is not None:
            found = self._slots.get(key.digest)
            if found is None:
                return Acquisition(None, None)
            if not unless_fresh.due(found.record) and not (
                found.lease_owner == owner and found.lease_expires > self._clock()
            ):
                return Acquisition(None, found.record)
        slot = self._slot(key)
        now = self._clock()
        if slot.lease_owner == owner and slot.lease_expires > now:
            # A replay: owner tokens are unique per call, so this lease is the caller's own.
            return Acquisition(Lease(key, owner, slot.fence), slot.record)
        if slot.lease_owner is not None and slot.lease_expires > now:
            return Acquisition(None, slot.record)
        slot.fence += 1
        slot.lease_owner, slot.lease_expires = owner, now + ttl
        return Acquisition(Lease(key, owner, slot.fence), slot.record)

    def _holds(self, lease: Lease) -> _Slot | None:
        slot = self._slots.get(lease.key.digest)
        if slot and slot.fence == lease.fence and slot.lease_owner == lease.owner:
            return slot
        return None

    async def extend(self, lease: Lease, ttl: float) -> bool:
        self._check_open()
        slot = self._holds(lease)
        if slot is None:
            return False
        slot.lease_expires = self._clock() + ttl
        return True

    async def release(self, lease: Lease) -> bool:
        self._check_open()
        slot = self._holds(lease)
        if slot is None:
            # A replay finds its own release done: same fence, nobody holding.
            again = self._slots.get(lease.key.digest)
            return again is not None and again.fence == lease.fence and again.lease_owner is None
        slot.lease_owner = None
        self._notifier.notify(lease.key.digest)
        return True

    def _write(self, key: TenantKey, slot: _Slot, update: Update | None) -> Record | None:
        slot.version += 1
        slot.record = (
            None
            if update is None
            else Record(
                key=key,
                payload=update.payload,
                status=update.status,
                version=slot.version,
                expires_at=update.expires_at,
                updated_at=update.updated_at,
            )
        )
        slot.lease_owner = None
        self._notifier.notify(key.digest, None if update is None else update.notice)
        return slot.record

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        self._check_open()
        slot = self._holds(lease)
        if slot is None:
            # A replay finds its own write: same fence, nobody holding, the same payload.
            again = self._slots.get(lease.key.digest)
            if (
                again is not None
                and again.fence == lease.fence
                and again.lease_owner is None
                and again.record is not None
                and _same(again.record, update)
            ):
                return again.record
            return None
        return self._write(lease.key, slot, update)

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        self._check_open()
        slot = self._slots.get(key.digest)
        if slot is None and update is None:
            return  # forgetting an unknown tenant leaves nothing behind
        slot = self._slot(key)
        if slot.lease_owner is None and (
            slot.record is None if update is None else slot.record is not None and _same(slot.record, update)
        ):
            return  # a replay: already written, nobody to fence out
        slot.fence += 1  # fences out whoever holds the lease now
        self._write(key, slot, update)

    async def claim_code(self, key: TenantKey, code_hash: str, owner: str, ttl: float) -> CodeClaim:
        self._check_open()
        now = self._clock()
        self._claims = {k: c for k, c in self._claims.items() if c.expires > now - CLAIM_RETENTION}
        ident = (key.namespace, code_hash)
        claim = self._claims.get(ident)
        if claim is None or (claim.state is ClaimState.CLAIMED and claim.expires <= now):
            claim = self._claims[ident] = _Claim(key, owner, ClaimState.CLAIMED, now + ttl)
            return CodeClaim(key, code_hash, owner, claim.state, won=True)
        expired = claim.state in (ClaimState.CLAIMED, ClaimState.SENT) and claim.expires <= now
        return CodeClaim(
            claim.key, code_hash, owner, claim.state, claim.owner == owner, expired, claim.outcome
        )

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        self._check_open()
        held = self._claims.get((claim.key.namespace, claim.code_hash))
        if held is not None and held.owner == claim.owner and held.state is state:
            return held.outcome == outcome  # a replay of the step already made
        if held is None or held.owner != claim.owner or held.state in (ClaimState.DONE, ClaimState.FAILED):
            return False
        if state is ClaimState.SENT and held.state is not ClaimState.CLAIMED:
            return False
        held.state, held.outcome = state, outcome
        held.expires = self._clock() + (ttl if state is ClaimState.SENT else CLAIM_RETENTION)
        self._notifier.notify(held.key.digest)
        return True

    async def hold(self, namespace: str, until: float) -> float:
        self._check_open()
        state = self._throttles.get(namespace, ThrottleState())
        if until > state.not_before:
            state = self._throttles[namespace] = attrs.evolve(state, not_before=until)
            self._notifier.notify(hold_digest(namespace))
        return state.not_before

    async def admit(self, namespace: str, ticket: str, interval: float, burst: int) -> float:
        self._check_open()
        state = self._throttles.get(namespace, ThrottleState())
        wait, self._throttles[namespace] = state.admit(time.time(), ticket, interval, burst)
        return wait

    async def tenants(self, namespace: str) -> list[Record]:
        self._check_open()
        return [s.record for s in self._slots.values() if s.record and s.record.key.namespace == namespace]

    def watch(self, key: TenantKey) -> AbstractAsyncContextManager[Watch]:
        return self._notifier.watch(key)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        return self._notifier.on_change(callback)

    async def check(self) -> None:
        self._check_open()

    async def aclose(self) -> None:
        self._closed = True


def _same(record: Record, update: Update) -> bool:
    """True when ``record`` holds exactly what ``update`` writes (a replayed write)."""
    return (record.payload, record.status, record.expires_at, record.updated_at) == (
        update.payload,
        update.status,
        update.expires_at,
        update.updated_at,
    )
