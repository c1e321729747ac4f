"""``httpx`` authentication from a TokenManager (async) or a SyncTokenManager (sync).

Install with ``pip install "factorial-tokens[httpx]"``::

    async with httpx.AsyncClient(base_url=app.base_url, auth=FactorialAuth(tm, "acme")) as api:
        resp = await api.get("/api/2025-10-01/resources/employees/employees")

    with httpx.Client(base_url=app.base_url, auth=FactorialAuth(stm, "acme")) as api:
        resp = api.get("/api/2025-10-01/resources/employees/employees")

Each request carries the tenant's current Bearer token. On a 401 the token is reported to
the manager (:meth:`~factorial_tokens.TokenManager.token_rejected`: a newer stored token,
else one refresh, single-flight) and the request is sent once more, as ``tm.client()``
does. The token is only ever sent to the app's ``base_url`` origin: a request to another
host raises ConfigurationError. Request bodies are read before sending so the retry can
resend them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from ._client import same_origin
from ._errors import ConfigurationError
from ._manager import TokenManager
from .sync import SyncTokenManager

__all__ = ["FactorialAuth"]


class FactorialAuth(httpx.Auth):
    """An :class:`httpx.Auth` for one tenant (see the module doc).

    With a :class:`~factorial_tokens.TokenManager` it serves ``httpx.AsyncClient``; with a
    :class:`~factorial_tokens.sync.SyncTokenManager` it serves ``httpx.Client``. Used with
    the other kind of client it raises ConfigurationError.
    """

    requires_request_body = True

    def __init__(self, manager: TokenManager | SyncTokenManager, tenant: str) -> None:
        if not isinstance(manager, TokenManager | SyncTokenManager):
            raise TypeError("FactorialAuth needs a TokenManager or a SyncTokenManager")
        self.manager = manager
        self.tenant = tenant

    def __repr__(self) -> str:
        return f"FactorialAuth(tenant={self.tenant!r})"

    def _check(self, request: httpx.Request) -> None:
        if not same_origin(str(request.url), self.manager.app.base_url):
            raise ConfigurationError(f"refusing to send {self.tenant!r}'s token to another origin")

    def _rejected(self, response: httpx.Response) -> bool:
        """A 401 from the app's origin: the token was refused. (The response comes after
        redirects; a 401 from where one led says nothing of the token, which httpx did
        not send there.)"""
        return response.status_code == 401 and same_origin(str(response.url), self.manager.app.base_url)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Authenticate with the async manager; one retry after a 401."""
        manager = self.manager
        if not isinstance(manager, TokenManager):
            raise ConfigurationError("httpx.AsyncClient needs FactorialAuth(TokenManager, tenant)")
        self._check(request)
        token = await manager.access_token(self.tenant)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if self._rejected(response):
            token = await manager.token_rejected(self.tenant, token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Authenticate with the blocking manager; one retry after a 401."""
        manager = self.manager
        if not isinstance(manager, SyncTokenManager):
            raise ConfigurationError("httpx.Client needs FactorialAuth(SyncTokenManager, tenant)")
        self._check(request)
        token = manager.access_token(self.tenant)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if self._rejected(response):
            token = manager.token_rejected(self.tenant, token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request
