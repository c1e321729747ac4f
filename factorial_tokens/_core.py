"""What every part of the manager shares: its settings and state, the cache entries, and
the helpers that turn records into entries and back.

TokenManager (``_manager``) sets the state; the parts (``_leases``, ``_flight``,
``_exchange``, ``_callback``) read and change it as methods of the one object.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import attrs

from ._errors import (
    ManagerClosed,
    ReauthorizationRequired,
    StoreUnavailable,
    TenantNotConnected,
    TokenSealError,
)
from ._events import EventDispatcher, EventKind, TokenEvent
from ._models import FactorialApp, TokenSet
from ._notice import Notices
from ._oauth import OAuthClient
from ._secret import AppSecret
from ._slots import Slots
from ._state import LinkSigner, StateSigner
from ._telemetry import Observer
from .sealing import PayloadCodec
from .store import Record, Store, TenantKey, TenantStatus, Update

log = logging.getLogger("factorial_tokens")

T = TypeVar("T")

#: At most this many tenants' store keys are kept (past that they are made per call).
KEYS_KEPT = 65_536


@attrs.frozen
class Entry:
    """A tenant's cached token set, its stored version, and its two windows."""

    tokens: TokenSet
    version: int
    due: float  # the advisory window opens: refresh in the background
    must: float  # the mandatory window opens: callers wait for a refresh


class Core:
    """The state and shared helpers of a :class:`~factorial_tokens.TokenManager`."""

    app: FactorialApp
    leeway: float
    min_valid: float
    lease_ttl: float
    refresh_deadline: float
    wait_timeout: float
    refresh_rate: float | None
    state_ttl: float
    _owns_store: bool
    _store: Store
    _oauth: OAuthClient
    _interval: float
    _burst: int
    _hold_digest: str
    _slots: Slots
    _unless_fresh: bool  # the store takes a lease only for a due record (AcquireUnlessFresh)
    _throttles: bool  # the store has the fleet's back-pressure (Throttle: hold, admit)
    _not_before: float  # wall clock: no refresh is sent before (a 429's Retry-After)
    _codec: PayloadCodec
    _secret: AppSecret
    _notices: Notices  # seals and opens what commits' announcements carry
    _signer: StateSigner
    _links: LinkSigner
    _events: EventDispatcher
    _cache: dict[str, Entry]
    _outage_fallback: dict[str, Entry]  # dropped after lost announcements; served only in an outage
    _hits: int
    _obs: Observer
    _digests: dict[str, str]
    _keys: dict[str, TenantKey]  # the store keys of tenants asked for (up to KEYS_KEPT)
    _flights: dict[str, asyncio.Task[Entry]]
    _joined: dict[asyncio.Task[Entry], dict[asyncio.Future[Entry], None]]  # callers waiting per flight
    _advisory: set[asyncio.Task[Entry]]  # flights that are background refreshes
    _forced: set[str]  # tenants whose flight forces a new token set
    _queued: dict[str, asyncio.Future[bool]]  # flights queued for a slot: set False on an announcement
    _backoff: dict[str, tuple[int, float]]  # failed advisory refreshes, retry at
    _deaths: dict[str, tuple[int, type[ReauthorizationRequired], str]]  # marked dead here: version, cause
    _dying: dict[str, tuple[int, type[ReauthorizationRequired], str]]  # being marked: version held, cause
    _exchanges: dict[str, tuple[str, asyncio.Task[TokenSet]]]
    _tasks: set[asyncio.Task[Any]]
    # The context of done callbacks that only keep the books (they log nothing): asyncio
    # would copy the caller's context for each, an object per callback per flight. One per
    # manager, not per process: a context is entered by one thread at a time, and managers
    # on loops of their own in other threads run such callbacks at the same moment.
    _books: contextvars.Context
    _unsubscribe: Callable[[], None] | None
    _closed: bool

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosed("this TokenManager is closed; create a new one")

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard, context=self._books)
        return task

    async def _patiently(self, tenant: str, what: str, write: Callable[[], Awaitable[T]]) -> T:
        """Write tokens Factorial just issued, retrying for up to ``lease_ttl`` while the
        store is unavailable: they exist nowhere else, and the grant they replace is spent.
        (Fenced writes stay safe to retry: a lost lease is refused, never overwritten.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_ttl
        delay = 0.05
        while True:
            try:
                return await write()
            except StoreUnavailable as exc:
                if loop.time() + delay >= deadline:
                    log.error("tenant %r: could not store the %s, they are lost: %s", tenant, what, exc)
                    raise
                log.warning("tenant %r: store unavailable while writing the %s; retrying", tenant, what)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _emit(self, event: TokenEvent) -> None:
        self._events.publish(self._obs.complete(event))

    def _forget_cached(self, tenant: str) -> None:
        self._cache.pop(tenant, None)
        self._outage_fallback.pop(tenant, None)

    def _remember(self, tenant: str, entry: Entry) -> Entry:
        """Cache ``entry`` and return it; but a read sent before a refresh landed may
        answer after it: a newer cached entry (versions only grow) stays and is returned."""
        cached = self._cache.get(tenant)
        if cached is not None and cached.version > entry.version:
            return cached
        self._cache[tenant] = entry
        if self._outage_fallback:
            self._outage_fallback.pop(tenant, None)
        if self._backoff and time.time() < entry.due:
            self._backoff.pop(tenant, None)  # renewed: a later background failure starts over
        self._digests.setdefault(self._key(tenant).digest, tenant)
        return entry

    def _key(self, tenant: str) -> TenantKey:
        # Kept: a key hashes its tenant id, and a refresh asks for it several times.
        key = self._keys.get(tenant)
        if key is None:
            key = TenantKey(self.app.client_id, tenant)
            if len(self._keys) < KEYS_KEPT:
                self._keys[tenant] = key
        return key

    def _update(self, key: TenantKey, tokens: TokenSet) -> Update:
        return Update(
            self._codec.encode(key, tokens), TenantStatus.ACTIVE, tokens.expires_at, tokens.obtained_at
        )

    def _entry(self, record: Record) -> Entry:
        return self._entry_of(self._codec.decode(record.key, record.payload), record.version)

    def _entry_of(self, tokens: TokenSet, version: int) -> Entry:
        """The entry with its two windows. A short-lived token's leeway shrinks to half its
        lifetime; ``min_valid`` shrinks in the same proportion."""
        due = tokens.refresh_due_at(self.leeway)
        if tokens.expires_at is None or self.leeway == 0:
            return Entry(tokens, version, due, due)
        margin = (tokens.expires_at - due) * self.min_valid / self.leeway
        return Entry(tokens, version, due, tokens.expires_at - margin)

    def _usable(self, tenant: str, record: Record | None, *, allow_reauth: bool = False) -> Entry:
        """The record's entry, or the error that tells why there is none."""
        if record is None:
            raise TenantNotConnected(tenant)
        if record.status is TenantStatus.NEEDS_REAUTH and not allow_reauth:
            death = self._deaths.get(tenant)
            if death is not None and death[0] == record.version:
                # This process marked it dead: every caller learns the same cause (a caller
                # whose read is answered after the mark would otherwise get a vaguer one).
                raise death[1](tenant, death[2])
            dying = self._dying.get(tenant)
            if dying is not None and record.version > dying[0]:
                raise dying[1](tenant, dying[2])  # the mark landed; its answer is on the way
            raise ReauthorizationRequired(tenant, "the grant was refused earlier; connect again")
        try:
            return self._entry(record)
        except TokenSealError as exc:
            # Never served, never overwritten: the record stays as it is for the right key.
            log.error("tenant %r: stored tokens cannot be opened: %s", tenant, exc)
            self._emit(TokenEvent(EventKind.SEAL_ERROR, tenant, detail=str(exc)))
            raise
