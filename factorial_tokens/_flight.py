"""The hot path and single-flight refresh: cached tokens, the advisory and mandatory
windows, one flight per tenant in a process and one lease holder across processes, and
the fleet's back-pressure on refreshes. See the ``_manager`` module docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import secrets
import time
from collections.abc import Callable
from typing import cast

import attrs

from ._core import Entry
from ._errors import (
    FactorialTokensError,
    ProviderError,
    RefreshTimeout,
    RequestInDoubt,
    RotationLost,
    StoreUnavailable,
)
from ._events import EventKind, TokenEvent
from ._leases import Leases
from ._logs import OperationContext, bind
from ._models import TokenSet, fingerprint, validate_tenant
from ._oauth import MAX_RETRY_AFTER
from .store import (
    Freshness,
    Lease,
    Record,
    TenantKey,
    TenantStatus,
    Throttle,
    Watch,
    acquire_lease,
    announced,
    changed,
)

log = logging.getLogger("factorial_tokens")

#: ``newer_than`` of a forced flight that beats the version it reads when it starts.
_STORED = -1

#: A failed background refresh is retried after this (doubling per failure, jittered) ...
_ADVISORY_BACKOFF = 0.5

#: ... up to this many seconds.
_ADVISORY_BACKOFF_MAX = 30.0


def _renewable(tokens: TokenSet) -> bool:
    """False for tokens that never expire and cannot be refreshed (company tokens)."""
    return tokens.refresh_token is not None or tokens.expires_at is not None


class _Decoding:
    """``Core._usable`` (given as ``usable``) for one flight, which decodes a record it
    sees again (read, then acquired on) once. (A class, not a closure: a flight is made
    per due tenant, and a closure costs several objects more for the garbage collector.)"""

    __slots__ = ("_entry", "_record", "_tenant", "_usable")

    def __init__(self, usable: Callable[[str, Record | None], Entry], tenant: str) -> None:
        self._usable = usable
        self._tenant = tenant
        self._record: Record | None = None
        self._entry: Entry | None = None

    def __call__(self, record: Record | None) -> Entry:
        if record is None or record.status is not TenantStatus.ACTIVE:
            return self._usable(self._tenant, record)
        seen = self._record
        if seen is None or seen.version != record.version or seen.payload != record.payload:
            self._entry = self._usable(self._tenant, record)
            self._record = record
        assert self._entry is not None
        return self._entry


class Flights(Leases):
    """Cached tokens and single-flight, lease-fenced refreshes."""

    async def access_token(self, tenant: str) -> str:
        """A valid access token for ``tenant``, with at least ``min_valid`` seconds left.

        Costs no I/O while the cached token is fresh. Inside the leeway it still returns
        the current token at once and starts one background refresh (a failed one is
        logged, emitted as ``refresh_failed`` and retried later with backoff); it waits
        only when the token has less than ``min_valid`` left or there is none. Raises
        TenantNotConnected, ReauthorizationRequired, ProviderError, StoreUnavailable (only
        when no cached token is still valid), RefreshTimeout.
        """
        entry = self._cache.get(tenant)
        if entry is not None and time.time() < entry.due and not self._closed:
            self._hits += 1
            return entry.tokens.access_token
        return (await self._current(tenant)).tokens.access_token

    async def token_set(self, tenant: str) -> TokenSet:
        """Like :meth:`access_token`, but the whole token set."""
        # The cache check is repeated, not shared: on the hot path one more coroutine call
        # would cost about as much as the whole lookup.
        entry = self._cache.get(tenant)
        if entry is not None and time.time() < entry.due and not self._closed:
            self._hits += 1
            return entry.tokens
        return (await self._current(tenant)).tokens

    async def _current(self, tenant: str) -> Entry:
        """The tenant's entry with at least ``min_valid`` left; starts a background refresh
        when it is inside the advisory window."""
        self._check_open()
        tenant = validate_tenant(tenant)
        self._obs.misses += 1
        entry = self._cache.get(tenant)
        # Twice at most: an entry that aged into the mandatory window while this caller
        # waited to be scheduled is looked up once more (a fresh token never is).
        for _ in range(2):
            if entry is not None and time.time() < entry.must:
                break
            try:
                if self._flights.get(tenant) in self._advisory and tenant not in self._cache:
                    # A background refresh is under way and the cache was dropped (an
                    # announcement): the stored token may still do, so read it rather than
                    # wait for the refresh. (A cached entry in the mandatory window is the
                    # newest this process knows of: its caller joins the refresh at once, a
                    # read would only add a round trip.)
                    entry = self._usable(tenant, await self._store.read(self._key(tenant)))
                    if time.time() < entry.must:
                        entry = self._remember(tenant, entry)
                        continue
                entry = await self._obtain(tenant, newer_than=None)
            except StoreUnavailable as exc:
                stale = self._cache.get(tenant) or self._outage_fallback.get(tenant)
                if stale is not None and not stale.tokens.is_expired():
                    log.warning("store unavailable; serving tenant %r's cached token till it expires", tenant)
                    self._obs.stale_served(tenant, stale.tokens.fingerprint, exc)
                    return stale
                raise
        assert entry is not None
        if time.time() >= entry.due:
            self._advise(tenant)
        return entry

    def _advise(self, tenant: str) -> None:
        """Start one background refresh of ``tenant`` unless one flies or a failed one
        is backing off. Callers never await it; its failure is logged, never raised."""
        if tenant in self._flights or self._closed:
            return
        backoff = self._backoff.get(tenant)
        if backoff is not None and time.monotonic() < backoff[1]:
            return
        flight = self._launch(tenant, newer_than=None, advisory=True)
        self._advisory.add(flight)
        flight.add_done_callback(functools.partial(self._advised, tenant))

    def _advised(self, tenant: str, flight: asyncio.Task[Entry]) -> None:
        """A background refresh ended: forget its backoff, or log it and back off."""
        self._advisory.discard(flight)
        if flight.cancelled():
            return
        error = flight.exception()
        if error is None:
            self._backoff.pop(tenant, None)
            return
        failures = self._backoff.get(tenant, (0, 0.0))[0] + 1
        delay = min(_ADVISORY_BACKOFF * 2 ** (failures - 1), _ADVISORY_BACKOFF_MAX) * random.uniform(0.5, 1.0)
        self._backoff[tenant] = (failures, time.monotonic() + delay)
        # The failure itself was emitted as ``refresh_failed`` where it happened.
        log.warning(
            "tenant %r: background refresh failed (%s: %s); callers keep the current token, retry in %.1fs",
            tenant,
            type(error).__name__,
            error,
            delay,
        )

    async def refresh(self, tenant: str, *, newer_than: int | None = None) -> TokenSet:
        """Force a new token set (single-flight, under the lease).

        If another worker refreshed since this process last saw the tenant, its result is
        returned instead of refreshing again. ``newer_than`` is the stored version the
        caller last saw (a :class:`TenantInfo`'s ``version``, as keepalive passes it):
        any stored version above it counts as refreshed already. Raises what
        :meth:`access_token` raises.
        """
        self._check_open()
        tenant = validate_tenant(tenant)
        if newer_than is None:
            entry = self._cache.get(tenant)
            if entry is None and tenant in self._forced:
                # Nothing cached, but a forced refresh is in flight: its result is newer than
                # anything this caller could read now, and a read answered after it committed
                # would take it for an old one and force a second refresh.
                return (await self._obtain(tenant, newer_than=None)).tokens
            if entry is None and tenant not in self._flights:
                # Nothing cached and nothing in flight: the flight itself reads the version to
                # beat, so that the callers who come while it flies join it rather than read.
                return (await self._obtain(tenant, newer_than=_STORED)).tokens
            if entry is None:
                record = await self._store.read(self._key(tenant))
                entry = self._usable(tenant, record) if record else None
                if entry is not None:
                    # Remembered, so the flight knows this version is stale and does not read
                    # it again; but the version to beat is the one read, not a newer one
                    # cached meanwhile (that one may be the refresh this caller asked for).
                    self._remember(tenant, entry)
            newer_than = entry.version if entry else 0
        return (await self._obtain(tenant, newer_than=newer_than)).tokens

    async def tokens(self, tenant: str) -> TokenSet:
        """The stored token set, read from the store without refreshing it."""
        self._check_open()
        tenant = validate_tenant(tenant)
        record = await self._store.read(self._key(tenant))
        return self._usable(tenant, record).tokens

    def _launch(self, tenant: str, *, newer_than: int | None, advisory: bool = False) -> asyncio.Task[Entry]:
        flight = self._spawn(self._fly(tenant, newer_than, advisory))
        self._flights[tenant] = flight
        if newer_than is None:
            self._forced.discard(tenant)
        else:
            self._forced.add(tenant)
        flight.add_done_callback(functools.partial(self._land, tenant), context=self._books)
        return flight

    async def _obtain(self, tenant: str, *, newer_than: int | None) -> Entry:
        """Join (or start) the tenant's flight until it yields an acceptable entry."""
        while True:
            flight = self._flights.get(tenant)
            joined_advisory = flight in self._advisory
            if flight is None:
                flight = self._launch(tenant, newer_than=newer_than)
            try:
                if flight.done():
                    entry = flight.result()
                else:
                    waiter = self._waiter(flight)
                    try:
                        entry = await waiter
                    except asyncio.CancelledError:
                        # This caller was cancelled, never the flight (its other callers wait on).
                        waiters = self._joined.get(flight)
                        if waiters is not None:
                            waiters.pop(waiter, None)
                        raise
            except (ProviderError, StoreUnavailable, RefreshTimeout):
                # A background refresh gave up (it stops retrying when the mandatory window
                # opens): a caller that must wait starts one of its own instead. The ended
                # flight may not have landed yet (its callbacks run a turn later): forget it.
                if not joined_advisory:
                    raise
                self._land(tenant, flight)
                continue
            if newer_than is None or entry.version > newer_than or not _renewable(entry.tokens):
                return entry
            # A finished flight is awaited without yielding, and its landing may not have run
            # yet: forget it here, or this loop would join it again forever.
            self._land(tenant, flight)

    def _waiter(self, flight: asyncio.Task[Entry]) -> asyncio.Future[Entry]:
        """A future of this caller's own that gets ``flight``'s outcome when it lands.

        What ``asyncio.shield`` gives each caller, for less: one done callback per flight
        wakes every caller (a shield costs each caller two more callbacks), and a
        cancelled caller cancels its own future only, never the flight."""
        waiters = self._joined.get(flight)
        if waiters is None:
            waiters = self._joined[flight] = {}
            flight.add_done_callback(self._wake, context=self._books)
        waiter: asyncio.Future[Entry] = flight.get_loop().create_future()
        waiters[waiter] = None
        return waiter

    def _wake(self, flight: asyncio.Task[Entry]) -> None:
        """Hand a landed flight's entry, or its error, to every caller still waiting."""
        waiters = self._joined.pop(flight, {})
        if flight.cancelled():
            for waiter in waiters:
                waiter.cancel()
            return
        error = flight.exception()
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(flight.result())
            else:
                waiter.set_exception(error)

    def _land(self, tenant: str, flight: asyncio.Task[Entry]) -> None:
        """Forget a finished flight (unless a newer one took its place)."""
        if self._flights.get(tenant) is flight:
            del self._flights[tenant]
            self._forced.discard(tenant)
        if not flight.cancelled():
            flight.exception()  # mark retrieved: callers that awaited it got it already

    def _acceptable(self, entry: Entry, newer_than: int | None, advisory: bool) -> bool:
        """Forced: newer than ``newer_than``; advisory: not yet due; else: not yet in the
        mandatory window (the caller starts the advisory refresh itself)."""
        if newer_than is not None:
            return entry.version > newer_than
        return time.time() < (entry.due if advisory else entry.must)

    def _freshness(self, advisory: bool) -> Freshness:
        """:meth:`_acceptable` for a flight that is not forced, as the store checks it now:
        the advisory window opens ``min(leeway, lifetime / 2)`` before expiry, the mandatory
        one ``min_valid / leeway`` of that (see ``_entry_of``); the lifetime is what the
        store keeps as ``expires_at - updated_at`` (``updated_at`` is ``obtained_at``)."""
        if advisory:
            return Freshness(time.time(), self.leeway, 0.5)
        if self.leeway == 0:
            return Freshness(time.time(), 0.0, 0.0)
        return Freshness(time.time(), self.min_valid, self.min_valid / (2 * self.leeway))

    async def _fly(self, tenant: str, newer_than: int | None, advisory: bool = False) -> Entry:
        """Across processes: take the lease if the record is due, or wait for whoever has it.

        A flight that is not forced asks the store to take the lease only if the record is
        due (``unless_fresh``): a fresh stored token costs that one round trip and no lease
        (a lease taken and given back would wake every other worker), a refresh two
        (acquire, commit). It reads first instead when the store was written to the older
        contract, when it is forced (judged by version, which the store does not know), or
        when no provider slot is free: a fresh token must not queue behind refreshes. When
        this process already knows its cached entry is stale, that read is left out; after
        waiting for another worker's refresh, it takes the record that refresh's announcement
        carried (``_notice``), or else reads (the likely answer is a fresh token).
        """
        key = self._key(tenant)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.wait_timeout
        waited = False
        bind(OperationContext(tenant, "refresh", self._obs.store))  # for log records (own task)
        cached = self._cache.get(tenant)
        known_stale = (
            cached is not None
            and newer_than != _STORED
            and not self._acceptable(cached, newer_than, advisory)
        )
        conditional = newer_than is None and self._unless_fresh
        look = conditional and not known_stale  # a first look, by the acquisition itself
        usable = _Decoding(self._usable, tenant)

        # The newest version this flight saw (read, acquired on): a notice must be newer.
        floor = cached.version if known_stale and cached is not None else 0
        while True:
            async with self._store.watch(key) as watch:
                if not known_stale and not (look and not self._slots.locked()):
                    entry = usable(await self._store.read(key))
                    floor = entry.version
                    if newer_than == _STORED:
                        newer_than = entry.version
                    elif self._acceptable(entry, newer_than, advisory):
                        if waited:
                            self._obs.lease_waited(loop.time() - started)
                        return self._remember(tenant, entry)
                known_stale = look = False  # after a wait, someone else's result is likely: read
                # A lease is taken only with a free provider slot: a lease held while its
                # request queues for a connection could lapse under a large backlog, and
                # the tenants this process cannot start yet stay free for other workers.
                # While it queues, another worker's commit of the tenant ends the wait.
                if not await self._take_slot(tenant, key, watch):
                    carried = self._carried(key, watch, floor, usable)
                    if carried is not None and self._acceptable(carried, newer_than, advisory):
                        self._obs.lease_waited(loop.time() - started)
                        return self._remember(tenant, carried)
                    continue  # read again
                try:
                    owner = secrets.token_hex(16)
                    rule = self._freshness(advisory) if conditional else None
                    won = await acquire_lease(self._store, key, owner, self.lease_ttl, unless_fresh=rule)
                    if won.lease is not None:
                        if waited:
                            self._obs.lease_waited(loop.time() - started)
                            waited = False
                        found = await self._opened(won.lease, won.record, usable)
                        before = won.record.version if won.record else None
                        result = await self._obs.refresh(
                            won.lease,
                            before,
                            self._refresh_holding(won.lease, won.record, found, newer_than, advisory),
                        )
                        if result is not None:
                            return self._remember(tenant, result)
                finally:
                    self._slots.release()
                again = won.lease is not None
                if won.lease is None:
                    seen = usable(won.record)
                    floor = seen.version
                    if self._acceptable(seen, newer_than, advisory):
                        if waited:
                            self._obs.lease_waited(loop.time() - started)
                        return self._remember(tenant, seen)
                    if rule is not None and not rule.due(won.record):
                        # Fresh when the store judged it, due now (it aged on the way back,
                        # or the windows' arithmetic differs in the last bit): nobody holds
                        # the lease and no announcement will come; ask again, plainly.
                        again = known_stale = True
                        conditional = False
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._obs.refresh_timeout(tenant, loop.time() - started)
                    raise RefreshTimeout(
                        f"tenant {tenant!r}: no fresh token within {self.wait_timeout:g}s "
                        "(the refresh lease stayed busy or was lost)"
                    )
                if again:
                    continue
                log.debug("tenant %r: waiting for another worker's refresh", tenant)
                waited = True
                if await watch.wait(remaining):
                    # The holder's commit may have announced its record: no read then.
                    carried = self._carried(key, watch, floor, usable)
                    if carried is not None and self._acceptable(carried, newer_than, advisory):
                        self._obs.lease_waited(loop.time() - started)
                        return self._remember(tenant, carried)

    def _carried(
        self, key: TenantKey, watch: Watch, floor: int, usable: Callable[[Record | None], Entry]
    ) -> Entry | None:
        """The entry of the record the newest announcement ``watch`` saw carried (a
        commit's notice), if it is newer than ``floor``, the newest version this flight saw
        (a replayed or lagging notice is older); else ``None``: read."""
        notice = announced(watch)
        carried = None if notice is None else self._notices.open(key, notice)
        if carried is None or carried.version <= floor:
            return None
        return usable(carried)

    async def _take_slot(self, tenant: str, key: TenantKey, watch: Watch) -> bool:
        """Take a provider slot (True); or, while queued for one, give up (False) when a
        change of the tenant is announced (``_on_change`` sets the queued future to False).
        Also when ``watch`` already saw one (during the read), with a commit's notice or
        without (one without may follow one with): what was read is stale, so the caller
        takes the notice or reads again rather than queueing."""
        if self._slots.take_free():
            return True
        if changed(watch) or announced(watch) is not None:
            return False
        waiter = self._queued[tenant] = self._slots.queue()
        self._digests.setdefault(key.digest, tenant)
        try:
            return await self._slots.wait(waiter)
        finally:
            if self._queued.get(tenant) is waiter:
                del self._queued[tenant]

    async def _opened(
        self, lease: Lease, record: Record | None, usable: Callable[[Record | None], Entry]
    ) -> Entry:
        """The entry of the ``record`` a lease was taken on (``usable``: how it is made);
        when there is none (forgotten, dead, or sealed under a key this process lacks), the
        lease is given back untouched and the error raised as a read's would be: no
        refresh was attempted."""
        try:
            return usable(record)
        except BaseException:
            with contextlib.suppress(FactorialTokensError):
                await asyncio.shield(self._store.release(lease))
            raise

    async def _refresh_holding(
        self,
        lease: Lease,
        record: Record | None,
        entry: Entry,
        newer_than: int | None,
        advisory: bool = False,
    ) -> Entry | None:
        """Refresh while holding ``lease`` (taken on ``record``, whose entry is ``entry``);
        ``None`` means "start over" (lease lost)."""
        tenant = lease.key.tenant
        async with self._holding(lease, record, renew=True) as held:
            if self._acceptable(entry, newer_than, advisory):
                return entry  # someone refreshed between our read and our acquire
            old = entry.tokens
            assert record is not None  # _usable raised otherwise
            if not _renewable(old):
                return entry  # a company token that never expires: nothing to refresh
            if old.refresh_token is None:
                self._obs.note(lease, "no_refresh_token")
                error = await self._mark_dead(held, "no refresh token to renew an expiring token")
                if error is None:
                    return None
                raise error
            loop = asyncio.get_running_loop()
            await self._admitted(tenant, loop.time() + self.refresh_deadline)
            # The provider call gets its whole budget after the wait: a request cut short by
            # a spent deadline would be in doubt, and its retry could cost the grant.
            deadline = loop.time() + self.refresh_deadline
            if held.lost:
                return None
            # A background refresh stops retrying when the mandatory window opens, with a
            # last try at its start: callers who must wait then start a refresh of their
            # own at once, rather than wait out this one's backoff.
            retry_until = loop.time() + (entry.must - time.time()) if advisory else None
            try:
                new = await self._oauth.refresh(old.refresh_token, deadline=deadline, retry_until=retry_until)
            except RequestInDoubt as exc:
                log.warning(
                    "tenant %r: refresh of %s in doubt (%s); re-reading, then one more try",
                    tenant,
                    fingerprint(old.refresh_token),
                    exc.error,
                )
                current = await self._store.read(lease.key)
                if current is None or record is None or current.version != record.version:
                    self._obs.note(lease, "lost_race")
                    return None
                try:
                    new = await self._oauth.refresh(old.refresh_token, deadline=deadline)
                except ProviderError as again:
                    if again.error != "invalid_grant":
                        raise
                    error = await self._mark_dead(
                        held,
                        "the refresh token was rotated by a request whose answer was lost",
                        error=RotationLost,
                    )
                    if error is None:
                        return None
                    raise error from None
            except ProviderError as exc:
                if exc.error != "invalid_grant":
                    raise
                # Lost race or dead grant? Dead only if the store still holds what we sent.
                current = await self._store.read(lease.key)
                if current is None or record is None or current.version != record.version:
                    self._obs.note(lease, "lost_race")
                    return None
                error = await self._mark_dead(held, "Factorial refused the refresh token (invalid_grant)")
                if error is None:
                    return None
                raise error from None
            if new.refresh_token is None:
                # RFC 6749 section 6: no new refresh token means the current one stays valid.
                new = attrs.evolve(new, refresh_token=old.refresh_token)
            if new.company_id is None:
                new = attrs.evolve(new, company_id=old.company_id)
            update = self._update(lease.key, new)
            # The commit's announcement carries the record (sealed), so that the workers
            # waiting for this refresh need not read it. A commit writes version + 1.
            update = attrs.evolve(update, notice=self._notices.seal(lease.key, record.version + 1, update))
            stored = await self._patiently(tenant, "refreshed tokens", lambda: held.commit(update))
            if stored is None:
                self._obs.note(lease, "fenced_out")
                log.error(
                    "tenant %r: lease lost before writing refreshed tokens %s; they are discarded",
                    tenant,
                    new.fingerprint,
                )
                # Stored nowhere (a reconnection replaced the grant, or the lease lapsed):
                # revoked, not left live at Factorial.
                await self._revoke_quietly(tenant, new, "refreshed tokens that could not be stored")
                return None
            log.info(
                "tenant %r: refreshed, access token %s, expires in %s",
                tenant,
                new.fingerprint,
                "never" if new.lifetime is None else f"{new.lifetime:.0f}s",
            )
            self._emit(TokenEvent(EventKind.REFRESHED, tenant, new.fingerprint, stored.version))
            return self._entry_of(new, stored.version)

    def _provider_held(self, seconds: float) -> None:
        """The token endpoint said 429 (or 503 with Retry-After): hold every worker."""
        if not 0 <= seconds <= MAX_RETRY_AFTER:  # NaN included: it would wedge _admitted
            seconds = MAX_RETRY_AFTER if seconds > MAX_RETRY_AFTER else 0.0
        until = time.time() + seconds
        if until <= self._not_before:
            return
        self._not_before = until
        log.warning("the provider asked to hold refreshes for %.1fs; holding every worker", seconds)
        if self._throttles and not self._closed:
            self._spawn(self._share_hold(until))

    @property
    def _throttle(self) -> Throttle:
        """The store as the fleet's back-pressure (only when ``_throttles``)."""
        assert self._throttles
        return cast(Throttle, self._store)

    async def _share_hold(self, until: float) -> None:
        try:
            await self._throttle.hold(self.app.client_id, until)
        except StoreUnavailable as exc:
            log.warning("could not share the provider's hold with other workers: %s", exc)

    async def _learn_hold(self) -> None:
        """Another worker recorded a hold (or announcements were lost): read it."""
        try:
            held = await self._throttle.hold(self.app.client_id, 0.0)
            if math.isfinite(held):  # a damaged store value is no hold
                self._not_before = max(self._not_before, min(held, time.time() + MAX_RETRY_AFTER))
        except StoreUnavailable as exc:
            log.warning("could not read the fleet's refresh hold: %s", exc)

    async def _admitted(self, tenant: str, deadline: float) -> None:
        """Wait until a refresh may be sent: past the fleet's hold and, with a
        ``refresh_rate``, with a unit of the shared budget. Raises ProviderError when that
        is later than ``deadline`` (callers with a valid token never see it)."""
        loop = asyncio.get_running_loop()
        ticket: str | None = None  # only with a budget (a system call per refresh otherwise)
        while True:
            wait = self._not_before - time.time()
            if wait <= 0 and self._interval > 0 and self._throttles:
                ticket = ticket or secrets.token_hex(8)
                wait = await self._throttle.admit(self.app.client_id, ticket, self._interval, self._burst)
            if wait <= 0:
                return
            if loop.time() + wait >= deadline:
                raise ProviderError(
                    429, "rate_limited", f"refreshes are held {wait:.1f}s more, past this refresh's deadline"
                )
            log.debug("tenant %r: refresh held %.2fs by the fleet's back-pressure", tenant, wait)
            await asyncio.sleep(wait)
