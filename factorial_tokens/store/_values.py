"""The values the store contract speaks in: keys, records, leases, code claims, throttle state.

Plain frozen data (attrs), shared by the manager and every store.
"""

from __future__ import annotations

import enum
import hashlib
import logging

import attrs

__all__ = [
    "CLAIM_RETENTION",
    "Acquisition",
    "ClaimState",
    "CodeClaim",
    "Freshness",
    "Lease",
    "Record",
    "TenantKey",
    "TenantStatus",
    "ThrottleState",
    "Update",
    "hold_digest",
    "record_from_columns",
    "unreadable_record",
]

log = logging.getLogger("factorial_tokens.store")

#: How long a finished code claim is remembered (seconds). Doorkeeper's codes live
#: ten minutes; a day covers any retried callback.
CLAIM_RETENTION = 24 * 3600.0


@attrs.frozen
class TenantKey:
    """A tenant within a namespace (the app's client id), so apps can share one store.

    ``digest`` is what stores use to build keys: a hash, so no tenant id can escape its
    key, collide with another's, or pick a Redis Cluster slot.
    """

    namespace: str
    tenant: str
    digest: str = attrs.field(init=False, repr=False, eq=False)

    @digest.default
    def _digest(self) -> str:
        raw = f"{self.namespace}\x00{self.tenant}".encode()
        return hashlib.sha256(raw).hexdigest()[:32]


class TenantStatus(enum.Enum):
    """Whether a tenant's grant can still be refreshed."""

    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"


@attrs.frozen
class Update:
    """What a write stores: the opaque payload plus the metadata listings need.

    ``notice``: opaque bytes (never stored) that a commit's announcement carries to other
    instances' watchers, for a store that can (see :func:`~factorial_tokens.store.announced`);
    the manager puts there what a worker waiting for this refresh needs to skip its read,
    sealed under the app's secret."""

    payload: bytes = attrs.field(repr=False)
    status: TenantStatus = TenantStatus.ACTIVE
    expires_at: float | None = None
    updated_at: float = 0.0
    notice: bytes | None = attrs.field(default=None, repr=False)


@attrs.frozen
class Record:
    """A tenant's stored state. ``version`` grows by one on every write."""

    key: TenantKey
    payload: bytes = attrs.field(repr=False)
    status: TenantStatus
    version: int
    expires_at: float | None
    updated_at: float


@attrs.frozen
class Freshness:
    """When a record needs no refresh yet: the rule an
    :class:`~factorial_tokens.store.AcquireUnlessFresh` store's ``acquire`` checks when given
    ``unless_fresh`` (the manager's windows, in terms a store can evaluate).

    A record is *fresh* when it is ACTIVE and, at the wall-clock instant ``at``, its token
    has more than ``min(margin, share * lifetime)`` seconds left, where the lifetime is
    ``expires_at - updated_at`` (never below 0); a record without ``expires_at`` never
    expires and is always fresh. In one expression, with ``E`` the record's
    ``expires_at`` and ``U`` its ``updated_at``::

        E is None  or  E - min(margin, share * max(E - U, 0)) > at

    Stores evaluate this very expression in IEEE doubles (Python, Lua, SQL ``double
    precision``), at ``at``, never by their own clock; the conformance suite checks its
    boundaries against :meth:`due`.
    """

    at: float
    margin: float
    share: float = 0.0

    def fresh(self, record: Record) -> bool:
        """True when ``record`` is ACTIVE and fresh at ``at`` (see the class docstring)."""
        if record.status is not TenantStatus.ACTIVE:
            return False
        expires = record.expires_at
        if expires is None:
            return True
        return expires - min(self.margin, self.share * max(expires - record.updated_at, 0.0)) > self.at

    def due(self, record: Record | None) -> bool:
        """True when a lease is worth taking for ``record``: it is ACTIVE and not fresh.
        An absent record, or one that needs re-authorization, has nothing to refresh."""
        return record is not None and record.status is TenantStatus.ACTIVE and not self.fresh(record)


def record_from_columns(
    key: TenantKey,
    payload: bytes | bytearray | memoryview | str | None,
    status: str | bytes,
    version: int | str | bytes,
    expires_at: float | str | bytes | None,
    updated_at: float | str | bytes | None,
) -> Record | None:
    """A record from the five columns a store keeps, as a driver returns them (numbers as
    numbers or as text, text as ``str`` or ``bytes``); ``None`` when ``payload`` is (a
    tenant forgotten, or never written).

    Columns that do not make a record (tampered with, where the backend does not type
    them) are logged and give :func:`unreadable_record`: not an outage to retry, but a
    record that cannot be opened, met as such by every reader (refresh, listing, rekey,
    a reconnection), never hidden.
    """
    if payload is None:
        return None
    try:
        if not isinstance(payload, bytes | bytearray | memoryview | str):
            raise TypeError(f"a payload is bytes, not {type(payload).__name__}")
        expires = _text(expires_at)
        return Record(
            key=key,
            payload=payload.encode() if isinstance(payload, str) else bytes(payload),
            status=_STATUSES.get(status) or TenantStatus(_text(status)),
            version=int(_text(version) or 0),
            expires_at=None if expires is None or expires == "" else float(expires),
            updated_at=float(_text(updated_at) or 0.0),
        )
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        log.warning("the stored record of tenant %r is malformed (%s); it cannot be opened", key.tenant, exc)
        return unreadable_record(key)


def unreadable_record(key: TenantKey) -> Record:
    """The record a store gives for columns that do not make one: an empty payload, which
    no codec opens (every payload it writes has a prefix), status ACTIVE, version 0, and
    long expired, so that keepalive and status show it due, never as a token that does
    not expire."""
    return Record(key, b"", TenantStatus.ACTIVE, 0, 0.0, 0.0)


#: A status column as drivers return it, looked up without an Enum call (one per record read).
_STATUSES: dict[object, TenantStatus] = {
    **{s.value: s for s in TenantStatus},
    **{s.value.encode(): s for s in TenantStatus},
}


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.frozen
class Lease:
    """Proof of holding a tenant's lease. ``fence`` is unique and only grows per tenant."""

    key: TenantKey
    owner: str = attrs.field(repr=False)
    fence: int


@attrs.frozen
class Acquisition:
    """The answer to ``acquire``: the lease if won (else ``None``) and the record seen."""

    lease: Lease | None
    record: Record | None


class ClaimState(enum.Enum):
    """The steps of a code exchange, as recorded in its claim."""

    CLAIMED = "claimed"  # claimed, not yet sent: may be taken over once expired
    SENT = "sent"  # sent to the provider: never sent again
    DONE = "done"  # tokens stored for the claim's tenant
    FAILED = "failed"  # the provider refused; ``outcome`` says why


@attrs.frozen
class CodeClaim:
    """A code claim as the store holds it, seen by the asking ``owner``.

    ``won`` is True when the asking owner holds the claim (never the holder's secret
    owner token: a loser's ``CodeClaim`` cannot advance the claim).

    ``expired`` is True when a CLAIMED or SENT claim outlived its TTL (its holder is
    presumed dead), judged by the store's clock.
    """

    key: TenantKey
    code_hash: str
    owner: str = attrs.field(repr=False)
    state: ClaimState
    won: bool
    expired: bool = False
    outcome: str | None = None


def hold_digest(namespace: str) -> str:
    """The digest a store announces a raised hold on: the namespace's own, which no
    tenant has (a tenant id is never empty)."""
    return TenantKey(namespace, "").digest


@attrs.frozen
class ThrottleState:
    """A namespace's back-pressure state, for stores that keep it as one value: the
    "not before" instant, the budget's theoretical arrival time (GCRA), the last ticket
    admitted."""

    not_before: float = 0.0
    tat: float = 0.0
    ticket: str = ""

    def encode(self) -> str:
        """As one line of text."""
        return f"{self.not_before!r} {self.tat!r} {self.ticket}"

    @classmethod
    def decode(cls, text: str | None) -> ThrottleState:
        """From :meth:`encode`'s text (``None`` or malformed: the empty state)."""
        try:
            not_before, tat, ticket = (text or "").split(" ", 2)
            return cls(float(not_before), float(tat), ticket)
        except ValueError:
            return cls()

    def admit(self, now: float, ticket: str, interval: float, burst: int) -> tuple[float, ThrottleState]:
        """The wait :meth:`Throttle.admit` answers at ``now``, and the state after it."""
        if ticket and ticket == self.ticket:
            return 0.0, self  # a resend of an admission already made
        if self.not_before > now:
            return self.not_before - now, self
        if interval <= 0:
            return 0.0, self
        tat = max(self.tat, now)
        wait = tat - (max(burst, 1) - 1) * interval - now
        if wait > 0:
            return wait, self
        return 0.0, attrs.evolve(self, tat=tat + interval, ticket=ticket)
