"""Exactly-once code exchange: a code is claimed in the store, sent once, and its outcome
shared with every duplicate; the new grant is pinned to the tenant's company.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
from typing import Any

import attrs

from ._errors import (
    CodeReused,
    CompanyMismatch,
    ExchangeInDoubt,
    FactorialTokensError,
    InvalidCallback,
    ProviderError,
    RefreshTimeout,
    RequestInDoubt,
    StoreUnavailable,
    TenantNotConnected,
    TokenSealError,
)
from ._events import EventKind, TokenEvent
from ._leases import Leases
from ._models import TokenSet, validate_tenant
from ._secret import SIGNING_PREFIX
from .store import ClaimState, CodeClaim, TenantKey, acquire_within

log = logging.getLogger("factorial_tokens")


@attrs.define
class _Replacing:
    """What a connection's first attempt to store its grant found stored (``old``), for
    its retries after a lost reply."""

    tried: bool = False
    old: TokenSet | None = None


def _grant(tokens: TokenSet | None) -> str | None:
    """The access token that tells a stored grant from another (None: none stored)."""
    return None if tokens is None else tokens.access_token


_MAX_CODE = 2048

#: Appended to the namespace for the key whose lease connections of a tenant take turns on
#: (it never holds a record, so no listing shows it).
_CONNECT_TURN = "/connect-turn"


def connect_turn(key: TenantKey) -> TenantKey:
    """The key of the lease that a tenant's connections (and its revocation) take turns on:
    beside the tenant's own, never holding a record."""
    return TenantKey(key.namespace + _CONNECT_TURN, key.tenant)


def check_code(code: object) -> str:
    """``code`` if it looks like an authorization code; raise InvalidCallback otherwise."""
    if (
        not isinstance(code, str)
        or not code
        or len(code) > _MAX_CODE
        or not code.isprintable()
        or code.startswith(SIGNING_PREFIX)  # its hash would be a signing key (see _secret)
    ):
        raise InvalidCallback("the authorization code is missing or malformed")
    return code


#: Why a new grant was refused over a stored record that cannot be opened.
_UNREADABLE = (
    "tenant {tenant!r}: the stored record cannot be opened (a missing or wrong key, or a tampered "
    "record), so the new grant's company cannot be checked against it; the record was kept and the "
    "new grant refused and revoked. Configure the key that sealed it, or forget the tenant (or pass "
    "allow_company_change=True) to replace it"
)


def _claim_error(tenant: str, outcome: str | None) -> FactorialTokensError:
    """Rebuild the error a failed code claim recorded, for callers that did not send it."""
    try:
        data = json.loads(outcome or "{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict) or data.get("in_doubt"):
        return ExchangeInDoubt(tenant, "the code was sent but the answer was lost")
    if data.get("seal_error"):
        return TokenSealError(_UNREADABLE.format(tenant=tenant))
    mismatch = data.get("company_mismatch")
    if isinstance(mismatch, list) and len(mismatch) == 2:
        return CompanyMismatch(tenant, str(mismatch[0]), str(mismatch[1]))
    status = data.get("status")
    return ProviderError(
        status if isinstance(status, int) else None,
        str(data.get("error", "exchange_failed")),
        str(data.get("description", "")),
    )


class Exchanges(Leases):
    """Exactly-once code exchange and pinning a grant to its company."""

    async def exchange_code(self, tenant: str, code: str, *, allow_company_change: bool = False) -> TokenSet:
        """Exchange an authorization code for ``tenant``'s tokens, exactly once per code.

        Concurrent and repeated calls with one code return the tenant's tokens after a
        single provider exchange. The new grant's company is read from Factorial's
        credentials endpoint and kept with the tokens (``TokenSet.company_id``): a tenant
        already connected to another company raises CompanyMismatch, keeps its stored
        tokens, and the unwanted grant is revoked at Factorial, unless
        ``allow_company_change=True``. A stored grant whose company could not be read when
        it was connected is asked for its company with its own access token; if that fails
        (expired, refused), the new grant is refused (CompanyMismatch, expected
        ``unknown``). When the tenant had tokens, its previous grant is
        revoked at Factorial once the new tokens are stored, and a ``reconnected`` event
        names the old and the new company. A tenant that was forgotten or revoked has no
        company any more: its next connection pins a new one.

        Raises CodeReused if the code was claimed for another tenant, ProviderError if
        Factorial refused it (every caller gets the same error), ExchangeInDoubt if it was
        sent but its answer was lost, CompanyMismatch (see above).

        Connections of one tenant take turns (a lease of their own), so two that overlap
        are compared with each other as well.

        Limitations: if a connection's turn stays busy for longer than ``refresh_deadline``
        (its holder died), the next one is compared only with what the store held just
        before it writes.
        """
        self._check_open()
        tenant = validate_tenant(tenant)
        check_code(code)
        code_hash = self._secret.code_hash(code)
        existing = self._exchanges.get(code_hash)
        if existing is None:
            flight = self._spawn(self._exchange(self._key(tenant), code, code_hash, allow_company_change))
            self._exchanges[code_hash] = (tenant, flight)
            flight.add_done_callback(lambda _: self._exchanges.pop(code_hash, None))
        elif existing[0] != tenant:
            raise CodeReused(
                f"this authorization code was already presented for another tenant, not {tenant!r}"
            )
        else:
            flight = existing[1]
        return await asyncio.shield(flight)

    async def _exchange(self, key: TenantKey, code: str, code_hash: str, allow_change: bool) -> TokenSet:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        owner = secrets.token_hex(16)
        while True:
            if loop.time() >= deadline:
                raise RefreshTimeout(f"tenant {key.tenant!r}: the code exchange did not finish in time")
            async with self._store.watch(key) as watch:
                claim = await self._store.claim_code(key, code_hash, owner, self.lease_ttl)
                if claim.key != key:
                    raise CodeReused(
                        f"this code was already presented for another tenant, not {key.tenant!r}"
                    )
                if claim.won:
                    # Patiently: a lost reply of a step that landed would leave the claim SENT
                    # for a code never sent (a replay by this owner answers True).
                    sent = await self._patiently(
                        key.tenant,
                        "the code claim's sent step",
                        functools.partial(self._store.advance_code, claim, ClaimState.SENT, self.lease_ttl),
                    )
                    if sent:
                        return await self._obs.exchange(
                            key.tenant, self._exchange_holding(claim, code, allow_change)
                        )
                    await watch.wait(min(0.05, max(deadline - loop.time(), 0.0)))
                    continue
                if claim.state is ClaimState.DONE:
                    return self._usable(key.tenant, await self._store.read(key)).tokens
                if claim.state is ClaimState.FAILED:
                    raise _claim_error(key.tenant, claim.outcome)
                if claim.expired and claim.state is ClaimState.SENT:
                    raise ExchangeInDoubt(
                        key.tenant, "the code was sent by a worker that died before storing the answer"
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RefreshTimeout(f"tenant {key.tenant!r}: another worker's exchange took too long")
                # Asked again every quarter of the claim's life: nothing announces that a
                # holder died, only its claim's expiry tells (ExchangeInDoubt, not a timeout).
                await watch.wait(min(remaining, self.lease_ttl / 4))

    async def _exchange_holding(self, claim: CodeClaim, code: str, allow_change: bool) -> TokenSet:
        key = claim.key
        deadline = asyncio.get_running_loop().time() + self.refresh_deadline
        try:
            tokens = await self._oauth.exchange_code(code, deadline=deadline)
        except RequestInDoubt as exc:
            await self._fail_claim(claim, ExchangeInDoubt(key.tenant, exc.error or "in doubt"))
            log.error(
                "tenant %r: code exchange in doubt (%s); the company must connect again",
                key.tenant,
                exc.error,
            )
            raise ExchangeInDoubt(
                key.tenant, f"the code was sent but the answer was lost ({exc.error})"
            ) from None
        except ProviderError as exc:
            await self._fail_claim(claim, exc)
            raise
        # The grant's company, read with the exchange's own deadline so the claim (SENT,
        # lease_ttl) outlives the whole step.
        unknown: ProviderError | None = None
        try:
            owner = await self._oauth.credentials(tokens.access_token, deadline=deadline)
            tokens = attrs.evolve(tokens, company_id=owner.company_id)
        except ProviderError as exc:
            unknown = exc
            log.warning("tenant %r: the new grant's company could not be read: %s", key.tenant, exc.error)
        replacing = _Replacing()
        try:
            stored = await self._patiently(
                key.tenant,
                "exchanged tokens",
                lambda: self._pin_and_store(key, tokens, allow_change, unknown, replacing),
            )
        except (StoreUnavailable, RefreshTimeout, asyncio.CancelledError) as exc:
            # Exchanged but maybe not stored: a grant stored nowhere would stay live at
            # Factorial, unseen. Revoked (a write that did land then reads as a grant that
            # needs re-authorization: seen, at least).
            await asyncio.shield(
                self._revoke_quietly(key.tenant, tokens, "a new grant that could not be stored")
            )
            if not isinstance(exc, asyncio.CancelledError):
                await self._fail_claim(claim, ExchangeInDoubt(key.tenant, "not stored"))
            raise
        except (CompanyMismatch, ProviderError, TokenSealError) as exc:
            # Revoked first: recording the failure may fail too.
            await self._revoke_quietly(key.tenant, tokens, "the refused new grant")
            await self._fail_claim(claim, exc)
            if isinstance(exc, TokenSealError):
                log.error("%s", exc)
                self._emit(TokenEvent(EventKind.SEAL_ERROR, key.tenant, tokens.fingerprint, detail=str(exc)))
            if isinstance(exc, CompanyMismatch):
                log.warning("%s", exc)
                self._emit(
                    TokenEvent(
                        EventKind.COMPANY_MISMATCH,
                        key.tenant,
                        tokens.fingerprint,
                        detail=f"company {exc.expected} kept, company {exc.got} refused and revoked",
                        company_id=exc.got,
                        previous_company_id=exc.expected,
                    )
                )
            raise
        old = replacing.old
        try:
            await self._patiently(
                key.tenant,
                "exchange's outcome",
                lambda: self._store.advance_code(claim, ClaimState.DONE, self.lease_ttl),
            )
        finally:
            # The new grant is stored whatever comes of the claim: the one it replaced goes.
            self._forget_cached(key.tenant)
            if old is not None:
                await self._revoke_quietly(key.tenant, old, "the previous grant")
        log.info("tenant %r: code exchanged, access token %s", key.tenant, tokens.fingerprint)
        company = tokens.company_id
        self._emit(TokenEvent(EventKind.EXCHANGED, key.tenant, tokens.fingerprint, company_id=company))
        if old is not None:
            detail = f"company {old.company_id or 'unknown'} -> company {tokens.company_id or 'unknown'}"
            log.info("tenant %r: reconnected, %s", key.tenant, detail)
            self._emit(
                TokenEvent(
                    EventKind.RECONNECTED,
                    key.tenant,
                    tokens.fingerprint,
                    detail=detail,
                    company_id=tokens.company_id,
                    previous_company_id=old.company_id,
                )
            )
        return stored

    async def _pin_and_store(
        self,
        key: TenantKey,
        tokens: TokenSet,
        allow_change: bool,
        unknown: ProviderError | None,
        replacing: _Replacing,
    ) -> TokenSet:
        """Store a new grant's tokens unless they belong to another company than the
        stored ones; note in ``replacing`` the tokens they replace (none for a first
        connection). Safe to call again after a lost reply: a retry that
        finds the new tokens already stored keeps what the first attempt noted, and never
        takes the new grant for the one it replaced; one that finds another connection's
        grant stored since (which replaced ours, if ours landed) writes nothing, revokes ours
        and returns that grant: the later connection wins. Returns the tokens stored. A
        stored grant whose company was never read is pinned all the same (see
        :meth:`_company_of`).

        Connections of one tenant take turns on a lease of their own (a second key beside
        the tenant's, never holding a record), so two that overlap are compared with each
        other too; the write is a ``replace``, which fences out a refresh of the old grant
        in flight. If that turn stays busy longer than a refresh may take (a holder that
        died), the comparison is made without it.
        """
        won = await acquire_within(self._store, connect_turn(key), self.lease_ttl, self.refresh_deadline)
        lease = won.lease if won is not None else None
        async with self._holding(lease, None) if lease is not None else contextlib.nullcontext():
            old = await self._stored_grant(key, allow_change)
            if old is not None and old.access_token == tokens.access_token:
                return tokens  # a retry: this write landed before its reply was lost
            if replacing.tried and _grant(old) != _grant(replacing.old):
                await self._revoke_quietly(key.tenant, tokens, "a grant a later connection replaced")
                if old is None:
                    raise TenantNotConnected(key.tenant)  # forgotten meanwhile
                return old
            replacing.tried, replacing.old = True, old
            if old is not None and not allow_change:
                pinned = await self._company_of(key, old, tokens)
                if unknown is not None:
                    raise unknown  # cannot tell the company: never replace a pinned tenant blindly
                if tokens.company_id != pinned:
                    raise CompanyMismatch(key.tenant, pinned, tokens.company_id or "unknown")
            await self._store.replace(key, self._update(key, tokens))
            return tokens

    async def _company_of(self, key: TenantKey, old: TokenSet, new: TokenSet) -> str:
        """The company of the stored grant ``old`` that ``new`` would replace. One connected
        while the credentials endpoint failed has none stored: it is asked of Factorial with
        the grant's own access token; if that cannot be done (the token expired, or was
        refused), the new grant is refused, since it may be a stranger's (CompanyMismatch,
        expected ``unknown``)."""
        if old.company_id is not None:
            return old.company_id
        if not old.is_expired():
            # A deadline of its own: a write retried while the store is down comes after
            # the exchange's, and a timeout would read as a company mismatch.
            deadline = asyncio.get_running_loop().time() + self.refresh_deadline
            try:
                found = await self._oauth.credentials(old.access_token, deadline=deadline)
            except ProviderError as exc:
                log.warning("tenant %r: the stored grant's company is unknown: %s", key.tenant, exc.error)
            else:
                if found.company_id is not None:
                    return found.company_id
        raise CompanyMismatch(key.tenant, "unknown", new.company_id or "unknown")

    async def _stored_grant(self, key: TenantKey, allow_change: bool) -> TokenSet | None:
        """The tokens a new grant replaces, or None (none stored).

        A stored record that cannot be opened (its payload, or the row itself) may hold
        another company's grant: it is kept and the new grant refused (TokenSealError),
        unless ``allow_change``."""
        try:
            record = await self._store.read(key)
            return None if record is None else self._codec.decode(key, record.payload)
        except TokenSealError as exc:
            if not allow_change:
                raise TokenSealError(_UNREADABLE.format(tenant=key.tenant)) from exc
            log.warning("tenant %r: the replaced record cannot be opened (%s)", key.tenant, exc)
            return None

    async def _fail_claim(self, claim: CodeClaim, exc: FactorialTokensError) -> None:
        """Record a code claim's failure so duplicates of its callback get the same error."""
        if isinstance(exc, CompanyMismatch):
            outcome: dict[str, Any] = {"company_mismatch": [exc.expected, exc.got]}
        elif isinstance(exc, TokenSealError):
            outcome = {"seal_error": True}
        elif isinstance(exc, ProviderError):
            outcome = {"status": exc.status, "error": exc.error, "description": exc.description}
        else:
            outcome = {"in_doubt": True}
        try:
            await self._store.advance_code(claim, ClaimState.FAILED, self.lease_ttl, json.dumps(outcome))
        except StoreUnavailable as error:
            # Best effort: the caller gets the failure itself; an unrecorded claim expires
            # SENT, and its retried callbacks hear that the company must connect again.
            log.warning("tenant %r: could not record the failed exchange: %s", claim.key.tenant, error)
