"""Review of the hostile-input fixes (bf45377..4af9789): failing reproductions."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from factorial_tokens import FactorialApp, FactorialTokensError, ProviderError, TokenManager
from factorial_tokens.store import SQLiteStore
from factorial_tokens.testing import FakeFactorial

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, app_for
from .stores import open_backend
from .test_hostile_inputs import BUDGETS, CODE, REFRESH, _client, _texts, raw_provider

__all__ = ["raw_provider"]  # the fixture, shared with test_hostile_inputs


def _echo_piece(field: str, where: str) -> Any:
    """A 400 that quotes the first 16 characters of what was sent (a proxy, a server
    that names the token it refused), either in ``error_description`` beside a real code
    or in an ``error`` that is not a code."""

    async def answer(request: web.Request) -> web.StreamResponse:
        piece = str((await request.post())[field])[:16]
        if where == "description":
            body = {"error": "invalid_grant", "error_description": f"token {piece} was revoked"}
        else:
            body = {"error": f"token {piece} was revoked"}
        return web.json_response(body, status=400)

    return answer


@pytest.mark.parametrize("where", ["description", "error"])
async def test_a_piece_of_the_refresh_token_echoed_by_the_provider_is_redacted(
    raw_provider: Any, where: str
) -> None:
    """``_error_code`` refuses a code sharing 8 characters with a secret, but the
    description (and the excerpt of a body whose ``error`` is not a code) is redacted
    only of whole secrets and runs of 20+ token characters: a 16-character piece stays."""
    raw_provider["token"] = _echo_piece("refresh_token", where)
    client = _client(raw_provider["base_url"])
    try:
        deadline = asyncio.get_running_loop().time() + 5
        with pytest.raises(ProviderError) as info:
            await client.refresh(REFRESH, deadline=deadline)
    finally:
        await client.aclose()
    assert REFRESH[:12] not in _texts(info.value), _texts(info.value)


async def test_a_piece_of_the_code_echoed_by_the_provider_is_not_kept_in_the_claim(
    raw_provider: Any, tmp_path: Path
) -> None:
    """The same piece, for a code: ``_fail_claim`` writes the description into the code
    claim's outcome (in Redis, in clear), and a retried callback gets it back."""
    raw_provider["token"] = _echo_piece("code", "description")
    app = FactorialApp(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        base_url=raw_provider["base_url"],
    )
    async with open_backend("redis", tmp_path) as backend:
        async with TokenManager(app, backend.store, **BUDGETS) as tm:
            with pytest.raises(ProviderError):
                await tm.exchange_code("acme", CODE)
            with pytest.raises(ProviderError) as again:  # rebuilt from the stored claim
                await tm.exchange_code("acme", CODE)
    assert CODE[:12] not in _texts(again.value), _texts(again.value)


async def test_a_rotated_refresh_token_with_a_space_is_kept(raw_provider: Any) -> None:
    """RFC 6749 (A.17) allows any VSCHAR (0x20-0x7E) in a refresh token, and a form
    carries a space fine (``+``). ``_TOKEN_TEXT`` refuses the space, so the rotated
    refresh token is dropped and the caller keeps the old one, which the rotation killed:
    the next refresh is an ``invalid_grant`` (the company must connect again)."""
    rotated = "new refresh token " + "f" * 40

    async def answer(request: web.Request) -> web.StreamResponse:
        body = {"access_token": "a" * 64, "refresh_token": rotated, "expires_in": 7200}
        return web.json_response(body)

    raw_provider["token"] = answer
    client = _client(raw_provider["base_url"])
    try:
        deadline = asyncio.get_running_loop().time() + 5
        tokens = await client.refresh(REFRESH, deadline=deadline)
    finally:
        await client.aclose()
    assert tokens.refresh_token == rotated


async def test_a_reconnection_over_a_tampered_sqlite_row_revokes_the_refused_grant(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    """A tampered SQLite row (status 'bogus') is a record that cannot be read, like a
    garbled sealed payload; but it is mapped to StoreUnavailable, an outage, so a
    reconnection retries the read for lease_ttl, then gives up without failing the claim
    or revoking the new grant: company 666's grant stays live at Factorial, stored
    nowhere (the garbled-payload case refuses it with TokenSealError and revokes it)."""
    path = tmp_path / "tokens.db"
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        await tm.exchange_code("victim", sim.issue_code(company_id=111))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE tenants SET status = 'bogus'")
    conn.commit()
    conn.close()
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        with pytest.raises(FactorialTokensError):
            await asyncio.wait_for(tm.exchange_code("victim", sim.issue_code(company_id=666)), 30)
    assert sim.live_pairs(666) == 0, "the refused grant of company 666 is still live at Factorial"
