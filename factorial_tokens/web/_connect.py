"""The connect routes for aiohttp: send a company's admin to Factorial, take the OAuth callback.

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

import logging
import unicodedata
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .._connect import Answer, ConnectFlow, callback_path
from .._manager import TokenManager
from .._pages import BINDING_COOKIE

__all__ = ["COOKIE", "AccessLogger", "ConnectCheck", "callback_path", "connect_app", "printable"]

#: The cookie that binds a connection to the browser that started it.
COOKIE = BINDING_COOKIE
_UNPRINTABLE = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})

log = logging.getLogger("factorial_tokens.serve")

#: Decides whether a request may connect a tenant: ``allow(request, tenant) -> bool``.
ConnectCheck = Callable[[web.Request, str], bool | Awaitable[bool]]


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
    flow: ConnectFlow[web.Request] = ConnectFlow(
        manager, allow=allow, open_routes=open_routes, success_url=success_url, prefix=prefix, log=log
    )

    async def connect(request: web.Request) -> web.StreamResponse:
        return _response(
            await flow.connect(
                request,
                request.match_info["tenant"],
                request.query,
                request.cookies.get(COOKIE),
                request.secure,
            )
        )

    async def callback(request: web.Request) -> web.StreamResponse:
        return _response(await flow.callback(request, request.query, request.cookies.get(COOKIE)))

    app = web.Application()
    app.router.add_get("/connect/{tenant}", connect, allow_head=False)
    app.router.add_get(callback_path(manager.app.redirect_uri, prefix), callback, allow_head=False)
    return app


def _response(answer: Answer) -> web.Response:
    if answer.html is None:
        response = web.Response(status=answer.status, headers=answer.headers)
    else:
        response = web.Response(
            status=answer.status, text=answer.html, content_type="text/html", headers=answer.headers
        )
    if answer.cookie is not None:
        response.set_cookie(
            answer.cookie.name, answer.cookie.value, samesite="Lax", **answer.cookie.options()
        )
    return response


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
