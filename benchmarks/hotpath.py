"""Hot path: ``await tm.access_token(t)`` on a fresh cached token against a bare ``await``.

Measured twice: with OpenTelemetry's API installed but nothing configured (the default),
and with a configured SDK ``MeterProvider`` (an in-memory reader) and ``TracerProvider``
passed to the manager, so the instrumentation's cost on the hot path shows.

The baseline is the cheapest thing an async token getter can be: awaiting a coroutine
that returns a value from a dict. Rounds alternate which side goes first, so drift in
the machine's load hits both sides alike; the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import pstats
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from factorial_tokens import TokenManager
from factorial_tokens.store import MemoryStore
from factorial_tokens.telemetry import Telemetry

from .common import app_for, connect_tenants, median, new_client_id, strict_sim

TARGET_RATIO = 3.0
_VALUES = {"acme": "0" * 64}


async def bare(tenant: str) -> str:
    """The baseline: a coroutine that returns a dict value."""
    return _VALUES[tenant]


@dataclass(frozen=True)
class HotPathResult:
    """Median ns/call of each side, the median paired ratio, and every round."""

    rounds: int
    calls: int
    manager_ns: float
    bare_ns: float
    ratio: float
    target: float
    rounds_manager_ns: list[float]
    rounds_bare_ns: list[float]
    profile: str | None = None
    #: With a configured SDK MeterProvider and TracerProvider (None without the SDK).
    manager_otel_ns: float | None = None
    ratio_otel: float | None = None

    @property
    def met(self) -> bool:
        """True when the ratio is within the target (with and without a MeterProvider)."""
        return self.ratio <= self.target and (self.ratio_otel is None or self.ratio_otel <= self.target)


async def _time_calls(fn: Callable[[str], Awaitable[str]], tenant: str, calls: int) -> float:
    """ns per ``await fn(tenant)`` over ``calls`` calls (the loop is the same for both sides)."""
    start = time.perf_counter_ns()
    for _ in range(calls):
        await fn(tenant)
    return (time.perf_counter_ns() - start) / calls


def _profile(tm: TokenManager, tenant: str, calls: int) -> str:
    """cProfile of the manager side (deterministic: shows every call the hot path makes)."""

    async def loop() -> None:
        for _ in range(calls):
            await tm.access_token(tenant)

    profiler = cProfile.Profile()
    coro = loop()
    profiler.enable()
    try:
        coro.send(None)
    except StopIteration:
        pass
    finally:
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(8)
    return out.getvalue()


def _configured_telemetry() -> Telemetry | None:
    """An SDK MeterProvider (in-memory reader) and TracerProvider; None without the SDK."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    return Telemetry(
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
        tracer_provider=TracerProvider(),
    )


async def _measure(rounds: int, calls: int, profile: bool) -> HotPathResult:
    client_id = new_client_id()
    telemetry = _configured_telemetry()
    with strict_sim(client_id) as sim:
        app = app_for(client_id, sim.base_url)
        async with (
            TokenManager(app, MemoryStore()) as tm,
            TokenManager(app, MemoryStore(), telemetry=telemetry) as tm_otel,
        ):
            await connect_tenants(tm, sim, ["acme"], first_company=1)
            await connect_tenants(tm_otel, sim, ["acme"], first_company=1)
            token = await tm.access_token("acme")
            assert token and await tm.access_token("acme") == token
            assert await tm_otel.access_token("acme") == await tm_otel.access_token("acme")
            _VALUES["acme"] = token
            sides: dict[str, Callable[[str], Awaitable[str]]] = {"manager": tm.access_token, "bare": bare}
            if telemetry is not None:
                sides["otel"] = tm_otel.access_token
            for fn in sides.values():  # warm up each
                await _time_calls(fn, "acme", min(calls, 2000))
            per_side: dict[str, list[float]] = {name: [] for name in sides}
            ratios = []
            ratios_otel = []
            gc_was_enabled = gc.isenabled()
            try:
                for index in range(rounds):
                    order = list(sides) if index % 2 == 0 else list(reversed(sides))
                    got: dict[str, float] = {}
                    for name in order:
                        gc.collect()
                        gc.disable()
                        got[name] = await _time_calls(sides[name], "acme", calls)
                        gc.enable()
                    for name, ns in got.items():
                        per_side[name].append(ns)
                    ratios.append(got["manager"] / got["bare"])
                    if "otel" in got:
                        ratios_otel.append(got["otel"] / got["bare"])
            finally:
                if gc_was_enabled:
                    gc.enable()
            ratio = median(ratios)
            report = _profile(tm, "acme", calls) if profile and ratio > TARGET_RATIO else None
    return HotPathResult(
        rounds=rounds,
        calls=calls,
        manager_ns=median(per_side["manager"]),
        bare_ns=median(per_side["bare"]),
        ratio=ratio,
        target=TARGET_RATIO,
        rounds_manager_ns=per_side["manager"],
        rounds_bare_ns=per_side["bare"],
        profile=report,
        manager_otel_ns=median(per_side["otel"]) if ratios_otel else None,
        ratio_otel=median(ratios_otel) if ratios_otel else None,
    )


def run(rounds: int = 30, calls: int = 20_000, *, profile: bool = True) -> HotPathResult:
    """Measure the hot path (in its own event loop); profile it if it misses the target."""
    return asyncio.run(_measure(rounds, calls, profile))


def to_json(result: HotPathResult) -> dict[str, Any]:
    """The JSON form of a result."""
    data = dict(result.__dict__)
    data["met"] = result.met
    return data
