"""httpx: FactorialAuth with an AsyncClient (TokenManager) and a Client (SyncTokenManager),
counted against the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from factorial_tokens import ConfigurationError, ReauthorizationRequired, TokenManager
from factorial_tokens.httpx import FactorialAuth
from factorial_tokens.sync import SyncTokenManager
from factorial_tokens.testing import FakeFactorial

from .conftest import ThreadSimFactory, app_for
from .test_sync import in_threads

EMPLOYEES = "/api/2025-10-01/resources/employees/employees"


async def test_async_client_sends_the_token_and_refreshes_once_after_401s(
    sim: FakeFactorial, tm: TokenManager
) -> None:
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    async with httpx.AsyncClient(base_url=sim.base_url, auth=FactorialAuth(tm, "acme")) as api:
        assert (await api.get(EMPLOYEES)).status_code == 200
        sim.expire_access_tokens()  # every cached token is now refused by the API
        responses = await asyncio.gather(*(api.get(EMPLOYEES) for _ in range(50)))
        # A body is resent with the retry (it is read before the first try).
        posted = await api.post(EMPLOYEES, content=b"x" * 10)
    assert [r.status_code for r in responses] == [200] * 50
    assert posted.status_code in (404, 405)  # the simulator has no such route: not a 401
    stats = sim.stats
    assert stats.refreshes == 1 and stats.invalid_grant == 0
    assert stats.api_unauthorized == 50


async def test_a_dead_grant_raises_after_one_try(sim: FakeFactorial, tm: TokenManager) -> None:
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    await tm.access_token("acme")
    sim.revoke_company(1)
    async with httpx.AsyncClient(base_url=sim.base_url, auth=FactorialAuth(tm, "acme")) as api:
        with pytest.raises(ReauthorizationRequired):
            await api.get(EMPLOYEES)
    assert sim.stats.api_unauthorized == 1 and sim.stats.refresh_attempts == 1


async def test_the_token_never_leaves_for_another_origin(sim: FakeFactorial, tm: TokenManager) -> None:
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    before = sim.stats.api_calls
    async with httpx.AsyncClient(auth=FactorialAuth(tm, "acme")) as api:
        with pytest.raises(ConfigurationError):
            await api.get("http://127.0.0.2:9/steal")
        with pytest.raises(ConfigurationError):
            await api.get(sim.base_url.replace("http://", "https://") + EMPLOYEES)
    assert sim.stats.api_calls == before


async def test_the_wrong_kind_of_manager_is_refused(sim: FakeFactorial, tm: TokenManager) -> None:
    with httpx.Client(base_url=sim.base_url, auth=FactorialAuth(tm, "acme")) as api:
        with pytest.raises(ConfigurationError, match="SyncTokenManager"):
            api.get(EMPLOYEES)
    with pytest.raises(TypeError):
        FactorialAuth(object(), "acme")  # type: ignore[arg-type]


@pytest.fixture
def tsim(make_thread_sim: ThreadSimFactory) -> Iterator[FakeFactorial]:
    with make_thread_sim() as sim:
        yield sim


def test_sync_client_from_many_threads(tsim: FakeFactorial, tmp_path: Path) -> None:
    with SyncTokenManager(
        app_for(tsim), f"sqlite:///{tmp_path / 't.db'}", lease_ttl=6.0, provider_timeout=2.0
    ) as stm:
        stm.exchange_code("acme", tsim.issue_code(company_id=1))
        auth = FactorialAuth(stm, "acme")
        with httpx.Client(base_url=tsim.base_url, auth=auth) as api:
            assert api.get(EMPLOYEES).status_code == 200
            tsim.expire_access_tokens()
            statuses: list[int] = []

            def work(_: int) -> None:
                statuses.append(api.get(EMPLOYEES).status_code)

            assert in_threads(work) == []
        assert statuses == [200] * 16
        assert tsim.stats.refreshes == 1 and tsim.stats.invalid_grant == 0
        with httpx.Client(base_url=tsim.base_url, auth=auth) as api, pytest.raises(ConfigurationError):
            api.get("http://example.invalid/")


# -- review-sync: failing tests ------------------------------------------------------------


def test_a_401_from_the_origin_a_redirect_led_to_forces_no_refresh(
    tsim: FakeFactorial, tmp_path: Path
) -> None:
    """The auth flow sees the answer after httpx followed the redirects: a 401 from another
    origin (where httpx rightly sent no token) is taken for Factorial refusing the token,
    and ``token_rejected`` forces a refresh, a rotation for nothing, on every such request."""
    from urllib.parse import urlencode

    from .test_sync import other_origin

    with (
        SyncTokenManager(
            app_for(tsim), f"sqlite:///{tmp_path / 't.db'}", lease_ttl=6.0, provider_timeout=2.0
        ) as stm,
        other_origin(401) as (elsewhere, seen),
    ):
        stm.exchange_code("acme", tsim.issue_code(company_id=1))
        tsim.add_client("other-app", "other-secret", elsewhere + "/cb")
        query = urlencode(
            {"client_id": "other-app", "redirect_uri": elsewhere + "/cb", "response_type": "code"}
        )
        tsim.reset_stats()
        with httpx.Client(
            base_url=tsim.base_url, auth=FactorialAuth(stm, "acme"), follow_redirects=True
        ) as api:
            for _ in range(3):
                assert api.get(f"/oauth/authorize?{query}").status_code == 401
        assert seen and all(header is None for header in seen)  # httpx never sent it there
        assert tsim.stats.refreshes == 0, f"{tsim.stats.refreshes} refreshes for 401s Factorial never sent"
