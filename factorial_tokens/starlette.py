"""Starlette and FastAPI: the connect routes as an ASGI app to mount, and a lifespan helper.

Install with ``pip install "factorial-tokens[starlette]"``::

    tm = TokenManager(factorial, "redis://...")             # built at import, opened by the lifespan
    api = FastAPI(lifespan=lifespan(tm))
    api.mount("/factorial", connect_app(tm, prefix="/factorial"))
    link = tm.connect_link("acme", base_url="https://example.com/factorial")

The routes are those of the aiohttp :func:`~factorial_tokens.connect_app`, on the same
framework-neutral :meth:`~factorial_tokens.TokenManager.complete_callback`:

* ``GET /connect/{tenant}?link=...`` checks the signed connect link (403 without one),
  sets an HttpOnly, SameSite=Lax cookie that binds the flow to this browser, and answers
  302 to Factorial's authorize URL (``&company=1`` asks for a company token);
* ``GET <the redirect URI's path minus prefix>`` completes the callback: the state's
  signature, expiry and browser binding are checked, the state is spent once fleet-wide
  (a retried callback gets the same answer, the same state with another code 409), and
  the code is exchanged exactly once. It answers a small page, or 303 to ``success_url``.

Limitations: a connect link is a bearer credential until it expires; ``allow`` can add a
per-request check (your own sign-in).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ._errors import (
    ConfigurationError,
    FactorialTokensError,
    InvalidState,
    InvalidTenant,
    ProviderError,
    RefreshTimeout,
    StoreUnavailable,
)
from ._manager import TokenManager
from ._models import validate_tenant
from ._pages import BINDING_COOKIE, PAGE_HEADERS, callback_failure, page_html, valid_binding
from ._serve import callback_path

__all__ = ["StarletteConnectCheck", "connect_app", "lifespan"]

log = logging.getLogger("factorial_tokens.starlette")

#: Decides whether a request may connect a tenant: ``allow(request, tenant) -> bool``.
StarletteConnectCheck = Callable[[Request, str], bool | Awaitable[bool]]


def lifespan(manager: TokenManager) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A lifespan for ``Starlette(lifespan=...)`` / ``FastAPI(lifespan=...)`` that opens
    ``manager`` at start-up and closes it (work in flight first) at shutdown."""

    @contextlib.asynccontextmanager
    async def span(_app: Any) -> AsyncIterator[None]:
        async with manager:
            yield

    return span


def connect_app(
    manager: TokenManager,
    *,
    prefix: str = "",
    allow: StarletteConnectCheck | None = None,
    open_routes: bool = False,
    success_url: str | None = None,
) -> Starlette:
    """The connect routes for ``manager`` as an ASGI app (see the module doc).

    Args:
        manager: the TokenManager (opened by your lifespan, e.g. :func:`lifespan`).
        prefix: where the app is mounted (``api.mount(prefix, ...)``); the callback route
            is the redirect URI's path minus it.
        allow: ``allow(request, tenant)`` (sync or async) returns False to refuse a tenant
            with 404, on both routes.
        open_routes: local development only: no connect link needed, and a callback
            without the cookie is accepted for an unbound state.
        success_url: where the browser goes (303) after a successful connection;
            ``{tenant}`` in it is replaced by the URL-quoted tenant id.

    Raises ConfigurationError if the redirect URI does not fit ``prefix``, or if
    ``success_url`` is not an absolute http(s) URL.
    """
    if success_url is not None:
        parts = urlsplit(success_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError("success_url must be an absolute http(s) URL")
    routes = _Routes(manager, allow, open_routes, success_url, prefix)
    return Starlette(
        routes=[
            Route("/connect/{tenant}", routes.connect, methods=["GET"]),
            Route(callback_path(manager.app.redirect_uri, prefix), routes.callback, methods=["GET"]),
        ]
    )


def _page(status: int, title: str, message: str) -> HTMLResponse:
    return HTMLResponse(page_html(title, message), status_code=status, headers=PAGE_HEADERS)


class _Routes:
    def __init__(
        self,
        manager: TokenManager,
        allow: StarletteConnectCheck | None,
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

    async def _allowed(self, request: Request, tenant: str) -> bool:
        if self._allow is None:
            return True
        verdict = self._allow(request, tenant)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def connect(self, request: Request) -> Response:
        """Check the link, bind the browser, 302 to Factorial's authorize URL."""
        try:
            tenant = validate_tenant(request.path_params["tenant"])
        except InvalidTenant as exc:
            return _page(400, "Invalid tenant", str(exc))
        if not self._open:
            try:
                self._tm.check_connect_link(request.query_params.get("link"), tenant)
            except InvalidState as exc:
                return _page(
                    403,
                    "Connect link required",
                    f"Connecting {tenant!r} needs a valid connect link ({exc}); ask for a new one.",
                )
        if not await self._allowed(request, tenant):
            return _page(404, "Unknown tenant", f"No tenant {tenant!r} may be connected here.")
        company = request.query_params.get("company", "") in ("1", "true", "yes")
        binding = valid_binding(request.cookies.get(BINDING_COOKIE)) or secrets.token_urlsafe(32)
        # The target is built from the app's configured base URL only, never from the request.
        location = self._tm.authorization_url(tenant, company=company, binding=binding)
        response = RedirectResponse(location, status_code=302, headers=PAGE_HEADERS)
        response.set_cookie(
            BINDING_COOKIE,
            binding,
            max_age=int(self._tm.state_ttl),
            path=self._cookie_path,
            httponly=True,
            samesite="lax",
            secure=self._secure or request.url.scheme == "https",
        )
        return response

    async def callback(self, request: Request) -> Response:
        """Hand the callback to the manager; answer a success or error page."""
        query = request.query_params
        state = query.get("state")
        if not state:
            return _page(400, "Connection failed", "The callback has no state: start the connection again.")
        try:
            tenant = self._tm.tenant_from_state(state)
        except InvalidState as exc:
            return _page(400, "Connection failed", f"{exc}.")
        if not await self._allowed(request, tenant):
            return _page(404, "Unknown tenant", f"No tenant {tenant!r} may be connected here.")
        binding = valid_binding(request.cookies.get(BINDING_COOKIE))
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
                log.warning("tenant %r: code exchange failed on the token store: %s", tenant, exc)
            elif isinstance(exc, ProviderError):
                log.warning("tenant %r: code exchange refused: %s", tenant, exc.error)
            return _page(*callback_failure(exc, tenant))
        if self._success_url is not None:
            target = self._success_url.replace("{tenant}", quote(result.tenant, safe=""))
            return Response(status_code=303, headers={**PAGE_HEADERS, "Location": target})
        return _page(
            200, "Connected", f"Tenant {result.tenant!r} is connected to Factorial. You can close this page."
        )
