"""One worker process of the multi-process harness (see ``tests/multiproc.py``).

Run as ``python -m tests.multiproc_worker '<config json>'`` from the repository root. The
protocol on its pipes, one line each:

1. it builds ``FactorialApp`` + ``TokenManager(app, store_url)``, opens it, prints ``READY``;
2. it reads one JSON line from stdin: the go signal with its parameters (``code``, ``initial``);
3. it runs C tasks of the scenario, then prints ``RESULT <json>`` and exits 0.

Test-only kill switch (read here, never by the library): ``kill_at`` in the config wraps
the store so that the first process (of all workers: an O_EXCL marker file decides) to
reach the point SIGKILLs itself there: ``after_acquire`` (holding the lease, before the
provider call), ``before_commit`` (the provider answered, nothing written). ``record_holder``
only writes the first lease holder's pid to the marker, for the parent to kill it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from typing import Any

from factorial_tokens import (
    FactorialApp,
    FactorialTokensError,
    ReauthorizationRequired,
    TokenManager,
    TokenSet,
)
from factorial_tokens._models import fingerprint
from factorial_tokens.store import (
    Acquisition,
    Freshness,
    Lease,
    Record,
    Store,
    TenantKey,
    Update,
    store_from_url,
)
from factorial_tokens.testing import CountingStore

API_PATH = "/api/2026-01-01/resources/employees/employees"


class KillSwitch(CountingStore):
    """A store that SIGKILLs its own process at a chosen point, once across all workers."""

    def __init__(self, inner: Store, point: str, marker: str) -> None:
        super().__init__(inner)
        self.point = point
        self.marker = marker

    def _first(self) -> bool:
        """True for the first caller of all processes (creates the marker with our pid)."""
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def _die(self) -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        won = await super().acquire(key, owner, ttl, unless_fresh=unless_fresh)
        holder = won.lease is not None and self.point in ("after_acquire", "record_holder")
        if holder and self._first() and self.point == "after_acquire":
            self._die()
        return won

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        if self.point == "before_commit" and self._first():
            self._die()
        return await super().commit(lease, update)


class Tally:
    """What one worker saw: token fingerprints per tenant, errors, API statuses."""

    def __init__(self) -> None:
        self.tokens: dict[str, set[str]] = {}
        self.errors: Counter[str] = Counter()
        self.api: Counter[int] = Counter()
        self.calls = 0
        self.finished: list[float] = []
        self.least: dict[str, float] = {}

    def saw(self, tenant: str, token: str) -> str:
        fp = fingerprint(token)
        self.tokens.setdefault(tenant, set()).add(fp)
        return fp

    def saw_set(self, tenant: str, tokens: TokenSet) -> str:
        """Also note how long the token had left when the caller got it."""
        if tokens.expires_at is not None:
            left = tokens.expires_at - time.time()
            self.least[tenant] = min(self.least.get(tenant, left), left)
        return self.saw(tenant, tokens.access_token)

    def as_json(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "tokens": {t: sorted(fps) for t, fps in self.tokens.items()},
            "errors": dict(self.errors),
            "api": {str(k): v for k, v in self.api.items()},
            "calls": self.calls,
            "finished": self.finished,
            "least": self.least,
        }


async def exchange_task(tm: TokenManager, tally: Tally, tenant: str, code: str) -> None:
    tally.calls += 1
    try:
        tokens = await tm.exchange_code(tenant, code)
    except FactorialTokensError as exc:
        tally.errors[type(exc).__name__] += 1
    else:
        tally.saw(tenant, tokens.access_token)
    tally.finished.append(time.time())


async def traffic_task(
    tm: TokenManager, tally: Tally, tenant: str, config: dict[str, Any], go: dict[str, Any]
) -> None:
    """Call ``access_token`` (and the API through ``client()``) until the scenario says stop."""
    loop = asyncio.get_running_loop()
    until = loop.time() + config["duration"]
    initial = go.get("initial", {}).get(tenant)
    pace = config.get("pace", 0.5)
    await asyncio.sleep(random.uniform(0, pace))  # spread the tasks over one pace
    while loop.time() < until:
        tally.calls += 1
        try:
            fp = tally.saw_set(tenant, await tm.token_set(tenant))
            if config.get("api"):
                async with tm.client(tenant) as api, api.get(API_PATH) as response:
                    tally.api[response.status] += 1
        except ReauthorizationRequired as exc:
            tally.errors[type(exc).__name__] += 1
            if config.get("until_changed"):
                break
        except FactorialTokensError as exc:
            tally.errors[type(exc).__name__] += 1
        else:
            if config.get("until_changed") and fp != initial:
                break
        await asyncio.sleep(random.uniform(pace / 2, pace * 1.5))
    tally.finished.append(time.time())


async def main(config: dict[str, Any]) -> None:
    app = FactorialApp(
        client_id=config["client_id"],
        client_secret=config["client_secret"],
        redirect_uri=config["redirect_uri"],
        base_url=config["base_url"],
    )
    store: Store = store_from_url(config["store_url"])
    if config.get("kill_at"):
        store = KillSwitch(store, config["kill_at"], config["marker"])
    tally = Tally()
    otel = None
    options = dict(config.get("manager", {}))
    if config.get("telemetry"):
        from .otel import Otel

        otel = Otel()
        options["telemetry"] = otel.telemetry
    try:
        async with TokenManager(app, store, **options) as tm:
            print("READY", flush=True)
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return  # the parent went away
            go = json.loads(line)
            tenants: list[str] = config["tenants"]
            tasks = []
            for i in range(config["tasks"]):
                tenant = tenants[i % len(tenants)]
                if config["scenario"] == "exchange":
                    tasks.append(exchange_task(tm, tally, tenant, go["code"]))
                else:
                    tasks.append(traffic_task(tm, tally, tenant, config, go))
            await asyncio.gather(*tasks)
    finally:
        await store.aclose()
    result = tally.as_json()
    if otel is not None:
        result["metrics"] = metric_totals(otel)
    print("RESULT " + json.dumps(result), flush=True)


def metric_totals(otel: Any) -> dict[str, int]:
    """This process's counters (and histogram point counts) as ``name|attr|attr: total``."""
    totals: Counter[str] = Counter()
    for name, keys in (
        ("refreshes", ("outcome",)),
        ("refresh.duration", ("outcome",)),
        ("exchanges", ("outcome",)),
        ("provider.requests", ("endpoint", "status")),
    ):
        for attrs, value in otel.sums(f"factorial_tokens.{name}", *keys).items():
            totals["|".join((name, *attrs))] += value
    return dict(totals)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
