"""The peer: ``factorialhr`` (the Factorial API wrapper on PyPI) used as its documentation shows.

``ApiClient(base_url, auth=...)`` with ``RefreshTokenAuth`` in one process, or
``RefreshTokenAuthFile`` (``from_file``) shared by several processes through one JSON file
per tenant. One auth object per tenant per process, shared by all its tasks, as one
``ApiClient`` would be. The getter runs the auth's ``async_auth_flow`` on the request the
client would send and takes the ``Authorization`` header it sets: exactly what httpx does
before sending ``api.get(...)``.

What its source does (7.0.0, ``factorialhr/_client.py``): no lock of any kind; the access
token is taken to expire ``created_at + 1 hour`` whatever ``expires_in`` says; the refresh
is posted to ``{scheme}://{host}/oauth/token`` (the port is dropped), so the simulator must
listen on port 80; ``RefreshTokenAuthFile`` writes the file after its own refresh and never
reads it again.

factorialhr is a benchmark-only dependency (``benchmarks/requirements.txt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import factorialhr  # type: ignore[import-untyped,unused-ignore]
import httpx

from factorial_tokens import FactorialApp, TokenSet
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import Store, TenantKey

#: What the client would send: any API request goes through the same auth flow.
API_PATH = "/api/2026-04-01/resources/api_public/credentials"


def _created_at(tokens: TokenSet) -> datetime.datetime:
    """When the token was issued, as factorialhr keeps it (it ignores ``expires_in``)."""
    return datetime.datetime.fromtimestamp(tokens.obtained_at, datetime.UTC)


async def _stored(store: Store, app: FactorialApp, tenant: str) -> TokenSet:
    key = TenantKey(app.client_id, tenant)
    record = await store.read(key)
    if record is None:
        raise RuntimeError(f"tenant {tenant!r} is not in the store")
    return JsonCodec().decode(key, record.payload)


def _path(workdir: str, tenant: str) -> Path:
    return Path(workdir) / f"{tenant}.json"


async def write_files(store: Store, app: FactorialApp, tenants: Sequence[str], workdir: str) -> None:
    """Write each tenant's shared file, as ``RefreshTokenAuthFile.to_file`` does."""
    for tenant in tenants:
        tokens = await _stored(store, app, tenant)
        auth = factorialhr.RefreshTokenAuthFile(
            _path(workdir, tenant),
            refresh_token=tokens.refresh_token,
            client_id=app.client_id,
            client_secret=app.client_secret,
            access_token=tokens.access_token,
            token_type=tokens.token_type,
            created_at=_created_at(tokens),
        )
        auth.to_file(app.base_url)
        await auth._client.aclose()  # the auth opens an httpx client it never closes


def error_name(exc: BaseException) -> str:
    """The OAuth error of a refused refresh (``invalid_grant``), else the exception type."""
    if isinstance(exc, httpx.HTTPStatusError):
        with contextlib.suppress(ValueError, AttributeError):
            return str(exc.response.json()["error"])
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


@contextlib.asynccontextmanager
async def factorialhr_getter(
    app: FactorialApp, store: Store, tenants: Sequence[str], workdir: str | None
) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """One auth per tenant: ``RefreshTokenAuth`` from the store, or, with ``workdir``,
    ``RefreshTokenAuthFile.from_file`` on the shared file; yield a token getter."""
    auths: dict[str, factorialhr.RefreshTokenAuth] = {}
    for tenant in tenants:
        auth: factorialhr.RefreshTokenAuth
        if workdir is not None:
            auth, _ = factorialhr.RefreshTokenAuthFile.from_file(_path(workdir, tenant))
        else:
            tokens = await _stored(store, app, tenant)
            auth = factorialhr.RefreshTokenAuth(
                refresh_token=tokens.refresh_token or "",
                client_id=app.client_id,
                client_secret=app.client_secret,
                access_token=tokens.access_token,
                token_type=tokens.token_type,
                created_at=_created_at(tokens),
            )
        auths[tenant] = auth

    async def get(tenant: str) -> str:
        flow = auths[tenant].async_auth_flow(httpx.Request("GET", f"{app.base_url}{API_PATH}"))
        try:
            request = await flow.__anext__()
        finally:
            await flow.aclose()
        return request.headers["Authorization"].split(" ", 1)[1]

    try:
        yield get
    finally:
        await asyncio.gather(*(auth._client.aclose() for auth in auths.values()))
