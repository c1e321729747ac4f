"""The provider-bound baseline, measured: bare HTTP refreshes, no store, no manager.

P spawned processes, each with one aiohttp session limited to ``limit`` connections (the
same pool a TokenManager uses), send one refresh per tenant straight to the simulator,
all starting at one instant. The time until the last answer is what the simulator, the
HTTP stack and this machine allow at that concurrency, in the same run as the storm it
is compared with.

With ``callers_per_token``, each process also runs that many caller tasks per tenant it
refreshes, started together: the first of a tenant starts its refresh task, the others
await it, and the latencies are the callers'. That is the storm's shape (hundreds of caller
tasks per process) with no store and no manager: what Python's own tasks cost on top of HTTP.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier

import aiohttp

from factorial_tokens import FactorialApp

from .common import percentile, profiled

_TIMEOUT = 600.0


@dataclass(frozen=True)
class BareResult:
    """How long bare refreshes of every tenant took (ms from the common start), how many succeeded."""

    seconds: float
    p50_ms: float
    p99_ms: float
    refreshes: int
    failures: int
    processes: int
    connections_per_process: int
    #: CPU time of the bare workers per refresh (ms): what one HTTP refresh costs alone
    cpu_ms_per_refresh: float = math.nan
    #: caller tasks per refreshed tenant (0: the latencies are the refreshes' own)
    callers_per_token: int = 0


async def _refresh_all(
    app: FactorialApp, tokens: Sequence[str], limit: int, start_at: float, callers_per_token: int = 0
) -> tuple[list[float], int, float, list[str]]:
    failures = 0
    done: list[float] = []
    rotated: list[str] = []
    refreshes: dict[str, asyncio.Task[bool]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit)) as session:

        async def one(token: str) -> bool:
            nonlocal failures
            form = {
                "grant_type": "refresh_token",
                "refresh_token": token,
                "client_id": app.client_id,
                "client_secret": app.client_secret,
            }
            async with session.post(f"{app.base_url}/oauth/token", data=form) as resp:
                body = await resp.json()
                if resp.status != 200 or "access_token" not in body:
                    failures += 1
                    return False
                rotated.append(body["refresh_token"])
                if not callers_per_token:
                    done.append((time.time() - start_at) * 1000)
                return True

        async def caller(token: str) -> None:
            refresh = refreshes.get(token)
            if refresh is None:
                refresh = refreshes[token] = asyncio.ensure_future(one(token))
            if await refresh:
                done.append((time.time() - start_at) * 1000)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu = time.process_time()
        if callers_per_token:
            await asyncio.gather(*(caller(t) for _ in range(callers_per_token) for t in tokens))
        else:
            await asyncio.gather(*(one(t) for t in tokens))
        cpu = time.process_time() - cpu
    return done, failures, cpu, rotated


def _main(
    app: FactorialApp,
    tokens: list[str],
    limit: int,
    barriers: tuple[Barrier, Barrier],
    start_at: Synchronized[float],
    results: Queue[tuple[list[float], int, float, list[str]] | str],
    callers_per_token: int,
) -> None:
    try:
        for barrier in barriers:  # ready, then go (the start instant is set in between)
            barrier.wait(_TIMEOUT)
        with profiled("bare-worker"):
            results.put(asyncio.run(_refresh_all(app, tokens, limit, start_at.value, callers_per_token)))
    except Exception as exc:
        results.put(f"baseline worker failed: {type(exc).__name__}: {exc}")


def bare_refresh(
    app: FactorialApp, tokens: Sequence[str], processes: int, limit: int, callers_per_token: int = 0
) -> tuple[BareResult, list[str]]:
    """Refresh every token once, split over ``processes`` processes of ``limit`` connections
    (with ``callers_per_token`` caller tasks per token: see the module's doc). Returns the
    result and the rotated refresh tokens (each refreshed token's successor)."""
    ctx = mp.get_context("spawn")
    ready, go = ctx.Barrier(processes + 1), ctx.Barrier(processes + 1)
    start_at = ctx.Value("d", 0.0)
    results: Queue[tuple[list[float], int, float, list[str]] | str] = ctx.Queue()
    chunks = [list(tokens[i::processes]) for i in range(processes)]
    workers = [
        ctx.Process(
            target=_main,
            args=(app, chunk, limit, (ready, go), start_at, results, callers_per_token),
            daemon=True,
        )
        for chunk in chunks
    ]
    for worker in workers:
        worker.start()
    try:
        ready.wait(_TIMEOUT)
        start_at.value = time.time() + 0.2
        go.wait(_TIMEOUT)
        done: list[float] = []
        failures = 0
        cpu = 0.0
        rotated: list[str] = []
        for _ in workers:
            got = results.get(timeout=_TIMEOUT)
            if isinstance(got, str):
                raise RuntimeError(got)
            done += got[0]
            failures += got[1]
            cpu += got[2]
            rotated += got[3]
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    result = BareResult(
        seconds=max(done, default=math.nan) / 1000,
        p50_ms=percentile(done, 50),
        p99_ms=percentile(done, 99),
        refreshes=len(tokens) - failures,
        failures=failures,
        processes=processes,
        connections_per_process=limit,
        cpu_ms_per_refresh=cpu * 1000 / max(1, len(tokens) - failures),
        callers_per_token=callers_per_token,
    )
    return result, rotated
