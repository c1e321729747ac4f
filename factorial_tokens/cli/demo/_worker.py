"""One demo worker process: callers that take tokens and call the simulator's API for the
run's duration, reporting fingerprints (never tokens) and counts to the parent."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import attrs

from ..._errors import FactorialTokensError
from ..._events import EventKind, TokenEvent
from ..._manager import TokenManager
from ..._models import FactorialApp, fingerprint

__all__ = ["READY_TIMEOUT", "WorkerSpec", "worker_main"]

API_PATH = "/api/2025-10-01/resources/employees/employees"
#: How long workers wait for the start signal (and the parent for their readiness).
READY_TIMEOUT = 60.0
_PROGRESS_EVERY = 0.25


@attrs.frozen
class WorkerSpec:
    index: int
    client_id: str
    client_secret: str = attrs.field(repr=False)
    redirect_uri: str
    base_url: str
    store: str = attrs.field(repr=False)
    tenants: tuple[str, ...]
    tasks: int
    duration: float
    leeway: float
    think: float


def worker_main(spec: WorkerSpec, out: Any, go: Any) -> None:
    """Entry point of one worker process (spawned); reports on ``out``."""
    try:
        asyncio.run(_worker(spec, out, go))
    except KeyboardInterrupt:
        sys.exit(130)  # Ctrl-C reached the whole process group: the parent reports it
    except BaseException as exc:  # report, then die non-zero: the parent counts a crash
        out.put(("crashed", spec.index, f"{type(exc).__name__}: {exc}"[:300]))
        raise


async def _worker(spec: WorkerSpec, out: Any, go: Any) -> None:
    app = FactorialApp(
        client_id=spec.client_id,
        client_secret=spec.client_secret,
        redirect_uri=spec.redirect_uri,
        base_url=spec.base_url,
    )
    seen: dict[str, set[str]] = {t: set() for t in spec.tenants}
    refreshed: dict[str, set[str]] = {t: set() for t in spec.tenants}
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    token_latency: list[float] = []
    api_latency: list[float] = []

    def on_event(event: TokenEvent) -> None:
        if event.kind is EventKind.REFRESHED and event.fingerprint:
            refreshed.setdefault(event.tenant, set()).add(event.fingerprint)
            counts["refreshes"] += 1

    loop = asyncio.get_running_loop()
    async with TokenManager(app, spec.store, leeway=spec.leeway, on_event=on_event) as tm:
        out.put(("ready", spec.index, None))
        if not await loop.run_in_executor(None, go.wait, READY_TIMEOUT):
            raise RuntimeError("the demo never started")
        deadline = loop.time() + spec.duration

        async def task(offset: int) -> None:
            turn = offset
            while loop.time() < deadline:
                tenant = spec.tenants[turn % len(spec.tenants)]
                turn += 1
                started = time.perf_counter()
                try:
                    token = await tm.access_token(tenant)
                    got = time.perf_counter()
                    seen[tenant].add(fingerprint(token))
                    token_latency.append(got - started)
                    async with tm.client(tenant) as api, api.get(API_PATH) as resp:
                        await resp.read()
                        status = resp.status
                    api_latency.append(time.perf_counter() - got)
                    counts["calls"] += 1
                    counts["ok" if status == 200 else "unauthorized" if status == 401 else "other"] += 1
                except (FactorialTokensError, aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                if spec.think:  # never past the run's end
                    pause = spec.think * random.uniform(0.5, 1.5)
                    await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))

        async def report() -> None:
            while True:
                await asyncio.sleep(_PROGRESS_EVERY)
                out.put(("progress", spec.index, {**counts, "errors": errors.total()}))

        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(task(i) for i in range(spec.tasks)))
        finally:
            reporter.cancel()
    out.put(
        (
            "done",
            spec.index,
            {
                "counts": dict(counts),
                "errors": dict(errors),
                "seen": {t: sorted(f) for t, f in seen.items()},
                "refreshed": {t: sorted(f) for t, f in refreshed.items()},
                "token_latency": token_latency,
                "api_latency": api_latency,
            },
        )
    )
