"""Store round trips per operation, counted by wrapping the store in ``CountingStore``.

Every primitive of a store is one round trip, so the counts are round trips:

* ``hit``: ``access_token`` with a fresh cached token (per call, over many calls);
* ``miss``: ``access_token`` in a new manager (empty cache), the stored token fresh;
* ``refresh``: ``access_token`` in a new manager, the stored token expired;
* ``exchange``: ``exchange_code`` of a new code.

For Redis the count is cross-checked with the server's own ``INFO commandstats``
deltas (calls of EVALSHA/EVAL and plain commands sent by clients; a shared server's
other clients add noise, so the run uses a throwaway ``redis-server`` when one can be
started, else it skips the cross-check).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from factorial_tokens import TokenManager, store_from_url
from factorial_tokens.testing import CountingStore, FakeFactorial

from .common import app_for, expire_tenants, new_client_id, strict_sim
from .stores import STORES

HIT_CALLS = 1000
OPERATIONS = ("hit", "miss", "refresh", "exchange")


@dataclass
class RoundTrips:
    """Round trips per operation for one store, by primitive."""

    store: str
    per_operation: dict[str, dict[str, float]] = field(default_factory=dict)
    redis_commands: dict[str, dict[str, int]] | None = None

    def total(self, operation: str) -> float:
        """All round trips of one operation."""
        return sum(self.per_operation.get(operation, {}).values())

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "store": self.store,
            "per_operation": self.per_operation,
            "totals": {op: self.total(op) for op in OPERATIONS},
            "redis_commandstats": self.redis_commands,
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


async def _commandstats(url: str) -> dict[str, int]:
    """Calls per command from the server's INFO commandstats."""
    import redis.asyncio as aioredis  # the redis plugin's own dependency

    client = aioredis.Redis.from_url(url.split("?", 1)[0])
    try:
        info = await client.info("commandstats")
    finally:
        await client.aclose()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in info.items()}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    names = set(before) | set(after)
    diff = {n: after.get(n, 0) - before.get(n, 0) for n in names}
    # Our own INFO call is not the store's.
    diff["info"] = diff.get("info", 0) - 1
    return {n: d for n, d in sorted(diff.items()) if d > 0}


# -- counting ------------------------------------------------------------------------------


async def _count(
    counting: CountingStore,
    op: Callable[[], Awaitable[object]],
    redis_url: str | None,
    calls: int = 1,
) -> tuple[dict[str, float], dict[str, int] | None]:
    before = await _commandstats(redis_url) if redis_url else None
    counting.reset()
    for _ in range(calls):
        await op()
    counts = {name: n / calls for name, n in sorted(counting.calls.items())}
    after = await _commandstats(redis_url) if redis_url else None
    return counts, (_delta(before, after) if before is not None and after is not None else None)


async def _measure(
    name: str, url: str, sim: FakeFactorial, client_id: str, redis_url: str | None
) -> RoundTrips:
    result = RoundTrips(name, redis_commands={} if redis_url else None)
    app = app_for(client_id, sim.base_url)
    inner = store_from_url(url)
    counting = CountingStore(inner)
    try:
        async with TokenManager(app, counting) as tm:
            counted: dict[str, tuple[dict[str, float], dict[str, int] | None]] = {}
            counted["exchange"] = await _count(
                counting, lambda: tm.exchange_code("acme", sim.issue_code(company_id=1)), redis_url
            )
            await tm.access_token("acme")
            counted["hit"] = await _count(counting, lambda: tm.access_token("acme"), redis_url, HIT_CALLS)
        async with TokenManager(app, counting) as cold:
            counted["miss"] = await _count(counting, lambda: cold.access_token("acme"), redis_url)
        await expire_tenants(inner, client_id, ["acme"])
        async with TokenManager(app, counting) as cold:
            counted["refresh"] = await _count(counting, lambda: cold.access_token("acme"), redis_url)
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
