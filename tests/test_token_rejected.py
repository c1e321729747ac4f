"""``TokenManager.token_rejected``: what an HTTP client calls after a 401."""

from __future__ import annotations

import asyncio

import pytest

from factorial_tokens import TokenManager
from factorial_tokens.testing import FakeFactorial


@pytest.mark.timeout(20)
async def test_many_reports_of_one_rejected_token_refresh_once(sim: FakeFactorial, tm: TokenManager) -> None:
    # Reports arrive at every point of a flight's life, including between its end and
    # the moment it is forgotten (a report that joined such a flight once spun forever).
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    old = await tm.access_token("acme")
    sim.expire_access_tokens()

    async def report(ticks: int) -> str:
        for _ in range(ticks):
            await asyncio.sleep(0)
        return await tm.token_rejected("acme", old)

    tokens = set(await asyncio.gather(*(report(i % 40) for i in range(400))))
    assert len(tokens) == 1 and old not in tokens and sim.is_active(tokens.pop())
    assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


async def test_a_newer_stored_token_is_used_without_refreshing(sim: FakeFactorial, tm: TokenManager) -> None:
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    old = await tm.access_token("acme")
    newer = await tm.refresh("acme")  # as if another worker had refreshed
    assert await tm.token_rejected("acme", old) == newer.access_token
    assert sim.stats.refreshes == 1
