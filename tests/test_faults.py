"""Every fault the provider can throw: a typed error, stored tokens intact, recovery after.

Faults come from the strict simulator, never from a patched HTTP client. Every test whose
tokens reach a store runs once per store of the table (``tests/stores``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from factorial_tokens import (
    ExchangeInDoubt,
    FactorialApp,
    ProviderError,
    ReauthorizationRequired,
    RequestInDoubt,
    RotationLost,
    TokenManager,
    TokenSet,
)
from factorial_tokens.testing import FakeFactorial, Fault, RefreshMode

from .conftest import CLIENT_ID, REDIRECT_URI, SimFactory, app_for
from .stores import Backend

BUDGETS = {"lease_ttl": 3.0, "provider_timeout": 1.0, "refresh_deadline": 2.0}


@pytest.fixture
async def connected(sim: FakeFactorial, backend: Backend) -> AsyncIterator[tuple[TokenManager, TokenSet]]:
    async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
        tokens = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        yield tm, tokens


async def assert_recovers(tm: TokenManager, sim: FakeFactorial, before: TokenSet) -> None:
    """Stored tokens are the ones from before the fault; once it clears, refresh works."""
    assert (await tm.tokens("acme")).refresh_token == before.refresh_token
    sim.clear_faults()
    fresh = await tm.refresh("acme")
    assert fresh.access_token != before.access_token and sim.is_active(fresh.access_token)
    assert sim.stats.invalid_grant == 0 and sim.stats.families_revoked == 0


@pytest.mark.parametrize("fault", [Fault.HTTP_500, Fault.HTTP_503, Fault.RATE_LIMITED])
async def test_transient_refusals_are_retried(
    connected: tuple[TokenManager, TokenSet], sim: FakeFactorial, fault: Fault
) -> None:
    tm, before = connected
    sim.inject(fault, times=2, retry_after=0.2)
    fresh = await tm.refresh("acme")
    assert fresh.access_token != before.access_token
    assert sim.stats.refreshes == 1 and sim.stats.token_requests == 4  # exchange + 2 faults + refresh
    assert sim.stats.invalid_grant == 0


@pytest.mark.parametrize(
    "fault",
    [
        Fault.HTTP_502,
        Fault.HTTP_504,
        Fault.HTML_ERROR,
        Fault.HTML_200,
        Fault.MALFORMED_JSON,
        Fault.MISSING_FIELDS,
        Fault.DROP_BEFORE,
    ],
)
async def test_an_answer_in_doubt_is_retried_once_with_the_stored_token(
    connected: tuple[TokenManager, TokenSet], sim: FakeFactorial, fault: Fault
) -> None:
    tm, before = connected
    sim.inject(fault)
    fresh = await tm.refresh("acme")
    assert fresh.access_token != before.access_token
    assert sim.stats.token_requests == 3  # exchange, the request in doubt, one more try
    assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.HTTP_503, ProviderError),
        (Fault.HTTP_500, ProviderError),
        (Fault.HTTP_502, RequestInDoubt),
        (Fault.HTML_ERROR, RequestInDoubt),
        (Fault.MALFORMED_JSON, RequestInDoubt),
        (Fault.DROP_BEFORE, RequestInDoubt),
    ],
)
async def test_a_lasting_fault_is_a_typed_error_and_loses_nothing(
    connected: tuple[TokenManager, TokenSet], sim: FakeFactorial, fault: Fault, error: type[Exception]
) -> None:
    tm, before = connected
    sim.inject(fault, times=100)
    with pytest.raises(error) as info:
        await tm.refresh("acme")
    assert not isinstance(info.value, ReauthorizationRequired)
    assert before.access_token not in str(info.value) and before.refresh_token not in str(info.value)
    await assert_recovers(tm, sim, before)


async def test_retry_after_beyond_the_deadline_fails_fast(
    connected: tuple[TokenManager, TokenSet], sim: FakeFactorial
) -> None:
    tm, before = connected
    sim.inject(Fault.RATE_LIMITED, times=100, retry_after=3)  # beyond refresh_deadline (2 s)
    with pytest.raises(ProviderError) as info:
        await tm.refresh("acme")
    assert info.value.status == 429
    assert sim.stats.token_requests == 2
    # Held: a refresh inside the Retry-After sends nothing and fails fast ...
    with pytest.raises(ProviderError) as info:
        await tm.refresh("acme")
    assert info.value.status == 429 and sim.stats.token_requests == 2
    await asyncio.sleep(1.2)  # ... and once less than its deadline is left, waits it out
    await assert_recovers(tm, sim, before)


async def test_provider_down(connected: tuple[TokenManager, TokenSet], sim: FakeFactorial) -> None:
    tm, before = connected
    sim.unavailable = True
    with pytest.raises(ProviderError) as info:
        await tm.refresh("acme")
    assert info.value.status == 503
    sim.unavailable = False
    await assert_recovers(tm, sim, before)


async def test_a_backoff_that_sleeps_past_the_deadline_reports_the_last_answer(sim: FakeFactorial) -> None:
    """A busy event loop wakes the retry backoff after the refresh deadline: nothing more is
    sent, and the caller gets Factorial's last answer (here a 429), not a bare timeout (seen
    as a flaky 503 test under load). Memory only: the stall is this test's own."""
    async with TokenManager(app_for(sim), "memory://", **BUDGETS) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
        sim.inject(Fault.RATE_LIMITED, times=5, retry_after=1.0)  # the backoff sleeps 1 s of 2
        sent = sim.stats.token_requests

        async def stall_the_loop() -> None:
            while sim.stats.token_requests == sent:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.3)  # the refresh now sleeps its backoff
            time.sleep(2.0)  # a busy loop: the backoff ends after the deadline

        stall = asyncio.ensure_future(stall_the_loop())
        with pytest.raises(ProviderError) as info:
            await tm.refresh("acme")
        await stall
    assert info.value.status == 429
    assert sim.stats.token_requests == sent + 1


async def test_a_wrong_client_secret_is_not_a_dead_grant(sim: FakeFactorial, backend: Backend) -> None:
    async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
    wrong = FactorialApp(
        client_id=CLIENT_ID, client_secret="wrong", redirect_uri=REDIRECT_URI, base_url=sim.base_url
    )
    async with TokenManager(wrong, backend.store, **BUDGETS) as bad:
        with pytest.raises(ProviderError) as info:
            await bad.exchange_code("other", sim.issue_code(company_id=2))
        assert info.value.status == 401 and info.value.error == "invalid_client"
        assert "wrong" not in str(info.value)


async def test_unreachable_provider(sim: FakeFactorial) -> None:  # memory: no token reaches a store
    app = FactorialApp(
        client_id=CLIENT_ID, client_secret="s", redirect_uri=REDIRECT_URI, base_url="http://127.0.0.1:9"
    )
    async with TokenManager(app, "memory://", **BUDGETS) as tm:
        with pytest.raises(ProviderError) as info:
            await tm.exchange_code("acme", "code")
        assert info.value.error == "connection_error"
        assert "127.0.0.1:9" in info.value.description  # the error names where it tried


@pytest.mark.timeout(30)
async def test_a_provider_that_refuses_connections_fails_well_before_the_deadline() -> None:  # as above
    # A wrong base URL is reported after a few quick tries (within connect_timeout), not
    # after a whole 60 s refresh deadline of retries (the suite's timeout is the check).
    app = FactorialApp(
        client_id=CLIENT_ID, client_secret="s", redirect_uri=REDIRECT_URI, base_url="http://127.0.0.1:9"
    )
    async with TokenManager(app, "memory://", lease_ttl=90, refresh_deadline=60) as tm:
        with pytest.raises(ProviderError, match=r"cannot connect to 127\.0\.0\.1:9"):
            await tm.exchange_code("acme", "code")


async def test_lost_rotation_in_strict_mode_surfaces(
    connected: tuple[TokenManager, TokenSet], sim: FakeFactorial
) -> None:
    tm, _ = connected
    sim.inject(Fault.DROP_AFTER)
    results = await asyncio.gather(*(tm.refresh("acme") for _ in range(10)), return_exceptions=True)
    got = [f"{type(r).__name__}: {r}"[:90] for r in results]
    assert all(isinstance(r, RotationLost) for r in results), got
    assert sim.stats.refreshes == 1  # the one whose answer was lost
    assert sim.stats.refresh_attempts == 2  # and exactly one try with what was stored
    with pytest.raises(ReauthorizationRequired):
        await tm.access_token("acme")
    assert sim.stats.refresh_attempts == 2


async def test_slow_answer_past_the_timeout_is_in_doubt(
    connected: tuple[TokenManager, TokenSet], sim: FakeFactorial
) -> None:
    tm, _ = connected
    sim.inject(Fault.SLOW, delay=3)
    with pytest.raises(RotationLost):
        await tm.refresh("acme")


async def test_lost_rotation_heals_in_revoke_on_first_use_mode(
    make_sim: SimFactory, backend: Backend
) -> None:
    async with make_sim(refresh_mode=RefreshMode.REVOKE_ON_FIRST_USE) as sim:
        async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
            before = await tm.exchange_code("acme", sim.issue_code(company_id=1))
            sim.inject(Fault.DROP_AFTER)
            fresh = await tm.refresh("acme")
            assert fresh.access_token != before.access_token
            assert sim.stats.invalid_grant == 0
            async with tm.client("acme") as api:
                async with api.get(f"/api/{tm.app.api_version}/resources/employees/employees") as resp:
                    assert resp.status == 200


@pytest.mark.parametrize("fault", [Fault.DROP_AFTER, Fault.HTML_ERROR, Fault.HTTP_504, Fault.MALFORMED_JSON])
async def test_an_exchange_in_doubt_never_resends_the_code(
    sim: FakeFactorial, backend: Backend, fault: Fault
) -> None:
    async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
        code = sim.issue_code(company_id=1)
        sim.inject(fault)
        results = await asyncio.gather(
            *(tm.exchange_code("acme", code) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, ExchangeInDoubt) for r in results)
        with pytest.raises(ExchangeInDoubt):
            await tm.exchange_code("acme", code)  # a retried callback
        assert sim.stats.token_requests == 1 and sim.stats.max_attempts_per_code <= 1
        fresh = await tm.exchange_code("acme", sim.issue_code(company_id=1))  # connect again
        assert await tm.access_token("acme") == fresh.access_token


async def test_a_transient_refusal_of_an_exchange_is_retried(sim: FakeFactorial, backend: Backend) -> None:
    async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
        sim.inject(Fault.HTTP_503)
        tokens = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        assert sim.is_active(tokens.access_token) and sim.stats.exchanges == 1
