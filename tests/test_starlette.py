"""Starlette/FastAPI connect routes, through httpx's ASGI transport against the simulator:
one exchange for a duplicated callback, 400 for a tampered state, the browser binding,
the connect link, and the lifespan helper."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from factorial_tokens import FactorialApp, ManagerClosed, TokenManager
from factorial_tokens.starlette import connect_app, lifespan
from factorial_tokens.testing import FakeFactorial

from .conftest import CLIENT_SECRET

CLIENT = "starlette-client"
REDIRECT = "http://app/factorial/oauth/callback"


@pytest.fixture
async def stm(sim: FakeFactorial) -> AsyncIterator[TokenManager]:
    sim.add_client(CLIENT, CLIENT_SECRET, REDIRECT)
    factorial = FactorialApp(
        client_id=CLIENT, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT, base_url=sim.base_url
    )
    async with TokenManager(factorial, "memory://", lease_ttl=6.0, provider_timeout=2.0) as manager:
        yield manager


def browser(tm: TokenManager, **options: object) -> httpx.AsyncClient:
    api = Starlette(routes=[Mount("/factorial", connect_app(tm, prefix="/factorial", **options))])  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://app")


async def start(client: httpx.AsyncClient, tm: TokenManager, sim: FakeFactorial, tenant: str = "acme") -> str:
    """Open the connect link, approve at the simulator; the callback's path and query."""
    link = tm.connect_link(tenant, base_url="http://app/factorial")
    resp = await client.get(link)
    assert resp.status_code == 302, resp.text
    assert resp.headers["Location"].startswith(sim.base_url)
    callback = await sim.authorize(resp.headers["Location"])
    assert callback.startswith(REDIRECT + "?")
    return callback.removeprefix("http://app")


async def test_a_duplicated_callback_exchanges_once(sim: FakeFactorial, stm: TokenManager) -> None:
    async with browser(stm) as client:
        callback = await start(client, stm, sim)
        first, second = await asyncio.gather(client.get(callback), client.get(callback))
        again = await client.get(callback)
    assert [first.status_code, second.status_code, again.status_code] == [200, 200, 200]
    assert "connected" in first.text and first.headers["Cache-Control"] == "no-store"
    assert sim.stats.exchanges == 1 and sim.stats.exchange_attempts == 1
    assert [info.tenant for info in await stm.tenants()] == ["acme"]


async def test_a_tampered_state_is_400_and_sends_nothing(sim: FakeFactorial, stm: TokenManager) -> None:
    async with browser(stm) as client:
        callback = await start(client, stm, sim)
        path, query = callback.split("?", 1)
        params = dict(httpx.QueryParams(query))
        state = params["state"]
        params["state"] = state[:-2] + ("AA" if not state.endswith("AA") else "BB")
        resp = await client.get(path, params=params)
        assert resp.status_code == 400
        assert (await client.get(path, params={"code": params["code"]})).status_code == 400
    assert sim.stats.exchange_attempts == 0


async def test_a_state_with_another_code_is_refused(sim: FakeFactorial, stm: TokenManager) -> None:
    async with browser(stm) as client:
        callback = await start(client, stm, sim)
        assert (await client.get(callback)).status_code == 200
        path, query = callback.split("?", 1)
        params = dict(httpx.QueryParams(query))
        params["code"] = sim.issue_code(client_id=CLIENT)
        assert (await client.get(path, params=params)).status_code == 409
    assert sim.stats.exchanges == 1


async def test_link_and_browser_binding_are_required(sim: FakeFactorial, stm: TokenManager) -> None:
    async with browser(stm) as client:
        assert (await client.get("/factorial/connect/acme")).status_code == 403
        callback = await start(client, stm, sim)
    async with browser(stm) as other_browser:  # no cookie: another browser
        resp = await other_browser.get(callback)
        assert resp.status_code == 400 and "browser" in resp.text
    assert sim.stats.exchange_attempts == 0


async def test_success_url_and_open_routes(sim: FakeFactorial, stm: TokenManager) -> None:
    async with browser(stm, success_url="https://example.com/done/{tenant}", open_routes=True) as client:
        resp = await client.get("/factorial/connect/caf%C3%A9")
        assert resp.status_code == 302
        callback = await sim.authorize(resp.headers["Location"])
        done = await client.get(callback.removeprefix("http://app"))
    assert done.status_code == 303 and done.headers["Location"] == "https://example.com/done/caf%C3%A9"
    assert sim.stats.exchanges == 1


async def test_lifespan_opens_and_closes_the_manager(sim: FakeFactorial) -> None:
    sim.add_client(CLIENT, CLIENT_SECRET, REDIRECT)
    factorial = FactorialApp(
        client_id=CLIENT, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT, base_url=sim.base_url
    )
    tm = TokenManager(factorial, "memory://")
    api = Starlette(lifespan=lifespan(tm), routes=[Mount("/factorial", connect_app(tm, prefix="/factorial"))])
    async with api.router.lifespan_context(api):
        await tm.exchange_code("acme", sim.issue_code(client_id=CLIENT))
        assert await tm.access_token("acme")
    with pytest.raises(ManagerClosed):
        await tm.access_token("acme")


async def test_head_never_exchanges_on_starlette(sim: FakeFactorial, stm: TokenManager) -> None:
    """A HEAD request to the callback completes the connection on Starlette: the routes are
    declared ``methods=["GET"]`` and Starlette's ``Route`` adds HEAD to every GET route, so
    a HEAD (a link checker, a prefetcher in the admin's browser) spends the state and
    exchanges the code, and answers with no page. The aiohttp routes refuse HEAD (405,
    ``allow_head=False``, tests/test_serve.py::test_head_never_exchanges); both adapters
    promise the same guarantees. HEAD /connect likewise sets the binding cookie."""
    async with browser(stm) as client:
        callback = await start(client, stm, sim)
        resp = await client.head(callback)
        assert sim.stats.exchange_attempts == 0 and await stm.tenants() == []
        assert resp.status_code == 405
        head = await client.head(stm.connect_link("globex", base_url="http://app/factorial"))
        assert head.status_code == 405 and "set-cookie" not in head.headers


async def test_a_tenant_id_with_a_slash_connects_on_starlette(sim: FakeFactorial, stm: TokenManager) -> None:
    """``connect_link("a/b")`` gives ``/connect/a%2Fb``, which the aiohttp routes serve
    (tests/test_serve.py::test_odd_tenant_ids_round_trip), but Starlette routes on the
    percent-decoded path (``/connect/a/b``) and its ``{tenant}`` matches no slash: the
    link answers 404, so a valid tenant id can never be connected through this adapter."""
    async with browser(stm) as client:
        callback = await start(client, stm, sim, "a/b")
        assert (await client.get(callback)).status_code == 200
    assert [info.tenant for info in await stm.tenants()] == ["a/b"]
