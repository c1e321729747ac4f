"""Fifth review: bugs left or introduced by the fixes in 51c6b37..main (each test fails
on the code its docstring names)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from factorial_tokens import (
    EventKind,
    FactorialApp,
    ProviderError,
    ReauthorizationRequired,
    TokenEvent,
    TokenManager,
)
from factorial_tokens._events import EventDispatcher
from factorial_tokens.store import TenantKey, TenantStatus
from factorial_tokens.testing import FakeFactorial, RefreshMode

from .conftest import CLIENT_ID, REDIRECT_URI
from .stores import open_backend

BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}


# -- a short client secret: its characters are not an error code's ---------------------------


@pytest.mark.parametrize("name", ["postgres", "redis"])
@pytest.mark.parametrize("secret", ["a", "grant"])
async def test_a_short_client_secret_does_not_hide_invalid_grant(name: str, secret: str, tmp_path: Path) -> None:
    """``_without_pieces`` redacts a secret shorter than 8 characters by matching the whole
    of it anywhere, and ``_error_code`` drops any code it "shares a piece" with: with a
    client secret ``a`` (or ``grant``) the provider's ``invalid_grant`` is dropped and read
    as ``invalid_response``. A dead grant is then never marked: the tenant stays ACTIVE and
    every caller asks Factorial again."""
    async with FakeFactorial(
        client_id=CLIENT_ID,
        client_secret=secret,
        redirect_uri=REDIRECT_URI,
        refresh_mode=RefreshMode.REVOKE_AT_REFRESH,
        reuse_detection=True,
    ) as sim:
        app = FactorialApp(
            client_id=CLIENT_ID, client_secret=secret, redirect_uri=REDIRECT_URI, base_url=sim.base_url
        )
        async with open_backend(name, tmp_path) as backend:
            async with TokenManager(app, backend.store, **BUDGETS) as tm:
                await tm.exchange_code("acme", sim.issue_code(company_id=1))
                sim.revoke_company(1)
                with pytest.raises((ReauthorizationRequired, ProviderError)) as info:
                    await tm.refresh("acme")
                stored = await backend.store.read(TenantKey(CLIENT_ID, "acme"))
                assert isinstance(info.value, ReauthorizationRequired), repr(info.value)
                assert stored is not None and stored.status is TenantStatus.NEEDS_REAUTH
