"""``requests`` authentication from a :class:`~factorial_tokens.sync.SyncTokenManager`.

Install with ``pip install "factorial-tokens[requests]"``::

    session = requests.Session()
    session.auth = FactorialAuth(stm, "acme")
    session.get(f"{app.base_url}/api/2025-10-01/resources/employees/employees")

Each request carries the tenant's current Bearer token; on a 401 the token is reported
to the manager (:meth:`~factorial_tokens.TokenManager.token_rejected`: a newer stored
token, else one refresh) and the request is sent once more. The token is only ever sent
to the app's ``base_url`` origin: a request elsewhere raises ConfigurationError.

Limitations: a request whose body is a stream or a generator is not resent after a 401
(its body is spent); the 401 response is returned instead, the token reported all the
same. A 401 from an origin a redirect led to is returned as it is.
"""

from __future__ import annotations

from typing import Any

import requests

from ._client import same_origin
from ._errors import ConfigurationError
from .sync import SyncTokenManager

__all__ = ["FactorialAuth"]


class FactorialAuth(requests.auth.AuthBase):
    """Authenticate ``requests`` calls as ``tenant`` (see the module doc)."""

    def __init__(self, manager: SyncTokenManager, tenant: str) -> None:
        if not isinstance(manager, SyncTokenManager):
            raise TypeError("FactorialAuth for requests needs a SyncTokenManager")
        self.manager = manager
        self.tenant = tenant

    @property
    def base_url(self) -> str:
        """Where the token may go: the app's ``base_url``."""
        return self.manager.app.base_url

    def __repr__(self) -> str:
        return f"FactorialAuth(tenant={self.tenant!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if not same_origin(request.url or "", self.base_url):
            raise ConfigurationError(f"refusing to send {self.tenant!r}'s token to another origin")
        token = self.manager.access_token(self.tenant)
        request.headers["Authorization"] = f"Bearer {token}"
        request.hooks["response"].append(_Retry(self, token))
        return request


class _Retry:
    """The response hook: after a 401, one retry with the token the manager gives back."""

    def __init__(self, auth: FactorialAuth, token: str) -> None:
        self.auth = auth
        self.token = token
        self.done = False

    def __call__(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        # requests runs this hook for the answers of redirects too, with the token off
        # (another origin) or on: only a 401 from the app's origin is about the token, and
        # only there may a retry carry it.
        if self.done or response.status_code != 401 or not same_origin(request.url or "", self.auth.base_url):
            return response
        self.done = True
        token = self.auth.manager.token_rejected(self.auth.tenant, self.token)
        if not _resendable(request.body):
            return response  # its body is spent; the next request gets the renewed token
        response.content  # noqa: B018 - read it so the connection goes back to the pool
        response.close()
        retry = request.copy()
        retry.headers["Authorization"] = f"Bearer {token}"
        retry.hooks = {"response": []}
        again: requests.Response = response.connection.send(retry, **kwargs)
        again.history.append(response)
        again.request = retry
        return again


def _resendable(body: object) -> bool:
    return body is None or isinstance(body, bytes | str)
