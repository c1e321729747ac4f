"""Starlette and FastAPI: the connect routes as an ASGI app to mount, and a lifespan helper.

Install with ``pip install "factorial-tokens[starlette]"``::

    tm = TokenManager(factorial, "redis://...")             # built at import, opened by the lifespan
    api = FastAPI(lifespan=lifespan(tm))
    api.mount("/factorial", connect_app(tm, prefix="/factorial"))
    link = tm.connect_link("acme", base_url="https://example.com/factorial")

The routes are those of the aiohttp :func:`factorial_tokens.web.connect_app`, through the
same framework-neutral steps and :meth:`~factorial_tokens.TokenManager.complete_callback`:

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
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ._connect import Answer, ConnectFlow, callback_path
from ._manager import TokenManager
from ._pages import BINDING_COOKIE, PAGE_HEADERS

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
    flow: ConnectFlow[Request] = ConnectFlow(
        manager, allow=allow, open_routes=open_routes, success_url=success_url, prefix=prefix, log=log
    )

    async def connect(request: Request) -> Response:
        if request.method != "GET":
            return _not_get()
        return _response(
            await flow.connect(
                request,
                request.path_params["tenant"],
                request.query_params,
                request.cookies.get(BINDING_COOKIE),
                request.url.scheme == "https",
            )
        )

    async def callback(request: Request) -> Response:
        if request.method != "GET":
            return _not_get()
        return _response(
            await flow.callback(request, request.query_params, request.cookies.get(BINDING_COOKIE))
        )

    return Starlette(
        routes=[
            # ``path``: a tenant id may hold a slash (its link quotes it, Starlette routes on
            # the decoded path).
            Route("/connect/{tenant:path}", connect, methods=["GET"]),
            Route(callback_path(manager.app.redirect_uri, prefix), callback, methods=["GET"]),
        ]
    )


def _not_get() -> Response:
    """Starlette answers HEAD on every GET route; a HEAD (a link checker, a prefetch) must
    neither spend a state nor set the binding cookie."""
    return Response(status_code=405, headers={**PAGE_HEADERS, "Allow": "GET"})


def _response(answer: Answer) -> Response:
    response: Response
    if answer.html is None:
        response = Response(status_code=answer.status, headers=dict(answer.headers))
    else:
        response = HTMLResponse(answer.html, status_code=answer.status, headers=dict(answer.headers))
    if answer.cookie is not None:
        response.set_cookie(
            answer.cookie.name, answer.cookie.value, samesite="lax", **answer.cookie.options()
        )
    return response
