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

The simulator by job: ``_rules`` (grants, rotation, reuse detection, revocation),
``_faults`` (scripted faults and the rate limiter), ``_wire`` (what is written: JSON,
dialects, pages), ``_stats`` (the counters), and this server, which reads requests,
applies latency, faults and answers in pieces, and hands the rest to the rules. The
package depends on nothing else in ``factorial_tokens``: stdlib, aiohttp and attrs.

Limitations: state lives in memory of one process; the simulator's clock is the wall
clock plus the offset set by :meth:`FakeFactorial.advance_time`; refresh-token scope
narrowing and PKCE are not simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Final

import aiohttp
from aiohttp import web

from ._faults import PRE_FAULTS, Fault, FaultQueue, QueuedFault, RateLimiter, fault_response
from ._rules import Client, GrantError, Owner, Pair, RefreshMode, Rules
from ._stats import Counters, SimulatorStats
from ._wire import (
    NO_STORE,
    Dialect,
    approval_page,
    drop,
    error_response,
    format_seconds,
    json_response,
    render_credentials,
    render_employees,
    token_body,
)

__all__ = ["AuthorizationRejected", "FakeFactorial"]

_VERSION_RE: Final = re.compile(r"^(?:(\d{4})-\d{2}-\d{2}|v\d+)$")

#: Renders an API body from the authenticated pair and whether ids are strings.
_Renderer = Callable[[Pair, bool], dict[str, Any]]


class AuthorizationRejected(Exception):
    """Raised by :meth:`FakeFactorial.authorize` when the answer is not a 302 redirect.

    ``status`` is the HTTP status and ``body`` the (text) body of the answer.
    """

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"authorize answered {status} instead of 302: {body[:300]}")
        self.status = status
        self.body = body


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

        # One lock over the rules, the fault queue, the rate limiter and the counters.
        self._lock = threading.Lock()
        self._c = Counters()
        self._rules = Rules(self, Client(client_id, client_secret, redirect_uri), self._c)
        self._faults = FaultQueue(self._c)
        self._rates = RateLimiter(self._c)

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
            self._rules.add_client(Client(client_id, client_secret, redirect_uri))

    def next_owner(self, company_id: int | None = None, employee_id: int | None = None) -> None:
        """Queue who approves the next ``/oauth/authorize`` request (FIFO).

        ``company_id`` None picks a fresh id. For user tokens an ``employee_id`` of None
        picks a fresh id too; company tokens ignore ``employee_id``.
        """
        with self._lock:
            cid = self._rules.next_id() if company_id is None else company_id
            self._rules.next_owners.append(Owner(cid, employee_id))

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
        queued = FaultQueue.make(fault, times, endpoint, retry_after, delay)
        with self._lock:
            self._faults.add(endpoint, queued)

    def pending_faults(self, endpoint: str | None = None) -> int:
        """How many injected faults are still queued (for one endpoint family or all)."""
        with self._lock:
            return self._faults.pending(endpoint)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    def advance_time(self, seconds: float) -> None:
        """Move the simulator's clock forward: codes and tokens expire without sleeping."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        with self._lock:
            self._rules.clock_offset += seconds

    # ------------------------------------------------------------------ test helpers

    @property
    def stats(self) -> SimulatorStats:
        """A consistent snapshot of every counter, safe to read from any thread."""
        with self._lock:
            return self._c.snapshot()

    def reset_stats(self) -> None:
        """Zero every counter (tokens, codes and families are kept)."""
        with self._lock:
            self._c.reset()

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
            return self._rules.issue_code(
                client_id or self.client_id, company_id, employee_id, company_token, scope
            )

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
            return self._rules.is_active(access_token)

    def is_refresh_usable(self, refresh_token: str) -> bool:
        """True if presenting this refresh token now would succeed."""
        with self._lock:
            return self._rules.is_refresh_usable(refresh_token)

    def live_pairs(self, company_id: int | None = None) -> int:
        """Pairs (access + refresh token records) still usable, for one company or all.

        A pair is live when neither it nor its family is revoked and either its access
        token is unexpired or its refresh token can still refresh.
        """
        with self._lock:
            return self._rules.live_pairs(company_id)

    def family_alive(self, company_id: int) -> bool:
        """True if the company has at least one unrevoked grant with a live pair."""
        return self.live_pairs(company_id) > 0

    def families_revoked_for(self, company_id: int) -> int:
        """How many of the company's families (grants) are revoked."""
        with self._lock:
            return self._rules.families_revoked_for(company_id)

    def revoke_company(self, company_id: int) -> int:
        """Revoke every grant of a company, as an admin disconnecting the app would.

        Returns how many families were revoked (counted under cause ``admin``).
        """
        with self._lock:
            return self._rules.revoke_company(company_id)

    def expire_access_tokens(self, company_id: int | None = None) -> int:
        """Expire every unexpired access token (of one company or all) now.

        Refresh tokens are untouched. Returns how many access tokens were expired.
        """
        with self._lock:
            return self._rules.expire_access_tokens(company_id)

    def secrets_issued(self) -> set[str]:
        """Every access token, refresh token and code issued so far: what a test checks
        never reaches a log, an error or a repr."""
        with self._lock:
            return self._rules.secrets_issued()

    # ------------------------------------------------------------------ HTTP plumbing

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, cut short when the simulator stops; True if it is stopping."""
        closing = self._closing
        if seconds > 0 and closing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), seconds)
        return closing is not None and closing.is_set()

    async def _enter(
        self, request: web.Request, endpoint: str
    ) -> tuple[web.StreamResponse | None, QueuedFault | None]:
        """Latency, the unavailable switch, the rate limiter and queued faults."""
        if await self._sleep(self.latency):
            return drop(request), None
        if self.unavailable:
            with self._lock:
                self._c.unavailable += 1
            return json_response(503, {"error": "service_unavailable"}), None
        with self._lock:
            wait = None
            if request.method == "POST":
                wait = self._rates.check(endpoint, self.rate_limit_per_minute, self.rate_limit_window)
            queued = self._faults.take(endpoint) if wait is None else None
        if wait is not None:
            return json_response(
                429,
                {"error": "too_many_requests", "error_description": "Rate limit exceeded"},
                headers={"Retry-After": format_seconds(wait)},
            ), None
        if queued is not None and queued.fault in PRE_FAULTS:
            return fault_response(request, endpoint, queued), None
        return None, queued

    async def _leave(
        self, request: web.Request, queued: QueuedFault | None, response: web.StreamResponse
    ) -> web.StreamResponse:
        """Apply a post-processing fault (DROP_AFTER, SLOW) to a computed answer."""
        if queued is not None:
            if queued.fault is Fault.DROP_AFTER:
                return drop(request)
            if await self._sleep(queued.delay):
                # Stopping: do not hand out an answer early, drop the connection instead.
                return drop(request)
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
        return await self._handle_form(request, "token", self._token_answer)

    async def _handle_revoke(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._c.revoke_requests += 1
        return await self._handle_form(request, "revoke", self._rules.revoke)

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
                    raise self._rules.invalid_request(
                        "The request body must be application/x-www-form-urlencoded."
                    )
                body = handle(form, authorization)
            response = json_response(200, body, headers=NO_STORE)
        except GrantError as err:
            response = error_response(err)
        return await self._leave(request, queued, response)

    async def _handle_authorize(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._c.authorize_requests += 1
        early, queued = await self._enter(request, "authorize")
        if early is not None:
            return early
        query = request.query
        if self.authorize_page and query.get("approve") != "1":
            return await self._leave(request, queued, approval_page(query))
        try:
            with self._lock:
                location = self._rules.authorize(query)
            response: web.StreamResponse = web.Response(
                status=302, headers={"Location": location, "Cache-Control": "no-store"}
            )
        except GrantError as err:
            response = error_response(err)
        return await self._leave(request, queued, response)

    def _token_answer(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        issued = self._rules.grant(form, authorization)
        return token_body(issued.pair, self.dialect, self.access_token_ttl, with_refresh=issued.with_refresh)

    async def _handle_api(self, request: web.Request, render: _Renderer) -> web.StreamResponse:
        with self._lock:
            self._c.api_calls += 1
        early, queued = await self._enter(request, "api")
        if early is not None:
            return early
        version = request.match_info["version"]
        match = _VERSION_RE.match(version)
        if match is None:
            return json_response(404, {"error": "not_found", "error_description": "Unknown version"})
        string_ids = match.group(1) is not None and int(match.group(1)) >= 2026
        authorization = request.headers.get("Authorization")
        try:
            with self._lock:
                pair = self._rules.api_auth(authorization)
            response: web.StreamResponse = json_response(200, render(pair, string_ids))
        except GrantError as err:
            response = error_response(err)
        return await self._leave(request, queued, response)

    async def _handle_credentials(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_api(request, render_credentials)

    async def _handle_employees(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_api(request, render_employees)
