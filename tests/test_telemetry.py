"""OpenTelemetry metrics and spans, counted against what the simulator counted.

The SDK's in-memory reader and span exporter (test dependencies) read what the library
reports through the API. Counts are compared with FakeFactorial's own counters and with
a CountingStore's, never with timings.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.metrics._internal.instrument import NoOpCounter

from factorial_tokens import (
    EventKind,
    ReauthorizationRequired,
    RefreshTimeout,
    TokenEvent,
    TokenManager,
)
from factorial_tokens.store import MemoryStore, SQLiteStore
from factorial_tokens.telemetry import Telemetry
from factorial_tokens.testing import CountingStore, Fault

from .conftest import CLIENT_SECRET, SimFactory, app_for
from .multiproc import Scenario, WorkerPool
from .otel import Otel
from .test_audit import issued_secrets

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}
TENANTS = [f"t{i}" for i in range(5)]


async def test_counters_equal_what_the_simulator_counted(make_sim: SimFactory) -> None:
    otel = Otel()
    events: list[TokenEvent] = []
    counting = CountingStore(MemoryStore())
    async with make_sim(access_token_ttl=3600) as sim:
        app = app_for(sim)
        async with (
            TokenManager(app, counting, telemetry=otel.telemetry, on_event=events.append, **BUDGETS) as one,
            TokenManager(app, counting, telemetry=otel.telemetry, **BUDGETS) as two,
        ):
            for i, tenant in enumerate(TENANTS):
                await one.exchange_code(tenant, sim.issue_code(company_id=i + 1))
            # A storm: 400 gathered forced refreshes over 5 tenants and two managers.
            calls = [m.refresh(t) for _ in range(40) for m in (one, two) for t in TENANTS]
            await asyncio.gather(*calls)
            # One forced invalid_grant: the company disconnected the app at Factorial.
            sim.revoke_company(5)
            with pytest.raises(ReauthorizationRequired):
                await one.refresh("t4")
            stats = sim.stats
            assert stats.invalid_grant == 1 and stats.families_revoked_by_cause == {"admin": 1}

            refreshes = otel.sums("factorial_tokens.refreshes", "outcome")
            assert refreshes[("ok",)] == stats.refreshes >= len(TENANTS)
            assert refreshes[("invalid_grant",)] == stats.invalid_grant == 1
            assert set(refreshes) == {("ok",), ("invalid_grant",)}
            exchanges = otel.sums("factorial_tokens.exchanges", "outcome")
            assert exchanges == {("ok",): stats.exchanges} and stats.exchanges == len(TENANTS)
            # One histogram point per refresh, and per exchange.
            durations = otel.sums("factorial_tokens.refresh.duration", "outcome")
            assert durations == refreshes
            assert otel.sums("factorial_tokens.exchange.duration", "outcome") == exchanges
            requests = otel.sums("factorial_tokens.provider.requests", "endpoint", "status")
            requests.pop(("credentials", "200"), None)  # the exchange's company check (issue 12)
            assert requests == {("token", "200"): stats.refreshes + stats.exchanges, ("token", "400"): 1}
            timed = otel.sums("factorial_tokens.provider.duration", "endpoint")
            assert timed[("token",)] == stats.token_requests
            # Every store round trip, as CountingStore counted them.
            operations = otel.sums("factorial_tokens.store.operations", "primitive")
            assert {k[0]: v for k, v in operations.items()} == dict(counting.calls)
            timed = otel.sums("factorial_tokens.store.duration", "primitive")
            assert sum(timed.values()) == counting.calls.total()

            # Cache hits: exactly the calls served from the cache.
            before = otel.sums("factorial_tokens.cache", "result")
            for _ in range(100):
                await one.access_token("t0")
            after = otel.sums("factorial_tokens.cache", "result")
            assert after[("hit",)] - before[("hit",)] >= 99  # the first call may be a miss
            assert (after[("hit",)] + after[("miss",)]) - (before[("hit",)] + before[("miss",)]) == 100

            # The tenants gauge: read from the store, at most once a minute.
            counts = await one.tenant_counts()
            assert (counts.active, counts.needs_reauth) == (4, 1)
            reads = counting.calls["tenants"]
            await one.tenant_counts()
            assert counting.calls["tenants"] == reads  # cached
            gauge = otel.sums("factorial_tokens.tenants", "status")
            assert gauge == {("active",): 4, ("needs_reauth",): 1}

            assert await one.flush_events()
            kinds = [e.kind for e in events]
            assert kinds.count(EventKind.REFRESH_FAILED) == 1
            [failed] = [e for e in events if e.kind is EventKind.REFRESH_FAILED]
            assert failed.tenant == "t4" and failed.error and "ReauthorizationRequired" in failed.error
            assert failed.duration is not None and failed.duration >= 0
            assert all(e.duration is not None for e in events if e.kind is EventKind.REFRESHED)

    # Spans: one per refresh and per exchange, the tenant on each, never a token.
    spans = otel.spans.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("factorial_tokens.refresh") == sum(refreshes.values())
    assert names.count("factorial_tokens.exchange") == len(TENANTS)
    assert names.count("factorial_tokens.store.commit") == counting.calls["commit"]
    refresh_spans = [s for s in spans if s.name == "factorial_tokens.refresh"]
    assert {s.attributes["factorial_tokens.tenant"] for s in refresh_spans} == set(TENANTS)
    store_spans = [s for s in spans if s.name == "factorial_tokens.store.commit"]
    assert all(s.parent is not None for s in store_spans)  # inside a refresh or an exchange
    secrets = issued_secrets(sim) | {CLIENT_SECRET}
    text = json.dumps([s.to_json() for s in spans])
    assert not [secret for secret in secrets if secret and secret in text]
    otel.shutdown()


async def test_tenant_ids_can_be_left_out_of_spans(make_sim: SimFactory) -> None:
    otel = Otel(tenant_ids=False)
    async with make_sim() as sim:
        async with TokenManager(app_for(sim), "memory://", telemetry=otel.telemetry, **BUDGETS) as tm:
            await tm.exchange_code("acme-person", sim.issue_code(company_id=1))
            await tm.refresh("acme-person")
    spans = otel.spans.get_finished_spans()
    assert len(spans) > 3
    assert "acme-person" not in json.dumps([s.to_json() for s in spans])
    otel.shutdown()


async def test_telemetry_can_be_turned_off(make_sim: SimFactory) -> None:
    otel = Otel()
    off = Telemetry(meter_provider=otel.meters, tracer_provider=otel.tracers, enabled=False)
    async with make_sim() as sim:
        async with TokenManager(app_for(sim), "memory://", telemetry=off, **BUDGETS) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await tm.refresh("acme")
            assert isinstance(tm.store, MemoryStore)
    assert otel.points("factorial_tokens.refreshes") == [] and otel.spans.get_finished_spans() == ()
    otel.shutdown()


async def test_rate_limits_and_timeouts_are_counted_with_their_events(make_sim: SimFactory) -> None:
    otel = Otel()
    events: list[TokenEvent] = []
    store = MemoryStore()
    options = {"telemetry": otel.telemetry, "on_event": events.append, **BUDGETS}
    async with make_sim() as sim:
        async with TokenManager(app_for(sim), store, **options) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            sim.inject(Fault.RATE_LIMITED, times=2, retry_after=0.05)
            await tm.refresh("acme")  # two 429s, then the refresh
            quick_budgets = {**options, "refresh_deadline": 0.6, "provider_timeout": 0.5}
            async with TokenManager(app_for(sim), store, **quick_budgets) as quick:
                sim.inject(Fault.HTTP_503, times=50)  # retried until the refresh deadline
                with pytest.raises(Exception, match=r"503|server_error|unavailable"):
                    await quick.refresh("acme")
                sim.clear_faults()
                assert await quick.flush_events()
            assert await tm.flush_events()
    stats = sim.stats
    requests = otel.sums("factorial_tokens.provider.requests", "status")
    assert requests[("429",)] == stats.faults_by_kind["RATE_LIMITED"] == 2
    assert requests[("503",)] == stats.faults_by_kind.get("HTTP_503", 0) > 0
    refreshes = otel.sums("factorial_tokens.refreshes", "outcome")
    assert refreshes == {("ok",): 1, ("provider_error",): 1}
    limited = [e for e in events if e.kind is EventKind.RATE_LIMITED]
    assert len(limited) == 2
    assert all(e.retry_after == pytest.approx(0.05) and e.tenant == "acme" for e in limited)
    [failed] = [e for e in events if e.kind is EventKind.REFRESH_FAILED]
    assert failed.error and "ProviderError" in failed.error and failed.duration is not None
    otel.shutdown()


async def test_a_slow_or_failing_listener_never_delays_or_breaks_a_refresh(make_sim: SimFactory) -> None:
    release = threading.Event()
    entered: list[EventKind] = []
    finished: list[EventKind] = []

    def slow(event: TokenEvent) -> None:
        entered.append(event.kind)
        release.wait(30)
        finished.append(event.kind)

    def failing(event: TokenEvent) -> None:
        raise RuntimeError("listener bug")

    async with make_sim() as sim:
        async with TokenManager(app_for(sim), "memory://", **BUDGETS) as tm:
            tm.add_listener(failing)
            tm.add_listener(slow)
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            for _ in range(3):
                await tm.refresh("acme")  # returns while the listener is still blocked
            assert sim.stats.refreshes == 3
            assert finished == []  # the slow listener has not returned once
            release.set()
            assert await tm.flush_events()
            assert finished == [EventKind.EXCHANGED] + [EventKind.REFRESHED] * 3


async def test_async_listeners_run_on_the_loop(make_sim: SimFactory) -> None:
    seen: list[EventKind] = []
    done = asyncio.Event()

    async def listener(event: TokenEvent) -> None:
        seen.append(event.kind)
        if event.kind is EventKind.REFRESHED:
            done.set()

    async with make_sim() as sim:
        async with TokenManager(app_for(sim), "memory://", on_event=listener, **BUDGETS) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await tm.refresh("acme")
            await asyncio.wait_for(done.wait(), 10)
    assert seen == [EventKind.EXCHANGED, EventKind.REFRESHED]


async def test_lease_lost_and_refresh_timeout_events(make_sim: SimFactory, tmp_path: Path) -> None:
    otel = Otel()
    events: list[TokenEvent] = []
    store = SQLiteStore(tmp_path / "tokens.db")
    async with make_sim() as sim:
        app = app_for(sim)
        async with TokenManager(app, store, **BUDGETS) as holder:
            await holder.exchange_code("acme", sim.issue_code(company_id=1))
            from factorial_tokens.store import TenantKey

            held = await store.acquire(TenantKey(app.client_id, "acme"), "another-worker", 30)
            assert held.lease is not None
            async with TokenManager(
                app,
                store,
                telemetry=otel.telemetry,
                on_event=events.append,
                lease_ttl=1,
                provider_timeout=0.5,
                wait_timeout=1.2,
            ) as impatient:
                with pytest.raises(RefreshTimeout):
                    await impatient.refresh("acme")
                assert await impatient.flush_events()
            await store.release(held.lease)
    await store.aclose()
    [timeout] = [e for e in events if e.kind is EventKind.REFRESH_TIMEOUT]
    assert timeout.tenant == "acme" and timeout.duration is not None and timeout.duration >= 1.2
    assert otel.sums("factorial_tokens.lease.wait", "outcome") == {("timeout",): 1}
    otel.shutdown()


async def test_a_refresh_fenced_out_is_counted_with_a_lease_lost_event(make_sim: SimFactory) -> None:
    otel = Otel()
    events: list[TokenEvent] = []
    store = MemoryStore()
    async with make_sim() as sim:
        app = app_for(sim)
        async with (
            TokenManager(app, store, telemetry=otel.telemetry, on_event=events.append, **BUDGETS) as slow,
            TokenManager(app, store, **BUDGETS) as other,
        ):
            await slow.exchange_code("acme", sim.issue_code(company_id=1))
            sim.inject(Fault.SLOW, delay=1.0)  # processed at once, answered a second later
            refresh = asyncio.create_task(slow.refresh("acme"))
            while sim.stats.refreshes == 0:
                await asyncio.sleep(0.01)
            # The company connects again meanwhile: that write fences the refresher out.
            await other.exchange_code("acme", sim.issue_code(company_id=1))
            await refresh
            assert await slow.flush_events()
    assert otel.sums("factorial_tokens.refreshes", "outcome") == {("fenced_out",): 1}
    [lost] = [e for e in events if e.kind is EventKind.LEASE_LOST]
    assert lost.tenant == "acme" and lost.detail == "fenced_out" and lost.duration is not None
    otel.shutdown()


async def test_a_wait_for_another_workers_lease_is_timed(make_sim: SimFactory) -> None:
    from factorial_tokens.store import TenantKey

    otel = Otel()
    store = CountingStore(MemoryStore())
    async with make_sim() as sim:
        app = app_for(sim)
        async with TokenManager(app, store, telemetry=otel.telemetry, **BUDGETS) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            held = await store.inner.acquire(TenantKey(app.client_id, "acme"), "another-worker", 30)
            assert held.lease is not None
            store.reset()
            refresh = asyncio.create_task(tm.refresh("acme"))
            while store.calls["acquire"] == 0:  # the manager tried, and now waits
                await asyncio.sleep(0.01)
            assert not refresh.done()
            await store.inner.release(held.lease)
            await refresh
    assert sim.stats.refreshes == 1
    assert otel.sums("factorial_tokens.lease.wait", "outcome") == {("ok",): 1}
    assert otel.sums("factorial_tokens.refreshes", "outcome") == {("ok",): 1}
    otel.shutdown()


async def test_stale_served_when_the_store_is_down(make_sim: SimFactory, tmp_path: Path) -> None:
    from .redis_server import RedisServer

    otel = Otel()
    events: list[TokenEvent] = []
    with RedisServer() as server:
        async with make_sim(access_token_ttl=3) as sim:
            async with TokenManager(
                app_for(sim),
                server.url,
                telemetry=otel.telemetry,
                on_event=events.append,
                leeway=1.0,
                min_valid=0.9,
                **BUDGETS,
            ) as tm:
                token = (await tm.exchange_code("acme", sim.issue_code(company_id=1))).access_token
                assert await tm.access_token("acme") == token
                # Inside the mandatory window (callers must wait for a refresh; inside the
                # advisory one they keep the token without asking the store), still valid.
                await asyncio.sleep(2.2)
                server.stop()
                assert await tm.access_token("acme") == token  # served stale: the store is down
                assert await tm.flush_events()
                server.start()
    stale = [e for e in events if e.kind is EventKind.STALE_SERVED]
    assert stale and stale[0].tenant == "acme" and stale[0].error and "StoreUnavailable" in stale[0].error
    assert otel.sums("factorial_tokens.cache", "result")[("stale_served",)] == len(stale)
    assert otel.sums("factorial_tokens.store.operations", "outcome")[("unavailable",)] >= 1
    otel.shutdown()


async def test_counts_from_worker_processes_add_up_to_the_simulators(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    """Each worker process has its own reader and reports its counters; their sum is what
    the simulator counted, and each worker's histograms hold one point per refresh."""
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    tenants = {"north": 1, "south": 2, "east": 3}
    budgets = {"leeway": 0.5, "lease_ttl": 4.5, "provider_timeout": 3.0, "wait_timeout": 10.0}
    scenario = Scenario(
        kind="traffic",
        tenants=list(tenants),
        tasks=20,
        duration=4.0,
        pace=0.3,
        manager=budgets,
        telemetry=True,
    )
    async with make_sim(access_token_ttl=2) as sim:
        parent = Otel()
        async with WorkerPool(url, sim, scenario, processes=3) as pool:
            async with TokenManager(app_for(sim), url, telemetry=parent.telemetry, **budgets) as tm:
                for tenant, cid in tenants.items():
                    await tm.exchange_code(tenant, sim.issue_code(company_id=cid))
            sim.revoke_company(3)  # one forced invalid_grant, at east's first refresh
            pool.go()
            reports = await pool.results()
        stats = sim.stats
    totals: dict[str, int] = {}
    for report in reports:
        for key, value in report.metrics.items():
            totals[key] = totals.get(key, 0) + value
    for (outcome,), value in parent.sums("factorial_tokens.exchanges", "outcome").items():
        totals[f"exchanges|{outcome}"] = totals.get(f"exchanges|{outcome}", 0) + value
    parent.shutdown()
    assert stats.refreshes >= 2 and stats.invalid_grant == 1
    assert totals.get("exchanges|ok", 0) == stats.exchanges == len(tenants)
    assert totals.get("refreshes|ok", 0) == stats.refreshes
    assert totals.get("refreshes|invalid_grant", 0) == stats.invalid_grant == 1
    assert totals.get("refresh.duration|ok", 0) == stats.refreshes
    assert totals.get("refresh.duration|invalid_grant", 0) == 1
    assert totals.get("provider.requests|token|200", 0) == stats.refreshes
    assert {k for k in totals if k.startswith("refreshes|")} <= {"refreshes|ok", "refreshes|invalid_grant"}


def test_the_core_works_without_opentelemetry(tmp_path: Path) -> None:
    """With opentelemetry not importable, the manager works and reports nothing."""
    script = """
import sys
sys.modules["opentelemetry"] = None  # import opentelemetry -> ImportError
import asyncio
from factorial_tokens import TokenManager
from factorial_tokens.store import MemoryStore
from factorial_tokens.testing import FakeFactorial
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, app_for

async def main():
    async with FakeFactorial(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI
    ) as sim:
        async with TokenManager(app_for(sim), "memory://") as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await tm.refresh("acme")
            assert isinstance(tm.store, MemoryStore)
            health = await tm.health()
            assert health.healthy and health.provider_last_answer_age is not None
    assert "opentelemetry.metrics" not in sys.modules
    print("OK", sim.stats.refreshes)

asyncio.run(main())
"""
    assert _run(script).strip() == "OK 1"


def test_a_global_tracer_provider_set_after_the_manager_was_built_gets_its_spans() -> None:
    """Without a provider, no span is made (not even a no-op one); the global provider set
    later, as an application's start-up may do, is picked up (in a process of its own:
    the API sets the global provider once per process)."""
    script = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from factorial_tokens import TokenManager
from factorial_tokens.testing import FakeFactorial
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, app_for

async def main():
    spans = InMemorySpanExporter()
    async with FakeFactorial(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI
    ) as sim:
        async with TokenManager(app_for(sim), "memory://") as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await tm.refresh("acme")
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(spans))
            trace.set_tracer_provider(provider)
            await tm.refresh("acme")
            await tm.refresh("acme")
    names = [s.name for s in spans.get_finished_spans()]
    print(names.count("factorial_tokens.refresh"), names.count("factorial_tokens.store.commit"))

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    assert _run(script, env=env).split() == ["2", "2"]  # the two refreshes made after it was set


def _run(script: str, env: dict[str, str] | None = None) -> str:
    """Run ``script`` in a Python process of its own from the checkout; its standard output."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class _BrokenCounter(NoOpCounter):
    def add(self, amount: Any, attributes: Any = None, context: Any = None) -> None:
        raise RuntimeError("meter exporter broken")


class _BrokenMeterProvider(NoOpMeterProvider):
    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        meter = super().get_meter(*args, **kwargs)
        meter.create_counter = lambda name, *a, **k: _BrokenCounter(name)  # type: ignore[method-assign]
        return meter


async def test_a_failing_meter_never_breaks_a_store_call(make_sim: SimFactory) -> None:
    telemetry = Telemetry(meter_provider=_BrokenMeterProvider())
    async with make_sim(access_token_ttl=3600) as sim:
        store = MemoryStore()
        async with TokenManager(app_for(sim), store, **BUDGETS) as plain:
            await plain.exchange_code("acme", sim.issue_code(company_id=1))
        async with TokenManager(app_for(sim), store, telemetry=telemetry, **BUDGETS) as tm:
            tokens = await tm.refresh("acme")
    assert tokens.access_token


# 4. Keepalive's second refresh (after a rekey) re-refreshes what another worker just refreshed.


async def test_tenant_ids_left_out_of_spans_stay_out_of_recorded_errors(make_sim: SimFactory) -> None:
    """With ``Telemetry(tenant_ids=False)`` (tenant ids are personal data) the tenant is
    left out of span attributes, but ``Observer._span`` opens spans with
    ``start_as_current_span``'s defaults (_telemetry.py, ``_span``): an error raised through
    a span is recorded as an ``exception`` event whose message and stacktrace name the
    tenant (``tenant 'acme-person' ...``), so the id reaches the tracing backend anyway."""
    otel = Otel(tenant_ids=False)
    async with make_sim() as sim:
        async with TokenManager(app_for(sim), "memory://", telemetry=otel.telemetry, **BUDGETS) as tm:
            await tm.exchange_code("acme-person", sim.issue_code(company_id=7))
            sim.revoke_company(7)
            with pytest.raises(ReauthorizationRequired):
                await tm.refresh("acme-person")
            with pytest.raises(ReauthorizationRequired):
                await tm.access_token("acme-person")
    spans = otel.spans.get_finished_spans()
    assert spans
    assert "acme-person" not in json.dumps([s.to_json() for s in spans])
    otel.shutdown()
