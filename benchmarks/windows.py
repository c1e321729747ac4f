"""The two windows and fleet-wide back-pressure under load, each beside its baseline.

* ``rotation``: P processes x C tasks per tenant x T tenants call ``access_token`` without
  pause for D seconds while 6 s tokens rotate with a 2 s leeway (revoke on first use,
  provider latency L). Per-call latency p50/p99/max. Baseline, same run: the same with
  ``min_valid = leeway`` (no advisory window: a caller inside the leeway waits, which is
  how every release before the two windows behaved).
* ``outage``: the same, with the token endpoint answering 503 for 1.5 s from the moment the
  tokens enter the leeway. Caller errors and the longest wait, beside the same baseline.

Every row also shows the event loop's longest stall in the workers (how late a 10 ms
timer fired): no call that yields can wait less, so it is the machine's floor under
P x C x T busy callers, beside the longest wait it bounds.
* ``budget``: N due tenants refreshed by P processes against a simulator that answers 429
  beyond R token requests per W seconds, with ``refresh_rate`` set to 90 % of that rate;
  baseline without a budget. 429s drawn and the time until all are fresh.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from factorial_tokens import FactorialTokensError, TokenManager
from factorial_tokens.store import store_from_url
from factorial_tokens.testing import FakeFactorial, RefreshMode

from .common import CLIENT_SECRET, REDIRECT_URI, app_for, connect_tenants, new_client_id, percentile
from .stores import STORES

TTL, LEEWAY, MIN_VALID = 6.0, 2.0, 0.5
OUTAGE = 1.5


def _sim(client_id: str, **options: Any) -> FakeFactorial:
    return FakeFactorial(
        client_id=client_id,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        refresh_mode=options.pop("refresh_mode", RefreshMode.REVOKE_ON_FIRST_USE),
        reuse_detection=True,
        **options,
    )


async def _callers(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: C tasks per tenant calling ``access_token`` until the end."""
    app = app_for(config["client_id"], config["base_url"])
    waits: list[float] = []
    firsts: list[float] = []  # each task's first call: a cold cache in a process just started
    # The longest wait of a caller that already had a token (every call but each task's
    # first, which reads a cold process's store and is shown apart).
    warm = [0.0]
    # The longest a timer due on the event loop waited past its instant: the floor of any
    # call that yields (a store read, a refresh), whatever the library does.
    stall = [0.0]
    errors: Counter[str] = Counter()
    async with TokenManager(app, config["url"], **config["manager"]) as tm:
        late = max(0.0, time.time() - config["start"])  # a worker that came up after the start
        await asyncio.sleep(max(0.0, config["start"] - time.time()))
        end = config["start"] + config["duration"]

        async def task(tenant: str) -> None:
            first = True
            while time.time() < end:
                began = time.perf_counter()
                try:
                    await tm.access_token(tenant)
                except FactorialTokensError as exc:
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.01)
                else:
                    waits.append(time.perf_counter() - began)
                    if first:
                        firsts.append(waits[-1])
                    else:
                        warm[0] = max(warm[0], waits[-1])
                first = False
                await asyncio.sleep(config["pace"])

        async def stalls() -> None:
            loop = asyncio.get_running_loop()
            while time.time() < end:
                due = loop.time() + 0.01
                await asyncio.sleep(0.01)
                stall[0] = max(stall[0], loop.time() - due)

        await asyncio.gather(stalls(), *(task(t) for t in config["tenants"] for _ in range(config["tasks"])))
    return {
        "waits": waits,
        "firsts": firsts,
        "warm_max": warm[0],
        "stall_max": stall[0],
        "late": late,
        "errors": dict(errors),
    }


def _worker(config: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_callers(config))


def _rotation(
    store: str,
    processes: int,
    tasks: int,
    tenants: int,
    latency: float,
    duration: float,
    outage: bool,
    advisory: bool,
) -> dict[str, Any]:
    client_id = new_client_id()
    names = [f"r{i}" for i in range(tenants)]
    manager = {"leeway": LEEWAY, "min_valid": MIN_VALID if advisory else LEEWAY}
    with STORES[store]() as url, _sim(client_id, access_token_ttl=TTL).serve_in_thread() as sim:

        async def setup() -> float:
            async with TokenManager(app_for(client_id, sim.base_url), url) as tm:
                await connect_tenants(tm, sim, names, 1)
                return min([(await tm.tokens(t)).refresh_due_at(LEEWAY) for t in names])

        due = asyncio.run(setup())
        sim.latency = latency
        config = {
            "client_id": client_id,
            "base_url": sim.base_url,
            "url": url,
            "manager": manager,
            "tenants": names,
            "tasks": tasks,
            "pace": 0.02,
            "duration": duration,
            "start": time.time() + 2.0,
        }
        with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, config) for _ in range(processes)]
            if outage:
                time.sleep(max(0.0, due - time.time()))
                sim.unavailable = True
                time.sleep(OUTAGE)
                sim.unavailable = False
            results = [f.result() for f in futures]
        stats = sim.stats
    waits = [w for r in results for w in r["waits"]]
    firsts = [w for r in results for w in r["firsts"]]
    errors: Counter[str] = sum((Counter(r["errors"]) for r in results), Counter())
    return {
        "store": store,
        "advisory": advisory,
        "outage": outage,
        "shape": f"{processes}x{tasks}x{tenants}",
        "calls": len(waits) + sum(errors.values()),
        "p50_ms": percentile(waits, 50) * 1e3,
        "p99_ms": percentile(waits, 99) * 1e3,
        "max_ms": max(r["warm_max"] for r in results) * 1e3,
        "first_max_ms": max(firsts, default=float("nan")) * 1e3,
        "stall_max_ms": max(r["stall_max"] for r in results) * 1e3,
        # Over about 0.3 s, an outage row's callers may have met the outage cold, or not at
        # all (the workers start 2 s after set-up, the outage when the tokens are due).
        "late_start_s": max(r["late"] for r in results),
        "errors": dict(errors),
        "refreshes": stats.refreshes,
        "invalid_grant": stats.invalid_grant,
    }


def rotation(
    store: str, processes: int, tasks: int, tenants: int, latency: float, duration: float
) -> list[dict[str, Any]]:
    """The steady-rotation rows of ``store``: with and without the advisory window."""
    return [_rotation(store, processes, tasks, tenants, latency, duration, False, a) for a in (True, False)]


def outage(store: str, processes: int, tasks: int, tenants: int, latency: float) -> list[dict[str, Any]]:
    """The outage rows of ``store``: a 1.5 s 503 outage from the leeway's start."""
    return [_rotation(store, processes, tasks, tenants, latency, TTL, True, a) for a in (True, False)]


async def _refresh_all(config: dict[str, Any]) -> dict[str, Any]:
    app = app_for(config["client_id"], config["base_url"])
    errors: Counter[str] = Counter()
    async with TokenManager(app, config["url"], **config["manager"]) as tm:
        await asyncio.sleep(max(0.0, config["start"] - time.time()))

        async def one(tenant: str) -> None:
            try:
                await tm.access_token(tenant)
            except FactorialTokensError as exc:
                errors[type(exc).__name__] += 1

        await asyncio.gather(*(one(t) for t in config["tenants"]))
    return {"errors": dict(errors), "ended": time.time()}


def _budget_worker(config: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_refresh_all(config))


def budget(
    store: str, processes: int, tenants: int, limit: int, window: float, budgeted: bool
) -> dict[str, Any]:
    """N due tenants against a rate-limited simulator, with or without ``refresh_rate``."""
    from .common import mint_expired_tenants

    client_id = new_client_id()
    names = [f"b{i}" for i in range(tenants)]
    rate = 0.9 * limit * 60 / window  # per minute, 90 % of the simulator's limit
    manager: dict[str, Any] = {"lease_ttl": 120, "refresh_deadline": 60, "wait_timeout": 240}
    if budgeted:
        manager |= {"refresh_rate": rate, "refresh_burst": max(1, int(0.015 * limit))}
    sim = _sim(client_id, access_token_ttl=3600, refresh_mode=RefreshMode.REVOKE_AT_REFRESH)
    with STORES[store]() as url, sim.serve_in_thread() as running:

        async def setup() -> None:
            inner = store_from_url(url)
            try:
                await mint_expired_tenants(inner, running, app_for(client_id, running.base_url), names, 1)
            finally:
                await inner.aclose()

        asyncio.run(setup())
        running.rate_limit_window = window
        running.rate_limit_per_minute = limit
        start = time.time() + 2.0
        config = {
            "client_id": client_id,
            "base_url": running.base_url,
            "url": url,
            "manager": manager,
            "start": start,
        }
        with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
            shares = [names[i::processes] for i in range(processes)]
            results = list(pool.map(_budget_worker, [{**config, "tenants": s} for s in shares]))
        stats = running.stats
    return {
        "store": store,
        "budgeted": budgeted,
        "tenants": tenants,
        "limit": f"{limit} per {window:g} s",
        "refresh_rate": rate if budgeted else None,
        "rate_limited": stats.rate_limited,
        "refreshes": stats.refreshes,
        "invalid_grant": stats.invalid_grant,
        "errors": dict(sum((Counter(r["errors"]) for r in results), Counter())),
        "seconds": max(r["ended"] for r in results) - start,
    }
