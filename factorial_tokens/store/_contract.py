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
  changes; a bounded, jittered poll is only the fallback. A store may also carry a
  commit's ``Update.notice`` to other instances' watchers (read with :func:`announced`).
* ``tenants``, ``check`` (health), ``aclose``.

A capability every shipped store has (:class:`AcquireUnlessFresh`): ``acquire`` with
``unless_fresh`` takes the lease only when the record is due (ACTIVE and not fresh by the
given :class:`Freshness`); otherwise it returns the record with no lease and writes and
announces nothing. A process with nothing cached then refreshes in two round trips
(acquire, commit) and pays one for a fresh record, with no read first. A store declares
it with a true ``acquires_unless_fresh`` attribute; a store without it (written to the
older contract) keeps working: the manager reads first, then acquires.

Another capability every shipped store has (:class:`Throttle`): fleet-wide back-pressure
per app. ``hold`` records a "not before" instant after the provider said 429 (or 503
with ``Retry-After``) and announces it; ``admit`` answers how long to wait before the next
provider call, by that instant and by an optional shared rate budget (a token bucket).

Every failure of the backend surfaces as :class:`~factorial_tokens.StoreUnavailable`. A
stored record whose columns do not make a record (tampered with) is not an outage: it is
returned as :func:`~factorial_tokens.store.unreadable_record` (what
:func:`~factorial_tokens.store.record_from_columns` gives), which the manager meets as a
payload that cannot be opened (``TokenSealError``, a ``seal_error`` event), never hidden.

Every primitive must be safe to run twice (a client resends a command whose reply was
lost): the second run answers as the first did and writes nothing more. ``acquire`` by
the same owner returns that owner's live lease; ``commit``, ``release``, ``replace`` and
``advance_code`` recognise their own step already done (same fence and values, same owner
and state). Forgetting a tenant the store never held writes nothing.

After ``aclose`` every primitive raises :class:`~factorial_tokens.StoreUnavailable` saying
the store is closed (:func:`~factorial_tokens.store.closed_error`); ``aclose`` itself may be
called again.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeGuard, cast, runtime_checkable

from .._errors import StoreUnavailable
from ._values import Acquisition, ClaimState, CodeClaim, Freshness, Lease, Record, TenantKey, Update

__all__ = [
    "AcquireUnlessFresh",
    "ChangeListener",
    "Store",
    "Throttle",
    "Watch",
    "acquire_lease",
    "acquire_within",
    "acquires_unless_fresh",
    "announced",
    "changed",
    "closed_error",
]

#: Told the digest of a tenant that changed, or ``None`` when anything may have changed.
ChangeListener = Callable[[str | None], None]


class Watch(Protocol):
    """A registration for change notifications on one tenant, made before reading.

    Optionally (see :func:`announced`), a ``notice`` attribute: what the newest
    announcement carried, or ``None``."""

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


@runtime_checkable
class AcquireUnlessFresh(Protocol):
    """A store whose ``acquire`` can leave a fresh record alone (every shipped store).

    Declared by a true ``acquires_unless_fresh`` attribute, checked with the signature of
    ``acquire`` by :func:`acquires_unless_fresh` (a wrapper answers for its inner store).
    ``Store.acquire`` keeps its older signature, so a store written to it still
    type-checks as a :class:`Store`.
    """

    acquires_unless_fresh: bool

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        """Without ``unless_fresh``, :meth:`Store.acquire`. With it, take the lease only when
        ``unless_fresh.due(record)``: an ACTIVE record that is not fresh at
        ``unless_fresh.at``; a lease held by someone else is refused as always. Otherwise
        return ``Acquisition(None, record)`` (``record`` may be ``None``) having written
        nothing and announced nothing. A replay by the owner of a live lease returns it."""
        ...


def acquires_unless_fresh(store: object) -> TypeGuard[AcquireUnlessFresh]:
    """True when ``store`` declares :class:`AcquireUnlessFresh` (a true
    ``acquires_unless_fresh`` attribute) and its ``acquire`` takes ``unless_fresh`` (or any
    keyword): a subclass that overrides ``acquire`` with the older signature inherits the
    attribute, not the capability. Inspects a signature: ask once per store, not per call."""
    if getattr(store, "acquires_unless_fresh", False) is not True:
        return False
    try:
        parameters = inspect.signature(store.acquire).parameters.values()  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return False
    return any(p.name == "unless_fresh" or p.kind is p.VAR_KEYWORD for p in parameters)


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


def throttles(store: object) -> TypeGuard[Throttle]:
    """True when ``store`` has the :class:`Throttle` primitives. Asked with ``getattr``, not
    ``isinstance``: since Python 3.12 a runtime protocol check does not see attributes a
    wrapper forwards through ``__getattr__``, so the capability would be lost behind one."""
    return callable(getattr(store, "hold", None)) and callable(getattr(store, "admit", None))


async def acquire_lease(
    store: Store, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
) -> Acquisition:
    """``store.acquire``, with ``unless_fresh`` passed only when given, so that a store written
    to the older contract never sees the keyword (give it only to a store that
    :func:`acquires_unless_fresh` accepts); what wrappers forward with."""
    if unless_fresh is None:
        return await store.acquire(key, owner, ttl)
    return await cast(AcquireUnlessFresh, store).acquire(key, owner, ttl, unless_fresh=unless_fresh)


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


def announced(watch: Watch) -> bytes | None:
    """The notice (``Update.notice``) the newest announcement seen by ``watch`` carried:
    that of a commit by another instance, byte for byte; ``None`` when the store's watches
    keep none or that announcement carried none.

    A store that carries notices sends each only once its commit is done, and in the order
    of the writes; notices are not stored. Notices come from anyone who can announce on the
    store's channel: a reader authenticates them (the manager seals them)."""
    notice = getattr(watch, "notice", None)
    return notice if isinstance(notice, bytes) else None


def changed(watch: Watch) -> bool:
    """True if ``watch`` saw an announcement that no ``wait`` has taken yet (a notice or
    not): what was read meanwhile may be stale. ``False`` for a watch that cannot tell."""
    return getattr(watch, "changed", False) is True


def closed_error(kind: str, where: str = "") -> StoreUnavailable:
    """What every primitive of a closed store raises: ``the <kind> store<where> is closed``
    (``where``, e.g. `` at /path/tokens.db``, must hold no secret)."""
    return StoreUnavailable(f"the {kind} store{where} is closed")
