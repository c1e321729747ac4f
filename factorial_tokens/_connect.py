"""The connect routes' steps, whatever the web framework: ``/connect/{tenant}`` and the
OAuth callback, as an :class:`Answer` each framework adapter turns into its own response.

The adapters (:mod:`factorial_tokens.web` for aiohttp, :mod:`factorial_tokens.starlette`)
only read the request (path, query, the binding cookie, whether it came over https) and
write the answer; every check and every page is decided here, so both serve the same
routes with the same guarantees (see :mod:`factorial_tokens.web`).
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

import attrs

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
from ._models import split_url, validate_tenant
from ._pages import BINDING_COOKIE, PAGE_HEADERS, callback_failure, page_html, valid_binding

if TYPE_CHECKING:
    from ._manager import TokenManager

__all__ = ["Answer", "BindingCookie", "ConnectFlow", "callback_path", "check_success_url"]

RequestT = TypeVar("RequestT")


@attrs.frozen
class BindingCookie:
    """The HttpOnly, SameSite=Lax cookie that binds a connection to the browser."""

    value: str = attrs.field(repr=False)
    max_age: int
    path: str
    secure: bool
    name: str = BINDING_COOKIE

    def options(self) -> dict[str, Any]:
        """The ``set_cookie`` keywords both frameworks share (each adds its own ``samesite``)."""
        return {"max_age": self.max_age, "path": self.path, "httponly": True, "secure": self.secure}


@attrs.frozen
class Answer:
    """What a route answers: a status, headers, an HTML page or nothing, and the cookie to set."""

    status: int
    headers: Mapping[str, str]
    html: str | None = None
    cookie: BindingCookie | None = None


def page(status: int, title: str, message: str) -> Answer:
    """A plain HTML page (see ``_pages``)."""
    return Answer(status, PAGE_HEADERS, page_html(title, message))


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


def check_success_url(success_url: str | None) -> None:
    """Raise ConfigurationError unless ``success_url`` is None or an absolute http(s) URL."""
    if success_url is not None:
        parts = split_url(success_url)
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError("success_url must be an absolute http(s) URL")


class ConnectFlow(Generic[RequestT]):
    """The two routes' steps for one manager; ``RequestT`` is the framework's request type,
    handed untouched to ``allow``."""

    def __init__(
        self,
        manager: TokenManager,
        *,
        allow: Callable[[RequestT, str], bool | Awaitable[bool]] | None,
        open_routes: bool,
        success_url: str | None,
        prefix: str,
        log: logging.Logger,
    ) -> None:
        check_success_url(success_url)
        self._tm = manager
        self._allow = allow
        self._open = open_routes
        self._success_url = success_url
        self._cookie_path = prefix.rstrip("/") + "/"
        self._secure = urlsplit(manager.app.redirect_uri).scheme == "https"
        self._log = log

    async def _allowed(self, request: RequestT, tenant: str) -> bool:
        if self._allow is None:
            return True
        verdict = self._allow(request, tenant)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def connect(
        self, request: RequestT, tenant: str, query: Mapping[str, str], cookie: str | None, https: bool
    ) -> Answer:
        """``GET /connect/{tenant}``: check the link, bind the browser, 302 to Factorial's
        authorize URL. ``cookie`` is the binding cookie's value, ``https`` whether the
        request came over https."""
        try:
            tenant = validate_tenant(tenant)
        except InvalidTenant as exc:
            return page(400, "Invalid tenant", str(exc))
        if not self._open:
            try:
                self._tm.check_connect_link(query.get("link"), tenant)
            except InvalidState as exc:
                # The tenant id is not shown: nothing vouches for it, and the page is on the
                # app's own origin (a path of one's choosing would be a message of one's choosing).
                return page(
                    403,
                    "Connect link required",
                    f"Connecting needs a valid connect link ({exc}); ask for a new one.",
                )
        if not await self._allowed(request, tenant):
            return page(404, "Unknown tenant", "This tenant may not be connected here.")
        company = query.get("company", "") in ("1", "true", "yes")
        binding = valid_binding(cookie) or secrets.token_urlsafe(32)
        # The target is built from the app's configured base URL only, never from the request.
        location = self._tm.authorization_url(tenant, company=company, binding=binding)
        max_age = math.ceil(self._tm.state_ttl)  # never 0, which deletes the cookie
        cookie_out = BindingCookie(binding, max_age, self._cookie_path, self._secure or https)
        return Answer(302, {**PAGE_HEADERS, "Location": location}, cookie=cookie_out)

    async def callback(self, request: RequestT, query: Mapping[str, str], cookie: str | None) -> Answer:
        """The OAuth callback: hand it to :meth:`TokenManager.complete_callback`; a success
        or error page, or 303 to ``success_url``."""
        state = query.get("state")
        if not state:
            return page(400, "Connection failed", "The callback has no state: start the connection again.")
        try:
            tenant = self._tm.tenant_from_state(state)
        except InvalidState as exc:
            return page(400, "Connection failed", f"{exc}.")
        if not await self._allowed(request, tenant):
            return page(404, "Unknown tenant", f"No tenant {tenant!r} may be connected here.")
        binding = valid_binding(cookie)
        if binding is None and not self._open:
            return page(
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
                self._log.exception("tenant %r: code exchange failed on the token store", tenant)
            elif isinstance(exc, ProviderError):
                self._log.warning("tenant %r: code exchange refused: %s", tenant, exc.error)
            elif not isinstance(exc, InvalidState | InvalidCallback | AuthorizationDenied):
                self._log.warning("tenant %r: callback refused: %s", tenant, type(exc).__name__)
            return page(*callback_failure(exc, tenant))
        if self._success_url is not None:
            target = self._success_url.replace("{tenant}", quote(result.tenant, safe=""))
            return Answer(303, {**PAGE_HEADERS, "Location": target})
        return page(
            200, "Connected", f"Tenant {result.tenant!r} is connected to Factorial. You can close this page."
        )
