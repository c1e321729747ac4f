"""Many worker processes on one store, against the strict simulator, counted exactly.

Every test runs once per store of ``tests.stores.MULTIPROCESS_STORES``; the workers are
real processes (``tests/multiproc_worker.py``) that reach FakeFactorial over loopback.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from factorial_tokens import TokenManager, TokenSet
from factorial_tokens.store import Throttle
from factorial_tokens.testing import Dialect, FakeFactorial, Fault, RefreshMode

from .conftest import SimFactory, app_for
from .multiproc import Scenario, WorkerPool, all_tokens, least_valid, total_api, total_errors
from .stores import MULTIPROCESS_STORES, STORES

PROCESSES = 4
TASKS = 50
#: Clock reads between the manager's check and the worker's measure (same thread, no await).
SLACK = 0.01


@pytest.fixture(params=sorted(MULTIPROCESS_STORES))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL, once per store that several processes can share."""
    return STORES[request.param].url(tmp_path)


async def test_one_code_exchanged_by_every_process_at_once(store_url: str, sim: FakeFactorial) -> None:
    code = sim.issue_code(company_id=7)
    scenario = Scenario(
        kind="exchange", tenants=["acme"], tasks=TASKS, manager={"lease_ttl": 6, "provider_timeout": 3}
    )
    async with WorkerPool(store_url, sim, scenario, processes=PROCESSES) as pool:
        pool.go(code=code)
        reports = await pool.results()
    assert sum(len(r.finished) for r in reports) == PROCESSES * TASKS  # every caller was answered
    assert total_errors(reports) == {}
    seen = all_tokens(reports, "acme")
    assert len(seen) == 1, seen  # ... with the same tokens
    assert sim.stats.exchanges == 1
    assert sim.stats.exchange_attempts == 1 and sim.stats.max_attempts_per_code == 1
    assert sim.stats.invalid_grant == 0
    async with TokenManager(app_for(sim), store_url) as tm:
        assert (await tm.token_set("acme")).fingerprint in seen


@pytest.mark.parametrize("crowded", [False, True], ids=["three-tenants", "twelve-tenants-one-slot"])
async def test_tokens_expiring_every_two_seconds_are_refreshed_once_per_expiry(
    store_url: str, make_sim: SimFactory, crowded: bool
) -> None:
    """Every process's callers ask for every tenant without pause while the tokens expire
    every 2 s. Crowded: 12 tenants that fall due together, one provider slot per process
    and a provider answering after 0.15 s, so most refreshes queue for a slot and most
    queued ones end on another process's announced commit."""
    names = ["north", "south", "east"] + ([f"branch-{n}" for n in range(9)] if crowded else [])
    tenants = {name: index + 1 for index, name in enumerate(names)}
    duration, ttl, leeway = 6.0, 2.0, 0.5
    budgets: dict[str, Any] = {
        "leeway": leeway,
        "lease_ttl": 4.5,
        "provider_timeout": 3.0,  # generous: a refresh in doubt would be retried (not counted once)
        "wait_timeout": 10.0,
    }
    if crowded:
        budgets["max_refreshes"] = 1
    scenario = Scenario(
        kind="traffic",
        tenants=list(tenants),
        tasks=TASKS,
        duration=duration,
        pace=0.5,
        api=True,
        manager=budgets,
    )
    async with make_sim(access_token_ttl=ttl, latency=0.15 if crowded else 0.0) as sim:
        async with WorkerPool(store_url, sim, scenario, processes=PROCESSES) as pool:
            started = time.time()
            async with TokenManager(app_for(sim), store_url, **budgets) as tm:
                initial = {
                    tenant: (await tm.exchange_code(tenant, sim.issue_code(company_id=cid))).fingerprint
                    for tenant, cid in tenants.items()
                }
            pool.go(initial=initial)
            reports = await pool.results()
        ended = time.time()
        stats = sim.stats
        async with TokenManager(app_for(sim), store_url, **budgets) as tm:
            stored = {tenant: (await tm.tokens(tenant)).fingerprint for tenant in tenants}

    assert total_errors(reports) == {}
    api = total_api(reports)
    assert set(api) == {200} and api[200] == sum(r.calls for r in reports)  # no 401 reached a caller
    # Callers got the current token inside the leeway, never one below min_valid (leeway / 4).
    assert least_valid(reports) >= leeway / 4 - SLACK
    assert stats.exchanges == len(tenants)
    assert stats.invalid_grant == 0 and stats.families_revoked == 0
    # No refresh token was ever presented twice: every refresh was the only one of its expiry.
    assert stats.refresh_attempts == stats.refreshes
    assert stats.max_attempts_per_refresh_token == 1
    for tenant, cid in tenants.items():
        # A background refresh at the very end may store a generation no caller asked for yet.
        generations = all_tokens(reports, tenant) | {initial[tenant], stored[tenant]}
        # Each refresh made one generation that callers got or the store holds; none was lost.
        assert stats.refreshes_by_company[cid] == len(generations) - 1, (tenant, stats.refreshes_by_company)
        # A token is replaced only once it is due: at most one refresh per lifetime-minus-leeway.
        assert 2 <= stats.refreshes_by_company[cid] <= (ended - started) / (ttl - leeway) + 1


STRICT = RefreshMode.REVOKE_AT_REFRESH
ON_FIRST_USE = RefreshMode.REVOKE_ON_FIRST_USE


@pytest.mark.parametrize(
    ("point", "mode"),
    [
        ("after_acquire", STRICT),
        ("during_refresh", STRICT),
        ("during_refresh", ON_FIRST_USE),
        ("before_commit", STRICT),
        ("before_commit", ON_FIRST_USE),
    ],
)
async def test_a_lease_holder_killed(
    store_url: str, make_sim: SimFactory, tmp_path: Path, point: str, mode: RefreshMode
) -> None:
    """SIGKILL the refresher: before its provider call, during it, or after the answer but
    before the write. The others take over once the lease lapses. A lost rotation (the
    provider rotated, the store never heard) is harmless when the old refresh token still
    works (revoke on first use); in the strict mode it surfaces as ReauthorizationRequired."""
    tasks = 20
    marker = tmp_path / "lease-holder.pid"
    budgets: dict[str, Any] = {
        "leeway": 1.0,
        "lease_ttl": 3.0,
        "provider_timeout": 1.5,
        "refresh_deadline": 2.0,
        "wait_timeout": 12.0,
    }
    scenario = Scenario(
        kind="traffic",
        tenants=["acme"],
        tasks=tasks,
        duration=25.0,
        pace=0.2,
        until_changed=True,
        manager=budgets,
        kill_at="record_holder" if point == "during_refresh" else point,
    )
    async with make_sim(access_token_ttl=2, refresh_mode=mode) as sim:
        async with WorkerPool(store_url, sim, scenario, processes=PROCESSES, marker=marker) as pool:
            async with TokenManager(app_for(sim), store_url, **budgets) as tm:
                first: TokenSet = await tm.exchange_code("acme", sim.issue_code(company_id=1))
            if point == "during_refresh":
                sim.inject(Fault.SLOW, delay=60)  # the provider rotates, then holds the answer
            await asyncio.sleep(max(0.0, first.refresh_due_at(budgets["leeway"]) - time.time()) + 0.05)
            pool.go(initial={"acme": first.fingerprint})
            if point == "during_refresh":
                async with asyncio.timeout(30):
                    while sim.stats.refreshes == 0:
                        await asyncio.sleep(0.01)
                pool.kill(int(marker.read_text()))  # the holder's request is in the air
            reports = await pool.results()
        stats = sim.stats
        async with TokenManager(app_for(sim), store_url, **budgets) as tm:
            [info] = await tm.tenants()
            stored = (await tm.tokens("acme")).fingerprint if not info.needs_reauthorization else None

    killed = [r for r in reports if r.killed]
    survivors = [r for r in reports if not r.killed]
    assert [r.pid for r in killed] == [int(marker.read_text())]
    assert all(len(r.finished) == tasks for r in survivors)  # nobody got stuck
    assert stats.families_revoked == stats.invalid_grant  # a revocation only through the one refusal
    lost = point != "after_acquire"  # the provider rotated for the dead worker
    if lost and mode is STRICT:
        # Exactly one survivor presented the old refresh token, was refused, and told everyone.
        assert stats.refresh_attempts == 2 and stats.refreshes == 1 and stats.invalid_grant == 1
        assert info.needs_reauthorization
        assert total_errors(survivors) == {"ReauthorizationRequired": len(survivors) * tasks}
        # Inside the advisory window callers may still have got the first token, no other.
        assert all_tokens(survivors, "acme") <= {first.fingerprint}
    else:
        assert stats.refreshes == stats.refresh_attempts == (2 if lost else 1)
        assert stats.invalid_grant == 0 and not info.needs_reauthorization
        assert total_errors(survivors) == {}
        assert all_tokens(survivors, "acme") - {first.fingerprint} == {stored}


async def test_a_provider_outage_inside_the_advisory_window_reaches_no_caller(
    store_url: str, make_sim: SimFactory
) -> None:
    """The provider answers 503 for 1.5 s from when the token enters the leeway until just
    before the mandatory window: every caller keeps getting the current token, one refresh
    lands after the outage, none is presented twice (revoke-on-first-use mode)."""
    ttl, leeway, min_valid = 6.0, 2.5, 0.5  # advisory from 3.5 s, mandatory from 5.5 s
    budgets: dict[str, Any] = {
        "leeway": leeway,
        "min_valid": min_valid,
        "lease_ttl": 3.0,
        "provider_timeout": 0.5,
        "refresh_deadline": 1.0,  # shorter than the outage: a caller that waited would fail
        "wait_timeout": 10.0,
    }
    scenario = Scenario(
        kind="traffic", tenants=["acme"], tasks=20, duration=6.0, pace=0.1, manager=budgets
    )  # no API calls: the simulator's outage answers those with 503 as well
    async with make_sim(access_token_ttl=ttl, refresh_mode=ON_FIRST_USE) as sim:
        async with WorkerPool(store_url, sim, scenario, processes=PROCESSES) as pool:
            async with TokenManager(app_for(sim), store_url, **budgets) as tm:
                first = await tm.exchange_code("acme", sim.issue_code(company_id=1))
            pool.go(initial={"acme": first.fingerprint})
            due = first.refresh_due_at(leeway)
            await asyncio.sleep(max(0.0, due - 0.1 - time.time()))
            sim.unavailable = True
            await asyncio.sleep(1.5)
            sim.unavailable = False
            outage = sim.stats.unavailable
            reports = await pool.results()
        stats = sim.stats

    assert outage > 0  # the outage was seen by background refreshes ...
    assert total_errors(reports) == {}  # ... and by no caller
    assert least_valid(reports) >= min_valid - SLACK
    assert stats.refreshes == stats.refresh_attempts == 1
    assert stats.invalid_grant == 0 and stats.families_revoked == 0


async def test_a_429_seen_by_one_process_holds_every_process(store_url: str, make_sim: SimFactory) -> None:
    """Twelve tenants with 2 s tokens keep every process refreshing; one token request is
    answered 429 with Retry-After: 5. Counted at the simulator: from shortly after the hold
    is in the store (in-flight requests and the announcement's travel) until its 5 s are
    over, no process sends a token request; afterwards refreshing resumes."""
    tenants = {f"t{i}": 100 + i for i in range(12)}
    budgets: dict[str, Any] = {
        "leeway": 1.0,
        "lease_ttl": 5.0,
        "provider_timeout": 3.0,  # generous: a refresh in doubt would be retried (not counted once)
        "refresh_deadline": 3.5,
        "wait_timeout": 10.0,
    }
    scenario = Scenario(
        kind="traffic", tenants=list(tenants), tasks=24, duration=8.0, pace=0.2, manager=budgets
    )
    async with make_sim(access_token_ttl=2.0) as sim:
        async with WorkerPool(store_url, sim, scenario, processes=PROCESSES) as pool:
            async with TokenManager(app_for(sim), store_url, **budgets) as tm:
                for tenant, cid in tenants.items():
                    await tm.exchange_code(tenant, sim.issue_code(company_id=cid))
                pool.go()
                async with asyncio.timeout(20):
                    while sim.stats.refreshes < 4:  # the fleet is refreshing
                        await asyncio.sleep(0.01)
                    sim.inject(Fault.RATE_LIMITED, retry_after=5)
                    while sim.stats.faults_injected == 0:
                        await asyncio.sleep(0.002)
                    answered = time.monotonic()
                    # The hold travels through the store: recorded (under load, this write
                    # can wait a while), then announced and read by the other processes.
                    assert isinstance(tm.store, Throttle)
                    while await tm.store.hold(tm.app.client_id, 0.0) <= time.time():
                        await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            held_from = sim.stats.token_requests
            await asyncio.sleep(answered + 4.8 - time.monotonic())
            held_until = sim.stats.token_requests
            reports = await pool.results()
        stats = sim.stats

    assert held_until == held_from, "a process sent a token request during the hold"
    assert stats.token_requests > held_until  # ... and refreshing resumed after it
    assert stats.invalid_grant == 0 and stats.families_revoked == 0, "\n".join(r.stderr for r in reports)
    assert set(total_errors(reports)) <= {"ProviderError"}  # expiring tokens could not be renewed


#: Provider conditions of the real wire (see tests/test_wire.py), two storms per store:
#: every condition runs on every store, paired so the suite stays fast.
WIRE_CONDITIONS: dict[str, dict[str, Any]] = {
    "pieces+strings+no-rotation": {
        "answer_pieces": 4,
        "piece_delay": 0.01,
        "dialect": Dialect.STRINGS,
        "rotate_refresh_tokens": False,
    },
    "chunked+loose": {"answer_pieces": 3, "piece_delay": 0.01, "chunked": True, "dialect": Dialect.LOOSE},
}


@pytest.mark.parametrize("condition", list(WIRE_CONDITIONS))
async def test_a_storm_on_the_real_wire(store_url: str, make_sim: SimFactory, condition: str) -> None:
    """P=4 processes x C=25 tasks, tokens expiring every two seconds, answers in pieces and
    in other shapes, refreshes with or without a new refresh token: counted like the
    clean storm above."""
    tenants = {"north": 1, "south": 2}
    duration, ttl, leeway = 3.0, 2.0, 0.5
    budgets: dict[str, Any] = {
        "leeway": leeway,
        "lease_ttl": 4.5,
        "provider_timeout": 3.0,
        "wait_timeout": 10.0,
    }
    scenario = Scenario(
        kind="traffic",
        tenants=list(tenants),
        tasks=25,
        duration=duration,
        pace=0.5,
        api=True,
        manager=budgets,
    )
    options = WIRE_CONDITIONS[condition]
    async with make_sim(access_token_ttl=ttl, **options) as sim:
        async with WorkerPool(store_url, sim, scenario, processes=PROCESSES) as pool:
            started = time.time()
            async with TokenManager(app_for(sim), store_url, **budgets) as tm:
                initial = {
                    tenant: (await tm.exchange_code(tenant, sim.issue_code(company_id=cid))).fingerprint
                    for tenant, cid in tenants.items()
                }
            pool.go(initial=initial)
            reports = await pool.results()
        ended = time.time()
        stats = sim.stats
        async with TokenManager(app_for(sim), store_url, **budgets) as tm:
            assert not any(info.needs_reauthorization for info in await tm.tenants())
            stored = {tenant: (await tm.tokens(tenant)).fingerprint for tenant in tenants}
    assert total_errors(reports) == {}
    api = total_api(reports)
    assert set(api) == {200} and api[200] == sum(r.calls for r in reports)
    assert stats.exchanges == len(tenants)
    assert stats.invalid_grant == 0 and stats.families_revoked == 0
    assert stats.refresh_attempts == stats.refreshes
    if options.get("rotate_refresh_tokens", True):
        assert stats.max_attempts_per_refresh_token == 1
    for tenant, cid in tenants.items():
        # A background refresh at the very end may store a generation no caller asked for yet.
        generations = all_tokens(reports, tenant) | {initial[tenant], stored[tenant]}
        assert stats.refreshes_by_company[cid] == len(generations) - 1, (tenant, stats.refreshes_by_company)
        assert 1 <= stats.refreshes_by_company[cid] <= (ended - started) / (ttl - leeway) + 1
