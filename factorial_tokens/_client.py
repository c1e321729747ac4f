"""TenantSession: an API session for one tenant that sends its Bearer token."""

from __future__ import annotations

from collections.abc import Coroutine, Generator, Mapping
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp

from ._errors import ConfigurationError

__all__ = ["TenantSession", "same_origin"]


class TokenSource(Protocol):
    """Where a session gets its tokens (:class:`~factorial_tokens.TokenManager`)."""

    async def access_token(self, tenant: str) -> str:
        """A valid access token for ``tenant``."""
        ...

    async def token_rejected(self, tenant: str, token: str) -> str:
        """The token to retry with after the API answered 401 to ``token``."""
        ...


def same_origin(url: str, base_url: str) -> bool:
    """True if ``url`` has the scheme and host (and port) of ``base_url``: where tokens may go."""
    base, target = urlsplit(base_url), urlsplit(url)
    return (target.scheme.lower(), target.netloc.lower()) == (base.scheme.lower(), base.netloc.lower())


class _RequestContext:
    """Awaitable for a response, or an async context manager that releases it."""

    __slots__ = ("_coro", "_response")

    def __init__(self, coro: Coroutine[Any, Any, aiohttp.ClientResponse]) -> None:
        self._coro = coro
        self._response: aiohttp.ClientResponse | None = None

    def __await__(self) -> Generator[Any, None, aiohttp.ClientResponse]:
        return self._coro.__await__()

    async def __aenter__(self) -> aiohttp.ClientResponse:
        self._response = await self._coro
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            self._response.release()


class TenantSession:
    """Requests to Factorial's API on behalf of one tenant.

    Paths are joined to the app's ``base_url``; absolute URLs to any other origin are
    refused, so the token never leaves for another host. On a 401 the session reloads
    the token (or forces a refresh if the store has nothing newer) and retries once.
    A body that cannot be sent twice (a stream, a file, ``FormData``) is not: the 401 is
    returned, and the token is renewed for the next request.
    """

    def __init__(
        self, manager: TokenSource, tenant: str, session: aiohttp.ClientSession, base_url: str
    ) -> None:
        self._manager = manager
        self._session = session
        self.tenant = tenant
        self.base_url = base_url

    def __repr__(self) -> str:
        return f"TenantSession(tenant={self.tenant!r}, base_url={self.base_url!r})"

    async def __aenter__(self) -> TenantSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None  # the HTTP session belongs to the manager

    def request(self, method: str, path: str, **kwargs: Any) -> _RequestContext:
        """Send ``method path`` with the tenant's token; see the class docstring."""
        return _RequestContext(self._request(method, path, kwargs))

    def get(self, path: str, **kwargs: Any) -> _RequestContext:
        """GET ``path``."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> _RequestContext:
        """POST ``path``."""
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> _RequestContext:
        """PUT ``path``."""
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> _RequestContext:
        """PATCH ``path``."""
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> _RequestContext:
        """DELETE ``path``."""
        return self.request("DELETE", path, **kwargs)

    def _url(self, path: str) -> str:
        url = urljoin(self.base_url + "/", path)
        if not same_origin(url, self.base_url):
            raise ConfigurationError(f"refusing to send {self.tenant!r}'s token to another origin")
        return url

    async def _request(self, method: str, path: str, kwargs: dict[str, Any]) -> aiohttp.ClientResponse:
        url = self._url(path)
        headers = dict(kwargs.pop("headers", None) or {})
        token = await self._manager.access_token(self.tenant)
        headers["Authorization"] = f"Bearer {token}"
        # Asked before the first send, which may consume the body (a multipart form's
        # fields included).
        retry = _resendable(kwargs.get("data"))
        response = await self._session.request(method, url, headers=headers, **kwargs)
        if response.status != 401 or not same_origin(str(response.url), self.base_url):
            # (A 401 from where a redirect led says nothing of the token: aiohttp sends it
            # to no other origin.)
            return response
        # A body the first send consumed is not sent again (it would go out empty): the
        # 401 is the answer, and the next request gets the renewed token.
        if not retry:
            try:
                await self._manager.token_rejected(self.tenant, token)
            except BaseException:
                response.release()
                raise
            return response
        response.release()
        renewed = await self._manager.token_rejected(self.tenant, token)
        headers["Authorization"] = f"Bearer {renewed}"
        return await self._session.request(method, url, headers=headers, **kwargs)


def _resendable(data: object) -> bool:
    """False for a request body that a first send consumes: a stream, a file, an async
    iterable, or a form (a mapping, pairs, ``FormData``) holding one."""
    if data is None or isinstance(data, bytes | bytearray | memoryview | str):
        return True
    if _consumable(data):
        return False
    if isinstance(data, aiohttp.FormData):
        fields = getattr(data, "_fields", None)  # aiohttp keeps no public list of them
        return fields is not None and not any(_consumable(field[-1]) for field in fields)
    if isinstance(data, Mapping):
        return not any(_consumable(value) for value in data.values())
    if isinstance(data, list | tuple):
        return not any(isinstance(pair, tuple) and pair and _consumable(pair[-1]) for pair in data)
    return False  # a payload object, or something else: not known to be sent twice


def _consumable(value: object) -> bool:
    return hasattr(value, "read") or hasattr(value, "__aiter__") or hasattr(value, "__anext__")
