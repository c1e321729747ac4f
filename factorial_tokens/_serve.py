"""The connect routes: send a company's admin to Factorial, take the OAuth callback.

``connect_app(manager)`` is an aiohttp application with two routes:

* ``GET /connect/{tenant}`` answers 302 to Factorial's authorize URL with a signed
  ``state`` bound to the tenant (``?company=1`` asks for a company token);
* ``GET <the redirect URI's path>`` (e.g. ``/oauth/callback``) verifies the state, claims
  its nonce for the code it came with, exchanges the code (once, ever) and answers a
  small HTML page.

Mount it inside your own server with
``app.add_subapp("/factorial", connect_app(tm, prefix="/factorial"))``, or run it alone
with ``factorial-tokens serve``.

Guarantees: a replayed callback (same state, same code) answers the same success without
a second exchange; a state presented again with a *different* code is refused; the
callback never redirects anywhere; tenant ids and provider messages are HTML-escaped;
no page holds a token or the client secret.

Limitations: anyone who can reach ``/connect/{tenant}`` can start connecting *their*
Factorial company to that tenant id. Put the routes behind your own authentication, or
pass ``allow`` to decide per request who may connect which tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import inspect
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from ._errors import (
    CodeReused,
    ConfigurationError,
    ExchangeInDoubt,
    FactorialTokensError,
    InvalidCallback,
    InvalidState,
    InvalidTenant,
    ProviderError,
    ReauthorizationRequired,
    RefreshTimeout,
    StoreUnavailable,
)
from ._manager import TokenManager
from ._models import validate_tenant
from ._store import ClaimState, TenantKey

__all__ = ["ConnectCheck", "connect_app"]

log = logging.getLogger("factorial_tokens.serve")

#: Decides whether a request may connect a tenant: ``allow(request, tenant) -> bool``.
ConnectCheck = Callable[[web.Request, str], bool | Awaitable[bool]]

_NONCE_TRIES = 3
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
    manager: TokenManager, *, prefix: str = "", allow: ConnectCheck | None = None
) -> web.Application:
    """The connect routes for ``manager`` as an aiohttp application (see the module doc).

    Args:
        manager: an open TokenManager (the caller owns its lifecycle).
        prefix: where the application is mounted with ``add_subapp`` (``""`` when it is
            the root application); the callback route is the redirect URI's path minus it.
        allow: ``allow(request, tenant)`` (sync or async) returns False to refuse a tenant
            with 404, on both routes; by default every valid tenant id may connect.

    Raises ConfigurationError if the redirect URI does not fit ``prefix``.
    """
    app = web.Application()
    routes = _Routes(manager, allow)
    app.router.add_get("/connect/{tenant}", routes.connect, allow_head=False)
    app.router.add_get(callback_path(manager.app.redirect_uri, prefix), routes.callback, allow_head=False)
    return app


def _page(status: int, title: str, message: str) -> web.Response:
    """A plain HTML page; both strings are escaped here."""
    body = _PAGE.format(title=html.escape(title), message=html.escape(message))
    return web.Response(status=status, text=body, content_type="text/html", headers=_HEADERS)


class _Routes:
    def __init__(self, manager: TokenManager, allow: ConnectCheck | None) -> None:
        self._tm = manager
        self._allow = allow

    async def _allowed(self, request: web.Request, tenant: str) -> bool:
        if self._allow is None:
            return True
        verdict = self._allow(request, tenant)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def connect(self, request: web.Request) -> web.StreamResponse:
        """302 to Factorial's authorize URL for the tenant in the path."""
        tenant = request.match_info["tenant"]
        try:
            validate_tenant(tenant)
        except InvalidTenant as exc:
            return _page(400, "Invalid tenant", str(exc))
        if not await self._allowed(request, tenant):
            return _page(404, "Unknown tenant", f"No tenant {tenant!r} may be connected here.")
        company = request.query.get("company", "") in ("1", "true", "yes")
        # The target is built from the app's configured base URL only, never from the request.
        location = self._tm.authorization_url(tenant, company=company)
        return web.Response(status=302, headers={**_HEADERS, "Location": location})

    async def callback(self, request: web.Request) -> web.StreamResponse:
        """Verify the state, exchange the code once, answer a success or error page."""
        query = request.query
        state = query.get("state")
        error = query.get("error")
        tenant: str | None = None
        if state:
            try:
                tenant = self._tm.verify_state(state)[0]
            except InvalidState:
                tenant = None
        if error is not None:
            return self._denied(error, tenant)
        if not state:
            return _page(400, "Connection failed", "The callback has no state: start the connection again.")
        try:
            tenant, nonce = self._tm.verify_state(state)
        except InvalidState as exc:
            return _page(400, "Connection failed", f"{exc}.")
        code = query.get("code")
        if not code:
            return _page(400, "Connection failed", "The callback has no authorization code.")
        if not await self._allowed(request, tenant):
            return _page(404, "Unknown tenant", f"No tenant {tenant!r} may be connected here.")
        try:
            if not await self._claim_nonce(tenant, nonce, code):
                return _page(
                    409,
                    "Connection link already used",
                    f"This connection of {tenant!r} was already completed with another "
                    "authorization; start the connection again.",
                )
            await self._tm.exchange_code(tenant, code)
        except InvalidCallback as exc:
            return _page(400, "Connection failed", f"{exc}.")
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
        return _page(
            200, "Connected", f"Tenant {tenant!r} is connected to Factorial. You can close this page."
        )

    def _denied(self, error: str, tenant: str | None) -> web.Response:
        who = f" for {tenant!r}" if tenant else ""
        if error == "access_denied":
            return _page(403, "Access not granted", f"Access to Factorial was not granted{who}.")
        shown = error[:64]
        return _page(
            400, "Connection failed", f"Factorial answered {shown!r}{who}; start the connection again."
        )

    async def _claim_nonce(self, tenant: str, nonce: str, code: str) -> bool:
        """Bind the state's nonce to the first code it arrives with; True for that code.

        A state is single-use: the first callback claims its nonce for its code (in the
        store, so every worker agrees); the same code again passes (the exchange itself is
        idempotent), another code is refused.
        """
        store = self._tm.store
        secret = self._tm.app.client_secret.encode()
        nonce_hash = "state:" + hashlib.sha256(nonce.encode()).hexdigest()
        # The claim's owner is the code's binding, so a duplicate of the same callback
        # holds the same claim; the binding is also kept as the finished claim's outcome.
        binding = hmac.new(secret, b"state-binding\x00" + code.encode(), hashlib.sha256).hexdigest()
        key = TenantKey(self._tm.app.client_id, tenant)
        for _ in range(_NONCE_TRIES):
            claim = await store.claim_code(key, nonce_hash, binding, self._tm.lease_ttl)
            same = claim.won or (claim.outcome is not None and hmac.compare_digest(claim.outcome, binding))
            if claim.key != key or not same:
                return False
            if claim.state is not ClaimState.CLAIMED:
                return True
            # Finished claims are kept for a day, longer than any state lives.
            if await store.advance_code(claim, ClaimState.DONE, self._tm.lease_ttl, binding):
                return True
            # A duplicate of this very callback finished the claim first: read it again.
        return False
