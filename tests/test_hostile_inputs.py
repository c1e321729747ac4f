"""Hostile provider answers, callback values, store URLs and store contents: each gets a
typed error and loses nothing; no piece of a secret reaches an error or a log line; a
tenant whose record cannot be opened is never rebound silently. (Found by an adversarial
review; each test failed on the code its docstring names before the fix.)"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from factorial_tokens import (
    CompanyMismatch,
    ConfigurationError,
    EventKind,
    FactorialApp,
    FactorialTokensError,
    InvalidState,
    Keyring,
    ProviderError,
    ReauthorizationRequired,
    TokenManager,
    TokenSealError,
)
from factorial_tokens._oauth import OAuthClient
from factorial_tokens.store import SQLiteStore, TenantKey, TenantStatus, Update, unreadable_record
from factorial_tokens.testing import FakeFactorial, RefreshMode

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, app_for, oauth_client
from .stores import BACKENDS, open_backend

BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}
T = TypeVar("T")
CODE = "c0de5ecret" + "9" * 54  # a 64-character authorization code, as Factorial issues
REFRESH = "2efre5h" + "7" * 57


async def _ask(raw_server: Any, answer: Any, call: Callable[[OAuthClient, float], Awaitable[T]]) -> T:
    """The raw server answers with ``answer``; ``call(client, deadline)`` on a new OAuth client."""
    raw_server["handler"] = answer
    client = oauth_client(raw_server["base_url"])
    try:
        return await call(client, asyncio.get_running_loop().time() + 5)
    finally:
        await client.aclose()


def _tamper(path: str | Path, statement: str, parameters: tuple[object, ...] = ()) -> None:
    """Change a SQLite store's file behind its back (one statement)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(statement, parameters)
        conn.commit()
    finally:
        conn.close()


async def _tamper_status(name: str, backend: Any, key: TenantKey) -> None:
    """Someone with write access but no key sets a status column the store cannot read
    (SQLite or Redis; PostgreSQL's CHECK constraint refuses it)."""
    if name == "sqlite":
        _tamper(
            backend.url.removeprefix("sqlite:///"),
            "UPDATE tenants SET status = 'bogus' WHERE tenant = ?",
            (key.tenant,),
        )
        return
    await _tamper_redis(backend.store._rec(key.digest), "status", "bogus")


async def _tamper_redis(name: str, field: str, value: str) -> int:
    """Change one field of a Redis store's hash behind its back; the count of new fields."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        return int(await client.hset(name, field, value))
    finally:
        await client.aclose()


def _texts(exc: BaseException) -> str:
    out = []
    seen: BaseException | None = exc
    while seen is not None:
        out += [str(seen), repr(seen), str(getattr(seen, "description", "")), str(getattr(seen, "error", ""))]
        seen = seen.__cause__ or seen.__context__
    return " | ".join(out)


# -- a 2xx answer with an enormous number keeps its tokens --------------------------------


@pytest.mark.parametrize("field", ["expires_in", "created_at"])
async def test_a_2xx_with_an_enormous_number_literal_keeps_its_tokens(raw_server: Any, field: str) -> None:
    """A valid JSON body whose ``expires_in`` (or ``created_at``) is an integer literal of
    5000 digits: Python's json refuses it (int max str digits), so ``_json`` raises
    RequestInDoubt and the issued access token is lost (the code was consumed)."""
    body = '{"access_token":"issued-access-token","refresh_token":"r","' + field + '":1' + "0" * 5000 + "}"

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, text=body, content_type="application/json")

    tokens = await _ask(
        raw_server, answer, lambda client, deadline: client.exchange_code(CODE, deadline=deadline)
    )
    assert tokens.access_token == "issued-access-token"


# -- the provider's `error` value is a code, or nothing: never an echo, never a log line ---


async def test_a_provider_error_code_echoing_the_refresh_token_is_redacted(raw_server: Any) -> None:
    """A 400 whose ``error`` echoes what was sent (a proxy, a buggy server): ``_error``
    keeps ``data["error"][:64]`` as is, so the whole refresh token is in str(exc)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        sent = (await request.post())["refresh_token"]
        return web.json_response({"error": sent}, status=400)

    with pytest.raises(ProviderError) as info:
        await _ask(raw_server, answer, lambda client, deadline: client.refresh(REFRESH, deadline=deadline))
    assert REFRESH[:12] not in _texts(info.value)


async def test_a_provider_error_code_cannot_forge_log_lines(
    raw_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The connect callback logs ``exc.error`` raw: a CR/LF in Factorial's (or a proxy's)
    ``error`` value forges a log line, though the access log escapes control characters."""
    from aiohttp.test_utils import TestClient, TestServer

    from factorial_tokens.web import connect_app

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "invalid_grant\nCRITICAL forged line"}, status=400)

    raw_server["handler"] = answer
    app = app_for(raw_server["base_url"])
    caplog.set_level(logging.DEBUG)
    async with TokenManager(app, "memory://", **BUDGETS) as tm:
        cookie = "b" * 43
        url = tm.authorization_url("acme", binding=cookie)
        state = url.split("state=")[1].split("&")[0]
        async with TestClient(TestServer(connect_app(tm, open_routes=False))) as http:
            http.session.cookie_jar.update_cookies({"factorial_tokens_binding": cookie})
            resp = await http.get("/oauth/callback", params={"state": _unquote(state), "code": CODE})
            assert resp.status == 502
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("factorial_tokens")]
    assert not any("\n" in line for line in lines), lines


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


# -- an error excerpt is redacted before it is cut -----------------------------------------


async def test_an_error_page_cut_inside_an_echoed_secret_shows_no_piece_of_it(raw_server: Any) -> None:
    """``_excerpt`` cuts the body at 2000 characters *before* redacting: a secret that
    straddles the cut is no longer whole (not replaced) and its piece is shorter than the
    20-character token pattern, so the piece survives whitespace folding into the error."""

    async def answer(request: web.Request) -> web.StreamResponse:
        sent = (await request.post())["code"]
        return web.Response(status=400, text=" " * 1990 + f"{sent} was refused", content_type="text/html")

    with pytest.raises(ProviderError) as info:
        await _ask(raw_server, answer, lambda client, deadline: client.exchange_code(CODE, deadline=deadline))
    assert CODE[:8] not in _texts(info.value), _texts(info.value)


# -- tampered columns read as a record that cannot be opened --------------------------------


@pytest.mark.parametrize(
    ("column", "value"),
    [("status", "bogus"), ("status", None), ("expires_at", "soon"), ("version", "x"), ("updated_at", "x")],
)
async def test_a_tampered_sqlite_column_is_a_typed_error(
    tmp_path: Path, sim: FakeFactorial, column: str, value: object
) -> None:
    """SQLite keeps columns untyped: ``record_from_columns``'s ValueError escaped the store
    and the manager. The row now reads as a record that cannot be opened: TokenSealError,
    with a ``seal_error`` event."""
    path = tmp_path / "tokens.db"
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
    _tamper(path, f"UPDATE tenants SET {column} = ?", (value,))
    store = SQLiteStore(path)
    try:
        assert await store.read(TenantKey(CLIENT_ID, "acme")) == unreadable_record(
            TenantKey(CLIENT_ID, "acme")
        )
        async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
            events: list[EventKind] = []
            tm.add_listener(lambda event: events.append(event.kind))
            with pytest.raises(TokenSealError):
                await tm.access_token("acme")
            assert await tm.flush_events()
            assert events == [EventKind.SEAL_ERROR]
    finally:
        await store.aclose()


@pytest.mark.parametrize("name", ["sqlite", "redis"])
async def test_one_tampered_record_does_not_hide_the_others_from_the_listing(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``tenants`` (keepalive, the CLI's list, rekey) neither fails the whole listing for a
    record it cannot read nor hides it: the record is listed as one that cannot be opened."""
    async with open_backend(name, tmp_path) as backend:
        store = backend.store
        for tenant in ("acme", "broken", "zeta"):
            await store.replace(
                TenantKey("ns", tenant), Update(b"j1:{}", TenantStatus.ACTIVE, None, time.time())
            )
        broken = TenantKey("ns", "broken")
        await _tamper_status(name, backend, broken)
        with caplog.at_level(logging.WARNING):
            records = {record.key.tenant: record for record in await store.tenants("ns")}
        assert sorted(records) == ["acme", "broken", "zeta"]
        assert records["broken"] == unreadable_record(broken) != records["acme"]
        assert "the stored record of tenant 'broken' is malformed" in caplog.text
        assert await store.read(broken) == unreadable_record(broken)


# -- a plain payload with wrong types or deep nesting is a seal error -----------------------


@pytest.mark.parametrize(
    "payload",
    [
        b'j1:{"access_token":["served-as-a-list"],"refresh_token":"r","expires_at":null}',
        b'j1:{"access_token":"a","refresh_token":"r","expires_at":"soon"}',
        b'j1:{"access_token":"a","refresh_token":5,"expires_at":1.0}',
        b"j1:" + b"[" * 100_000,
    ],
    ids=["list-token", "string-expiry", "int-refresh", "deep-nesting"],
)
@pytest.mark.parametrize("name", [b for b in BACKENDS if b in ("sqlite", "redis", "postgres")])
async def test_a_tampered_plain_payload_is_a_seal_error(
    name: str, payload: bytes, sim: FakeFactorial, tmp_path: Path
) -> None:
    """``JsonCodec.decode`` builds ``TokenSet(**data)`` without checking types, and does not
    catch RecursionError: a tampered record is served (a list as the access token) or
    raises TypeError / AttributeError / RecursionError instead of TokenSealError."""
    async with open_backend(name, tmp_path) as backend:
        store = backend.store
        async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await store.replace(
                TenantKey(CLIENT_ID, "acme"), Update(payload, TenantStatus.ACTIVE, None, time.time())
            )
            tm._forget_cached("acme")
            with pytest.raises(TokenSealError):
                await asyncio.wait_for(tm.access_token("acme"), 10)


# -- a record that cannot be opened keeps its company pin -----------------------------------


async def test_a_record_that_cannot_be_opened_does_not_unpin_the_tenant(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    """``_decode_replaced`` turns a TokenSealError into "nothing stored": a tenant pinned to
    company 111 whose record cannot be opened (a key missing from the ring, or a record
    garbled by someone with write access but no key) takes company 666's grant without
    CompanyMismatch, the sealed record is overwritten (docs/security.md: "never
    overwritten") and the old grant stays live at Factorial."""
    ring = Keyring.generate("k1")
    path = tmp_path / "tokens.db"
    async with TokenManager(app_for(sim), SQLiteStore(path), keyring=ring, **BUDGETS) as tm:
        first = await tm.exchange_code("victim", sim.issue_code(company_id=111))
        # Write access without the key: garble the sealed payload, keep everything else.
        key = TenantKey(CLIENT_ID, "victim")
        record = await tm._store.read(key)
        assert record is not None
        await tm._store.replace(key, Update(record.payload[:-8] + b"AAAAAAAA", expires_at=record.expires_at))
        with pytest.raises((CompanyMismatch, TokenSealError)):
            await tm.exchange_code("victim", sim.issue_code(company_id=666))
    assert sim.is_active(first.access_token)


# -- state and binding values that cannot be encoded are invalid states ----------------------


@pytest.mark.parametrize(
    ("state", "binding"),
    [("\ud800.AAAA", None), (None, "\udcff" * 40)],
    ids=["surrogate-state", "surrogate-binding"],
)
async def test_unencodable_callback_values_are_invalid_state(
    sim: FakeFactorial, state: str | None, binding: str | None
) -> None:
    """``_Signer._open`` computes the MAC of ``body.encode()`` outside its try, and
    ``binding_hash`` encodes the binding: a lone surrogate (what aiohttp's surrogateescape
    header decoding gives for a raw byte in a Cookie) raises UnicodeEncodeError."""
    async with TokenManager(app_for(sim), "memory://", **BUDGETS) as tm:
        if state is None:
            url = tm.authorization_url("acme", binding="b" * 43)
            state = _unquote(url.split("state=")[1].split("&")[0])
        with pytest.raises(InvalidState):
            await tm.complete_callback(state=state, code=CODE, binding=binding)


# -- a malformed store URL is a configuration error, quoted nowhere -------------------------


@pytest.mark.parametrize("url", ["postgresql://u:pw-S3cret@[::1:5432/test", "redis://:pw-S3cret@[::1:6379/0"])
def test_a_malformed_store_url_is_a_configuration_error(url: str) -> None:
    from factorial_tokens.store import store_from_url

    with pytest.raises(ConfigurationError):
        store_from_url(url)


# -- a tampered code claim is a typed error ---------------------------------------------------


@pytest.mark.parametrize("name", ["sqlite", "redis"])
async def test_a_tampered_code_claim_is_a_typed_error(name: str, sim: FakeFactorial, tmp_path: Path) -> None:
    """A claim whose state column/field was tampered with: SQLite's ``ClaimState(state)``
    and Redis's ``ClaimState(_text(state))`` raise ValueError out of ``claim_code`` (the
    record read maps the same kind of damage to StoreUnavailable on Redis)."""
    async with open_backend(name, tmp_path) as backend:
        store = backend.store
        async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
            code = sim.issue_code(company_id=1)
            await tm.exchange_code("acme", code)
            code_hash = tm._secret.code_hash(code)
            if name == "sqlite":
                _tamper(
                    backend.url.removeprefix("sqlite:///"),
                    "UPDATE claims SET state = 'bogus' WHERE code_hash = ?",
                    (code_hash,),
                )
            else:
                assert await _tamper_redis(store._claim(CLIENT_ID, code_hash), "state", "bogus") == 0
            with pytest.raises(FactorialTokensError):
                await tm.exchange_code("acme", code)


# -- an access token that cannot go into a header is in doubt, typed -------------------------


@pytest.mark.parametrize(
    "access", ["a\\r\\nX-Injected: 1", "a\\u0000b", "a\\ud800"], ids=["crlf", "nul", "surrogate"]
)
async def test_an_access_token_unfit_for_a_header_is_a_typed_error(raw_server: Any, access: str) -> None:
    """``_token_set`` accepts any non-blank string as the access token; the exchange's
    credentials call then fails inside aiohttp (ValueError: forbidden control character) or
    in ``fingerprint`` (UnicodeEncodeError), untyped, leaving the code's claim SENT."""

    async def answer(request: web.Request) -> web.StreamResponse:
        body = '{"access_token":"' + access + '","refresh_token":"r","expires_in":7200}'
        return web.Response(status=200, text=body, content_type="application/json")

    raw_server["handler"] = answer
    app = app_for(raw_server["base_url"])
    async with TokenManager(app, "memory://", **BUDGETS) as tm:
        with pytest.raises(FactorialTokensError):
            await tm.exchange_code("acme", CODE)


# -- pieces of secrets, spaces in refresh tokens, tampered rows on reconnection and keepalive


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
    raw_server: Any, where: str
) -> None:
    """``_error_code`` refuses a code sharing 8 characters with a secret, but the
    description (and the excerpt of a body whose ``error`` is not a code) is redacted
    only of whole secrets and runs of 20+ token characters: a 16-character piece stays."""
    raw_server["handler"] = _echo_piece("refresh_token", where)
    client = oauth_client(raw_server["base_url"])
    try:
        deadline = asyncio.get_running_loop().time() + 5
        with pytest.raises(ProviderError) as info:
            await client.refresh(REFRESH, deadline=deadline)
    finally:
        await client.aclose()
    assert REFRESH[:12] not in _texts(info.value), _texts(info.value)


async def test_a_piece_of_the_code_echoed_by_the_provider_is_not_kept_in_the_claim(
    raw_server: Any, tmp_path: Path
) -> None:
    """The same piece, for a code: ``_fail_claim`` writes the description into the code
    claim's outcome (in Redis, in clear), and a retried callback gets it back."""
    raw_server["handler"] = _echo_piece("code", "description")
    app = FactorialApp(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        base_url=raw_server["base_url"],
    )
    async with open_backend("redis", tmp_path) as backend:
        async with TokenManager(app, backend.store, **BUDGETS) as tm:
            with pytest.raises(ProviderError):
                await tm.exchange_code("acme", CODE)
            with pytest.raises(ProviderError) as again:  # rebuilt from the stored claim
                await tm.exchange_code("acme", CODE)
    assert CODE[:12] not in _texts(again.value), _texts(again.value)


async def test_a_rotated_refresh_token_with_a_space_is_kept(raw_server: Any) -> None:
    """RFC 6749 (A.17) allows any VSCHAR (0x20-0x7E) in a refresh token, and a form
    carries a space fine (``+``). ``_TOKEN_TEXT`` refuses the space, so the rotated
    refresh token is dropped and the caller keeps the old one, which the rotation killed:
    the next refresh is an ``invalid_grant`` (the company must connect again)."""
    rotated = "new refresh token " + "f" * 40

    async def answer(request: web.Request) -> web.StreamResponse:
        body = {"access_token": "a" * 64, "refresh_token": rotated, "expires_in": 7200}
        return web.json_response(body)

    tokens = await _ask(
        raw_server, answer, lambda client, deadline: client.refresh(REFRESH, deadline=deadline)
    )
    assert tokens.refresh_token == rotated


async def test_a_reconnection_over_a_tampered_sqlite_row_revokes_the_refused_grant(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    """A tampered SQLite row (status 'bogus') is a record that cannot be opened, like a
    garbled sealed payload. Read as StoreUnavailable (an outage), it made a reconnection
    retry for lease_ttl and give up without failing the claim or revoking the new grant:
    company 666's grant stayed live at Factorial, stored nowhere."""
    path = tmp_path / "tokens.db"
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        await tm.exchange_code("victim", sim.issue_code(company_id=111))
    _tamper(path, "UPDATE tenants SET status = 'bogus'")
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        with pytest.raises(FactorialTokensError):
            await asyncio.wait_for(tm.exchange_code("victim", sim.issue_code(company_id=666)), 30)
    assert sim.live_pairs(666) == 0, "the refused grant of company 666 is still live at Factorial"


async def test_rekey_does_not_report_success_over_a_row_it_could_not_read(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    """``rekey`` promises TokenSealError naming every record it could not open, so an
    operator never retires a key some record still needs. A ``tenants()`` that dropped a
    tampered row from the listing let rekey answer success over it."""
    path = tmp_path / "tokens.db"
    raw = os.urandom(32)
    k1 = Keyring([("k1", raw)])
    both = Keyring([("k2", os.urandom(32)), ("k1", raw)])
    async with TokenManager(app_for(sim), SQLiteStore(path), keyring=k1, **BUDGETS) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=111))
        await tm.exchange_code("broken", sim.issue_code(company_id=222))
    _tamper(path, "UPDATE tenants SET updated_at = 'yesterday' WHERE tenant = 'broken'")
    async with TokenManager(app_for(sim), SQLiteStore(path), keyring=both, **BUDGETS) as tm:
        with pytest.raises(TokenSealError, match="broken"):
            await tm.rekey(both)


async def test_a_piece_of_a_refresh_token_with_spaces_is_redacted(raw_server: Any) -> None:
    """Refresh tokens may hold spaces (VSCHAR): the piece rule first looked only inside
    runs of token characters, which a space ends, so a 16-character echo of such a token,
    made of words under 8 characters, was kept whole in the error."""
    refresh = "rt0 kq7 zx9 mw2 plv ytr " + "f" * 40

    async def answer(request: web.Request) -> web.StreamResponse:
        piece = str((await request.post())["refresh_token"])[:16]
        return web.json_response(
            {"error": "invalid_grant", "error_description": f"token {piece} was revoked"}, status=400
        )

    with pytest.raises(ProviderError) as info:
        await _ask(raw_server, answer, lambda client, deadline: client.refresh(refresh, deadline=deadline))
    assert refresh[:12] not in _texts(info.value), info.value.description


@pytest.mark.parametrize("name", ["sqlite", "redis"])
async def test_keepalive_does_not_report_an_unreadable_record_as_healthy(
    name: str, sim: FakeFactorial, tmp_path: Path
) -> None:
    """A tampered row listed with no expiry was filed by keepalive under ``non_expiring``
    (company tokens that never expire), never tried, and its report was ``ok`` (the CLI's
    ``keepalive --once`` exited 0). It is listed long expired: tried, and ``failed``, as a
    record sealed under a missing key is."""
    async with open_backend(name, tmp_path) as backend:
        async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
            await tm.exchange_code("broken", sim.issue_code(company_id=1))
            await _tamper_status(name, backend, TenantKey(CLIENT_ID, "broken"))
            with pytest.raises(TokenSealError):  # the manager itself knows it cannot be opened
                await tm.access_token("broken")
            report = await tm.keep_alive(max_age=0.01, jitter=0, once=True)
            assert "broken" not in report.non_expiring, report
            assert report.ok is False, report


async def test_an_echoed_short_client_secret_is_redacted(raw_server: Any) -> None:
    """Pieces of a secret are 8 characters: a client secret shorter than that
    (``FactorialApp`` accepts any) echoed by the provider reached the error verbatim."""
    short = "hunter2"
    app = FactorialApp(
        client_id=CLIENT_ID, client_secret=short, redirect_uri=REDIRECT_URI, base_url=raw_server["base_url"]
    )

    async def answer(request: web.Request) -> web.StreamResponse:
        sent = str((await request.post())["client_secret"])
        return web.Response(status=500, text=f"<h1>Internal error</h1> bad client secret {sent}")

    raw_server["handler"] = answer
    client = OAuthClient(app, timeout=5.0)
    try:
        with pytest.raises(ProviderError) as info:
            await client.refresh("r" * 40, deadline=asyncio.get_running_loop().time() + 5)
    finally:
        await client.aclose()
    texts = f"{info.value} {info.value!r} {info.value.description}"
    assert short not in texts, texts


@pytest.mark.parametrize("name", ["postgres", "redis"])
@pytest.mark.parametrize("secret", ["a", "grant"])
async def test_a_short_client_secret_does_not_hide_invalid_grant(
    name: str, secret: str, tmp_path: Path
) -> None:
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


# -- tampered lease, claim and tenant-id columns of an SQLite row ----------------------------


async def test_a_tampered_sqlite_lease_expiry_is_a_typed_error(sim: FakeFactorial, tmp_path: Path) -> None:
    """SQLite keeps columns untyped, and ``_acquire`` compares ``lease_expires`` with the
    clock in Python (``row[7] > now``, factorial_tokens/store/sqlite.py ``_acquire``): a row
    whose lease columns were set to text (``lease_owner = 'x', lease_expires = 'garbage'``)
    makes ``acquire`` raise a raw TypeError ('>' not supported between 'str' and 'float'),
    which escapes the store and the manager instead of StoreUnavailable or a record that
    cannot be opened."""
    path = tmp_path / "tokens.db"
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
    _tamper(path, "UPDATE tenants SET lease_owner = 'x', lease_expires = 'garbage'")
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        with pytest.raises(FactorialTokensError):
            await asyncio.wait_for(tm.refresh("acme"), 20)


async def test_a_tampered_sqlite_claim_expiry_is_a_typed_error(sim: FakeFactorial, tmp_path: Path) -> None:
    """The claim's state column is checked (a tampered one is StoreUnavailable), its
    ``expires`` column is not: ``_claim_code`` compares it in Python (``row[3] <= now``), so
    a claim whose ``expires`` holds text makes ``claim_code`` (and the retried callback's
    ``exchange_code``) raise a raw TypeError instead of a typed error."""
    path = tmp_path / "tokens.db"
    code = sim.issue_code(company_id=1)
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        await tm.exchange_code("acme", code)
    _tamper(path, "UPDATE claims SET state = 'claimed', expires = 'later'")
    async with TokenManager(app_for(sim), SQLiteStore(path), **BUDGETS) as tm:
        with pytest.raises(FactorialTokensError):
            await asyncio.wait_for(tm.exchange_code("acme", code), 20)


async def test_a_tenant_id_column_tampered_to_a_blob_is_a_typed_error(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    """``_tenants`` builds ``TenantKey(namespace, row[0])`` from the tenant column as SQLite
    returns it: a tenant id rewritten as a BLOB (``CAST(tenant AS BLOB)``) comes back as
    ``bytes``. ``tm.tenants()`` then raises a raw TypeError (sorting bytes among str) and
    ``rekey`` a raw AttributeError (``_aad`` calls ``bytes.encode``), aborting the rotation
    for every other tenant. Such a row is no tenant's (no text id finds it): it is left
    out of the listing with a warning, as the Redis store leaves out a tampered tenant
    field, and the rotation goes on for the others."""
    path = tmp_path / "tokens.db"
    ring = Keyring.generate("k1")
    async with TokenManager(app_for(sim), SQLiteStore(path), keyring=ring, **BUDGETS) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
        await tm.exchange_code("zeta", sim.issue_code(company_id=2))
    _tamper(path, "UPDATE tenants SET tenant = CAST(tenant AS BLOB) WHERE tenant = 'zeta'")
    async with TokenManager(app_for(sim), SQLiteStore(path), keyring=ring, **BUDGETS) as tm:
        assert [info.tenant for info in await tm.tenants()] == ["acme"]
        assert await asyncio.wait_for(tm.rekey(ring.rotated("k2")), 20) == 1
    with sqlite3.connect(path) as conn:
        query = "SELECT payload FROM tenants WHERE tenant = ? AND payload IS NOT NULL"
        payload = conn.execute(query, ("acme",)).fetchone()[0]
    assert payload is not None and bytes(payload).startswith(b"s1:k2:"), payload
