"""The lease protocol, written once (``_holding``), and what works under a lease besides a
refresh: marking a tenant dead, re-sealing under a new key (``rekey``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ._core import Core
from ._errors import (
    FactorialTokensError,
    ReauthorizationRequired,
    RefreshTimeout,
    StoreUnavailable,
    TokenSealError,
)
from ._events import EventKind, TokenEvent
from ._models import TokenSet
from .sealing import Keyring, SealedCodec
from .store import Lease, Record, Store, TenantKey, TenantStatus, Update, acquire_within

log = logging.getLogger("factorial_tokens")


class Held:
    """A lease being worked under (see ``Leases._holding``): its one fenced write.

    ``async with`` it: the block ends with one fenced :meth:`commit`, or the lease is
    released on the way out, shielded, so that a cancelled holder still gives it back.
    With a ``watchdog`` (``_holding(..., renew=True)``), it is started ``renew_after``
    seconds into the work (a third of the lease) to extend the lease, and sets ``lost`` if
    it was taken over. (A class, not a generator-based context manager: one is made per
    refresh, thousands at once in a cold start.)"""

    __slots__ = (
        "_renew_after",
        "_store",
        "_timer",
        "_watchdog",
        "_watching",
        "committed",
        "lease",
        "lost",
        "record",
    )

    def __init__(
        self,
        store: Store,
        lease: Lease,
        record: Record | None,
        *,
        watchdog: Callable[[Held], asyncio.Task[None]] | None = None,
        renew_after: float = 0.0,
    ) -> None:
        self._store = store
        self._watchdog = watchdog  # starts the renewing watchdog, ``renew_after`` into the work
        self._renew_after = renew_after
        self._timer: asyncio.TimerHandle | None = None
        self._watching: asyncio.Task[None] | None = None
        self.lease = lease
        self.record = record  # what the store held when the lease was taken
        self.committed = False  # a commit was answered: the lease is over, written or fenced out
        self.lost = False  # the renewing watchdog found the lease taken over

    async def __aenter__(self) -> Held:
        if self._watchdog is not None:
            # No watchdog task for work that ends within a third of the lease (nearly all).
            self._timer = asyncio.get_running_loop().call_later(self._renew_after, self._watch)
        return self

    def _watch(self) -> None:
        assert self._watchdog is not None
        self._watching = self._watchdog(self)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watching is not None:
            self._watching.cancel()
        if not self.committed:
            with contextlib.suppress(FactorialTokensError):
                await asyncio.shield(self._store.release(self.lease))

    async def commit(self, update: Update) -> Record | None:
        """Write ``update`` fenced by the lease, which it ends; ``None`` when fenced out."""
        stored = await self._store.commit(self.lease, update)
        self.committed = True
        return stored


class Leases(Core):
    """Work under a tenant's lease: the one lease helper, mark-dead, rekey."""

    async def rekey(self, keyring: Keyring, *, wait_timeout: float | None = None) -> int:
        """Re-seal every record of this app under ``keyring``'s newest key; return how many.

        Plain ``j1:`` records are sealed too when this manager reads them (no keyring, or
        ``allow_plaintext=True``): this completes a migration to sealing. A manager that
        refuses them counts them as records it could not open (TokenSealError): with a
        keyring in force, a plain record was planted by someone without the key, and
        sealing it would make it pass. Records already sealed under the newest key are
        opened (to find damaged ones) and left alone.

        Safe while workers run: each tenant is re-sealed under its lease (a busy tenant is
        retried after the others, waiting up to ``wait_timeout``, default the manager's,
        for its holder to finish) and written with a fenced ``commit`` that keeps status and
        expiry, so a concurrent refresh is never overwritten. Workers must already know
        every key of ``keyring`` (see ``docs/security.md``).

        Raises TokenSealError after processing every other tenant if some records could not
        be opened (their count and tenant ids in the message; those records are left
        intact), RefreshTimeout if a tenant's lease stayed busy for ``wait_timeout``,
        StoreUnavailable.
        """
        self._check_open()
        wait_timeout = self.wait_timeout if wait_timeout is None else wait_timeout
        namespace = self.app.client_id
        reads_plain = not isinstance(self._codec, SealedCodec) or self._codec.allow_plaintext
        codec = SealedCodec(keyring, allow_plaintext=reads_plain)
        pending: list[TenantKey] = []
        unopened: list[str] = []
        for record in await self._store.tenants(namespace):
            if not codec.is_current(record.payload):
                pending.append(record.key)
                continue
            # Labelled with the newest key: opened all the same, since a damaged record (or
            # one sealed under another key of that id) would otherwise pass as rotated.
            try:
                codec.decode(record.key, record.payload)
            except TokenSealError as exc:
                log.error("rekey: %s", exc)
                unopened.append(record.key.tenant)
        done = 0
        busy: list[TenantKey] = []
        for key in pending:  # first pass: never wait, defer busy tenants
            outcome = await self._reseal(codec, key, wait=0.0)
            if outcome is None:
                busy.append(key)
            elif isinstance(outcome, TokenSealError):
                unopened.append(key.tenant)
            else:
                done += outcome
        for key in busy:
            outcome = await self._reseal(codec, key, wait=wait_timeout)
            if isinstance(outcome, TokenSealError):
                unopened.append(key.tenant)
            elif outcome is None:
                raise RefreshTimeout(
                    f"rekey: tenant {key.tenant!r}'s lease stayed busy for {wait_timeout:g}s "
                    f"({done} records re-sealed so far; run rekey again)"
                )
            else:
                done += outcome
        log.info("rekey: %d records of %r re-sealed under key %r", done, namespace, keyring.newest)
        if unopened:
            shown = ", ".join(repr(t) for t in unopened[:10]) + (", ..." if len(unopened) > 10 else "")
            raise TokenSealError(
                f"rekey: {done} records re-sealed, {len(unopened)} could not be opened and were left "
                f"intact: {shown}"
            )
        return done

    async def _reseal(
        self, codec: SealedCodec, key: TenantKey, *, wait: float
    ) -> int | TokenSealError | None:
        """Re-seal one tenant under its lease: 1 if written, 0 if nothing to do, the error if
        its record cannot be opened, ``None`` if its lease stayed busy for ``wait`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            won = await acquire_within(self._store, key, self.lease_ttl, deadline - loop.time())
            if won is None or won.lease is None:
                return None
            async with self._holding(won.lease, won.record) as held:
                record = held.record
                if record is None or codec.is_current(record.payload):
                    return 0  # forgotten, or re-sealed (by a writer with the new key) since listed
                try:
                    payload = codec.reseal(key, record.payload)
                except TokenSealError as exc:
                    log.error("rekey: %s", exc)
                    return exc
                update = Update(payload, record.status, record.expires_at, record.updated_at)
                if await held.commit(update) is not None:
                    return 1

    async def _revoke_quietly(self, tenant: str, tokens: TokenSet, what: str) -> None:
        """Revoke a grant at Factorial, logging (not raising) a failure."""
        deadline = asyncio.get_running_loop().time() + self.refresh_deadline
        try:
            await self._oauth.revoke(tokens.refresh_token or tokens.access_token, deadline=deadline)
            log.info("tenant %r: %s (%s) revoked at Factorial", tenant, what, tokens.fingerprint)
        except FactorialTokensError as exc:
            log.warning("tenant %r: could not revoke %s (%s): %s", tenant, what, tokens.fingerprint, exc)

    def _holding(self, lease: Lease, record: Record | None, *, renew: bool = False) -> Held:
        """Work under ``lease`` (which found ``record``): every write under a lease goes
        through this (see :class:`Held`)."""
        if not renew:
            return Held(self._store, lease, record)
        return Held(self._store, lease, record, watchdog=self._watchdog, renew_after=self.lease_ttl / 3)

    def _watchdog(self, held: Held) -> asyncio.Task[None]:
        return self._spawn(self._renew(held))

    async def _mark_dead(
        self,
        held: Held,
        reason: str,
        *,
        error: type[ReauthorizationRequired] = ReauthorizationRequired,
    ) -> ReauthorizationRequired | None:
        """Record (fenced) that the tenant needs re-authorization; return the error to raise,
        or ``None`` when the write was refused (someone reconnected or refreshed meanwhile:
        the tenant may be fine, so start over)."""
        tenant = held.lease.key.tenant
        record = held.record
        assert record is not None  # only a stored grant dies
        update = Update(record.payload, TenantStatus.NEEDS_REAUTH, record.expires_at, record.updated_at)
        self._forget_cached(tenant)
        # Until the commit is answered: a read answered in between may already see the mark.
        self._dying[tenant] = (record.version, error, reason)
        try:
            stored = await held.commit(update)
        finally:
            self._dying.pop(tenant, None)
        if stored is None:
            log.info("tenant %r: the store changed before it could be marked dead; re-reading", tenant)
            return None
        log.error("tenant %r needs re-authorization: %s", tenant, reason)
        self._emit(TokenEvent(EventKind.REAUTHORIZATION_REQUIRED, tenant, detail=reason))
        self._deaths[tenant] = (stored.version, error, reason)
        return error(tenant, reason)

    async def _renew(self, held: Held) -> None:
        """Watchdog: keep the lease alive while its holder works (started a third of the
        lease into the work, then renewing every third)."""
        lease = held.lease
        while True:
            try:
                if not await self._store.extend(lease, self.lease_ttl):
                    held.lost = True
                    return
            except StoreUnavailable:
                log.warning("tenant %r: could not renew the lease; retrying", lease.key.tenant)
            await asyncio.sleep(self.lease_ttl / 3)
