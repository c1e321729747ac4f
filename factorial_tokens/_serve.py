"""The connect routes: send a company's admin to Factorial, take the OAuth callback.

``connect_app(manager)`` is an aiohttp application with two routes:

* ``GET /connect/{tenant}?link=...`` checks the signed connect link
  (:meth:`TokenManager.connect_link`; 403 without a valid one), sets an HttpOnly,
  SameSite=Lax cookie that binds the flow to this browser (Secure when the redirect URI
  is https), and answers 302 to Factorial's authorize URL with a signed ``state`` bound
  to the tenant and to that cookie (``&company=1`` asks for a company token);
* ``GET <the redirect URI's path>`` (e.g. ``/oauth/callback``) hands the callback to
  :meth:`TokenManager.complete_callback` with the cookie as the binding, and answers a
  small HTML page, or 303 to the configured ``success_url``.

Mount it inside your own server with
``app.add_subapp("/factorial", connect_app(tm, prefix="/factorial"))``, or run it alone
with ``factorial-tokens serve``.

Guarantees: only the holder of a connect link can start connecting a tenant; a callback
completed in another browser (no cookie, or another one) is refused; a callback without a
valid state never reaches Factorial, never writes to the store, and shows nothing of its
``error=`` text; a replayed callback (same state, same code) answers the same success
without a second exchange; a state presented again with a *different* code is refused; a
grant of another company than the tenant's is refused and revoked (``CompanyMismatch``);
the callback redirects nowhere but ``success_url``; tenant ids and provider messages are
HTML-escaped; no page holds a token or the client secret.

``open_routes=True`` (``factorial-tokens serve --open``) drops the link and the cookie
requirements: for local development only.

Limitations: a connect link is a bearer credential until it expires: whoever holds the
link of a tenant that was never connected can connect it to a company they administer.
Send links only to the tenant's admin, with a short ``ttl``; ``allow`` can add your own
per-request check.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import unicodedata
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ._errors import (
    AuthorizationDenied,
    ConfigurationError,
    FactorialTokensError,
    InvalidCallback,
    InvalidState,
    InvalidTenant,
    ProviderError,
    RefreshTimeout,
    StoreUnavailable,
)
from ._manager import TokenManager
from ._models import validate_tenant
from ._pages import BINDING_COOKIE, PAGE_HEADERS, callback_failure, page_html, valid_binding

__all__ = ["ConnectCheck", "connect_app"]

#: The cookie that binds a connection to the browser that started it.
COOKIE = BINDING_COOKIE
_HEADERS = PAGE_HEADERS
_UNPRINTABLE = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})

log = logging.getLogger("factorial_tokens.serve")

#: Decides whether a request may connect a tenant: ``allow(request, tenant) -> bool``.
ConnectCheck = Callable[[web.Request, str], bool | Awaitable[bool]]


def callback_path(redirect_uri: str, prefix: str = "") -> str:
    """The route path of the OAuth callback: the redirect URI's path, minus ``prefix``.

    Raises ConfigurationError if the redirect URI's path does not live under ``prefix``.
    """
    path = urlsplit(redirect_uri).path or "/"
    prefix = prefix.rstrip("/")
    if not prefix:
        return path
    if not path.startswith(prefix + "/"):
        raise ConfigurationError(
            f"the redirect URI's path {path!r} is not under the sub-app prefix {prefix!r}"
        )
    return path[len(prefix) :]


def connect_app(
    manager: TokenManager,
    *,
    prefix: str = "",
    allow: ConnectCheck | None = None,
    open_routes: bool = False,
    success_url: str | None = None,
) -> web.Application:
    """The connect routes for ``manager`` as an aiohttp application (see the module doc).

    Args:
        manager: an open TokenManager (the caller owns its lifecycle).
        prefix: where the application is mounted with ``add_subapp`` (``""`` when it is
            the root application); the callback route is the redirect URI's path minus it.
        allow: ``allow(request, tenant)`` (sync or async) returns False to refuse a tenant
            with 404, on both routes; by default every valid tenant id may connect.
        open_routes: local development only: ``/connect/{tenant}`` needs no connect link
            and a callback without the browser cookie is accepted for an unbound state.
        success_url: where the admin's browser goes (303) after a successful connection;
            ``{tenant}`` in it is replaced by the URL-quoted tenant id. Default: a page.

    Raises ConfigurationError if the redirect URI does not fit ``prefix``, or if
    ``success_url`` is not an absolute http(s) URL.
    """
    if success_url is not None:
        parts = urlsplit(success_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError("success_url must be an absolute http(s) URL")
    app = web.Application()
    routes = _Routes(manager, allow, open_routes, success_url, prefix)
    app.router.add_get("/connect/{tenant}", routes.connect, allow_head=False)
    app.router.add_get(callback_path(manager.app.redirect_uri, prefix), routes.callback, allow_head=False)
    return app


def _page(status: int, title: str, message: str) -> web.Response:
    """A plain HTML page (see ``_pages``)."""
    return web.Response(
        status=status, text=page_html(title, message), content_type="text/html", headers=_HEADERS
    )


def printable(text: str) -> str:
    """``text`` with every control, format and separator character escaped (``\\x0d``),
    so a decoded request path cannot forge log lines or hide characters."""
    out = []
    for ch in text:
        if ch == "\\" or unicodedata.category(ch) in _UNPRINTABLE:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


class AccessLogger(AbstractAccessLogger):
    """Method, path and status only (a callback's query holds the code and the state),
    with control characters escaped."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %.1fms",
            printable(request.method),
            printable(request.path),
            response.status,
            time * 1000,
        )


class _Routes:
    def __init__(
        self,
        manager: TokenManager,
        allow: ConnectCheck | None,
        open_routes: bool,
        success_url: str | None,
        prefix: str,
    ) -> None:
        self._tm = manager
        self._allow = allow
        self._open = open_routes
        self._success_url = success_url
        self._cookie_path = prefix.rstrip("/") + "/"
        self._secure = urlsplit(manager.app.redirect_uri).scheme == "https"

    async def _allowed(self, request: web.Request, tenant: str) -> bool:
        if self._allow is None:
            return True
        verdict = self._allow(request, tenant)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    @staticmethod
    def _binding(request: web.Request) -> str | None:
        return valid_binding(request.cookies.get(COOKIE))

    async def connect(self, request: web.Request) -> web.StreamResponse:
        """Check the link, bind the browser, 302 to Factorial's authorize URL."""
        try:
            tenant = validate_tenant(request.match_info["tenant"])
        except InvalidTenant as exc:
            return _page(400, "Invalid tenant", str(exc))
        if not self._open:
            try:
                self._tm.check_connect_link(request.query.get("link"), tenant)
            except InvalidState as exc:
                return _page(
                    403,
                    "Connect link required",
                    f"Connecting {tenant!r} needs a valid connect link ({exc}); ask for a new one.",
                )
        if not await self._allowed(request, tenant):
            return _page(404, "Unknown tenant", f"No tenant {tenant!r} may be connected here.")
        company = request.query.get("company", "") in ("1", "true", "yes")
        binding = self._binding(request) or secrets.token_urlsafe(32)
        # The target is built from the app's configured base URL only, never from the request.
        location = self._tm.authorization_url(tenant, company=company, binding=binding)
        response = web.Response(status=302, headers={**_HEADERS, "Location": location})
        response.set_cookie(
            COOKIE,
            binding,
            max_age=int(self._tm.state_ttl),
            path=self._cookie_path,
            httponly=True,
            samesite="Lax",
            secure=self._secure or request.secure,
        )
        return response

    async def callback(self, request: web.Request) -> web.StreamResponse:
        """Hand the callback to the manager; answer a success or error page."""
        query = request.query
        state = query.get("state")
        if not state:
            return _page(400, "Connection failed", "The callback has no state: start the connection again.")
        try:
            tenant = self._tm.tenant_from_state(state)
        except InvalidState as exc:
            return _page(400, "Connection failed", f"{exc}.")
        if not await self._allowed(request, tenant):
            return _page(404, "Unknown tenant", f"No tenant {tenant!r} may be connected here.")
        binding = self._binding(request)
        if binding is None and not self._open:
            return _page(
                400,
                "Connection failed",
                f"This connection of {tenant!r} was not started in this browser (its cookie is "
                "missing): open the connect link again in this browser.",
            )
        try:
            result = await self._tm.complete_callback(
                state=state, code=query.get("code"), error=query.get("error"), binding=binding
            )
        except FactorialTokensError as exc:
            if isinstance(exc, StoreUnavailable | RefreshTimeout):
                log.exception("tenant %r: code exchange failed on the token store", tenant)
            elif isinstance(exc, ProviderError):
                log.warning("tenant %r: code exchange refused: %s", tenant, exc.error)
            elif not isinstance(exc, InvalidState | InvalidCallback | AuthorizationDenied):
                log.warning("tenant %r: callback refused: %s", tenant, type(exc).__name__)
            return _page(*callback_failure(exc, tenant))
        if self._success_url is not None:
            target = self._success_url.replace("{tenant}", quote(result.tenant, safe=""))
            return web.Response(status=303, headers={**_HEADERS, "Location": target})
        return _page(
            200, "Connected", f"Tenant {result.tenant!r} is connected to Factorial. You can close this page."
        )
