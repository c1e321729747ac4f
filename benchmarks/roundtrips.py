"""Store round trips per operation, counted by wrapping the store in ``CountingStore``.

Every primitive of a store is one round trip, so the counts are round trips:

* ``hit``: ``access_token`` with a fresh cached token (per call, over many calls);
* ``miss``: ``access_token`` in a new manager (empty cache), the stored token fresh (an
  acquisition unless fresh, which takes nothing; a read on a store without it);
* ``refresh``: ``access_token`` in a new manager, the stored token expired;
* ``exchange``: ``exchange_code`` of a new code.

A warm-up pass on another tenant comes first (scripts loaded, statements prepared).
For Redis the count is cross-checked on the server: a throwaway ``redis-server`` (so no
other client adds noise) whose MONITOR stream is counted between markers, leaving out
the commands Lua scripts run inside the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from factorial_tokens import FactorialApp, TokenManager
from factorial_tokens.store import (
    Freshness,
    Store,
    TenantKey,
    TenantStatus,
    Update,
    acquires_unless_fresh,
    store_from_url,
)
from factorial_tokens.testing import CountingStore, FakeFactorial

from .common import app_for, expire_tenants, median, new_client_id, strict_sim
from .stores import STORES

HIT_CALLS = 1000
LATENCY_REPEATS = 50
OPERATIONS = ("hit", "miss", "refresh", "exchange")


@dataclass
class RoundTrips:
    """Round trips per operation for one store, by primitive."""

    store: str
    per_operation: dict[str, dict[str, float]] = field(default_factory=dict)
    redis_commands: dict[str, dict[str, int]] | None = None
    #: median microseconds of one primitive, called one at a time (``acquire_fresh``: an
    #: acquisition unless fresh of a fresh record, the cold miss)
    latency_us: dict[str, float] = field(default_factory=dict)

    def total(self, operation: str) -> float:
        """All round trips of one operation."""
        return sum(self.per_operation.get(operation, {}).values())

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "store": self.store,
            "per_operation": self.per_operation,
            "totals": {op: self.total(op) for op in OPERATIONS},
            "redis_monitor": self.redis_commands,
            "latency_us": self.latency_us,
        }


# -- a throwaway redis-server, for clean INFO commandstats ---------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _private_redis(url: str) -> Iterator[str | None]:
    """Start ``redis-server`` on a free port; yield ``url`` pointed at it (None if no binary)."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ft-bench-redis-") as tmp:
        options = ["--port", str(port), "--bind", "127.0.0.1", "--appendonly", "no", "--dir", tmp]
        proc = subprocess.Popen(
            [binary, *options, "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                time.sleep(0.05)
            parts = urlsplit(url)
            yield urlunsplit((parts.scheme, f"127.0.0.1:{port}", parts.path, parts.query, parts.fragment))
        finally:
            proc.terminate()
            proc.wait(timeout=10)


class _RedisMonitor:
    """Counts the commands clients send to a (private) Redis server, through MONITOR.

    MONITOR shows commands run inside Lua scripts as coming from ``lua``: they are left
    out, so what is counted is what crossed the network. Markers (``ECHO``) sent from a
    separate connection bracket each measured operation.
    """

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis  # the redis plugin's own dependency

        self._client = aioredis.Redis.from_url(url.split("?", 1)[0])
        self._seen: list[tuple[str, str]] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._marks = 0

    async def __aenter__(self) -> _RedisMonitor:
        await self._client.ping()
        ready = asyncio.Event()

        async def listen() -> None:
            async with self._client.monitor() as monitor:
                ready.set()
                while True:
                    info = await monitor.next_command()
                    self._seen.append((info["client_type"], info["command"]))
                    self._arrived.set()

        self._task = asyncio.create_task(listen())
        await ready.wait()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def mark(self) -> int:
        """Send a marker and wait until MONITOR has shown it; return its position."""
        self._marks += 1
        text = f"ft-bench-mark-{self._marks}"
        await self._client.echo(text)
        while True:
            for index in range(len(self._seen) - 1, -1, -1):
                if text in self._seen[index][1]:
                    return index
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 10)

    def commands(self, start: int, end: int) -> dict[str, int]:
        """Client commands seen between two marks, by name (markers and script internals left out)."""
        counts: Counter[str] = Counter()
        for client_type, command in self._seen[start + 1 : end]:
            if client_type != "lua" and "ft-bench-mark-" not in command:
                counts[command.split(" ", 1)[0].lower()] += 1
        return dict(sorted(counts.items()))


# -- counting ------------------------------------------------------------------------------


_Counted = dict[str, tuple[dict[str, float], dict[str, int] | None]]


async def _sequence(
    app: FactorialApp,
    inner: Store,
    sim: FakeFactorial,
    tenant: str,
    company: int,
    monitor: _RedisMonitor | None,
) -> _Counted:
    """Exchange, hit, miss, refresh on one tenant; counts per operation."""
    counting = CountingStore(inner)
    counted: _Counted = {}

    async def count(op: str, action: Callable[[], Awaitable[object]], calls: int = 1) -> None:
        start = await monitor.mark() if monitor else 0
        counting.reset()
        for _ in range(calls):
            await action()
        counts = {name: n / calls for name, n in sorted(counting.calls.items())}
        commands = monitor.commands(start, await monitor.mark()) if monitor else None
        counted[op] = (counts, commands)

    async with TokenManager(app, counting) as tm:
        await count("exchange", lambda: tm.exchange_code(tenant, sim.issue_code(company_id=company)))
        await tm.access_token(tenant)
        await count("hit", lambda: tm.access_token(tenant), HIT_CALLS)
    async with TokenManager(app, counting) as cold:
        await count("miss", lambda: cold.access_token(tenant))
    await expire_tenants(inner, app.client_id, [tenant])
    async with TokenManager(app, counting) as cold:
        await count("refresh", lambda: cold.access_token(tenant))
    return counted


async def _primitive_latency(
    store: Store, namespace: str, repeats: int = LATENCY_REPEATS
) -> dict[str, float]:
    """Median time of read, acquire (of a fresh record unless fresh, as a cold miss asks:
    nothing taken; and plainly) and commit, one at a time."""
    key = TenantKey(namespace, "latency")
    now = time.time()
    update = Update(b"j1:{}", TenantStatus.ACTIVE, now + 3600, now)
    await store.replace(key, update)
    samples: dict[str, list[float]] = {"read": [], "acquire": [], "commit": []}
    for _ in range(repeats):
        start = time.perf_counter()
        await store.read(key)
        samples["read"].append(time.perf_counter() - start)
        if acquires_unless_fresh(store):
            rule = Freshness(time.time(), 60.0, 0.5)
            start = time.perf_counter()
            left = await store.acquire(key, secrets.token_hex(8), 30, unless_fresh=rule)
            samples.setdefault("acquire_fresh", []).append(time.perf_counter() - start)
            assert left.lease is None
        start = time.perf_counter()
        won = await store.acquire(key, secrets.token_hex(8), 30)
        samples["acquire"].append(time.perf_counter() - start)
        assert won.lease is not None
        start = time.perf_counter()
        await store.commit(won.lease, update)
        samples["commit"].append(time.perf_counter() - start)
    return {name: median(values) * 1e6 for name, values in samples.items()}


async def _measure(
    name: str, url: str, sim: FakeFactorial, client_id: str, redis_url: str | None
) -> RoundTrips:
    result = RoundTrips(name, redis_commands={} if redis_url else None)
    app = app_for(client_id, sim.base_url)
    inner = store_from_url(url)
    try:
        # Warm-up (not counted): scripts loaded, statements prepared, pools filled.
        await _sequence(app, inner, sim, "warm-up", 1, None)
        async with contextlib.AsyncExitStack() as stack:
            monitor = await stack.enter_async_context(_RedisMonitor(redis_url)) if redis_url else None
            counted = await _sequence(app, inner, sim, "acme", 2, monitor)
        result.latency_us = await _primitive_latency(inner, client_id)
        for op in OPERATIONS:
            counts, commands = counted[op]
            result.per_operation[op] = counts
            if result.redis_commands is not None and commands is not None:
                result.redis_commands[op] = commands
    finally:
        await inner.aclose()
    return result


def run(name: str) -> RoundTrips:
    """Count round trips per operation on a fresh ``name`` store (and a strict simulator)."""
    client_id = new_client_id()
    with STORES[name]() as url, strict_sim(client_id) as sim:
        if name == "redis":
            with _private_redis(url) as private:
                return asyncio.run(_measure(name, private or url, sim, client_id, private))
        return asyncio.run(_measure(name, url, sim, client_id, None))
