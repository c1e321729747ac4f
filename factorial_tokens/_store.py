"""The Store contract: a handful of atomic primitives every token store implements.

The manager composes these; a store knows nothing of HTTP or OAuth. Token material
arrives as an opaque ``payload`` (JSON, or sealed ciphertext when a keyring is set),
so a store never sees a token in the clear unless the application chose so.

Primitives (each one atomic, each one round trip where the backend allows):

* ``read``: a tenant's record (payload, status, version) or ``None``.
* ``acquire`` / ``extend`` / ``release``: a per-tenant lease with a TTL and a
  **fencing number** that only grows; ``acquire`` also returns the record it saw.
* ``commit``: a fenced write: store a new payload only if the writer's fence is still the
  tenant's current one (no later acquisition, no ``replace``), then release and announce.
* ``replace``: an unconditional write (a new code exchanged, a tenant forgotten) that
  fences out any current holder.
* ``claim_code`` / ``advance_code``: the first claimer of a code's hash wins; the others
  see the claim, its step (claimed, sent, done, failed) and its outcome.
* ``watch`` / ``on_change``: wake-ups when a tenant's lease is released or its record
  changes; a bounded, jittered poll is only the fallback.
* ``tenants``, ``check`` (health), ``aclose``.

A capability every shipped store also has (:class:`Throttle`): fleet-wide back-pressure
per app. ``hold`` records a "not before" instant after the provider said 429 (or 503
with ``Retry-After``) and announces it; ``admit`` answers how long to wait before the next
provider call, by that instant and by an optional shared rate budget (a token bucket).

Every failure of the backend surfaces as :class:`~factorial_tokens.StoreUnavailable`.

Every primitive must be safe to run twice (a client resends a command whose reply was
lost): the second run answers as the first did and writes nothing more. ``acquire`` by
the same owner returns that owner's live lease; ``commit``, ``release``, ``replace`` and
``advance_code`` recognise their own step already done (same fence and values, same owner
and state). Forgetting a tenant the store never held writes nothing.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import random
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import attrs

from ._errors import ConfigurationError

__all__ = [
    "CLAIM_RETENTION",
    "Acquisition",
    "ChangeListener",
    "ClaimState",
    "CodeClaim",
    "Lease",
    "Notifier",
    "Record",
    "Store",
    "TenantKey",
    "TenantStatus",
    "Throttle",
    "ThrottleState",
    "Update",
    "Watch",
    "hold_digest",
    "store_from_url",
]

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


#: Told the digest of a tenant that changed, or ``None`` when anything may have changed.
ChangeListener = Callable[[str | None], None]


class TenantStatus(enum.Enum):
    """Whether a tenant's grant can still be refreshed."""

    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"


@attrs.frozen
class Update:
    """What a write stores: the opaque payload plus the metadata listings need."""

    payload: bytes = attrs.field(repr=False)
    status: TenantStatus = TenantStatus.ACTIVE
    expires_at: float | None = None
    updated_at: float = 0.0


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


class Watch(Protocol):
    """A registration for change notifications on one tenant, made before reading."""

    async def wait(self, timeout: float) -> bool:
        """Return True when a change was announced, False after at most ``timeout`` seconds
        (or earlier, on a poll tick). Callers re-read the state either way."""
        ...


@runtime_checkable
class Store(Protocol):
    """The contract every token store implements; see the module docstring."""

    async def read(self, key: TenantKey) -> Record | None:
        """Return the tenant's record, or ``None`` if it has none (or was forgotten)."""
        ...

    async def acquire(self, key: TenantKey, owner: str, ttl: float) -> Acquisition:
        """Take the tenant's lease for ``ttl`` seconds if nobody holds it, with a new fence."""
        ...

    async def extend(self, lease: Lease, ttl: float) -> bool:
        """Push the lease's expiry to ``ttl`` from now; False if the fence is no longer current."""
        ...

    async def release(self, lease: Lease) -> bool:
        """Give the lease back (owner-checked) and announce; False if it was not ours anymore."""
        ...

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        """Write ``update`` if ``lease.fence`` is still current, release, announce.

        Returns the new record, or ``None`` when fenced out (nothing written).
        """
        ...

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        """Write ``update`` unconditionally (``None`` forgets the tenant), fence out any
        lease holder, announce."""
        ...

    async def claim_code(self, key: TenantKey, code_hash: str, owner: str, ttl: float) -> CodeClaim:
        """Claim a code for the tenant if unclaimed, or take over an expired CLAIMED claim;
        otherwise return the existing claim (possibly another tenant's) with ``won=False``."""
        ...

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        """Move an owned claim to ``state`` (SENT, DONE or FAILED) and announce on its tenant.

        ``ttl`` is how long a SENT claim's holder has; finished claims are kept for
        :data:`CLAIM_RETENTION`. False if the claim is not ours (or not CLAIMED for SENT).
        """
        ...

    async def tenants(self, namespace: str) -> list[Record]:
        """Every tenant record of the namespace (forgotten tenants excluded)."""
        ...

    def watch(self, key: TenantKey) -> AbstractAsyncContextManager[Watch]:
        """Register for changes of ``key`` (enter before reading, to miss nothing)."""
        ...

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call ``callback(digest)`` on every announced change, ``callback(None)`` when
        announcements may have been lost (anything may have changed); returns an unsubscribe."""
        ...

    async def check(self) -> None:
        """Raise StoreUnavailable unless the backend answers."""
        ...

    async def aclose(self) -> None:
        """Close what the store created (not what it was given)."""
        ...


def hold_digest(namespace: str) -> str:
    """The digest a store announces a raised hold on: the namespace's own, which no
    tenant has (a tenant id is never empty)."""
    return TenantKey(namespace, "").digest


@runtime_checkable
class Throttle(Protocol):
    """Fleet-wide back-pressure for one app (a namespace); every shipped store has it.

    Both primitives are safe to resend: ``hold`` keeps the later instant, and ``admit``
    with a ticket it already admitted answers 0 again without taking a second unit.
    Instants are wall-clock seconds (hosts keep their clocks in sync, as for expiry).
    """

    async def hold(self, namespace: str, until: float) -> float:
        """Raise the namespace's "not before" instant to ``until`` if that is later, and
        announce it on :func:`hold_digest`; return the instant now in force (``hold(ns, 0)``
        only reads it)."""
        ...

    async def admit(self, namespace: str, ticket: str, interval: float, burst: int) -> float:
        """Seconds to wait before one provider call may be sent: until the "not before"
        instant, or, with ``interval > 0``, until the shared budget (one call per
        ``interval`` seconds, ``burst`` at once) has room. 0 means admitted, and one unit
        of the budget was taken for ``ticket``."""
        ...


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


class _EventWatch:
    __slots__ = ("_event", "_poll")

    def __init__(self, event: asyncio.Event, poll: float | None) -> None:
        self._event = event
        self._poll = poll

    async def wait(self, timeout: float) -> bool:
        if self._poll is not None:
            # Jitter keeps many pollers from hitting the backend in lockstep.
            timeout = min(timeout, self._poll * random.uniform(0.5, 1.5))
        try:
            await asyncio.wait_for(self._event.wait(), max(timeout, 0.0))
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Notifier:
    """In-process fan-out of change announcements, keyed by ``TenantKey.digest``.

    Stores feed it from their push channel (pub/sub, LISTEN/NOTIFY) and from their own
    writes; ``poll`` bounds every wait for stores whose channel can lose messages or
    that have none (SQLite). Must be used from the event loop's thread.
    """

    def __init__(self, poll: float | None = None) -> None:
        self.poll = poll
        self._events: dict[str, set[asyncio.Event]] = {}
        self._listeners: list[ChangeListener] = []

    def notify(self, digest: str) -> None:
        """Wake every watcher of ``digest`` and tell every change listener."""
        for event in self._events.get(digest, ()):
            event.set()
        for listener in list(self._listeners):
            listener(digest)

    def notify_all(self) -> None:
        """Wake every watcher and tell every listener that anything may have changed
        (``listener(None)``): after a reconnect, when announcements may have been lost."""
        for events in self._events.values():
            for event in events:
                event.set()
        for listener in list(self._listeners):
            listener(None)

    @asynccontextmanager
    async def watch(self, key: TenantKey) -> AsyncIterator[Watch]:
        """Register a watcher for ``key`` for the duration of the block."""
        event = asyncio.Event()
        watchers = self._events.setdefault(key.digest, set())
        watchers.add(event)
        try:
            yield _EventWatch(event, self.poll)
        finally:
            watchers.discard(event)
            if not watchers:
                self._events.pop(key.digest, None)

    @property
    def watching(self) -> bool:
        """True while any watcher or listener is registered."""
        return bool(self._events or self._listeners)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Register a listener; returns the function that removes it."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe


async def acquire_within(store: Store, key: TenantKey, ttl: float, wait: float) -> Acquisition | None:
    """Take ``key``'s lease (fresh owner token), waiting up to ``wait`` seconds, woken by the
    store's announcements, for a holder to give it back; ``None`` if it stayed busy.
    ``wait <= 0`` tries once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        async with store.watch(key) as watch:
            won = await store.acquire(key, secrets.token_hex(16), ttl)
            if won.lease is not None:
                return won
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await watch.wait(remaining)


#: The package to install for schemes that ship as plugins.
_PLUGINS = {
    "redis": "factorial-tokens-redis",
    "rediss": "factorial-tokens-redis",
    "redis+cluster": "factorial-tokens-redis",
    "postgresql": "factorial-tokens-postgres",
    "postgres": "factorial-tokens-postgres",
}


class _StoreFactory(Protocol):
    def from_url(self, url: str) -> Store: ...


def store_from_url(url: str) -> Store:
    """Build a store from its URL through the ``factorial_tokens.stores`` entry points.

    Raises ConfigurationError for a URL without scheme or an unknown scheme, listing the
    known schemes and the package that provides the wanted one.
    """
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ConfigurationError("a store URL needs a scheme, e.g. sqlite:///tokens.db or redis://host")
    found = {ep.name: ep for ep in entry_points(group="factorial_tokens.stores")}
    if scheme not in found:
        known = ", ".join(f"{name}://" for name in sorted(found)) or "none"
        hint = f"; install {_PLUGINS[scheme]} for {scheme}://" if scheme in _PLUGINS else ""
        raise ConfigurationError(f"no token store for {scheme}:// (known: {known}){hint}")
    factory: _StoreFactory = found[scheme].load()
    return factory.from_url(url)
