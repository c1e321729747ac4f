"""The connect routes (``connect_app``): the real flow and every kind of bad callback input.

Driven through aiohttp's TestServer/TestClient against the strict FakeFactorial; the
provider's counters prove what reached it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from factorial_tokens import ConfigurationError, FactorialApp, InvalidTenant, TokenManager
from factorial_tokens._state import LinkSigner, StateSigner
from factorial_tokens.testing import FakeFactorial, Fault
from factorial_tokens.web import COOKIE, AccessLogger, callback_path, connect_app

from .conftest import CLIENT_SECRET, REDIRECT_URI, SimFactory, app_for

CALLBACK = urlsplit(REDIRECT_URI).path


MANAGER = web.AppKey("manager", TokenManager)


def served(tm: TokenManager, **options: Any) -> web.Application:
    """``connect_app(tm, **options)``, remembering ``tm`` for the helpers below."""
    app = connect_app(tm, **options)
    app[MANAGER] = tm
    return app


@pytest.fixture
async def client(tm: TokenManager) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(served(tm))) as test_client:
        yield test_client


if TYPE_CHECKING:  # TestClient is generic at run time only since aiohttp 3.11
    Client = TestClient[web.Request, web.Application]


def link_path(tm: TokenManager, tenant: str, **options: Any) -> str:
    """The path and query of ``tenant``'s connect link."""
    url = urlsplit(tm.connect_link(tenant, **options))
    return f"{url.path}?{url.query}"


async def start(client: Client, sim: FakeFactorial, tenant: str, query: str = "") -> str:
    """Open the tenant's connect link (this client is the browser: it keeps the cookie), let
    the simulator approve it; return the callback's path+query."""
    tm = client.app[MANAGER]
    resp = await client.get(link_path(tm, tenant) + query, allow_redirects=False)
    assert resp.status == 302, await resp.text()
    location = resp.headers["Location"]
    assert location.startswith(sim.base_url + "/oauth/authorize?")
    callback = urlsplit(await sim.authorize(location))
    assert callback.path == CALLBACK
    return f"{callback.path}?{callback.query}"


def params(path_and_query: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(path_and_query).query).items()}


async def call(client: Client, path: str) -> tuple[int, str]:
    resp = await client.get(path, allow_redirects=False)
    body = await resp.text()
    assert "Location" not in resp.headers  # the callback never redirects
    assert resp.headers["Cache-Control"] == "no-store"
    return resp.status, body


def assert_clean(body: str, *secrets: str) -> None:
    """No page holds the client secret or any given token or code."""
    assert CLIENT_SECRET not in body
    for secret in secrets:
        assert secret not in body


# --------------------------------------------------------------------------- the happy path


async def test_connect_redirects_to_factorial_with_a_signed_state(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    resp = await client.get(link_path(tm, "acme"), allow_redirects=False)
    assert resp.status == 302
    url = urlsplit(resp.headers["Location"])
    assert f"{url.scheme}://{url.netloc}" == sim.base_url and url.path == "/oauth/authorize"
    query = parse_qs(url.query)
    assert query["client_id"] == [tm.app.client_id]
    assert query["redirect_uri"] == [REDIRECT_URI]
    assert query["response_type"] == ["code"]
    assert "resource_owner_type" not in query
    assert tm.tenant_from_state(query["state"][0]) == "acme"
    company = await client.get(link_path(tm, "acme") + "&company=1", allow_redirects=False)
    assert parse_qs(urlsplit(company.headers["Location"]).query)["resource_owner_type"] == ["company"]


async def test_connect_never_redirects_to_a_url_from_the_request(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    resp = await client.get(
        link_path(tm, "acme") + "&redirect_uri=https://evil.example/&next=https://evil.example/",
        headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"},
        allow_redirects=False,
    )
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith(sim.base_url + "/oauth/authorize?")
    assert "evil" not in location


async def test_the_flow_connects_the_tenant(client: Client, tm: TokenManager, sim: FakeFactorial) -> None:
    callback = await start(client, sim, "acme")
    status, body = await call(client, callback)
    assert status == 200 and "Connected" in body and "acme" in body
    assert sim.stats.exchanges == 1
    token = await tm.access_token("acme")
    assert sim.is_active(token)
    assert_clean(body, token, params(callback)["code"])


async def test_replayed_callback_with_the_same_code_answers_the_same_success(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    callback = await start(client, sim, "acme")
    first = await call(client, callback)
    again = await asyncio.gather(*(call(client, callback) for _ in range(10)))
    assert first[0] == 200 and {status for status, _ in again} == {200}
    assert sim.stats.exchange_attempts == 1 and sim.stats.exchanges == 1
    assert sim.stats.families_revoked == 0
    assert sim.is_active(await tm.access_token("acme"))


async def test_concurrent_duplicate_callbacks_exchange_once(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    callback = await start(client, sim, "acme")
    results = await asyncio.gather(*(call(client, callback) for _ in range(20)))
    assert {status for status, _ in results} == {200}
    assert sim.stats.exchange_attempts == 1 and sim.stats.invalid_grant == 0


async def test_replayed_state_with_another_code_is_refused(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    callback = await start(client, sim, "acme")
    assert (await call(client, callback))[0] == 200
    token = await tm.access_token("acme")
    other = sim.issue_code()
    state = params(callback)["state"]
    status, body = await call(client, f"{CALLBACK}?{urlencode({'code': other, 'state': state})}")
    assert status == 409 and "already" in body
    assert sim.stats.exchange_attempts == 1  # the second code never reached Factorial
    assert await tm.access_token("acme") == token and sim.is_active(token)
    assert_clean(body, other, token)


async def test_reloading_the_callback_of_a_revoked_tenant_is_not_a_server_error(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    """The admin reloads the callback page after the tenant was revoked (or forgotten):
    the state's nonce and the code's claim are both DONE for that code, so
    ``exchange_code`` reads the tenant's record, finds none, and raises
    TenantNotConnected, which ``callback_failure`` does not know: the page is a 500
    "The connection failed" (a server error for an ordinary, expected request), logged
    as a refused callback. It should say the connection must be started again (4xx)."""
    callback = await start(client, sim, "acme")
    assert (await call(client, callback))[0] == 200
    await tm.revoke("acme")
    status, body = await call(client, callback)
    assert status < 500, body
    assert "Connected" not in body
    assert sim.stats.exchange_attempts == 1


# --------------------------------------------------------------------------- bad state


async def test_missing_state_is_refused(client: Client, sim: FakeFactorial) -> None:
    status, body = await call(client, f"{CALLBACK}?code={sim.issue_code()}")
    assert status == 400 and "state" in body
    status, _ = await call(client, f"{CALLBACK}?state=&code=x")
    assert status == 400
    assert sim.stats.exchange_attempts == 0


async def test_forged_states_are_refused(client: Client, tm: TokenManager, sim: FakeFactorial) -> None:
    callback = await start(client, sim, "acme")
    state, code = params(callback)["state"], params(callback)["code"]
    body, mac = state.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    other_app = FactorialApp(
        client_id=tm.app.client_id, client_secret="another-secret", redirect_uri=REDIRECT_URI
    )
    forged = [
        f"{flipped}.{mac}",  # payload tampered
        f"{body}.{mac[:-3]}xyz",  # signature tampered
        body,  # signature missing
        StateSigner(other_app).sign("acme"),  # another app's key
        "not-a-state",
        "." * 3000,  # absurdly long
        "%00%01",
    ]
    for bad in forged:
        status, page = await call(client, f"{CALLBACK}?{urlencode({'code': code, 'state': bad})}")
        assert status == 400, bad
        assert_clean(page, code)
    assert sim.stats.exchange_attempts == 0
    assert (await call(client, callback))[0] == 200  # the genuine one still works


async def test_expired_state_is_refused(client: Client, tm: TokenManager, sim: FakeFactorial) -> None:
    stale = StateSigner(tm.app, ttl=600).sign("acme", now=time.time() - 3600)
    status, body = await call(client, f"{CALLBACK}?{urlencode({'code': sim.issue_code(), 'state': stale})}")
    assert status == 400 and "expired" in body
    assert sim.stats.exchange_attempts == 0


async def test_missing_code_does_not_burn_the_state(client: Client, sim: FakeFactorial) -> None:
    callback = await start(client, sim, "acme")
    state = params(callback)["state"]
    status, body = await call(client, f"{CALLBACK}?{urlencode({'state': state})}")
    assert status == 400 and "code" in body
    assert (await call(client, callback))[0] == 200


async def test_malformed_code_is_refused(client: Client, sim: FakeFactorial) -> None:
    callback = await start(client, sim, "acme")
    state = params(callback)["state"]
    status, _ = await call(client, f"{CALLBACK}?{urlencode({'state': state, 'code': 'x' * 5000})}")
    assert status == 400
    assert sim.stats.exchange_attempts == 0


# --------------------------------------------------------------------------- codes and provider


async def test_code_reused_for_another_tenant_is_refused(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    callback = await start(client, sim, "acme")
    assert (await call(client, callback))[0] == 200
    code = params(callback)["code"]
    evil_state = params(await start(client, sim, "evil"))["state"]
    status, body = await call(client, f"{CALLBACK}?{urlencode({'code': code, 'state': evil_state})}")
    assert status == 409 and "another tenant" in body
    assert sim.stats.exchange_attempts == 1 and sim.stats.families_revoked == 0
    assert sim.is_active(await tm.access_token("acme"))
    assert_clean(body, code)


async def test_code_refused_by_factorial_shows_a_provider_error_page(
    client: Client, sim: FakeFactorial
) -> None:
    callback = await start(client, sim, "acme")
    state = params(callback)["state"]
    made_up = "made-up-code-0123456789abcdef"
    status, body = await call(client, f"{CALLBACK}?{urlencode({'code': made_up, 'state': state})}")
    assert status == 502 and "invalid_grant" in body
    assert sim.stats.exchange_attempts == 1
    assert_clean(body, made_up)


async def test_html_gateway_error_means_connect_again(client: Client, sim: FakeFactorial) -> None:
    callback = await start(client, sim, "acme")
    sim.inject(Fault.HTML_ERROR)
    status, body = await call(client, callback)
    assert status == 409 and "connect the company again" in body
    assert "nginx" not in body and "<center>" not in body
    # The code may have been consumed: it is never sent again, even on a retried callback.
    assert (await call(client, callback))[0] == 409
    assert sim.stats.exchange_attempts == 0  # the fault answered before the grant was processed
    assert sim.stats.token_requests == 1


async def test_factorial_unavailable_shows_a_provider_error_page(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        app = app_for(sim)
        async with (
            TokenManager(app, "memory://", lease_ttl=3, provider_timeout=0.5, refresh_deadline=1) as tm,
            TestClient(TestServer(served(tm))) as client,
        ):
            callback = await start(client, sim, "acme")
            sim.inject(Fault.HTTP_503, times=100)
            status, body = await call(client, callback)
            assert status == 502 and "Factorial" in body
            assert_clean(body, params(callback)["code"])
            assert sim.stats.exchange_attempts == 0


async def test_access_denied(client: Client, sim: FakeFactorial) -> None:
    callback = await start(client, sim, "acme")
    state = params(callback)["state"]
    status, body = await call(client, f"{CALLBACK}?{urlencode({'error': 'access_denied', 'state': state})}")
    assert status == 403 and "not granted" in body and "acme" in body
    status, body = await call(
        client, f"{CALLBACK}?{urlencode({'error': '<script>x</script>', 'state': state})}"
    )
    assert status == 400 and "<script>" not in body and "scriptxscript" in body
    assert sim.stats.exchange_attempts == 0


async def test_an_error_without_a_valid_state_shows_nothing_of_it(client: Client, sim: FakeFactorial) -> None:
    for query in (
        {"error": "access_denied"},
        {"error": "phishing_text_call_0800", "error_description": "Call +1 555 0100"},
        {"error": "access_denied", "state": "forged.state"},
    ):
        status, body = await call(client, f"{CALLBACK}?{urlencode(query)}")
        assert status == 400 and "state" in body
        assert "phishing" not in body and "555" not in body and "not granted" not in body
    assert sim.stats.token_requests == 0


async def test_head_never_exchanges(client: Client, sim: FakeFactorial) -> None:
    callback = await start(client, sim, "acme")
    resp = await client.head(callback, allow_redirects=False)
    assert resp.status == 405
    assert sim.stats.exchange_attempts == 0


# --------------------------------------------------------------------------- tenants


async def test_unknown_tenant_is_refused_when_an_allow_hook_is_given(
    tm: TokenManager, sim: FakeFactorial
) -> None:
    async def allow(request: web.Request, tenant: str) -> bool:
        await asyncio.sleep(0)
        return tenant == "acme"

    async with TestClient(TestServer(served(tm, allow=allow))) as client:
        resp = await client.get(link_path(tm, "nobody"), allow_redirects=False)
        assert resp.status == 404 and "Location" not in resp.headers
        # A state for a tenant the hook refuses (e.g. issued before it was removed).
        state = params(tm.authorization_url("nobody"))["state"]
        status, body = await call(
            client, f"{CALLBACK}?{urlencode({'code': sim.issue_code(), 'state': state})}"
        )
        assert status == 404 and "nobody" in body
        assert sim.stats.exchange_attempts == 0
        status, _ = await call(client, await start(client, sim, "acme"))
        assert status == 200


async def test_a_new_tenant_connects_without_a_hook(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    assert await tm.tenants() == []
    assert (await call(client, await start(client, sim, "brand-new")))[0] == 200
    assert [info.tenant for info in await tm.tenants()] == ["brand-new"]


@pytest.mark.parametrize(
    "tenant",
    [
        "café-ü-日本語-🚀",
        "x" * 200,
        "a b+c&d=e?f#g",
        "'\"; DROP TABLE tenants; --",
        "a/b",
        "...",
    ],
)
async def test_odd_tenant_ids_round_trip(
    client: Client, tm: TokenManager, sim: FakeFactorial, tenant: str
) -> None:
    callback = await start(client, sim, tenant)
    assert tm.tenant_from_state(params(callback)["state"]) == tenant
    status, _ = await call(client, callback)
    assert status == 200
    assert [info.tenant for info in await tm.tenants()] == [tenant]


@pytest.mark.parametrize("tenant", [".", ".."])
async def test_dot_tenant_ids_are_refused_since_no_link_could_reach_them(
    client: Client, tm: TokenManager, tenant: str
) -> None:
    """``validate_tenant`` accepts ``"."`` and ``".."``, and ``connect_link`` builds
    ``/connect/..?link=...``: ``quote(tenant, safe="")`` leaves dots alone, so every
    browser and HTTP client removes the dot segment (RFC 3986 5.2.4) and opens ``/?link=``
    or ``/connect/?link=`` instead: the link such a tenant's admin gets can never work (404).
    Such ids are refused now, where any other is."""
    with pytest.raises(InvalidTenant, match=r"'\.' or '\.\.'"):
        tm.connect_link(tenant)
    resp = await client.get(f"/connect/{tenant}", allow_redirects=False)
    assert resp.status in (400, 404) and "Location" not in resp.headers


@pytest.mark.parametrize("raw", ["x" * 201, "%00", "a%0Ab", "%1B%5B31m", "a%7Fb", "%C2%85"])
async def test_invalid_tenant_ids_are_refused(client: Client, sim: FakeFactorial, raw: str) -> None:
    # Refused before the link is even looked at.
    resp = await client.get(f"/connect/{raw}", allow_redirects=False)
    assert resp.status == 400 and "Location" not in resp.headers
    assert sim.stats.authorize_requests == 0


async def test_tenant_ids_are_escaped_in_pages(client: Client, sim: FakeFactorial) -> None:
    tenant = "<script>alert('x')</script>"
    status, body = await call(client, await start(client, sim, tenant))
    assert status == 200
    assert "<script>" not in body and "&lt;script&gt;" in body
    state = params(await start(client, sim, tenant))["state"]
    status, body = await call(client, f"{CALLBACK}?{urlencode({'error': 'access_denied', 'state': state})}")
    assert status == 403 and "<script>" not in body


# --------------------------------------------------------------------------- mounting


async def test_mounted_as_a_sub_app(sim: FakeFactorial) -> None:
    redirect = "http://127.0.0.1:8765/factorial/oauth/callback"
    sim.add_client("sub-client", "sub-secret-0123456789", redirect)
    app = FactorialApp(
        client_id="sub-client",
        client_secret="sub-secret-0123456789",
        redirect_uri=redirect,
        base_url=sim.base_url,
    )
    async with TokenManager(app, "memory://", lease_ttl=6, provider_timeout=2) as tm:

        async def home(_: web.Request) -> web.Response:
            return web.Response(text="the user's own app")

        root = web.Application()
        root.router.add_get("/", home)
        root.add_subapp("/factorial", connect_app(tm, prefix="/factorial"))
        async with TestClient(TestServer(root)) as client:
            link = urlsplit(tm.connect_link("acme", base_url=str(client.make_url("/factorial"))))
            assert link.path == "/factorial/connect/acme"
            resp = await client.get(f"{link.path}?{link.query}", allow_redirects=False)
            assert resp.status == 302
            callback = urlsplit(await sim.authorize(resp.headers["Location"]))
            assert callback.path == "/factorial/oauth/callback"
            page = await client.get(f"{callback.path}?{callback.query}")
            assert page.status == 200
            assert (await client.get("/")).status == 200
        assert sim.is_active(await tm.access_token("acme"))


def test_callback_path_must_fit_the_prefix() -> None:
    assert callback_path("https://x.example/oauth/callback") == "/oauth/callback"
    assert callback_path("https://x.example/f/oauth/cb", "/f") == "/oauth/cb"
    assert callback_path("https://x.example/f/oauth/cb", "/f/") == "/oauth/cb"
    with pytest.raises(ConfigurationError):
        callback_path("https://x.example/oauth/callback", "/factorial")


# --------------------------------------------------------------------------- closed by default


async def test_connect_without_a_valid_link_is_403(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    expired = LinkSigner(tm.app, 600).sign("acme", now=time.time() - 3600)
    state = params(tm.authorization_url("acme"))["state"]
    for query in ("", "?link=", "?link=forged.link", f"?link={expired}", f"?link={state}"):
        resp = await client.get(f"/connect/acme{query}", allow_redirects=False)
        assert resp.status == 403 and "Location" not in resp.headers and "Set-Cookie" not in resp.headers
    other = link_path(tm, "globex").split("?")[1]
    resp = await client.get(f"/connect/acme?{other}", allow_redirects=False)
    assert resp.status == 403
    assert sim.stats.authorize_requests == 0 and await tm.tenants() == []


async def test_connect_without_a_link_shows_nothing_of_the_path(client: Client, sim: FakeFactorial) -> None:
    """Anyone can make the server's own origin show a sentence of their choosing: the 403
    page for ``/connect/{tenant}`` without a valid link quotes the unverified tenant id from
    the path (200 printable characters, spaces included), so a link to
    ``/connect/Your account is locked. Call +1 555 0100`` renders that text on the app's
    domain, under "Connect link required". The callback takes care to show nothing of an
    unverified ``error=`` (test_an_error_without_a_valid_state_shows_nothing_of_it); the
    connect route should likewise not echo what no link vouches for."""
    text = "Your Factorial account is locked. Call +1 555 0100 to unlock it"
    resp = await client.get(f"/connect/{quote(text, safe='')}", allow_redirects=False)
    body = await resp.text()
    assert resp.status == 403
    assert "555" not in body and "locked" not in body
    assert sim.stats.authorize_requests == 0


async def test_connect_sets_an_httponly_samesite_cookie(sim: FakeFactorial) -> None:
    for redirect, secure in ((REDIRECT_URI, False), ("https://app.example/oauth/callback", True)):
        app = FactorialApp(
            client_id="c", client_secret="s" * 20, redirect_uri=redirect, base_url=sim.base_url
        )
        async with (
            TokenManager(app, "memory://", lease_ttl=6, provider_timeout=2) as tm,
            TestClient(TestServer(served(tm))) as client,
        ):
            resp = await client.get(link_path(tm, "acme"), allow_redirects=False)
            assert resp.status == 302
            cookie = resp.headers["Set-Cookie"]
            assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
            assert ("Secure" in cookie) is secure and "Path=/;" in cookie + ";"
            if not secure:  # (the test client sends no Secure cookie over http)
                # A second connect in the same browser keeps its binding (two tabs both work).
                again = await client.get(link_path(tm, "acme"), allow_redirects=False)
                assert again.headers["Set-Cookie"].split(";")[0] == cookie.split(";")[0]


async def test_a_state_ttl_under_a_second_still_sets_a_lasting_cookie(sim: FakeFactorial) -> None:
    """The binding cookie's Max-Age was ``int(state_ttl)``: 0 for a state_ttl under a second,
    which tells the browser to delete the cookie at once (every callback then refused)."""
    async with (
        TokenManager(app_for(sim), "memory://", lease_ttl=6, provider_timeout=2, state_ttl=0.5) as tm,
        TestClient(TestServer(served(tm))) as client,
    ):
        resp = await client.get(link_path(tm, "acme"), allow_redirects=False)
        max_age = int(re.search(r"Max-Age=(\d+)", resp.headers["Set-Cookie"]).group(1))  # type: ignore[union-attr]
        assert max_age >= 1


async def test_a_callback_from_another_browser_is_refused_without_a_provider_request(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    callback = await start(client, sim, "acme")
    async with TestClient(TestServer(served(tm))) as other:
        status, body = await call(other, callback)  # no cookie at all
        assert status == 400 and "browser" in body
        other.session.cookie_jar.update_cookies({COOKIE: "x" * 43})  # another browser's cookie
        status, body = await call(other, callback)
        assert status == 400 and "another browser" in body
    assert sim.stats.token_requests == 0 and await tm.tenants() == []
    assert (await call(client, callback))[0] == 200  # the admin's own browser still completes it


async def test_a_victim_admin_tricked_into_an_attackers_authorize_url_connects_nothing(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    """Reproduction: the attacker opened /connect/<their tenant> and sent the authorize URL
    to a victim's admin, whose company landed in the attacker's tenant."""
    resp = await client.get(link_path(tm, "attacker"), allow_redirects=False)  # the attacker's browser
    authorize_url = resp.headers["Location"]
    async with TestClient(TestServer(served(tm))) as victim:  # the victim's browser
        sim.next_owner(20002)
        callback = urlsplit(await sim.authorize(authorize_url))
        status, _ = await call(victim, f"{callback.path}?{callback.query}")
        assert status == 400
    assert sim.stats.token_requests == 0 and await tm.tenants() == []


async def test_takeover_of_a_connected_tenant_over_http_is_refused_and_revoked(
    client: Client, tm: TokenManager, sim: FakeFactorial
) -> None:
    sim.next_owner(10001)
    assert (await call(client, await start(client, sim, "acme")))[0] == 200
    mine = await tm.access_token("acme")
    async with TestClient(TestServer(served(tm))) as attacker:
        sim.next_owner(10003)
        status, body = await call(attacker, await start(attacker, sim, "acme"))
    assert status == 409 and "10001" in body and "10003" in body and "revoked" in body
    assert (await tm.credentials("acme")).company_id == "10001" and await tm.access_token("acme") == mine
    assert sim.stats.exchanges == 2 and sim.stats.revocations_by_company == {10003: 1}
    assert sim.live_pairs(10003) == 0
    assert_clean(body, mine)


async def test_success_url_sends_the_admin_back_to_the_app(tm: TokenManager, sim: FakeFactorial) -> None:
    async with TestClient(TestServer(served(tm, success_url="https://app.example/done?t={tenant}"))) as c:
        callback = await start(c, sim, "café ☕")
        resp = await c.get(callback, allow_redirects=False)
        assert resp.status == 303
        assert resp.headers["Location"] == "https://app.example/done?t=caf%C3%A9%20%E2%98%95"
    with pytest.raises(ConfigurationError):
        connect_app(tm, success_url="/relative")


async def test_open_routes_connect_without_a_link(tm: TokenManager, sim: FakeFactorial) -> None:
    async with TestClient(TestServer(served(tm, open_routes=True))) as open_client:
        resp = await open_client.get("/connect/acme", allow_redirects=False)
        assert resp.status == 302
        callback = urlsplit(await sim.authorize(resp.headers["Location"]))
        assert (await call(open_client, f"{callback.path}?{callback.query}"))[0] == 200
        # An unbound state (connect-url) completes without a cookie in open mode only.
        unbound = urlsplit(await sim.authorize(tm.authorization_url("globex")))
        async with TestClient(TestServer(served(tm, open_routes=True))) as fresh:
            assert (await call(fresh, f"{unbound.path}?{unbound.query}"))[0] == 200


async def test_the_access_log_escapes_control_characters(
    tm: TokenManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    server = TestServer(served(tm))
    await server.start_server(access_log_class=AccessLogger)
    async with TestClient(server) as c:
        await c.get("/connect/a%0d%0aFORGED%20200%20%E2%80%AEx", allow_redirects=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert lines and all("\n" not in line and "\r" not in line and "\u202e" not in line for line in lines)
    assert any("a\\x0d\\x0aFORGED 200 \\u202ex" in line for line in lines)
