"""The peer: Authlib's ``AsyncOAuth2Client`` used as its documentation intends.

One client per tenant per process, built from the token the store holds, with
``token_endpoint`` set so it refreshes on expiry itself (``ensure_active_token``, which
``client.get(...)`` calls before every request; ``leeway`` as its own parameter) and an
``update_token`` callback that writes the new token to the same store. Its lock is per
client: tasks of one process wait for each other, processes do not (there is no
cross-process lock in Authlib).

Authlib is a benchmark-only dependency (``benchmarks/requirements.txt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from authlib.integrations.base_client import OAuthError  # type: ignore[import-untyped]
from authlib.integrations.httpx_client import AsyncOAuth2Client  # type: ignore[import-untyped]

from factorial_tokens import FactorialApp, TokenSet
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import Store, TenantKey, TenantStatus, Update

LEEWAY = 60


def _to_authlib(tokens: TokenSet) -> dict[str, Any]:
    token: dict[str, Any] = {"access_token": tokens.access_token, "token_type": tokens.token_type}
    if tokens.refresh_token is not None:
        token["refresh_token"] = tokens.refresh_token
    if tokens.expires_at is not None:
        token["expires_at"] = int(tokens.expires_at)
    if tokens.scope is not None:
        token["scope"] = tokens.scope
    return token


def _from_authlib(token: dict[str, Any]) -> TokenSet:
    expires_at = token.get("expires_at")
    return TokenSet(
        access_token=token["access_token"],
        refresh_token=token.get("refresh_token"),
        token_type=token.get("token_type", "Bearer"),
        scope=token.get("scope"),
        expires_at=float(expires_at) if expires_at is not None else None,
    )


def error_name(exc: BaseException) -> str:
    """A short label for a failure: the OAuth error for Authlib's errors, else the type."""
    if isinstance(exc, OAuthError):
        return str(exc.error)
    return type(exc).__name__


@contextlib.asynccontextmanager
async def authlib_getter(
    app: FactorialApp, store: Store, tenants: Sequence[str]
) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """Open one Authlib client per tenant (token read from ``store``); yield a token getter.

    The getter does what ``client.get(url)`` does before sending: ``ensure_active_token``,
    then uses ``client.token``.
    """
    codec = JsonCodec()
    clients: dict[str, AsyncOAuth2Client] = {}

    def updater(key: TenantKey) -> Callable[..., Awaitable[None]]:
        async def update_token(token: dict[str, Any], refresh_token: str | None = None, **_: Any) -> None:
            tokens = _from_authlib(token)
            update = Update(codec.encode(key, tokens), TenantStatus.ACTIVE, tokens.expires_at, time.time())
            await store.replace(key, update)

        return update_token

    async with contextlib.AsyncExitStack() as stack:
        for tenant in tenants:
            key = TenantKey(app.client_id, tenant)
            record = await store.read(key)
            if record is None:
                raise RuntimeError(f"tenant {tenant!r} is not in the store")
            client = AsyncOAuth2Client(
                client_id=app.client_id,
                client_secret=app.client_secret,
                token=_to_authlib(codec.decode(key, record.payload)),
                token_endpoint=f"{app.base_url}/oauth/token",
                update_token=updater(key),
                leeway=LEEWAY,
            )
            clients[tenant] = await stack.enter_async_context(client)

        async def get(tenant: str) -> str:
            client = clients[tenant]
            await client.ensure_active_token(client.token)
            return str(client.token["access_token"])

        yield get


async def authlib_exchanges(app: FactorialApp, code: str, deliveries: int) -> list[str | BaseException]:
    """``deliveries`` concurrent ``fetch_token(code=...)`` calls, as a callback handler does for
    each delivery of one callback: the access tokens got, or the errors."""
    async with AsyncOAuth2Client(
        client_id=app.client_id,
        client_secret=app.client_secret,
        redirect_uri=app.redirect_uri,
        token_endpoint=f"{app.base_url}/oauth/token",
    ) as client:

        async def one() -> str:
            token = await client.fetch_token(code=code, grant_type="authorization_code")
            return str(token["access_token"])

        return await asyncio.gather(*(one() for _ in range(deliveries)), return_exceptions=True)
