"""FakeFactorial: a strict local simulator of Factorial's OAuth server.

It serves the endpoints a Factorial integration touches (``/oauth/authorize``,
``/oauth/token``, ``/oauth/revoke`` and two API resources) over real HTTP on
127.0.0.1 and counts every request, so that a test suite can assert what the provider
saw: exactly one exchange per code, one refresh per expiry, zero ``invalid_grant``.

Behaviour follows Doorkeeper, the Rails OAuth server Factorial runs:

- codes are single use; a second exchange fails with ``invalid_grant`` and, with
  ``reuse_detection``, revokes every token issued from that code (its *family*);
- refresh rotates the refresh token, in one of two :class:`RefreshMode` s;
- presenting a rotated refresh token fails with ``invalid_grant`` and, with
  ``reuse_detection``, revokes the whole family (OAuth 2.1 reuse detection);
- an access token and its refresh token are one record: revoking either revokes both.

Faults (5xx, 429, HTML bodies, malformed JSON, dropped connections before or after the
grant was processed, slow answers) are queued with :meth:`FakeFactorial.inject`.

This module depends on nothing else in ``factorial_tokens``: stdlib, aiohttp and attrs.

Limitations: state lives in memory of one process; the simulator's clock is the wall
clock plus the offset set by :meth:`FakeFactorial.advance_time`; refresh-token scope
narrowing and PKCE are not simulated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import enum
import html
import itertools
import json
import math
import re
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Final

import aiohttp
import attrs
from aiohttp import web

__all__ = [
    "AuthorizationRejected",
    "Dialect",
    "FakeFactorial",
    "Fault",
    "RefreshMode",
    "SimulatorStats",
]


class RefreshMode(enum.Enum):
    """How a refresh treats the pair (access + refresh token) it was made from."""

    #: The old pair is revoked at once. Of two concurrent refreshes presenting the same
    #: refresh token one wins; the other gets ``invalid_grant``.
    REVOKE_AT_REFRESH = "revoke_at_refresh"
    #: Factorial's documented behaviour (Doorkeeper ``refresh_token_revoked_on_use``):
    #: the old pair stays valid until the new access token is first used on the API, or
    #: the new refresh token is used to refresh; then the old pair is revoked. Until then
    #: the old refresh token can be presented again and succeeds again, so concurrent
    #: refreshes presenting the same refresh token all succeed (several live pairs;
    #: siblings stay live, as in Doorkeeper).
    REVOKE_ON_FIRST_USE = "revoke_on_first_use"


class Dialect(enum.Enum):
    """How token answers are shaped. Every dialect is valid JSON that a real OAuth server
    (or a proxy in front of it) may send; a client must read all of them alike."""

    #: Doorkeeper's own: integer ``expires_in`` and ``created_at``, ``"Bearer"``, scope string.
    STANDARD = "standard"
    #: Numbers as strings: ``expires_in`` ``"7200"``, ``created_at`` as an ISO 8601 string,
    #: ``token_type`` ``"bearer"``.
    STRINGS = "strings"
    #: ``expires_in`` a float, ``scope`` a list, ``token_type`` ``"BEARER"``, no
    #: ``created_at``, and extra fields (``id_token``, ``resource_owner_id``, an object).
    LOOSE = "loose"


class Fault(enum.Enum):
    """A scripted fault, consumed by the next matching request (see ``inject``).

    ``HTTP_5xx``, ``HTML_ERROR``, ``RATE_LIMITED``, ``HTML_200``, ``MALFORMED_JSON``,
    ``MISSING_FIELDS`` and ``DROP_BEFORE`` answer *before* the request is processed:
    nothing is consumed or rotated. ``DROP_AFTER`` and ``SLOW`` process the request fully
    (a code is consumed, a refresh token rotated, and it is counted) and then drop the
    connection, or answer only after ``delay`` seconds: the "in doubt" cases.

    A dropped connection reaches an aiohttp client as ``ServerDisconnectedError`` (a
    ``ClientConnectionError``). Note that aiohttp silently retries an idempotent request
    (GET: the API and authorize endpoints) once after a disconnect, so a drop on those
    reaches the caller only with ``times=2``; POSTs (token, revoke) are never retried.
    """

    HTTP_500 = "http_500"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    HTTP_504 = "http_504"
    #: A proxy's HTML error page with status 502.
    HTML_ERROR = "html_error"
    #: 429 with a ``Retry-After`` header.
    RATE_LIMITED = "rate_limited"
    #: Status 200 with an HTML body (a login page, a captive portal).
    HTML_200 = "html_200"
    #: Status 200, ``application/json``, truncated JSON.
    MALFORMED_JSON = "malformed_json"
    #: Status 200 with JSON lacking the expected fields (no ``access_token``).
    MISSING_FIELDS = "missing_fields"
    #: Close the connection without an answer; the request is not processed.
    DROP_BEFORE = "drop_before"
    #: Process the request fully, then close the connection without an answer.
    DROP_AFTER = "drop_after"
    #: Process the request fully, then wait ``delay`` seconds before answering.
    SLOW = "slow"


_PRE_FAULTS: Final = frozenset(
    {
        Fault.HTTP_500,
        Fault.HTTP_502,
        Fault.HTTP_503,
        Fault.HTTP_504,
        Fault.HTML_ERROR,
        Fault.RATE_LIMITED,
        Fault.HTML_200,
        Fault.MALFORMED_JSON,
        Fault.MISSING_FIELDS,
        Fault.DROP_BEFORE,
    }
)

#: Endpoint families accepted by ``FakeFactorial.inject``.
ENDPOINTS: Final = ("token", "revoke", "api", "authorize")

#: Causes counted in ``SimulatorStats.invalid_grant_by_cause``. For a token whose family
#: is revoked the cause is ``family_revoked``, whatever else is wrong with it.
INVALID_GRANT_CAUSES: Final = (
    "code_unknown",  # no such code was ever issued
    "code_client_mismatch",  # the code was issued to another client
    "code_reused",  # the code was already exchanged
    "code_expired",  # older than code_ttl
    "redirect_mismatch",  # redirect_uri differs from the one the code was issued for
    "refresh_unknown",  # no such refresh token was ever issued
    "refresh_client_mismatch",  # the refresh token belongs to another client
    "refresh_rotated",  # a superseded (rotated) refresh token presented again
    "refresh_revoked",  # a refresh token revoked through /oauth/revoke or admin action
    "refresh_expired",  # older than refresh_token_ttl
    "family_revoked",  # any token of a family revoked by reuse detection or an admin
)

_DESC_INVALID_GRANT: Final = (
    "The provided authorization grant is invalid, expired, revoked, does not match the "
    "redirection URI used in the authorization request, or was issued to another client."
)
_DESC_INVALID_CLIENT: Final = (
    "Client authentication failed due to unknown client, no client authentication "
    "included, or unsupported authentication method."
)
_DESC_UNSUPPORTED_GRANT: Final = "The authorization grant type is not supported by the authorization server."
_VERSION_RE: Final = re.compile(r"^(?:(\d{4})-\d{2}-\d{2}|v\d+)$")
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_AUTO_ID_START: Final = 10_001


class AuthorizationRejected(Exception):
    """Raised by :meth:`FakeFactorial.authorize` when the answer is not a 302 redirect.

    ``status`` is the HTTP status and ``body`` the (text) body of the answer.
    """

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"authorize answered {status} instead of 302: {body[:300]}")
        self.status = status
        self.body = body


def _freeze(mapping: Mapping[Any, int]) -> Mapping[Any, int]:
    return dict(mapping)


@attrs.frozen(kw_only=True)
class SimulatorStats:
    """A consistent snapshot of the simulator's counters (see ``FakeFactorial.stats``).

    Request counters count every request received, faults included:
    ``authorize_requests``, ``token_requests``, ``revoke_requests``, ``api_calls``.
    Outcome counters count only what was processed:

    - ``exchanges``: successful code exchanges; ``exchanges_by_code`` and
      ``exchanges_by_company`` split them; ``exchange_attempts`` /
      ``exchange_attempts_by_code`` count every exchange that reached grant validation
      (client authenticated, parameters present), successful or not, so
      ``max_attempts_per_code == 1`` proves that no code was ever sent twice;
    - ``refreshes``: successful refreshes (``refreshes_by_company``);
      ``refresh_attempts`` / ``refresh_attempts_by_token`` likewise count attempts;
    - ``invalid_grant`` and ``invalid_grant_by_cause`` (keys from
      ``INVALID_GRANT_CAUSES``; only non-zero causes appear);
    - ``invalid_client``, ``invalid_request``, ``unsupported_grant_type``;
    - ``families_revoked`` and ``families_revoked_by_cause`` (``code_reused``,
      ``refresh_reused``, ``reauthorized``, ``admin``);
    - ``revocations``: pairs actually revoked through ``/oauth/revoke``
      (``revocations_by_company`` splits them by the grant's company);
    - ``api_ok`` / ``api_unauthorized``: API calls answered 200 / 401;
    - ``faults_injected`` and ``faults_by_kind`` (``Fault`` names): injected faults
      served; ``rate_limited``: 429s from ``rate_limit_per_minute`` (not injected);
      ``unavailable``: 503s from ``sim.unavailable``.
    """

    authorize_requests: int = 0
    codes_issued: int = 0
    token_requests: int = 0
    exchange_attempts: int = 0
    exchanges: int = 0
    exchanges_by_code: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    exchange_attempts_by_code: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    exchanges_by_company: Mapping[int, int] = attrs.field(factory=dict, converter=_freeze)
    refresh_attempts: int = 0
    refreshes: int = 0
    refreshes_by_company: Mapping[int, int] = attrs.field(factory=dict, converter=_freeze)
    refresh_attempts_by_token: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    invalid_grant: int = 0
    invalid_grant_by_cause: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    invalid_client: int = 0
    invalid_request: int = 0
    unsupported_grant_type: int = 0
    families_revoked: int = 0
    families_revoked_by_cause: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    revoke_requests: int = 0
    revocations: int = 0
    revocations_by_company: Mapping[int, int] = attrs.field(factory=dict, converter=_freeze)
    api_calls: int = 0
    api_ok: int = 0
    api_unauthorized: int = 0
    faults_injected: int = 0
    faults_by_kind: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    rate_limited: int = 0
    unavailable: int = 0

    @property
    def max_attempts_per_code(self) -> int:
        """The largest number of exchange attempts seen for any one code (0 if none)."""
        return max(self.exchange_attempts_by_code.values(), default=0)

    @property
    def max_attempts_per_refresh_token(self) -> int:
        """The largest number of refresh attempts seen for any one refresh token."""
        return max(self.refresh_attempts_by_token.values(), default=0)


@attrs.define
class _Counters:
    authorize_requests: int = 0
    codes_issued: int = 0
    token_requests: int = 0
    exchange_attempts: int = 0
    exchanges: int = 0
    exchanges_by_code: Counter[str] = attrs.field(factory=Counter)
    exchange_attempts_by_code: Counter[str] = attrs.field(factory=Counter)
    exchanges_by_company: Counter[int] = attrs.field(factory=Counter)
    refresh_attempts: int = 0
    refreshes: int = 0
    refreshes_by_company: Counter[int] = attrs.field(factory=Counter)
    refresh_attempts_by_token: Counter[str] = attrs.field(factory=Counter)
    invalid_grant: int = 0
    invalid_grant_by_cause: Counter[str] = attrs.field(factory=Counter)
    invalid_client: int = 0
    invalid_request: int = 0
    unsupported_grant_type: int = 0
    families_revoked: int = 0
    families_revoked_by_cause: Counter[str] = attrs.field(factory=Counter)
    revoke_requests: int = 0
    revocations: int = 0
    revocations_by_company: Counter[int] = attrs.field(factory=Counter)
    api_calls: int = 0
    api_ok: int = 0
    api_unauthorized: int = 0
    faults_injected: int = 0
    faults_by_kind: Counter[str] = attrs.field(factory=Counter)
    rate_limited: int = 0
    unavailable: int = 0

    def snapshot(self) -> SimulatorStats:
        return SimulatorStats(**attrs.asdict(self, recurse=False))


@attrs.define
class _Client:
    client_id: str
    client_secret: str = attrs.field(repr=False)
    redirect_uri: str


@attrs.define(frozen=True)
class _Owner:
    company_id: int
    employee_id: int | None


@attrs.define(eq=False)
class _Family:
    """All tokens descending from one authorization code."""

    id: int
    client_id: str
    owner: _Owner
    company_token: bool
    scope: str
    revoked: bool = False


@attrs.define(eq=False)
class _Code:
    value: str = attrs.field(repr=False)
    client_id: str
    redirect_uri: str
    owner: _Owner
    company_token: bool
    scope: str
    expires_at: float
    used: bool = False
    family: _Family | None = None


@attrs.define(eq=False)
class _Pair:
    """One Doorkeeper access-token record: an access token and its refresh token."""

    access: str = attrs.field(repr=False)
    refresh: str | None = attrs.field(repr=False)
    family: _Family
    created_at: float
    expires_at: float | None
    refresh_expires_at: float | None
    previous: _Pair | None = None
    revoked: bool = False
    #: "rotated" / "superseded" (refresh), "revoked" (/oauth/revoke), "admin".
    revoked_reason: str | None = None
    used: bool = False


#: Renders an API body from the authenticated pair and whether ids are strings.
_Renderer = Callable[[_Pair, bool], dict[str, Any]]


@attrs.define(frozen=True)
class _QueuedFault:
    fault: Fault
    retry_after: float
    delay: float


class _GrantError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        *,
        cause: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.description = description
        self.cause = cause
        self.headers = dict(headers or {})


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


class FakeFactorial:
    """A strict, counting simulator of Factorial's (Doorkeeper) OAuth server.

    Use as ``async with FakeFactorial(...) as sim:`` (or ``await sim.start()`` /
    ``await sim.stop()``), or from synchronous code ``with sim.serve_in_thread():``.
    ``sim.base_url`` is where it listens. Every public method is safe to call from any
    thread; counters are read as a consistent snapshot with ``sim.stats``.

    Constructor arguments (keyword-only):

    - ``client_id``, ``client_secret``, ``redirect_uri``: the registered application
      (more with :meth:`add_client`);
    - ``refresh_mode``: see :class:`RefreshMode`;
    - ``reuse_detection``: presenting an already used code or a rotated refresh token
      revokes every token of that grant (its family);
    - ``access_token_ttl``: seconds an access token lives; sent as the integer
      ``expires_in`` ``max(1, round(ttl))``, enforced with the exact value;
    - ``refresh_token_ttl``: seconds a refresh token lives, or ``None`` (never expires);
    - ``company_tokens_expire``: company tokens (``resource_owner_type=company``) come
      with no ``expires_in`` and no ``refresh_token`` and never expire, unless True;
    - ``revoke_on_reauthorize``: a new exchange for the same client and owner revokes
      that owner's earlier families (re-authorizing revokes earlier tokens);
    - ``code_ttl``: seconds a code can be exchanged;
    - ``default_scope``: scope granted when the authorize request names none;
    - ``latency``: seconds waited before every answer;
    - ``rate_limit_per_minute``: POSTs per rolling minute per endpoint family
      (``token``, ``revoke``) before answering 429 with ``Retry-After``; None = no limit;
    - ``rate_limit_window``: the rolling window's length in seconds (default 60; shorter
      windows let tests run a rate limit in seconds);
    - ``answer_pieces``, ``piece_delay``: every answer body is written in this many
      pieces, ``piece_delay`` seconds apart (as a slow network delivers it), with a
      ``Content-Length``; ``chunked=True`` sends it with chunked transfer encoding instead;
    - ``dialect``: the shape of token answers (see :class:`Dialect`);
    - ``rotate_refresh_tokens``: when False a refresh answer carries no ``refresh_token``
      and the refresh token presented stays valid (RFC 6749 section 6 allows both);
    - ``host``, ``port``: where to listen (port 0 picks a free one);
    - ``authorize_page``: ``/oauth/authorize`` shows a page where a person picks the
      company id and approves (what ``factorial-tokens simulate`` serves), instead of
      approving at once.

    Raises ``ValueError`` on nonsensical arguments.
    """

    def __init__(
        self,
        *,
        client_id: str = "test-client",
        client_secret: str = "test-secret",  # noqa: S107 - a test fixture, not a secret
        redirect_uri: str = "http://127.0.0.1/callback",
        refresh_mode: RefreshMode = RefreshMode.REVOKE_AT_REFRESH,
        reuse_detection: bool = True,
        access_token_ttl: float = 7200,
        refresh_token_ttl: float | None = None,
        company_tokens_expire: bool = False,
        revoke_on_reauthorize: bool = False,
        code_ttl: float = 600,
        default_scope: str = "read write",
        latency: float = 0.0,
        rate_limit_per_minute: int | None = None,
        rate_limit_window: float = 60.0,
        answer_pieces: int = 1,
        piece_delay: float = 0.0,
        chunked: bool = False,
        dialect: Dialect = Dialect.STANDARD,
        rotate_refresh_tokens: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        authorize_page: bool = False,
    ) -> None:
        if access_token_ttl <= 0:
            raise ValueError("access_token_ttl must be > 0")
        if refresh_token_ttl is not None and refresh_token_ttl <= 0:
            raise ValueError("refresh_token_ttl must be > 0 or None")
        if code_ttl <= 0:
            raise ValueError("code_ttl must be > 0")
        if latency < 0:
            raise ValueError("latency must be >= 0")
        if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
            raise ValueError("rate_limit_per_minute must be >= 1 or None")
        if not rate_limit_window > 0:
            raise ValueError("rate_limit_window must be > 0")
        if answer_pieces < 1:
            raise ValueError("answer_pieces must be >= 1")
        if piece_delay < 0:
            raise ValueError("piece_delay must be >= 0")
        if not isinstance(dialect, Dialect):
            raise ValueError(f"dialect must be a Dialect, not {dialect!r}")
        if not isinstance(refresh_mode, RefreshMode):
            raise ValueError(f"refresh_mode must be a RefreshMode, not {refresh_mode!r}")
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.refresh_mode = refresh_mode
        self.reuse_detection = reuse_detection
        self.access_token_ttl = float(access_token_ttl)
        self.refresh_token_ttl = None if refresh_token_ttl is None else float(refresh_token_ttl)
        self.company_tokens_expire = company_tokens_expire
        self.revoke_on_reauthorize = revoke_on_reauthorize
        self.code_ttl = float(code_ttl)
        self.default_scope = default_scope
        self.latency = float(latency)
        self.rate_limit_per_minute = rate_limit_per_minute
        self.rate_limit_window = float(rate_limit_window)
        self.answer_pieces = int(answer_pieces)
        self.piece_delay = float(piece_delay)
        self.chunked = chunked
        self.dialect = dialect
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.host = host
        self.port = port
        self.authorize_page = authorize_page
        #: When True every request is answered 503 ("provider down").
        self.unavailable = False

        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {client_id: _Client(client_id, client_secret, redirect_uri)}
        self._codes: dict[str, _Code] = {}
        self._by_access: dict[str, _Pair] = {}
        self._by_refresh: dict[str, _Pair] = {}
        self._families: list[_Family] = []
        self._family_ids = itertools.count(1)
        self._auto_ids = itertools.count(_AUTO_ID_START)
        self._next_owners: deque[_Owner] = deque()
        self._faults: dict[str, deque[_QueuedFault]] = {e: deque() for e in ENDPOINTS}
        self._rate_windows: dict[str, deque[float]] = {"token": deque(), "revoke": deque()}
        self._clock_offset = 0.0
        self._c = _Counters()

        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._bound_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running server; raises RuntimeError if stopped."""
        if self._bound_port is None:
            raise RuntimeError("FakeFactorial is not running: use `async with` or start()")
        return f"http://{self.host}:{self._bound_port}"

    @property
    def running(self) -> bool:
        """True while the server listens."""
        return self._runner is not None

    async def start(self) -> None:
        """Start listening. Raises RuntimeError if already running."""
        if self._runner is not None:
            raise RuntimeError("FakeFactorial is already running")
        app = web.Application()
        app.router.add_get("/oauth/authorize", self._handle_authorize)
        app.router.add_post("/oauth/token", self._handle_token)
        app.router.add_post("/oauth/revoke", self._handle_revoke)
        app.router.add_get("/api/{version}/resources/api_public/credentials", self._handle_credentials)
        app.router.add_get("/api/{version}/resources/employees/employees", self._handle_employees)
        self._closing = asyncio.Event()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        address = runner.addresses[0]
        self._bound_port = int(address[1])
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and close connections. Idempotent; state and counters stay."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            self._closing.set()  # wake SLOW faults and latency sleeps
        await runner.cleanup()
        self._bound_port = None

    async def __aenter__(self) -> FakeFactorial:
        """Start the server and return the simulator."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        await self.stop()

    @contextlib.contextmanager
    def serve_in_thread(self, *, startup_timeout: float = 10.0) -> Iterator[FakeFactorial]:
        """Run the server on its own event loop in a daemon thread, for sync code.

        Yields the simulator once it listens; stops it and joins the thread on exit.
        Raises RuntimeError if it does not start within ``startup_timeout`` seconds
        (or re-raises the start-up error).
        """
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start())
                except BaseException as exc:
                    failure.append(exc)
                    return
                finally:
                    ready.set()
                loop.run_forever()
                loop.run_until_complete(self.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

        thread = threading.Thread(target=run, name="FakeFactorial", daemon=True)
        thread.start()
        if not ready.wait(startup_timeout):
            loop.call_soon_threadsafe(loop.stop)
            raise RuntimeError("FakeFactorial did not start in time")
        if failure:
            thread.join()
            raise failure[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)

    # ------------------------------------------------------------------ configuration

    def add_client(self, client_id: str, client_secret: str, redirect_uri: str) -> None:
        """Register another OAuth application. Raises ValueError if the id is taken."""
        with self._lock:
            if client_id in self._clients:
                raise ValueError(f"client {client_id!r} is already registered")
            self._clients[client_id] = _Client(client_id, client_secret, redirect_uri)

    def next_owner(self, company_id: int | None = None, employee_id: int | None = None) -> None:
        """Queue who approves the next ``/oauth/authorize`` request (FIFO).

        ``company_id`` None picks a fresh id. For user tokens an ``employee_id`` of None
        picks a fresh id too; company tokens ignore ``employee_id``.
        """
        with self._lock:
            cid = next(self._auto_ids) if company_id is None else company_id
            self._next_owners.append(_Owner(cid, employee_id))

    def inject(
        self,
        fault: Fault,
        *,
        times: int = 1,
        endpoint: str = "token",
        retry_after: float = 1.0,
        delay: float = 30.0,
    ) -> None:
        """Queue ``fault`` for the next ``times`` requests of an endpoint family.

        ``endpoint`` is one of ``"token"``, ``"revoke"``, ``"api"``, ``"authorize"``.
        ``retry_after`` is sent as ``Retry-After`` with ``Fault.RATE_LIMITED``; ``delay``
        is how long ``Fault.SLOW`` waits (cut short when the simulator stops). Faults are
        consumed in order, after the ``unavailable`` switch and the rate limiter.
        Raises ValueError on an unknown endpoint or ``times < 1``.
        """
        if not isinstance(fault, Fault):
            raise ValueError(f"fault must be a Fault, not {fault!r}")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
        if times < 1:
            raise ValueError("times must be >= 1")
        if retry_after < 0 or delay < 0:
            raise ValueError("retry_after and delay must be >= 0")
        queued = _QueuedFault(fault, float(retry_after), float(delay))
        with self._lock:
            self._faults[endpoint].extend([queued] * times)

    def pending_faults(self, endpoint: str | None = None) -> int:
        """How many injected faults are still queued (for one endpoint family or all)."""
        with self._lock:
            if endpoint is None:
                return sum(len(q) for q in self._faults.values())
            return len(self._faults[endpoint])

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            for queue in self._faults.values():
                queue.clear()

    def advance_time(self, seconds: float) -> None:
        """Move the simulator's clock forward: codes and tokens expire without sleeping."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        with self._lock:
            self._clock_offset += seconds

    # ------------------------------------------------------------------ test helpers

    @property
    def stats(self) -> SimulatorStats:
        """A consistent snapshot of every counter, safe to read from any thread."""
        with self._lock:
            return self._c.snapshot()

    def reset_stats(self) -> None:
        """Zero every counter (tokens, codes and families are kept)."""
        with self._lock:
            self._c = _Counters()

    def issue_code(
        self,
        company_id: int | None = None,
        employee_id: int | None = None,
        company_token: bool = False,
        scope: str | None = None,
        *,
        client_id: str | None = None,
    ) -> str:
        """Mint an authorization code as if a user had approved the app; return it.

        The code is bound to the client's registered redirect URI. Ids of None are
        generated. Does not count as an authorize request. Raises ValueError for an
        unknown ``client_id``.
        """
        with self._lock:
            client = self._clients.get(client_id or self.client_id)
            if client is None:
                raise ValueError(f"unknown client {client_id!r}")
            owner = self._make_owner(company_id, employee_id, company_token)
            return self._mint_code(client, client.redirect_uri, owner, company_token, scope)

    async def authorize(self, url: str) -> str:
        """GET a full authorize URL without following the redirect; return ``Location``.

        Raises :class:`AuthorizationRejected` when the answer is not a 302.
        """
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            body = await resp.text()
            if resp.status != 302 or "Location" not in resp.headers:
                raise AuthorizationRejected(resp.status, body)
            return resp.headers["Location"]

    def authorize_sync(self, url: str, *, timeout: float = 10.0) -> str:
        """Blocking twin of :meth:`authorize` (urllib), for threads and sync code."""

        class _NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(url, timeout=timeout) as resp:
                raise AuthorizationRejected(resp.status, resp.read().decode(errors="replace"))
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location")
            if exc.code == 302 and location:
                return str(location)
            raise AuthorizationRejected(exc.code, exc.read().decode(errors="replace")) from None

    def is_active(self, access_token: str) -> bool:
        """True if the API would accept this access token now (does not count as use)."""
        with self._lock:
            pair = self._by_access.get(access_token)
            return pair is not None and self._access_problem(pair, self._now()) is None

    def is_refresh_usable(self, refresh_token: str) -> bool:
        """True if presenting this refresh token now would succeed."""
        with self._lock:
            pair = self._by_refresh.get(refresh_token)
            return pair is not None and self._refresh_problem(pair, self._now()) is None

    def live_pairs(self, company_id: int | None = None) -> int:
        """Pairs (access + refresh token records) still usable, for one company or all.

        A pair is live when neither it nor its family is revoked and either its access
        token is unexpired or its refresh token can still refresh.
        """
        with self._lock:
            now = self._now()
            return sum(
                1
                for pair in self._by_access.values()
                if (company_id is None or pair.family.owner.company_id == company_id)
                and self._pair_live(pair, now)
            )

    def family_alive(self, company_id: int) -> bool:
        """True if the company has at least one unrevoked grant with a live pair."""
        return self.live_pairs(company_id) > 0

    def families_revoked_for(self, company_id: int) -> int:
        """How many of the company's families (grants) are revoked."""
        with self._lock:
            return sum(1 for f in self._families if f.owner.company_id == company_id and f.revoked)

    def revoke_company(self, company_id: int) -> int:
        """Revoke every grant of a company, as an admin disconnecting the app would.

        Returns how many families were revoked (counted under cause ``admin``).
        """
        with self._lock:
            families = [f for f in self._families if f.owner.company_id == company_id and not f.revoked]
            for family in families:
                self._revoke_family(family, "admin")
            return len(families)

    def expire_access_tokens(self, company_id: int | None = None) -> int:
        """Expire every unexpired access token (of one company or all) now.

        Refresh tokens are untouched. Returns how many access tokens were expired.
        """
        with self._lock:
            now = self._now()
            count = 0
            for pair in self._by_access.values():
                if company_id is not None and pair.family.owner.company_id != company_id:
                    continue
                if pair.expires_at is None or pair.expires_at > now:
                    pair.expires_at = now
                    count += 1
            return count

    # ------------------------------------------------------------------ internals (locked)

    def _now(self) -> float:
        return time.time() + self._clock_offset

    def _make_owner(self, company_id: int | None, employee_id: int | None, company_token: bool) -> _Owner:
        cid = next(self._auto_ids) if company_id is None else company_id
        if company_token:
            return _Owner(cid, None)
        eid = next(self._auto_ids) if employee_id is None else employee_id
        return _Owner(cid, eid)

    def _mint_code(
        self,
        client: _Client,
        redirect_uri: str,
        owner: _Owner,
        company_token: bool,
        scope: str | None,
    ) -> str:
        value = secrets.token_urlsafe(32)
        self._codes[value] = _Code(
            value=value,
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            owner=owner,
            company_token=company_token,
            scope=scope or self.default_scope,
            expires_at=self._now() + self.code_ttl,
        )
        self._c.codes_issued += 1
        return value

    def _new_pair(self, family: _Family, previous: _Pair | None, *, keep_refresh: bool = False) -> _Pair:
        now = self._now()
        expiring = not family.company_token or self.company_tokens_expire
        refresh = secrets.token_hex(32) if expiring else None
        if keep_refresh and previous is not None:
            refresh = previous.refresh
        pair = _Pair(
            access=secrets.token_hex(32),
            refresh=refresh,
            family=family,
            created_at=now,
            expires_at=now + self.access_token_ttl if expiring else None,
            refresh_expires_at=(
                now + self.refresh_token_ttl if expiring and self.refresh_token_ttl is not None else None
            ),
            previous=previous,
        )
        self._by_access[pair.access] = pair
        if pair.refresh is not None:
            self._by_refresh[pair.refresh] = pair
        return pair

    def _token_body(self, pair: _Pair, *, with_refresh: bool = True) -> dict[str, Any]:
        expires_in = max(1, round(self.access_token_ttl)) if pair.expires_at is not None else None
        body: dict[str, Any] = {
            "access_token": pair.access,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "refresh_token": pair.refresh if with_refresh else None,
            "scope": pair.family.scope,
            "created_at": int(pair.created_at),
        }
        if self.dialect is Dialect.STRINGS:
            body.update(
                token_type="bearer",
                expires_in=None if expires_in is None else str(expires_in),
                created_at=datetime.datetime.fromtimestamp(int(pair.created_at), datetime.UTC).isoformat(),
            )
        elif self.dialect is Dialect.LOOSE:
            body.update(
                token_type="BEARER",
                expires_in=None if expires_in is None else float(expires_in),
                scope=pair.family.scope.split() if pair.family.scope else None,
                created_at=None,
                id_token="eyJhbGciOiJub25lIn0.e30.",
                resource_owner_id=pair.family.owner.company_id,
                info={"nested": [1, 2, {"deep": True}]},
            )
        return {k: v for k, v in body.items() if v not in (None, "")}

    def _revoke_pair(self, pair: _Pair, reason: str) -> None:
        if not pair.revoked:
            pair.revoked = True
            pair.revoked_reason = reason

    def _revoke_family(self, family: _Family, cause: str) -> None:
        if family.revoked:
            return
        family.revoked = True
        self._c.families_revoked += 1
        self._c.families_revoked_by_cause[cause] += 1

    def _access_problem(self, pair: _Pair, now: float) -> str | None:
        if pair.family.revoked or pair.revoked:
            return "The access token was revoked"
        if pair.expires_at is not None and now >= pair.expires_at:
            return "The access token expired"
        return None

    def _refresh_problem(self, pair: _Pair, now: float) -> str | None:
        if pair.family.revoked:
            return "family_revoked"
        if pair.revoked:
            if pair.revoked_reason in ("rotated", "superseded"):
                return "refresh_rotated"
            return "refresh_revoked"
        if pair.refresh_expires_at is not None and now >= pair.refresh_expires_at:
            return "refresh_expired"
        return None

    def _pair_live(self, pair: _Pair, now: float) -> bool:
        if pair.revoked or pair.family.revoked:
            return False
        if self._access_problem(pair, now) is None:
            return True
        return pair.refresh is not None and self._refresh_problem(pair, now) is None

    def _invalid_grant(self, cause: str) -> _GrantError:
        self._c.invalid_grant += 1
        self._c.invalid_grant_by_cause[cause] += 1
        return _GrantError(400, "invalid_grant", _DESC_INVALID_GRANT, cause=cause)

    def _invalid_request(self, description: str) -> _GrantError:
        self._c.invalid_request += 1
        return _GrantError(400, "invalid_request", description)

    def _authenticate(self, form: Mapping[str, str], authorization: str | None) -> _Client:
        client_id = form.get("client_id")
        client_secret = form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
                basic_id, _, basic_secret = decoded.partition(":")
                client_id = urllib.parse.unquote_plus(basic_id)
                client_secret = urllib.parse.unquote_plus(basic_secret)
            except (ValueError, UnicodeDecodeError):
                client_id = client_secret = None
        client = self._clients.get(client_id or "")
        if (
            client is None
            or client_secret is None
            or not secrets.compare_digest(client.client_secret, client_secret)
        ):
            self._c.invalid_client += 1
            raise _GrantError(401, "invalid_client", _DESC_INVALID_CLIENT)
        return client

    def _grant(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise self._invalid_request("Missing required parameter: grant_type.")
        if grant_type not in ("authorization_code", "refresh_token"):
            self._c.unsupported_grant_type += 1
            raise _GrantError(400, "unsupported_grant_type", _DESC_UNSUPPORTED_GRANT)
        client = self._authenticate(form, authorization)
        if grant_type == "authorization_code":
            return self._exchange(client, form)
        return self._refresh(client, form)

    def _exchange(self, client: _Client, form: Mapping[str, str]) -> dict[str, Any]:
        value = form.get("code")
        if not value:
            raise self._invalid_request("Missing required parameter: code.")
        redirect_uri = form.get("redirect_uri")
        if not redirect_uri:
            raise self._invalid_request("Missing required parameter: redirect_uri.")
        self._c.exchange_attempts += 1
        self._c.exchange_attempts_by_code[value] += 1
        code = self._codes.get(value)
        if code is None:
            raise self._invalid_grant("code_unknown")
        if code.client_id != client.client_id:
            raise self._invalid_grant("code_client_mismatch")
        if code.used:
            if self.reuse_detection and code.family is not None:
                self._revoke_family(code.family, "code_reused")
            raise self._invalid_grant("code_reused")
        if self._now() >= code.expires_at:
            raise self._invalid_grant("code_expired")
        if redirect_uri != code.redirect_uri:
            raise self._invalid_grant("redirect_mismatch")
        code.used = True
        if self.revoke_on_reauthorize:
            for earlier in self._families:
                if (
                    not earlier.revoked
                    and earlier.client_id == client.client_id
                    and earlier.owner == code.owner
                    and earlier.company_token == code.company_token
                ):
                    self._revoke_family(earlier, "reauthorized")
        family = _Family(
            id=next(self._family_ids),
            client_id=client.client_id,
            owner=code.owner,
            company_token=code.company_token,
            scope=code.scope,
        )
        self._families.append(family)
        code.family = family
        pair = self._new_pair(family, previous=None)
        self._c.exchanges += 1
        self._c.exchanges_by_code[value] += 1
        self._c.exchanges_by_company[family.owner.company_id] += 1
        return self._token_body(pair)

    def _refresh(self, client: _Client, form: Mapping[str, str]) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise self._invalid_request("Missing required parameter: refresh_token.")
        self._c.refresh_attempts += 1
        self._c.refresh_attempts_by_token[token] += 1
        pair = self._by_refresh.get(token)
        if pair is None:
            raise self._invalid_grant("refresh_unknown")
        if pair.family.client_id != client.client_id:
            raise self._invalid_grant("refresh_client_mismatch")
        problem = self._refresh_problem(pair, self._now())
        if problem is not None:
            if problem == "refresh_rotated" and self.reuse_detection:
                self._revoke_family(pair.family, "refresh_reused")
            raise self._invalid_grant(problem)
        if self.refresh_mode is RefreshMode.REVOKE_AT_REFRESH:
            self._revoke_pair(pair, "rotated")
        elif pair.previous is not None:
            # Using the new refresh token revokes the pair it was refreshed from.
            self._revoke_pair(pair.previous, "superseded")
        keep = not self.rotate_refresh_tokens
        # Not rotating: the refresh token presented moves on to the new pair and stays valid.
        new = self._new_pair(pair.family, previous=pair, keep_refresh=keep)
        self._c.refreshes += 1
        self._c.refreshes_by_company[pair.family.owner.company_id] += 1
        return self._token_body(new, with_refresh=not keep)

    def _revoke(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        client = self._authenticate(form, authorization)
        token = form.get("token")
        if not token:
            raise self._invalid_request("Missing required parameter: token.")
        pair = self._by_access.get(token) or self._by_refresh.get(token)
        if pair is None:
            return {}
        if pair.family.client_id != client.client_id:
            raise _GrantError(403, "unauthorized_client", "You are not authorized to revoke this token")
        if not pair.revoked:
            self._revoke_pair(pair, "revoked")
            self._c.revocations += 1
            self._c.revocations_by_company[pair.family.owner.company_id] += 1
        return {}

    def _api_auth(self, authorization: str | None) -> _Pair:
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        pair = self._by_access.get(token) if token else None
        problem = "The access token is invalid" if pair is None else self._access_problem(pair, self._now())
        if pair is None or problem is not None:
            self._c.api_unauthorized += 1
            challenge = f'Bearer realm="Doorkeeper", error="invalid_token", error_description="{problem}"'
            raise _GrantError(401, "invalid_token", problem or "", headers={"WWW-Authenticate": challenge})
        if not pair.used:
            pair.used = True
            if self.refresh_mode is RefreshMode.REVOKE_ON_FIRST_USE and pair.previous:
                self._revoke_pair(pair.previous, "superseded")
        self._c.api_ok += 1
        return pair

    # ------------------------------------------------------------------ HTTP plumbing

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, cut short when the simulator stops; True if it is stopping."""
        closing = self._closing
        if seconds > 0 and closing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), seconds)
        return closing is not None and closing.is_set()

    def _rate_check(self, endpoint: str) -> float | None:
        """Record a POST; return seconds to wait if over the limit (locked)."""
        limit = self.rate_limit_per_minute
        window = self._rate_windows.get(endpoint)
        if limit is None or window is None:
            return None
        now, span = time.monotonic(), self.rate_limit_window
        while window and now - window[0] >= span:
            window.popleft()
        if len(window) >= limit:
            self._c.rate_limited += 1
            return max(1.0, math.ceil(span - (now - window[0])))
        window.append(now)
        return None

    async def _enter(
        self, request: web.Request, endpoint: str
    ) -> tuple[web.StreamResponse | None, _QueuedFault | None]:
        """Latency, the unavailable switch, the rate limiter and queued faults."""
        if await self._sleep(self.latency):
            return _drop(request), None
        if self.unavailable:
            with self._lock:
                self._c.unavailable += 1
            return _json(503, {"error": "service_unavailable"}), None
        with self._lock:
            wait = self._rate_check(endpoint) if request.method == "POST" else None
            queued = None
            if wait is None and self._faults[endpoint]:
                queued = self._faults[endpoint].popleft()
                self._c.faults_injected += 1
                self._c.faults_by_kind[queued.fault.name] += 1
        if wait is not None:
            return _json(
                429,
                {"error": "too_many_requests", "error_description": "Rate limit exceeded"},
                headers={"Retry-After": _format_seconds(wait)},
            ), None
        if queued is not None and queued.fault in _PRE_FAULTS:
            return self._fault_response(request, endpoint, queued), None
        return None, queued

    def _fault_response(
        self, request: web.Request, endpoint: str, queued: _QueuedFault
    ) -> web.StreamResponse:
        fault = queued.fault
        if fault in (Fault.HTTP_500, Fault.HTTP_502, Fault.HTTP_503, Fault.HTTP_504):
            status = int(fault.name.removeprefix("HTTP_"))
            return _json(status, {"error": "server_error", "error_description": fault.name})
        if fault is Fault.HTML_ERROR:
            return web.Response(
                status=502,
                text="<html><head><title>502 Bad Gateway</title></head><body>"
                "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center>"
                "</body></html>",
                content_type="text/html",
            )
        if fault is Fault.RATE_LIMITED:
            return _json(
                429,
                {"error": "too_many_requests", "error_description": "Rate limit exceeded"},
                headers={"Retry-After": _format_seconds(queued.retry_after)},
            )
        if fault is Fault.HTML_200:
            return web.Response(
                status=200,
                text="<!DOCTYPE html><html><body><h1>Sign in to Factorial</h1></body></html>",
                content_type="text/html",
            )
        if fault is Fault.MALFORMED_JSON:
            return web.Response(
                status=200,
                text='{"access_token": "0123456789abcdef", "token_type": "Bea',
                content_type="application/json",
            )
        if fault is Fault.MISSING_FIELDS:
            bodies: dict[str, dict[str, Any]] = {
                "token": {"token_type": "Bearer", "expires_in": 7200, "scope": "read"},
                "api": {"meta": {}},
            }
            body = bodies.get(endpoint, {"unexpected": True})
            return _json(200, body, headers=_NO_STORE if endpoint == "token" else None)
        # DROP_BEFORE
        return _drop(request)

    async def _leave(
        self, request: web.Request, queued: _QueuedFault | None, response: web.StreamResponse
    ) -> web.StreamResponse:
        """Apply a post-processing fault (DROP_AFTER, SLOW) to a computed answer."""
        if queued is not None:
            if queued.fault is Fault.DROP_AFTER:
                return _drop(request)
            if await self._sleep(queued.delay):
                # Stopping: do not hand out an answer early, drop the connection instead.
                return _drop(request)
        return await self._in_pieces(request, response)

    async def _in_pieces(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Write ``response``'s body in ``answer_pieces`` pieces (or chunked), as configured."""
        body = response.body if isinstance(response, web.Response) else None
        if not isinstance(body, bytes) or not body or (self.answer_pieces == 1 and not self.chunked):
            return response
        stream = web.StreamResponse(status=response.status, headers=response.headers)
        if self.chunked:
            stream.enable_chunked_encoding()
        else:
            stream.content_length = len(body)
        await stream.prepare(request)
        size = -(-len(body) // self.answer_pieces)
        try:
            for start in range(0, len(body), size):
                if start and await self._sleep(self.piece_delay):
                    break
                await stream.write(body[start : start + size])
            await stream.write_eof()
        except ConnectionResetError:
            pass  # the client hung up mid-answer (its own timeout): nothing more to send
        return stream

    async def _read_form(self, request: web.Request) -> dict[str, str] | None:
        """The form body as str -> str, or None if the body is not a form."""
        if request.content_type not in (
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ):
            return None
        data = await request.post()
        return {k: v for k, v in data.items() if isinstance(v, str)}

    async def _handle_token(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._c.token_requests += 1
        return await self._handle_form(request, "token", self._grant)

    async def _handle_revoke(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._c.revoke_requests += 1
        return await self._handle_form(request, "revoke", self._revoke)

    async def _handle_form(
        self,
        request: web.Request,
        endpoint: str,
        handle: Callable[[Mapping[str, str], str | None], dict[str, Any]],
    ) -> web.StreamResponse:
        """A form-encoded POST endpoint: faults first, then ``handle`` under the lock."""
        early, queued = await self._enter(request, endpoint)
        if early is not None:
            return early
        form = await self._read_form(request)
        authorization = request.headers.get("Authorization")
        try:
            with self._lock:
                if form is None:
                    raise self._invalid_request("The request body must be application/x-www-form-urlencoded.")
                body = handle(form, authorization)
            response = _json(200, body, headers=_NO_STORE)
        except _GrantError as err:
            response = _error(err)
        return await self._leave(request, queued, response)

    async def _handle_authorize(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._c.authorize_requests += 1
        early, queued = await self._enter(request, "authorize")
        if early is not None:
            return early
        query = request.query
        if self.authorize_page and query.get("approve") != "1":
            return await self._leave(request, queued, _approval_page(query))
        try:
            with self._lock:
                location = self._authorize(query)
            response: web.StreamResponse = web.Response(
                status=302, headers={"Location": location, "Cache-Control": "no-store"}
            )
        except _GrantError as err:
            response = _error(err)
        return await self._leave(request, queued, response)

    def _authorize(self, query: Mapping[str, str]) -> str:
        client = self._clients.get(query.get("client_id", ""))
        if client is None:
            raise _GrantError(400, "invalid_client", _DESC_INVALID_CLIENT)
        redirect_uri = query.get("redirect_uri")
        if not redirect_uri:
            raise _GrantError(400, "invalid_request", "Missing required parameter: redirect_uri.")
        if redirect_uri != client.redirect_uri:
            raise _GrantError(
                400,
                "invalid_request",
                "The requested redirect uri is malformed or doesn't match client redirect URI.",
            )
        response_type = query.get("response_type")
        if not response_type:
            raise _GrantError(400, "invalid_request", "Missing required parameter: response_type.")
        if response_type != "code":
            raise _GrantError(
                400,
                "unsupported_response_type",
                "The authorization server does not support this response type.",
            )
        owner_type = query.get("resource_owner_type", "user")
        if owner_type not in ("user", "company"):
            raise _GrantError(400, "invalid_request", "Unknown resource_owner_type.")
        company_token = owner_type == "company"
        picked = query.get("company_id", "") if self.authorize_page else ""
        if picked.isdigit() and 0 < int(picked) < 2**31:
            owner = self._make_owner(int(picked), None, company_token)
        elif self._next_owners:
            queued = self._next_owners.popleft()
            owner = self._make_owner(queued.company_id, queued.employee_id, company_token)
        else:
            owner = self._make_owner(None, None, company_token)
        code = self._mint_code(client, redirect_uri, owner, company_token, query.get("scope"))
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        separator = "&" if "?" in redirect_uri else "?"
        return redirect_uri + separator + urllib.parse.urlencode(params)

    async def _handle_api(self, request: web.Request, render: _Renderer) -> web.StreamResponse:
        with self._lock:
            self._c.api_calls += 1
        early, queued = await self._enter(request, "api")
        if early is not None:
            return early
        version = request.match_info["version"]
        match = _VERSION_RE.match(version)
        if match is None:
            return _json(404, {"error": "not_found", "error_description": "Unknown version"})
        string_ids = match.group(1) is not None and int(match.group(1)) >= 2026
        authorization = request.headers.get("Authorization")
        try:
            with self._lock:
                pair = self._api_auth(authorization)
            response: web.StreamResponse = _json(200, render(pair, string_ids))
        except _GrantError as err:
            response = _error(err)
        return await self._leave(request, queued, response)

    async def _handle_credentials(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_api(request, _render_credentials)

    async def _handle_employees(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_api(request, _render_employees)


# ---------------------------------------------------------------------- rendering helpers


def _ident(value: int, string_ids: bool) -> int | str:
    return str(value) if string_ids else value


def _meta(total: int) -> dict[str, Any]:
    return {
        "limit": 100,
        "total": total,
        "has_next_page": False,
        "has_previous_page": False,
        "start_cursor": None,
        "end_cursor": None,
    }


def _render_credentials(pair: _Pair, string_ids: bool) -> dict[str, Any]:
    owner = pair.family.owner
    item: dict[str, Any] = {
        "id": _ident(pair.family.id, string_ids),
        "company_id": _ident(owner.company_id, string_ids),
    }
    if not pair.family.company_token and owner.employee_id is not None:
        eid = owner.employee_id
        item.update(
            employee_id=_ident(eid, string_ids),
            email=f"employee{eid}@company{owner.company_id}.example",
            first_name="Employee",
            last_name=str(eid),
            role="admin",
        )
    return {"data": [item], "meta": _meta(1)}


def _render_employees(pair: _Pair, string_ids: bool) -> dict[str, Any]:
    cid = pair.family.owner.company_id
    names = [("Ada", "Lovelace"), ("Grace", "Hopper"), ("Alan", "Turing")]
    data = [
        {
            "id": _ident(cid * 1000 + i, string_ids),
            "company_id": _ident(cid, string_ids),
            "first_name": first,
            "last_name": last,
            "full_name": f"{first} {last}",
            "email": f"{first.lower()}@company{cid}.example",
        }
        for i, (first, last) in enumerate(names, start=1)
    ]
    return {"data": data, "meta": _meta(len(data))}


def _json(status: int, body: Mapping[str, Any], *, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers=dict(headers or {}),
    )


def _error(err: _GrantError) -> web.Response:
    headers = dict(_NO_STORE)
    headers.update(err.headers)
    body = {"error": err.error}
    if err.description:
        body["error_description"] = err.description
    return _json(err.status, body, headers=headers)


_APPROVAL: Final = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>FakeFactorial: authorize</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;line-height:1.5}}</style>
</head><body><h1>Simulated Factorial</h1>
<p>The application <b>{client}</b> asks for access ({scope}).</p>
<form method="get" action="/oauth/authorize">{hidden}
<p><label>Company id <input name="company_id" type="number" min="1" value="1"></label></p>
<p><button name="approve" value="1">Approve</button></p></form></body></html>
"""


def _approval_page(query: Mapping[str, str]) -> web.Response:
    """The page a person approves on: the request's parameters ride along, escaped."""
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in query.items()
        if k not in ("approve", "company_id")
    )
    body = _APPROVAL.format(
        client=html.escape(query.get("client_id", "?")),
        scope=html.escape(query.get("scope", "default scopes")),
        hidden=hidden,
    )
    return web.Response(
        text=body,
        content_type="text/html",
        headers={
            **_NO_STORE,
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
        },
    )


def _drop(request: web.Request) -> web.Response:
    """Close the connection without answering; the client sees a disconnect."""
    transport = request.transport
    if transport is not None:
        transport.close()
    # aiohttp discards this answer: the transport is already closing.
    return web.Response(status=500)
