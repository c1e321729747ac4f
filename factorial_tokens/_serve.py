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

import html
import inspect
import logging
import re
import secrets
import unicodedata
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ._errors import (
    AuthorizationDenied,
    CodeReused,
    CompanyMismatch,
    ConfigurationError,
    ExchangeInDoubt,
    FactorialTokensError,
    InvalidCallback,
    InvalidState,
    InvalidTenant,
    ProviderError,
    ReauthorizationRequired,
    RefreshTimeout,
    StateReused,
    StoreUnavailable,
)
from ._manager import TokenManager
from ._models import validate_tenant

__all__ = ["ConnectCheck", "connect_app"]

#: The cookie that binds a connection to the browser that started it.
COOKIE = "factorial_tokens_binding"
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{32,64}")
_UNPRINTABLE = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})

log = logging.getLogger("factorial_tokens.serve")

#: Decides whether a request may connect a tenant: ``allow(request, tenant) -> bool``.
ConnectCheck = Callable[[web.Request, str], bool | Awaitable[bool]]

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
}
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;line-height:1.5}}</style>
</head><body><h1>{title}</h1><p>{message}</p></body></html>
"""


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
    """A plain HTML page; both strings are escaped here."""
    body = _PAGE.format(title=html.escape(title), message=html.escape(message))
    return web.Response(status=status, text=body, content_type="text/html", headers=_HEADERS)


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
        value = request.cookies.get(COOKIE)
        return value if value is not None and _COOKIE_VALUE.fullmatch(value) else None

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
        except StateReused:
            return _page(
                409,
                "Connection link already used",
                f"This connection of {tenant!r} was already completed with another "
                "authorization; start the connection again.",
            )
        except InvalidState as exc:
            return _page(400, "Connection failed", f"{exc}.")
        except AuthorizationDenied as exc:
            if exc.error == "access_denied":
                message = f"Access to Factorial was not granted for {tenant!r}."
                return _page(403, "Access not granted", message)
            return _page(
                400, "Connection failed", f"Factorial answered {exc.error!r} for {tenant!r}; start again."
            )
        except InvalidCallback as exc:
            return _page(400, "Connection failed", f"{exc}.")
        except CompanyMismatch as exc:
            return _page(
                409,
                "Another company",
                f"Tenant {tenant!r} is connected to Factorial company {exc.expected}; this "
                f"authorization was for company {exc.got}, so it was refused and revoked. Sign in "
                "to Factorial with the right company and connect again.",
            )
        except CodeReused:
            return _page(
                409, "Connection failed", "This authorization code was already used for another tenant."
            )
        except ExchangeInDoubt:
            return _page(
                409,
                "Connect again",
                f"The answer from Factorial for {tenant!r} was lost; connect the company again.",
            )
        except ReauthorizationRequired as exc:
            return _page(409, "Connect again", f"{exc}.")
        except ProviderError as exc:
            log.warning("tenant %r: code exchange refused: %s", tenant, exc.error)
            detail = f" ({exc.error})" if exc.error else ""
            return _page(
                502,
                "Factorial refused the connection",
                f"Factorial did not accept the authorization of {tenant!r}{detail}; "
                "start the connection again.",
            )
        except (StoreUnavailable, RefreshTimeout):
            log.exception("tenant %r: code exchange failed on the token store", tenant)
            return _page(503, "Try again", "The token store is unavailable; try again in a moment.")
        except FactorialTokensError:
            log.exception("tenant %r: code exchange failed", tenant)
            return _page(500, "Connection failed", "The connection failed; start it again.")
        if self._success_url is not None:
            target = self._success_url.replace("{tenant}", quote(result.tenant, safe=""))
            return web.Response(status=303, headers={**_HEADERS, "Location": target})
        return _page(
            200, "Connected", f"Tenant {result.tenant!r} is connected to Factorial. You can close this page."
        )
