"""Operators' endpoints: /metrics scraped over HTTP, /healthz and /readyz, structured logs,
and the Grafana dashboard's queries against the metric names Prometheus really sees."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from factorial_tokens import ManagerClosed, ReauthorizationRequired, TokenManager
from factorial_tokens._logs import FIELDS, JsonFormatter
from factorial_tokens.store import MemoryStore
from factorial_tokens.testing import FakeFactorial
from factorial_tokens.web import add_ops_routes, prometheus_exporter

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, SimFactory, app_for
from .redis_server import RedisServer
from .test_audit import issued_secrets
from .test_cli import SCRIPT, TOKEN_RE, _free_port, _get, age, browser, cli, seed

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


@pytest.fixture
def threaded_sim() -> Iterator[FakeFactorial]:
    """A simulator served from a thread, so a subprocess can reach it."""
    fake = FakeFactorial(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI)
    with fake.serve_in_thread():
        yield fake


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{label="v",...}': value}``, scope labels dropped."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        kept = sorted(
            part
            for part in (labels or "{}")[1:-1].split(",")
            if part and not part.startswith(("otel_scope_", "job=", "instance="))
        )
        key = name + ("{" + ",".join(kept) + "}" if kept else "")
        samples[key] = samples.get(key, 0.0) + float(value)
    return samples


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_metrics_scraped_over_http_equal_the_simulators_counts(make_sim: SimFactory) -> None:
    exporter = prometheus_exporter()
    assert exporter is not None
    telemetry, render = exporter
    async with make_sim() as sim:
        async with TokenManager(app_for(sim), MemoryStore(), telemetry=telemetry, **BUDGETS) as tm:
            app = web.Application()
            add_ops_routes(app, tm, render)
            runner, base = await _serve(app)
            try:
                tenants = [f"t{i}" for i in range(4)]
                for i, tenant in enumerate(tenants):
                    await tm.exchange_code(tenant, sim.issue_code(company_id=i + 1))
                await asyncio.gather(*(tm.refresh(t) for _ in range(50) for t in tenants))
                sim.revoke_company(4)
                with pytest.raises(ReauthorizationRequired):
                    await tm.refresh("t3")
                async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
                    assert resp.status == 200 and resp.content_type == "text/plain"
                    text = await resp.text()
            finally:
                await runner.cleanup()
    stats = sim.stats
    m = parse_metrics(text)
    ok, dead = 'outcome="ok",store="memory"', 'outcome="invalid_grant",store="memory"'
    assert m["factorial_tokens_refreshes_total{" + ok + "}"] == stats.refreshes >= 4
    assert m["factorial_tokens_refreshes_total{" + dead + "}"] == stats.invalid_grant == 1
    assert m["factorial_tokens_exchanges_total{" + ok + "}"] == stats.exchanges == 4
    assert m["factorial_tokens_refresh_duration_seconds_count{" + ok + "}"] == stats.refreshes
    assert m['factorial_tokens_provider_requests_total{endpoint="token",status="400"}'] == 1
    assert m['factorial_tokens_tenants{status="active",store="memory"}'] == 3
    assert m['factorial_tokens_tenants{status="needs_reauth",store="memory"}'] == 1
    secrets = issued_secrets(sim) | {CLIENT_SECRET}
    assert not [s for s in secrets if s in text]


def test_serve_health_follows_the_store_and_metrics_show_the_exchange(threaded_sim: FakeFactorial) -> None:
    sim = threaded_sim
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORIAL_")}
    env.update(FACTORIAL_CLIENT_SECRET=CLIENT_SECRET, FACTORIAL_BASE_URL=sim.base_url)
    port = _free_port()
    redirect = f"http://127.0.0.1:{port}/oauth/callback"
    sim.add_client("ops-client", CLIENT_SECRET, redirect)
    with RedisServer() as redis:
        env.update(
            FACTORIAL_CLIENT_ID="ops-client",
            FACTORIAL_REDIRECT_URI=redirect,
            FACTORIAL_TOKENS_STORE=redis.url,
        )
        proc = subprocess.Popen(
            [str(SCRIPT), "-v", "serve", "--port", str(port), "--open", "--log-format", "json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith(f"listening on http://127.0.0.1:{port}"), line
            base = f"http://127.0.0.1:{port}"
            status, body, _ = _get(f"{base}/healthz")
            assert status == 200 and json.loads(body)["healthy"] is True
            assert _get(f"{base}/readyz")[0] == 200
            # Connect one company, then read the exchange in /metrics.
            admin = browser()  # the callback must come back to the browser that started it
            callback = sim.authorize_sync(_get(f"{base}/connect/acme", admin)[2] or "")
            assert _get(callback, admin)[0] == 200
            status, text, _ = _get(f"{base}/metrics")
            assert status == 200
            m = parse_metrics(text)
            exchanged = m['factorial_tokens_exchanges_total{outcome="ok",store="redis"}']
            assert exchanged == sim.stats.exchanges == 1
            assert m['factorial_tokens_provider_requests_total{endpoint="token",status="200"}'] == 1
            assert m['factorial_tokens_tenants{status="active",store="redis"}'] == 1
            # The store goes away: unhealthy within 2 s (a bounded poll), then healthy again.
            redis.stop()
            assert _poll(f"{base}/healthz", 503, within=2.0)
            status, body, _ = _get(f"{base}/healthz")
            assert status == 503 and json.loads(body)["store_error"]
            assert _get(f"{base}/readyz")[0] == 503
            redis.start()
            assert _poll(f"{base}/healthz", 200, within=15.0)
            health = json.loads(_get(f"{base}/healthz")[1])
            assert health["provider_last_answer_age"] is not None and health["store_error"] is None
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert CLIENT_SECRET not in out + err and not TOKEN_RE.search(out + err)
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records and all(set(FIELDS) <= set(r) for r in records)
    assert any(r["tenant"] == "acme" and r["store"] == "redis" for r in records)


def _poll(url: str, status: int, *, within: float) -> bool:
    """True once ``url`` answers ``status``, polling for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        if _get(url)[0] == status:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


async def test_health_as_a_value(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        tm = TokenManager(app_for(sim), "memory://", **BUDGETS)
        before = await tm.health()
        assert before.healthy and not before.ready and before.provider_last_answer_age is None
        assert (await tm.tenant_counts()).active == 0  # before open: read from the store
        async with tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            health = await tm.health()
            assert health.healthy and health.ready and health.store == "memory"
            assert health.provider_last_answer_age is not None and health.provider_last_answer_age >= 0
        assert not (await tm.health()).ready
        with pytest.raises(ManagerClosed):
            await tm.tenant_counts()


async def test_every_log_record_carries_the_structured_fields(
    make_sim: SimFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="factorial_tokens")
    async with make_sim(access_token_ttl=3600) as sim:
        async with TokenManager(app_for(sim), "memory://", **BUDGETS) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await tm.refresh("acme")
            sim.revoke_company(1)
            with pytest.raises(ReauthorizationRequired):
                await tm.refresh("acme")
    records = [r for r in caplog.records if r.name.startswith("factorial_tokens")]
    assert len(records) >= 4
    for record in records:
        assert all(hasattr(record, field) for field in FIELDS), record.getMessage()
    refreshed = [r for r in records if "refreshed, access token" in r.getMessage()]
    assert refreshed and refreshed[0].tenant == "acme" and refreshed[0].event == "refresh"
    assert refreshed[0].fingerprint and refreshed[0].fingerprint.startswith("sha256:")
    assert refreshed[0].store == "memory" and refreshed[0].duration_ms >= 0
    failed = [r for r in records if getattr(r, "event", None) == "refresh_failed"]
    assert len(failed) == 1 and failed[0].tenant == "acme"
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    assert all(set(FIELDS) <= set(line) for line in lines)
    secrets = issued_secrets(sim) | {CLIENT_SECRET}
    assert not [s for s in secrets if s in json.dumps(lines)]


async def test_the_dashboard_reads_real_metric_names(make_sim: SimFactory) -> None:
    """Every metric a dashboard query or a documented alert names is one Prometheus sees."""
    exporter = prometheus_exporter()
    assert exporter is not None
    telemetry, render = exporter
    async with make_sim() as sim:
        async with TokenManager(app_for(sim), MemoryStore(), telemetry=telemetry, **BUDGETS) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await tm.refresh("acme")
            await tm.access_token("acme")
            await tm.tenant_counts()
            tm._obs.lease_waited(0.01)  # no worker waited in this run; the histogram must exist
            text = render()[0].decode()
    seen = {
        match.group(1)
        for line in text.splitlines()
        if (match := _SAMPLE.match(line)) and not line.startswith("#")
    }
    seen |= {name.rsplit("_", 1)[0] for name in seen if name.endswith(("_bucket", "_count", "_sum"))}
    # Waits and store failures may not have happened in this run: their families are declared.
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    known = seen | declared | {f"{n}_bucket" for n in declared} | {f"{n}_count" for n in declared}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 6
    doc = (ROOT / "docs" / "observability.md").read_text()
    named = set(re.findall(r"\bfactorial_tokens_[a-z_]+", " ".join(exprs) + doc))
    assert named, "the dashboard names no metric"
    unknown = {n for n in named if n not in known}
    assert not unknown, f"not a metric Prometheus sees: {sorted(unknown)}"


def test_keepalive_logs_json_lines(threaded_sim: FakeFactorial, tmp_path: Path) -> None:
    store = "sqlite:///" + str(tmp_path / "tokens.db")
    seed(threaded_sim, store, "acme", 1)
    age(store, "acme", 6 * 86400)  # older than keepalive's five days: due
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORIAL_")}
    env.update(
        FACTORIAL_CLIENT_ID=CLIENT_ID,
        FACTORIAL_CLIENT_SECRET=CLIENT_SECRET,
        FACTORIAL_REDIRECT_URI=REDIRECT_URI,
        FACTORIAL_BASE_URL=threaded_sim.base_url,
        FACTORIAL_TOKENS_STORE=store,
    )
    done = cli("-v", "keepalive", "--once", "--log-format", "json", env=env)
    assert done.returncode == 0, done.stderr
    assert threaded_sim.stats.refreshes == 1
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all(set(FIELDS) <= set(r) and r["message"] for r in records)
    [refreshed] = [r for r in records if "refreshed, access token" in r["message"]]
    assert (refreshed["tenant"], refreshed["event"], refreshed["store"]) == ("acme", "refresh", "sqlite")
    assert refreshed["fingerprint"].startswith("sha256:") and refreshed["duration_ms"] >= 0
