"""TokenManager: cached, single-flight, lease-fenced token management for many tenants.

Data flows one way: caller -> TokenManager -> (Store, OAuthClient).

* Hot path: a cached token fresh beyond the leeway is returned with no I/O.
* Two windows, as botocore's refreshable credentials: inside the leeway (advisory) callers
  still get the cached token at cache-hit cost while one background refresh runs; only
  below ``min_valid`` (mandatory), or with no token, does a caller wait for the refresh.
* In-process single-flight: one task per tenant (per code) does the work; callers await
  it through ``asyncio.shield``, so a cancelled caller never cancels a refresh in flight.
* Across processes: the store's lease (with a fencing number) picks one refresher; the
  others wait for the store's announcement and read the result. No refresh ever happens
  without the lease (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import attrs

from ._client import TenantSession
from ._codec import JsonCodec, PayloadCodec
from ._errors import (
    AuthorizationDenied,
    CodeReused,
    CompanyMismatch,
    ConfigurationError,
    ExchangeInDoubt,
    FactorialTokensError,
    InvalidCallback,
    InvalidState,
    ManagerClosed,
    ProviderError,
    ReauthorizationRequired,
    RefreshTimeout,
    RequestInDoubt,
    RotationLost,
    StateReused,
    StoreUnavailable,
    TenantNotConnected,
    TokenSealError,
)
from ._events import EventDispatcher, EventKind, Listener, TokenEvent
from ._health import Health, check_health
from ._keepalive import DEFAULT_CONCURRENCY, DEFAULT_MAX_AGE, KeepAliveReport, keep_alive
from ._logs import OperationContext, bind, install
from ._models import Credentials, FactorialApp, TokenSet, fingerprint, validate_tenant
from ._oauth import OAuthClient
from ._sealing import Keyring, SealedCodec
from ._state import LinkSigner, StateSigner
from ._store import (
    ClaimState,
    CodeClaim,
    Lease,
    Record,
    Store,
    TenantKey,
    TenantStatus,
    Throttle,
    Update,
    acquire_within,
    hold_digest,
    store_from_url,
)
from ._telemetry import Observer, Telemetry, TenantCounts, store_scheme

__all__ = ["CallbackResult", "TenantInfo", "TokenManager"]

log = logging.getLogger("factorial_tokens")

T = TypeVar("T")

_MAX_CODE = 2048
#: A failed background refresh is retried after this (doubling per failure, jittered) ...
_ADVISORY_BACKOFF = 0.5
#: ... up to this many seconds.
_ADVISORY_BACKOFF_MAX = 30.0
#: Appended to the namespace for the key whose lease connections of a tenant take turns on
#: (it never holds a record, so no listing shows it).
_CONNECT_TURN = "/connect-turn"


@attrs.frozen
class TenantInfo:
    """A tenant as listed by :meth:`TokenManager.tenants` (metadata only, no tokens)."""

    tenant: str
    status: TenantStatus
    expires_at: float | None
    refreshed_at: float
    version: int

    @property
    def needs_reauthorization(self) -> bool:
        """True when the company must connect again."""
        return self.status is TenantStatus.NEEDS_REAUTH


@attrs.frozen
class CallbackResult:
    """What :meth:`TokenManager.complete_callback` returns: the tenant the callback was for
    (from its signed state) and the tenant's tokens (``tokens.company_id`` names the company)."""

    tenant: str
    tokens: TokenSet


@attrs.frozen
class _Entry:
    tokens: TokenSet
    version: int
    due: float  # the advisory window opens: refresh in the background
    must: float  # the mandatory window opens: callers wait for a refresh


class TokenManager:
    """Keeps OAuth tokens valid for many Factorial tenants across processes and hosts.

    Args:
        app: the OAuth application.
        store: a store URL (``memory://``, ``sqlite:///path``, ``redis://``, ...) or a Store.
            A store built from a URL is closed with the manager; an injected one is not.
            There is no default on purpose: the store decides how far the guarantees reach
            (``memory://`` is one process only), so every deployment names its own.
        leeway: refresh this many seconds before expiry (at most half the token's lifetime):
            the advisory window. The first caller inside it starts one background refresh;
            every caller still gets the current token at cache-hit cost.
        min_valid: the mandatory window: a caller waits for a refresh only when the token
            has less than this left (default ``leeway / 4``; scaled down with the leeway for
            short-lived tokens). Must be in ``[0, leeway]``.
        lease_ttl: how long a refresher's lease lives without renewal.
        provider_timeout: the longest one HTTP attempt may take.
        refresh_deadline: the whole budget of one refresh or exchange, retries included;
            default two thirds of ``lease_ttl``.
        wait_timeout: the longest a caller waits for another worker's refresh; default
            ``2 * lease_ttl``.
        state_ttl: how long an authorization ``state`` stays valid.
        session: an aiohttp session to use for Factorial (not closed by the manager).
        codec: how token sets are written to the store (plain JSON by default).
        keyring: seal token material at rest with AES-GCM under this keyring
            (:class:`~factorial_tokens.SealedCodec`); default: the keyring in
            ``FACTORIAL_TOKENS_KEYS`` if that variable is set, else none. Not together
            with ``codec``. With a keyring, plain (unsealed) records are refused with
            TokenSealError: someone without the key wrote them.
        allow_plaintext: with a keyring, read plain records anyway: only while migrating
            a store written before sealing was on, until :func:`~factorial_tokens.rekey`
            has sealed them.
        on_event: called with every :class:`TokenEvent`, on a background thread (off the
            refresh path); exceptions it raises are logged.
        refresh_rate: a refresh budget shared by every worker of the app (refreshes per
            minute, a token bucket in the store), so that a cold start of thousands of
            tenants stays under the provider's rate limit; default none. Independently of
            it, a 429 (or 503 with ``Retry-After``) from the token endpoint holds every
            worker's refreshes until its ``Retry-After``.
        refresh_burst: how many refreshes the budget lets through at once (default a
            second's worth, at least one).
        max_refreshes: refreshes this process runs at once (each holds a lease and a
            provider connection; aiohttp's default pool has 100). Others wait, without a
            lease, so other workers can take those tenants.
        telemetry: OpenTelemetry providers and options (:class:`Telemetry`); default:
            the global providers, when ``opentelemetry-api`` is installed.

    The time budgets must nest: ``provider_timeout <= refresh_deadline < lease_ttl <
    wait_timeout``, else ConfigurationError.

    Limitations: a worker paused for longer than its lease (a stopped VM, a debugger) may
    still have one request in flight; fencing keeps it from overwriting newer tokens, but
    the provider may have rotated the token it sent.
    """

    def __init__(
        self,
        app: FactorialApp,
        store: str | Store,
        *,
        leeway: float = 60.0,
        min_valid: float | None = None,
        lease_ttl: float = 30.0,
        provider_timeout: float = 10.0,
        refresh_deadline: float | None = None,
        wait_timeout: float | None = None,
        state_ttl: float = 600.0,
        session: aiohttp.ClientSession | None = None,
        codec: PayloadCodec | None = None,
        keyring: Keyring | None = None,
        allow_plaintext: bool = False,
        on_event: Listener | None = None,
        refresh_rate: float | None = None,
        refresh_burst: int | None = None,
        max_refreshes: int = 100,
        telemetry: Telemetry | None = None,
    ) -> None:
        refresh_deadline = lease_ttl * 2 / 3 if refresh_deadline is None else refresh_deadline
        wait_timeout = lease_ttl * 2 if wait_timeout is None else wait_timeout
        if leeway < 0:
            raise ConfigurationError("leeway must not be negative")
        min_valid = leeway / 4 if min_valid is None else min_valid
        if not 0 <= min_valid <= leeway:
            raise ConfigurationError(f"min_valid must be in [0, leeway] (got {min_valid}, leeway {leeway})")
        if not 0 < provider_timeout <= refresh_deadline < lease_ttl < wait_timeout:
            raise ConfigurationError(
                "time budgets must nest: 0 < provider_timeout <= refresh_deadline < lease_ttl "
                f"< wait_timeout (got {provider_timeout}, {refresh_deadline}, {lease_ttl}, {wait_timeout})"
            )
        if refresh_rate is not None and not refresh_rate > 0:
            raise ConfigurationError(f"refresh_rate must be positive, per minute (got {refresh_rate})")
        if max_refreshes < 1:
            raise ConfigurationError(f"max_refreshes must be at least 1 (got {max_refreshes})")
        if refresh_burst is not None and refresh_burst < 1:
            raise ConfigurationError(f"refresh_burst must be at least 1 (got {refresh_burst})")
        self.app = app
        self.leeway = leeway
        self.min_valid = min_valid
        self.lease_ttl = lease_ttl
        self.refresh_deadline = refresh_deadline
        self.wait_timeout = wait_timeout
        self._owns_store = isinstance(store, str)
        self._store: Store = store_from_url(store) if isinstance(store, str) else store
        self._oauth = OAuthClient(
            app, session=session, timeout=provider_timeout, on_retry_after=self._provider_held
        )
        self.refresh_rate = refresh_rate
        self._interval = 0.0 if refresh_rate is None else 60.0 / refresh_rate
        self._burst = refresh_burst or max(1, int((refresh_rate or 0) // 60))
        self._hold_digest = hold_digest(app.client_id)
        self._slots = asyncio.Semaphore(max_refreshes)
        self._not_before = 0.0  # wall clock: no refresh is sent before (a 429's Retry-After)
        if keyring is not None and codec is not None:
            raise ConfigurationError("pass a keyring or a codec, not both")
        if codec is None:
            keyring = Keyring.from_env() if keyring is None else keyring
            codec = JsonCodec() if keyring is None else SealedCodec(keyring, allow_plaintext=allow_plaintext)
        self._codec: PayloadCodec = codec
        self.state_ttl = state_ttl
        self._signer = StateSigner(app, state_ttl)
        self._links = LinkSigner(app, 3600.0)
        self._events = EventDispatcher()
        if on_event is not None:
            self._events.add(on_event)
        self._cache: dict[str, _Entry] = {}
        self._hits = 0
        self._obs = Observer(
            telemetry,
            store=store_scheme(self._store),
            namespace=app.client_id,
            publish=self._events.publish,
            hits=lambda: self._hits,
            list_tenants=lambda: self._store.tenants(self.app.client_id),
        )
        self._store = self._obs.wrap_store(self._store)
        install()  # structured fields on the records of loggers created since import (plugins)
        self._oauth.observer = self._obs.provider_answer
        self._digests: dict[str, str] = {}
        self._flights: dict[str, asyncio.Task[_Entry]] = {}
        self._advisory: set[str] = set()  # tenants whose flight is a background refresh
        self._forced: set[str] = set()  # tenants whose flight forces a new token set
        self._backoff: dict[str, tuple[int, float]] = {}  # failed advisory refreshes, retry at
        self._exchanges: dict[str, tuple[str, asyncio.Task[TokenSet]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"TokenManager(client_id={self.app.client_id!r}, store={self._store!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> TokenManager:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Check the store answers and subscribe to its change announcements."""
        self._check_open()
        await self._store.check()
        if self._unsubscribe is None:
            self._unsubscribe = self._store.on_change(self._on_change)
            self._obs.attach()

    async def aclose(self) -> None:
        """Let work in flight finish, then close what the manager created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.wait_timeout)
        for task in self._tasks:
            task.cancel()
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self._oauth.aclose()
        self._obs.close()
        await self._events.aclose()
        if self._owns_store:
            await self._store.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosed("this TokenManager is closed; create a new one")

    @property
    def store(self) -> Store:
        """The store this manager uses."""
        return self._obs.unwrap(self._store)

    # -- authorization ---------------------------------------------------------------

    def authorization_url(
        self,
        tenant: str,
        *,
        company: bool = False,
        scope: str | None = None,
        binding: str | None = None,
    ) -> str:
        """The Factorial URL that lets ``tenant``'s admin grant access, with a signed state.

        ``company=True`` asks for a company token (``resource_owner_type=company``).
        ``binding`` is a value the application ties to the browser that starts the flow
        (e.g. a random value in an HttpOnly cookie); only a keyed hash of it goes into the
        state, and :meth:`complete_callback` then requires the same value, so a callback
        completed in another browser (a victim's admin sent this URL) is refused.
        """
        tenant = validate_tenant(tenant)
        if binding is not None and not binding:
            raise ConfigurationError("binding must be a non-empty string, or None")
        state = self._signer.sign(tenant, binding=binding)
        return self._oauth.authorization_url(state, company=company, scope=scope)

    def tenant_from_state(self, state: object) -> str:
        """The tenant a callback's ``state`` was issued for; raises InvalidState."""
        return self._signer.verify(state)[0]

    def verify_state(self, state: object) -> tuple[str, str]:
        """``(tenant, nonce)`` of a valid state; raises InvalidState."""
        return self._signer.verify(state)

    def connect_link(self, tenant: str, *, ttl: float = 3600.0, base_url: str | None = None) -> str:
        """A signed link that lets its holder start connecting ``tenant`` for ``ttl`` seconds.

        The link is ``<base_url>/connect/<tenant>?link=<signed token>``; ``base_url``
        defaults to the redirect URI's origin (where ``factorial-tokens serve`` and
        :func:`~factorial_tokens.connect_app` answer); pass the mount point when the routes
        live under a prefix (``https://example.com/factorial``). ``connect_app`` refuses
        ``/connect/{tenant}`` without a valid link (403) unless built with ``open_routes=True``.
        Anyone holding the link can start the flow: send it to the tenant's admin only.
        """
        tenant = validate_tenant(tenant)
        if not ttl > 0:
            raise ConfigurationError("a connect link's ttl must be positive")
        if base_url is None:
            parts = urlsplit(self.app.redirect_uri)
            base_url = f"{parts.scheme}://{parts.netloc}"
        token = self._links.sign(tenant, ttl=ttl)
        return f"{base_url.rstrip('/')}/connect/{quote(tenant, safe='')}?{urlencode({'link': token})}"

    def check_connect_link(self, link: object, tenant: str) -> None:
        """Raise InvalidState unless ``link`` (the ``link`` query value of a
        :meth:`connect_link`) is valid, unexpired and for ``tenant``."""
        self._links.verify(link, validate_tenant(tenant))

    async def complete_callback(
        self,
        *,
        state: object,
        code: object = None,
        error: object = None,
        binding: str | None = None,
        allow_company_change: bool = False,
    ) -> CallbackResult:
        """Finish an OAuth callback, whatever the web framework: verify, spend, exchange.

        Pass the callback's query values as they came (``state``, ``code``, ``error``)
        and the browser's ``binding`` (the value given to :meth:`authorization_url`; None
        if none was). In order:

        1. the state's signature, app and expiry are checked (InvalidState); nothing of a
           callback without a valid state is shown or sent anywhere;
        2. the binding must be the one the state was issued with: a bound state needs the
           same value, an unbound one needs None (InvalidState: "another browser");
        3. ``error=`` raises AuthorizationDenied (no request to Factorial);
        4. the code must be present and well-formed (InvalidCallback; the state is not spent);
        5. the state's nonce is spent once, fleet-wide, through the store: the same state
           with the same code again (a retried callback) goes on and gets the same result,
           the same state with another code raises StateReused (nothing sent);
        6. the code is exchanged exactly once (:meth:`exchange_code`), pinned to the
           tenant's company (CompanyMismatch unless ``allow_company_change``).

        Returns a :class:`CallbackResult` ``(tenant, tokens)``. Also raises what
        :meth:`exchange_code` raises (CodeReused, ProviderError, ExchangeInDoubt,
        StoreUnavailable, RefreshTimeout).
        """
        self._check_open()
        claims = self._signer.check(state)
        tenant = claims.tenant
        if binding is not None and (not isinstance(binding, str) or not binding):
            binding = "\x00"  # a malformed binding never matches anything
        if not claims.binding_matches(binding, self._signer):
            raise InvalidState(
                "this connection was started in another browser (or its cookie is missing): "
                "start the connection again from this browser"
            )
        if error is not None:
            raise AuthorizationDenied(tenant, _oauth_error_code(error))
        code = _check_code(code)
        if not await self._spend_nonce(tenant, claims.nonce, code):
            raise StateReused(
                f"this connection of tenant {tenant!r} was already completed with another "
                "authorization; start the connection again"
            )
        tokens = await self.exchange_code(tenant, code, allow_company_change=allow_company_change)
        return CallbackResult(tenant, tokens)

    async def _spend_nonce(self, tenant: str, nonce: str, code: str) -> bool:
        """Bind a state's nonce to the first code it arrives with; True for that code.

        The first callback claims the nonce for its code in the store, so every worker
        agrees; the same code again passes (the exchange itself is idempotent), another
        code is refused. Finished claims are kept for a day, longer than any state lives.
        """
        nonce_hash = "state:" + hashlib.sha256(nonce.encode()).hexdigest()
        # The claim's owner is derived from the code, so a duplicate of the same callback
        # holds the same claim; it is also kept as the finished claim's outcome.
        binding = hmac.new(
            self.app.client_secret.encode(), b"state-binding\x00" + code.encode(), hashlib.sha256
        ).hexdigest()
        key = self._key(tenant)
        for _ in range(3):
            claim = await self._store.claim_code(key, nonce_hash, binding, self.lease_ttl)
            same = claim.won or (claim.outcome is not None and hmac.compare_digest(claim.outcome, binding))
            if claim.key != key or not same:
                return False
            if claim.state is not ClaimState.CLAIMED:
                return True
            if await self._store.advance_code(claim, ClaimState.DONE, self.lease_ttl, binding):
                return True
            # A duplicate of this very callback finished the claim first: read it again.
        return False

    # -- the hot path ----------------------------------------------------------------

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

    async def _current(self, tenant: str) -> _Entry:
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
                entry = await self._valid(tenant)
            except StoreUnavailable as exc:
                stale = self._cache.get(tenant)
                if stale is not None and not stale.tokens.is_expired():
                    log.warning("store unavailable; serving tenant %r's cached token till it expires", tenant)
                    self._obs.stale_served(tenant, stale.tokens.fingerprint, exc)
                    return stale
                raise
        assert entry is not None
        if time.time() >= entry.due:
            self._advise(tenant)
        return entry

    async def _valid(self, tenant: str) -> _Entry:
        """An entry outside the mandatory window: the store's, or a refreshed one."""
        if tenant in self._advisory and tenant in self._flights:
            # A background refresh is under way and the cache was dropped (an announcement):
            # the stored token may still do, so read it rather than wait for the refresh.
            entry = self._usable(tenant, await self._store.read(self._key(tenant)))
            if time.time() < entry.must:
                return self._remember(tenant, entry)
        return await self._obtain(tenant, newer_than=None)

    def _advise(self, tenant: str) -> None:
        """Start one background refresh of ``tenant`` unless one flies or a failed one
        is backing off. Callers never await it; its failure is logged, never raised."""
        if tenant in self._flights or self._closed:
            return
        backoff = self._backoff.get(tenant)
        if backoff is not None and time.monotonic() < backoff[1]:
            return
        flight = self._launch(tenant, newer_than=None, advisory=True)
        self._advisory.add(tenant)
        flight.add_done_callback(functools.partial(self._advised, tenant))

    def _advised(self, tenant: str, flight: asyncio.Task[_Entry]) -> None:
        """A background refresh ended: forget its backoff, or log it and back off."""
        self._advisory.discard(tenant)
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

    async def refresh(self, tenant: str) -> TokenSet:
        """Force a new token set (single-flight, under the lease).

        If another worker refreshed since this process last saw the tenant, its result is
        returned instead of refreshing again.
        """
        self._check_open()
        tenant = validate_tenant(tenant)
        entry = self._cache.get(tenant)
        if entry is None and tenant in self._forced:
            # Nothing cached, but a forced refresh is in flight: its result is newer than
            # anything this caller could read now, and a read answered after it committed
            # would take it for an old one and force a second refresh.
            return (await self._obtain(tenant, newer_than=None)).tokens
        if entry is None:
            record = await self._store.read(self._key(tenant))
            entry = self._usable(tenant, record) if record else None
        seen = entry.version if entry else 0
        return (await self._obtain(tenant, newer_than=seen)).tokens

    async def tokens(self, tenant: str) -> TokenSet:
        """The stored token set, read from the store without refreshing it."""
        self._check_open()
        tenant = validate_tenant(tenant)
        record = await self._store.read(self._key(tenant))
        return self._usable(tenant, record).tokens

    # -- single-flight ---------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _launch(self, tenant: str, *, newer_than: int | None, advisory: bool = False) -> asyncio.Task[_Entry]:
        flight = self._spawn(self._fly(tenant, newer_than, advisory))
        self._flights[tenant] = flight
        if newer_than is None:
            self._forced.discard(tenant)
        else:
            self._forced.add(tenant)
        flight.add_done_callback(functools.partial(self._land, tenant))
        return flight

    async def _obtain(self, tenant: str, *, newer_than: int | None) -> _Entry:
        """Join (or start) the tenant's flight until it yields an acceptable entry."""
        while True:
            flight = self._flights.get(tenant)
            joined_advisory = flight is not None and tenant in self._advisory
            if flight is None:
                flight = self._launch(tenant, newer_than=newer_than)
            try:
                entry = await asyncio.shield(flight)
            except (ProviderError, StoreUnavailable, RefreshTimeout):
                # A background refresh gave up (it stops retrying when the mandatory window
                # opens): a caller that must wait starts one of its own instead.
                if joined_advisory and self._flights.get(tenant) is not flight:
                    continue
                raise
            if newer_than is None or entry.version > newer_than or not _renewable(entry.tokens):
                return entry
            # A finished flight is awaited without yielding, and its landing may not have run
            # yet: forget it here, or this loop would join it again forever.
            self._land(tenant, flight)

    def _land(self, tenant: str, flight: asyncio.Task[_Entry]) -> None:
        """Forget a finished flight (unless a newer one took its place)."""
        if self._flights.get(tenant) is flight:
            del self._flights[tenant]
            self._forced.discard(tenant)
        if not flight.cancelled():
            flight.exception()  # mark retrieved: callers that awaited it got it already

    def _acceptable(self, entry: _Entry, newer_than: int | None, advisory: bool) -> bool:
        """Forced: newer than ``newer_than``; advisory: not yet due; else: not yet in the
        mandatory window (the caller starts the advisory refresh itself)."""
        if newer_than is not None:
            return entry.version > newer_than
        return time.time() < (entry.due if advisory else entry.must)

    async def _fly(self, tenant: str, newer_than: int | None, advisory: bool = False) -> _Entry:
        """Across processes: read; if stale, take the lease or wait for whoever has it.

        When this process already knows its cached entry is stale, the first read is left
        out: the acquisition returns the record, so a refresh is two round trips (acquire,
        commit). A cold process reads first, so that a fresh stored token costs one read
        and no lease (a lease taken and given back would wake every other worker).
        """
        key = self._key(tenant)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.wait_timeout
        waited = False
        bind(OperationContext(tenant, "refresh", self._obs.store))  # for log records (own task)
        cached = self._cache.get(tenant)
        known_stale = cached is not None and not self._acceptable(cached, newer_than, advisory)
        while True:
            async with self._store.watch(key) as watch:
                if not known_stale:
                    entry = self._usable(tenant, await self._store.read(key))
                    if self._acceptable(entry, newer_than, advisory):
                        if waited:
                            self._obs.lease_waited(loop.time() - started)
                        return self._remember(tenant, entry)
                known_stale = False  # after a wait, someone else's result is likely: read
                # A lease is taken only with a free provider slot: a lease held while its
                # request queues for a connection could lapse under a large backlog, and
                # the tenants this process cannot start yet stay free for other workers.
                async with self._slots:
                    owner = secrets.token_hex(16)
                    won = await self._store.acquire(key, owner, self.lease_ttl)
                    if won.lease is not None:
                        if waited:
                            self._obs.lease_waited(loop.time() - started)
                            waited = False
                        before = won.record.version if won.record else None
                        result = await self._obs.refresh(
                            won.lease,
                            before,
                            self._refresh_holding(won.lease, won.record, newer_than, advisory),
                        )
                        if result is not None:
                            return self._remember(tenant, result)
                if won.lease is None:
                    seen = self._usable(tenant, won.record)
                    if self._acceptable(seen, newer_than, advisory):
                        if waited:
                            self._obs.lease_waited(loop.time() - started)
                        return self._remember(tenant, seen)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._obs.refresh_timeout(tenant, loop.time() - started)
                    raise RefreshTimeout(
                        f"tenant {tenant!r}: no fresh token within {self.wait_timeout:g}s "
                        "(the refresh lease stayed busy or was lost)"
                    )
                if won.lease is not None:
                    continue
                log.debug("tenant %r: waiting for another worker's refresh", tenant)
                waited = True
                await watch.wait(remaining)

    async def _refresh_holding(
        self, lease: Lease, record: Record | None, newer_than: int | None, advisory: bool = False
    ) -> _Entry | None:
        """Refresh while holding ``lease``; ``None`` means "start over" (lease lost)."""
        tenant = lease.key.tenant
        committed = False
        lost = asyncio.Event()
        # No watchdog task for a refresh that ends within a third of the lease (nearly all).
        watchdog: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            self.lease_ttl / 3, lambda: watchdog.append(self._spawn(self._renew(lease, lost)))
        )
        try:
            entry = self._usable(tenant, record)
            if self._acceptable(entry, newer_than, advisory):
                return entry  # someone refreshed between our read and our acquire
            old = entry.tokens
            assert record is not None  # _usable raised otherwise
            if not _renewable(old):
                return entry  # a company token that never expires: nothing to refresh
            if old.refresh_token is None:
                self._obs.note(lease, "no_refresh_token")
                error = await self._mark_dead(lease, record, "no refresh token to renew an expiring token")
                committed = True
                if error is None:
                    return None
                raise error
            loop = asyncio.get_running_loop()
            await self._admitted(tenant, loop.time() + self.refresh_deadline)
            # The provider call gets its whole budget after the wait: a request cut short by
            # a spent deadline would be in doubt, and its retry could cost the grant.
            deadline = loop.time() + self.refresh_deadline
            if lost.is_set():
                return None
            # A background refresh stops retrying when the mandatory window opens: callers
            # who must wait then start a refresh of their own at once, rather than wait
            # out this one's backoff.
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
                        lease,
                        record,
                        "the refresh token was rotated by a request whose answer was lost",
                        error=RotationLost,
                    )
                    committed = True
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
                error = await self._mark_dead(
                    lease, record, "Factorial refused the refresh token (invalid_grant)"
                )
                committed = True
                if error is None:
                    return None
                raise error from None
            if new.refresh_token is None:
                # RFC 6749 section 6: no new refresh token means the current one stays valid.
                new = attrs.evolve(new, refresh_token=old.refresh_token)
            if new.company_id is None:
                new = attrs.evolve(new, company_id=old.company_id)
            update = self._update(lease.key, new)
            stored = await self._patiently(
                tenant, "refreshed tokens", lambda: self._store.commit(lease, update)
            )
            committed = True
            if stored is None:
                self._obs.note(lease, "fenced_out")
                log.error(
                    "tenant %r: lease lost before writing refreshed tokens %s; they are discarded",
                    tenant,
                    new.fingerprint,
                )
                return None
            log.info(
                "tenant %r: refreshed, access token %s, expires in %s",
                tenant,
                new.fingerprint,
                "never" if new.lifetime is None else f"{new.lifetime:.0f}s",
            )
            self._emit(TokenEvent(EventKind.REFRESHED, tenant, new.fingerprint, stored.version))
            return self._entry_of(new, stored.version)
        finally:
            timer.cancel()
            for task in watchdog:
                task.cancel()
            if not committed:
                # Shielded: the lease must go back even if this task is being cancelled.
                with contextlib.suppress(FactorialTokensError):
                    await asyncio.shield(self._store.release(lease))

    # -- fleet-wide back-pressure -----------------------------------------------------

    def _provider_held(self, seconds: float) -> None:
        """The token endpoint said 429 (or 503 with Retry-After): hold every worker."""
        until = time.time() + seconds
        if until <= self._not_before:
            return
        self._not_before = until
        log.warning("the provider asked to hold refreshes for %.1fs; holding every worker", seconds)
        if isinstance(self._store, Throttle) and not self._closed:
            self._spawn(self._share_hold(until))

    async def _share_hold(self, until: float) -> None:
        assert isinstance(self._store, Throttle)
        try:
            await self._store.hold(self.app.client_id, until)
        except StoreUnavailable as exc:
            log.warning("could not share the provider's hold with other workers: %s", exc)

    async def _learn_hold(self) -> None:
        """Another worker recorded a hold (or announcements were lost): read it."""
        assert isinstance(self._store, Throttle)
        try:
            self._not_before = max(self._not_before, await self._store.hold(self.app.client_id, 0.0))
        except StoreUnavailable as exc:
            log.warning("could not read the fleet's refresh hold: %s", exc)

    async def _admitted(self, tenant: str, deadline: float) -> None:
        """Wait until a refresh may be sent: past the fleet's hold and, with a
        ``refresh_rate``, with a unit of the shared budget. Raises ProviderError when that
        is later than ``deadline`` (callers with a valid token never see it)."""
        loop = asyncio.get_running_loop()
        ticket = secrets.token_hex(8)
        while True:
            wait = self._not_before - time.time()
            if wait <= 0 and self._interval > 0 and isinstance(self._store, Throttle):
                wait = await self._store.admit(self.app.client_id, ticket, self._interval, self._burst)
            if wait <= 0:
                return
            if loop.time() + wait >= deadline:
                raise ProviderError(
                    429, "rate_limited", f"refreshes are held {wait:.1f}s more, past this refresh's deadline"
                )
            log.debug("tenant %r: refresh held %.2fs by the fleet's back-pressure", tenant, wait)
            await asyncio.sleep(wait)

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

    async def _mark_dead(
        self,
        lease: Lease,
        record: Record,
        reason: str,
        *,
        error: type[ReauthorizationRequired] = ReauthorizationRequired,
    ) -> ReauthorizationRequired | None:
        """Record (fenced) that the tenant needs re-authorization; return the error to raise,
        or ``None`` when the write was refused (someone reconnected or refreshed meanwhile:
        the tenant may be fine, so start over)."""
        tenant = lease.key.tenant
        update = Update(record.payload, TenantStatus.NEEDS_REAUTH, record.expires_at, record.updated_at)
        self._forget_cached(tenant)
        if await self._store.commit(lease, update) is None:
            log.info("tenant %r: the store changed before it could be marked dead; re-reading", tenant)
            return None
        log.error("tenant %r needs re-authorization: %s", tenant, reason)
        self._emit(TokenEvent(EventKind.REAUTHORIZATION_REQUIRED, tenant, detail=reason))
        return error(tenant, reason)

    async def _renew(self, lease: Lease, lost: asyncio.Event) -> None:
        """Watchdog: keep the lease alive while its holder works (started a third of the
        lease into the work, then renewing every third)."""
        while True:
            try:
                if not await self._store.extend(lease, self.lease_ttl):
                    lost.set()
                    return
            except StoreUnavailable:
                log.warning("tenant %r: could not renew the lease; retrying", lease.key.tenant)
            await asyncio.sleep(self.lease_ttl / 3)

    # -- code exchange ---------------------------------------------------------------

    async def exchange_code(self, tenant: str, code: str, *, allow_company_change: bool = False) -> TokenSet:
        """Exchange an authorization code for ``tenant``'s tokens, exactly once per code.

        Concurrent and repeated calls with one code return the tenant's tokens after a
        single provider exchange. The new grant's company is read from Factorial's
        credentials endpoint and kept with the tokens (``TokenSet.company_id``): a tenant
        already connected to another company raises CompanyMismatch, keeps its stored
        tokens, and the unwanted grant is revoked at Factorial, unless
        ``allow_company_change=True``. When the tenant had tokens, its previous grant is
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
        _check_code(code)
        code_hash = hmac.new(self.app.client_secret.encode(), code.encode(), hashlib.sha256).hexdigest()
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
                    if await self._store.advance_code(claim, ClaimState.SENT, self.lease_ttl):
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
                await watch.wait(remaining)

    async def _exchange_holding(self, claim: CodeClaim, code: str, allow_change: bool) -> TokenSet:
        key = claim.key
        deadline = asyncio.get_running_loop().time() + self.refresh_deadline
        try:
            tokens = await self._oauth.exchange_code(code, deadline=deadline)
        except RequestInDoubt as exc:
            await self._store.advance_code(
                claim, ClaimState.FAILED, self.lease_ttl, json.dumps({"in_doubt": True})
            )
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
        replaced: list[TokenSet] = []  # what the first attempt found stored (a retry may find ours)
        try:
            await self._patiently(
                key.tenant,
                "exchanged tokens",
                lambda: self._pin_and_store(key, tokens, allow_change, unknown, replaced),
            )
        except (CompanyMismatch, ProviderError) as exc:
            await self._fail_claim(claim, exc)
            await self._revoke_quietly(key.tenant, tokens, "the refused new grant")
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
        await self._patiently(
            key.tenant,
            "exchange's outcome",
            lambda: self._store.advance_code(claim, ClaimState.DONE, self.lease_ttl),
        )
        self._forget_cached(key.tenant)
        log.info("tenant %r: code exchanged, access token %s", key.tenant, tokens.fingerprint)
        company = tokens.company_id
        self._emit(TokenEvent(EventKind.EXCHANGED, key.tenant, tokens.fingerprint, company_id=company))
        old = replaced[0] if replaced else None
        if old is not None:
            await self._revoke_quietly(key.tenant, old, "the previous grant")
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
        return tokens

    async def _pin_and_store(
        self,
        key: TenantKey,
        tokens: TokenSet,
        allow_change: bool,
        unknown: ProviderError | None,
        replaced: list[TokenSet],
    ) -> None:
        """Store a new grant's tokens unless they belong to another company than the
        stored ones; note in ``replaced`` the tokens they replace (none for a first
        connection). Safe to call again after a lost reply: a retry that finds the new
        tokens already stored keeps what the first attempt noted, and never takes the new
        grant for the one it replaced.

        Connections of one tenant take turns on a lease of their own (a second key beside
        the tenant's, never holding a record), so two that overlap are compared with each
        other too; the write is a ``replace``, which fences out a refresh of the old grant
        in flight. If that turn stays busy longer than a refresh may take (a holder that
        died), the comparison is made without it.
        """
        turn = TenantKey(key.namespace + _CONNECT_TURN, key.tenant)
        won = await acquire_within(self._store, turn, self.lease_ttl, self.refresh_deadline)
        lease = won.lease if won is not None else None
        try:
            old = self._decode_replaced(key, await self._store.read(key))
            if old is not None and old.access_token == tokens.access_token:
                return  # a retry: this write landed before its reply was lost
            replaced[:] = [] if old is None else [old]
            pinned = old.company_id if old is not None else None
            if pinned is not None and not allow_change:
                if unknown is not None:
                    raise unknown  # cannot tell the company: never replace a pinned tenant blindly
                if tokens.company_id != pinned:
                    raise CompanyMismatch(key.tenant, pinned, tokens.company_id or "unknown")
            await self._store.replace(key, self._update(key, tokens))
        finally:
            if lease is not None:
                with contextlib.suppress(FactorialTokensError):
                    await asyncio.shield(self._store.release(lease))

    def _decode_replaced(self, key: TenantKey, record: Record | None) -> TokenSet | None:
        """The tokens a new grant replaces, or None (none stored, or unreadable)."""
        if record is None:
            return None
        try:
            return self._codec.decode(key, record.payload)
        except TokenSealError as exc:
            log.warning("tenant %r: the replaced record cannot be opened (%s)", key.tenant, exc)
            return None

    async def _fail_claim(self, claim: CodeClaim, exc: FactorialTokensError) -> None:
        """Record a code claim's failure so duplicates of its callback get the same error."""
        if isinstance(exc, CompanyMismatch):
            outcome: dict[str, Any] = {"company_mismatch": [exc.expected, exc.got]}
        elif isinstance(exc, ProviderError):
            outcome = {"status": exc.status, "error": exc.error, "description": exc.description}
        else:
            outcome = {"in_doubt": True}
        await self._store.advance_code(claim, ClaimState.FAILED, self.lease_ttl, json.dumps(outcome))

    async def _revoke_quietly(self, tenant: str, tokens: TokenSet, what: str) -> None:
        """Revoke a grant at Factorial, logging (not raising) a failure."""
        deadline = asyncio.get_running_loop().time() + self.refresh_deadline
        try:
            await self._oauth.revoke(tokens.refresh_token or tokens.access_token, deadline=deadline)
            log.info("tenant %r: %s (%s) revoked at Factorial", tenant, what, tokens.fingerprint)
        except FactorialTokensError as exc:
            log.warning("tenant %r: could not revoke %s (%s): %s", tenant, what, tokens.fingerprint, exc)

    # -- other operations ------------------------------------------------------------

    async def credentials(self, tenant: str) -> Credentials:
        """Who granted ``tenant``'s token (Factorial's credentials endpoint)."""
        for attempt in (1, 2):
            token = await self.access_token(tenant)
            deadline = asyncio.get_running_loop().time() + self.refresh_deadline
            try:
                return await self._oauth.credentials(token, deadline=deadline)
            except ProviderError as exc:
                if exc.status != 401 or attempt == 2:
                    raise
                await self._reload_after_401(tenant, token)
        raise AssertionError("unreachable")  # pragma: no cover

    async def token_rejected(self, tenant: str, token: str) -> str:
        """Report that Factorial's API answered 401 to ``token``; return the token to retry with.

        A newer token in the store (another worker refreshed) is used as it is; if the store
        still holds ``token``, one refresh is forced. Many callers reporting the same token
        cause at most one refresh. For HTTP clients of your own: retry the request once with
        the returned token; a second 401 is the API's answer. Raises what
        :meth:`access_token` raises.
        """
        self._check_open()
        validate_tenant(tenant)
        await self._reload_after_401(tenant, token)
        return await self.access_token(tenant)

    async def _reload_after_401(self, tenant: str, rejected: str) -> None:
        """After a 401: use a newer stored token if there is one, else force a refresh."""
        self._forget_cached(tenant)
        entry = await self._current(tenant)
        if entry.tokens.access_token == rejected:
            await self._obtain(tenant, newer_than=entry.version)

    def client(self, tenant: str) -> TenantSession:
        """An API session for ``tenant``: base URL, Bearer token, one retry after a 401.

        Use as ``async with tm.client("acme") as api: resp = await api.get("/api/...")``.
        """
        self._check_open()
        tenant = validate_tenant(tenant)
        return TenantSession(self, tenant, self._oauth.session, self.app.base_url)

    async def revoke(self, tenant: str) -> None:
        """Revoke ``tenant``'s grant at Factorial, then forget it (under the lease)."""
        self._check_open()
        tenant = validate_tenant(tenant)
        key = self._key(tenant)
        if await self._store.read(key) is None:
            raise TenantNotConnected(tenant)  # before the lease: leaves nothing behind
        async with self._lease(key) as record:
            tokens = self._usable(tenant, record, allow_reauth=True).tokens
            deadline = asyncio.get_running_loop().time() + self.refresh_deadline
            await self._oauth.revoke(tokens.refresh_token or tokens.access_token, deadline=deadline)
            await self._store.replace(key, None)
        self._forget_cached(tenant)
        log.info("tenant %r: revoked and forgotten", tenant)
        self._emit(TokenEvent(EventKind.REVOKED, tenant, tokens.fingerprint))

    async def keep_alive(
        self,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        interval: float = 3600.0,
        jitter: float = 0.2,
        once: bool = False,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> KeepAliveReport:
        """Refresh, under the lease, every tenant whose tokens are older than ``max_age``
        (jittered per tenant), every ``interval`` seconds until cancelled; ``once=True``
        runs one pass and returns its report. Skips tenants needing re-authorization and
        tokens that never expire; logs errors and goes on. ``concurrency`` tenants are
        visited at once; every refresh honours the fleet's back-pressure and ``refresh_rate``.
        See ``factorial_tokens._keepalive``.
        """
        self._check_open()
        return await keep_alive(
            self, max_age=max_age, interval=interval, jitter=jitter, once=once, concurrency=concurrency
        )

    async def forget(self, tenant: str) -> None:
        """Remove ``tenant``'s tokens from the store (without revoking them at Factorial)."""
        self._check_open()
        tenant = validate_tenant(tenant)
        await self._store.replace(self._key(tenant), None)
        self._forget_cached(tenant)
        self._emit(TokenEvent(EventKind.FORGOTTEN, tenant))

    async def tenants(self) -> list[TenantInfo]:
        """Every tenant of this app in the store, with its status (no tokens)."""
        self._check_open()
        records = await self._store.tenants(self.app.client_id)
        return sorted(
            (TenantInfo(r.key.tenant, r.status, r.expires_at, r.updated_at, r.version) for r in records),
            key=lambda info: info.tenant,
        )

    @contextlib.asynccontextmanager
    async def _lease(self, key: TenantKey) -> AsyncIterator[Record]:
        """Hold ``key``'s lease for a block that ends with ``replace`` (which releases it)."""
        won = await acquire_within(self._store, key, self.lease_ttl, self.wait_timeout)
        if won is None or won.lease is None:
            raise RefreshTimeout(f"tenant {key.tenant!r}: the lease stayed busy")
        lease = won.lease
        try:
            if won.record is None:
                raise TenantNotConnected(key.tenant)
            yield won.record
        finally:
            with contextlib.suppress(FactorialTokensError):
                await asyncio.shield(self._store.release(lease))

    # -- events, cache, records ------------------------------------------------------

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback`` with every event (on a background thread, in order; a
        coroutine it returns runs on the manager's loop); returns a function that removes it."""
        return self._events.add(callback)

    async def flush_events(self, timeout: float = 10.0) -> bool:
        """Wait until the listeners were handed every event emitted so far; False if
        that took longer than ``timeout`` (a listener is stuck)."""
        return await self._events.flush(timeout)

    def _emit(self, event: TokenEvent) -> None:
        self._events.publish(self._obs.complete(event))

    # -- health ----------------------------------------------------------------------

    async def health(self, *, timeout: float = 1.0) -> Health:
        """Whether this worker can do its job: the store answers (within ``timeout``),
        and how long ago Factorial last answered. What ``/healthz`` and ``/readyz`` serve."""
        return await check_health(
            self._store,
            store=self._obs.store,
            open=self._unsubscribe is not None and not self._closed,
            last_answer_at=self._obs.last_answer_at,
            timeout=timeout,
        )

    async def tenant_counts(self, max_age: float = 60.0) -> TenantCounts:
        """Tenants in the store by status (no tokens), listed at most every ``max_age``
        seconds (the ``factorial_tokens.tenants`` gauge reads the same counts)."""
        self._check_open()
        return await self._obs.count_tenants(max_age)

    def _on_change(self, digest: str | None) -> None:
        if digest is None or digest == self._hold_digest:
            if isinstance(self._store, Throttle) and not self._closed:
                self._spawn(self._learn_hold())
            if digest is not None:
                return
        if digest is None:  # announcements were lost: trust nothing cached
            self._cache.clear()
            return
        tenant = self._digests.get(digest)
        if tenant is not None:
            self._cache.pop(tenant, None)

    def _forget_cached(self, tenant: str) -> None:
        self._cache.pop(tenant, None)

    def _remember(self, tenant: str, entry: _Entry) -> _Entry:
        self._cache[tenant] = entry
        self._digests.setdefault(self._key(tenant).digest, tenant)
        return entry

    def _key(self, tenant: str) -> TenantKey:
        return TenantKey(self.app.client_id, tenant)

    def _update(self, key: TenantKey, tokens: TokenSet) -> Update:
        return Update(
            self._codec.encode(key, tokens), TenantStatus.ACTIVE, tokens.expires_at, tokens.obtained_at
        )

    def _entry(self, record: Record) -> _Entry:
        return self._entry_of(self._codec.decode(record.key, record.payload), record.version)

    def _entry_of(self, tokens: TokenSet, version: int) -> _Entry:
        """The entry with its two windows. A short-lived token's leeway shrinks to half its
        lifetime; ``min_valid`` shrinks in the same proportion."""
        due = tokens.refresh_due_at(self.leeway)
        if tokens.expires_at is None or self.leeway == 0:
            return _Entry(tokens, version, due, due)
        margin = (tokens.expires_at - due) * self.min_valid / self.leeway
        return _Entry(tokens, version, due, tokens.expires_at - margin)

    def _usable(self, tenant: str, record: Record | None, *, allow_reauth: bool = False) -> _Entry:
        """The record's entry, or the error that tells why there is none."""
        if record is None:
            raise TenantNotConnected(tenant)
        if record.status is TenantStatus.NEEDS_REAUTH and not allow_reauth:
            raise ReauthorizationRequired(tenant, "the grant was refused earlier; connect again")
        try:
            return self._entry(record)
        except TokenSealError as exc:
            # Never served, never overwritten: the record stays as it is for the right key.
            log.error("tenant %r: stored tokens cannot be opened: %s", tenant, exc)
            self._emit(TokenEvent(EventKind.SEAL_ERROR, tenant, detail=str(exc)))
            raise


def _check_code(code: object) -> str:
    """``code`` if it looks like an authorization code; raise InvalidCallback otherwise."""
    if not isinstance(code, str) or not code or len(code) > _MAX_CODE or not code.isprintable():
        raise InvalidCallback("the authorization code is missing or malformed")
    return code


def _oauth_error_code(error: object) -> str:
    """A callback's ``error=`` reduced to what is safe to show: ``[A-Za-z0-9_.-]``, 64 at most."""
    text = re.sub(r"[^A-Za-z0-9_.\-]", "", error if isinstance(error, str) else "")[:64]
    return text or "unknown_error"


def _renewable(tokens: TokenSet) -> bool:
    """False for tokens that never expire and cannot be refreshed (company tokens)."""
    return tokens.refresh_token is not None or tokens.expires_at is not None


def _claim_error(tenant: str, outcome: str | None) -> FactorialTokensError:
    """Rebuild the error a failed code claim recorded, for callers that did not send it."""
    try:
        data = json.loads(outcome or "{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict) or data.get("in_doubt"):
        return ExchangeInDoubt(tenant, "the code was sent but the answer was lost")
    mismatch = data.get("company_mismatch")
    if isinstance(mismatch, list) and len(mismatch) == 2:
        return CompanyMismatch(tenant, str(mismatch[0]), str(mismatch[1]))
    status = data.get("status")
    return ProviderError(
        status if isinstance(status, int) else None,
        str(data.get("error", "exchange_failed")),
        str(data.get("description", "")),
    )
