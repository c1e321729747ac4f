"""TokenManager: cached, single-flight, lease-fenced token management for many tenants.

Data flows one way: caller -> TokenManager -> (Store, OAuthClient).

* Hot path: a cached token fresh beyond the leeway is returned with no I/O.
* Two windows, as botocore's refreshable credentials: inside the leeway (advisory) callers
  still get the cached token at cache-hit cost while one background refresh runs; only
  below ``min_valid`` (mandatory), or with no token, does a caller wait for the refresh.
* In-process single-flight: one task per tenant (per code) does the work; each caller
  awaits a future of its own that the task's landing resolves (``asyncio.shield`` for an
  exchange), so a cancelled caller never cancels a refresh in flight.
* Across processes: the store's lease (with a fencing number) picks one refresher; the
  others wait for the store's announcement and read the result. No refresh ever happens
  without the lease (fail closed).

TokenManager is the one gate to the store, built from one part per concern: ``_flight``
(the hot path, single-flight refresh, back-pressure), ``_exchange`` (exactly-once code
exchange), ``_callback`` (authorization URLs, connect links, callbacks), ``_leases`` (the
one lease helper, mark-dead, rekey), over ``_core`` (shared state and record helpers).
This module keeps the constructor, the lifecycle and the remaining operations.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import Callable

import aiohttp

from ._callback import Callbacks
from ._client import TenantSession
from ._errors import ConfigurationError, ProviderError, RefreshTimeout, TenantNotConnected
from ._events import EventDispatcher, EventKind, Listener, TokenEvent
from ._exchange import connect_turn
from ._flight import Flights
from ._health import Health, check_health
from ._keepalive import DEFAULT_CONCURRENCY, DEFAULT_MAX_AGE, KeepAliveReport, keep_alive
from ._logs import install
from ._models import Credentials, FactorialApp, TenantInfo, validate_tenant
from ._notice import Notices
from ._oauth import OAuthClient
from ._secret import AppSecret
from ._slots import Slots
from ._state import LinkSigner, StateSigner
from ._telemetry import Observer, Telemetry, TenantCounts, store_scheme
from .sealing import JsonCodec, Keyring, PayloadCodec, SealedCodec
from .store import (
    CLAIM_RETENTION,
    Store,
    acquire_within,
    acquires_unless_fresh,
    hold_digest,
    store_from_url,
    throttles,
)

__all__ = ["TokenManager"]

log = logging.getLogger("factorial_tokens")


class TokenManager(Callbacks, Flights):
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
            default two thirds of ``lease_ttl``. A token request is retried only while a
            whole attempt (``provider_timeout``) fits before it: an attempt cut short would
            be in doubt though Factorial may have rotated the token.
        wait_timeout: the longest a caller waits for another worker's refresh; default
            ``2 * lease_ttl``.
        state_ttl: how long an authorization ``state`` stays valid (at most a day,
            ``CLAIM_RETENTION``: how long the store remembers that a state was used).
        session: an aiohttp session to use for Factorial (not closed by the manager). The
            manager's own keeps no cookies (every tenant's requests share it); give yours
            ``cookie_jar=aiohttp.DummyCookieJar()`` too.
        codec: how token sets are written to the store (plain JSON by default).
        keyring: seal token material at rest with AES-GCM under this keyring
            (:class:`~factorial_tokens.sealing.SealedCodec`); default: the keyring in
            ``FACTORIAL_TOKENS_KEYS`` if that variable is set, else none. Not together
            with ``codec``. With a keyring, plain (unsealed) records are refused with
            TokenSealError: someone without the key wrote them.
        allow_plaintext: with a keyring, read plain records anyway: only while migrating
            a store written before sealing was on, until :meth:`rekey`
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
            lease, so other workers can take those tenants, and start in random order,
            so workers handed the same tenants in the same order spread over them.
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
        if refresh_rate is not None and not 0 < refresh_rate < math.inf:
            raise ConfigurationError(
                f"refresh_rate must be positive and finite, per minute (got {refresh_rate})"
            )
        if not 0 < state_ttl <= CLAIM_RETENTION:
            # A state's nonce is spent in a claim the store keeps that long: a state that
            # outlived it could connect the tenant a second time.
            raise ConfigurationError(f"state_ttl must be in (0, {CLAIM_RETENTION:g}] (got {state_ttl})")
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
        self._store = store_from_url(store) if isinstance(store, str) else store
        self._oauth = OAuthClient(
            app, session=session, timeout=provider_timeout, on_retry_after=self._provider_held
        )
        self.refresh_rate = refresh_rate
        self._interval = 0.0 if refresh_rate is None else 60.0 / refresh_rate
        self._burst = refresh_burst or max(1, int((refresh_rate or 0) // 60))
        self._hold_digest = hold_digest(app.client_id)
        self._slots = Slots(max_refreshes)
        self._not_before = 0.0  # wall clock: no refresh is sent before (a 429's Retry-After)
        if keyring is not None and codec is not None:
            raise ConfigurationError("pass a keyring or a codec, not both")
        if codec is None:
            keyring = Keyring.from_env() if keyring is None else keyring
            codec = JsonCodec() if keyring is None else SealedCodec(keyring, allow_plaintext=allow_plaintext)
        self._codec = codec
        self.state_ttl = state_ttl
        self._secret = AppSecret(app)
        self._notices = Notices(self._secret)
        self._signer = StateSigner(app, state_ttl)
        self._links = LinkSigner(app, 3600.0)
        self._events = EventDispatcher()
        if on_event is not None:
            self._events.add(on_event)
        self._cache = {}
        self._outage_fallback = {}  # cached entries dropped after lost announcements
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
        self._unless_fresh = acquires_unless_fresh(self._store)
        self._throttles = throttles(self._store)
        install()  # structured fields on the records of loggers created since import (plugins)
        self._oauth.observer = self._obs.provider_answer
        self._digests = {}
        self._keys = {}
        self._flights = {}
        self._joined = {}  # the callers waiting on each flight
        self._advisory = set()  # flights that are background refreshes
        self._forced = set()  # tenants whose flight forces a new token set
        self._queued = {}  # flights queued for a provider slot, ended by an announcement
        self._backoff = {}  # failed advisory refreshes, retry at
        self._deaths = {}  # tenants this process marked dead: stored version, cause
        self._dying = {}  # tenants this process is marking dead: version held, cause
        self._exchanges = {}
        self._tasks = set()
        self._books = contextvars.Context()  # of the done callbacks that keep the books
        self._unsubscribe = None
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
            if self._throttles:
                await self._learn_hold()  # a hold the fleet is under already

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

    @property
    def store(self) -> Store:
        """The store this manager uses."""
        return self._obs.unwrap(self._store)

    # -- other operations ------------------------------------------------------------

    async def credentials(self, tenant: str) -> Credentials:
        """Who granted ``tenant``'s token (Factorial's credentials endpoint)."""
        self._check_open()
        tenant = validate_tenant(tenant)
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
        tenant = validate_tenant(tenant)
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
        """Revoke ``tenant``'s grant at Factorial, then forget it (under the lease, and in
        the tenant's connection turn: a connection completed meanwhile is stored before it,
        and its grant is the one revoked)."""
        self._check_open()
        tenant = validate_tenant(tenant)
        key = self._key(tenant)
        if await self._store.read(key) is None:
            raise TenantNotConnected(tenant)  # before the lease: leaves nothing behind
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while True:
            won = await acquire_within(self._store, key, self.lease_ttl, deadline - loop.time())
            if won is None or won.lease is None:
                raise RefreshTimeout(f"tenant {key.tenant!r}: the lease stayed busy")
            async with self._holding(won.lease, won.record, renew=True):
                # Then the connection turn (not held while waiting for the lease: a connection
                # waits for it only refresh_deadline). While it is held no connection stores a
                # grant, so the delete below (not fenced) removes only the grant revoked.
                turn = await acquire_within(
                    self._store, connect_turn(key), self.lease_ttl, deadline - loop.time()
                )
                if turn is None or turn.lease is None:
                    raise RefreshTimeout(f"tenant {key.tenant!r}: a connection of the tenant stayed busy")
                async with self._holding(turn.lease, None):
                    record = await self._store.read(key)
                    if record is not None and won.record is not None and record.version != won.record.version:
                        continue  # a connection stored a grant meanwhile: revoke that one
                    tokens = self._usable(tenant, record, allow_reauth=True).tokens
                    provider_deadline = loop.time() + self.refresh_deadline
                    await self._oauth.revoke(
                        tokens.refresh_token or tokens.access_token, deadline=provider_deadline
                    )
                    try:
                        # Revoked at Factorial: the delete must land, or the revoked token
                        # stays stored (and cached) as the tenant's.
                        await self._patiently(
                            tenant, "the revoked tenant's deletion", lambda: self._store.replace(key, None)
                        )
                    finally:
                        self._forget_cached(tenant)
            break
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
        # Fenced out (a replace in between): read again under a new lease.

    # -- events, cache, records ------------------------------------------------------

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback`` with every event (on a background thread, in order; a
        coroutine it returns runs on the manager's loop, and the next event waits for it);
        returns a function that removes it."""
        return self._events.add(callback)

    async def flush_events(self, timeout: float = 10.0) -> bool:
        """Wait until the listeners were handed every event emitted so far; False if
        that took longer than ``timeout`` (a listener is stuck)."""
        return await self._events.flush(timeout)

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
            if self._throttles and not self._closed:
                self._spawn(self._learn_hold())
            if digest is not None:
                return
        if digest is None:  # announcements were lost: trust nothing cached ...
            self._outage_fallback.update(self._cache)  # ... but through a store outage
            self._cache.clear()
            for waiting in self._queued.values():
                if not waiting.done():
                    waiting.set_result(False)
            return
        tenant = self._digests.get(digest)
        if tenant is not None:
            self._cache.pop(tenant, None)
            self._outage_fallback.pop(tenant, None)
            queued = self._queued.get(tenant)
            if queued is not None and not queued.done():
                queued.set_result(False)  # a flight queued for a slot looks at the announcement
