"""The demo: many worker processes keep many companies' tokens alive against a strict
Factorial simulator, and the provider's own counters show that no grant was broken.

What it does, in order:

1. starts :class:`~factorial_tokens.testing.FakeFactorial` on loopback in its strictest
   mode (revoke at refresh + reuse detection) with short-lived access tokens;
2. starts the connect server (:func:`~factorial_tokens._serve.connect_app`) on loopback
   and connects T companies through the real authorization-code flow, as one browser:
   the tenant's signed connect link ``/connect/{tenant}?link=...`` (which sets the binding
   cookie) -> Factorial's authorize page -> the callback with that cookie, each callback
   sent twice at once (a retried callback must not exchange its code twice);
3. runs P worker processes x C tasks that call ``access_token`` and the simulator's API
   through ``tm.client(tenant)`` for D seconds, all on one shared store;
4. compares what the provider counted with the ideal: each refresh must create exactly
   one new token generation that callers then used (``refresh requests == refreshes ==
   distinct generations - T``), with zero ``invalid_grant``, zero revoked grants, zero
   tenants needing re-authorization and zero 401s seen by callers.

Only fingerprints of tokens ever leave a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import queue
import random
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import attrs
from aiohttp import web

from ._errors import ConfigurationError, FactorialTokensError
from ._events import EventKind, TokenEvent
from ._manager import TokenManager
from ._models import FactorialApp, fingerprint
from ._serve import connect_app
from .store import store_from_url

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

# Run through `factorial-tokens demo`; nothing here is part of the library's API.
__all__: list[str] = []

API_PATH = "/api/2025-10-01/resources/employees/employees"
_NAMES = (
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "stark",
    "wayne",
    "tyrell",
    "cyberdyne",
    "soylent",
)
_READY_TIMEOUT = 60.0
_PROGRESS_EVERY = 0.25


@attrs.frozen
class DemoConfig:
    """The demo's knobs. ``store`` None means an SQLite file in a temporary folder."""

    tenants: int = 5
    workers: int = 4
    tasks: int = 25
    duration: float = 15.0
    token_ttl: float = 3.0
    leeway: float = 1.0
    think: float = 0.05
    store: str | None = None

    def check(self) -> None:
        """Raise ConfigurationError for values the demo cannot run with."""
        if self.tenants < 1 or self.workers < 1 or self.tasks < 1:
            raise ConfigurationError("the demo needs at least one tenant, one worker and one task")
        if not self.duration > 0:
            raise ConfigurationError("the demo's duration must be positive")
        if self.token_ttl < 1:
            raise ConfigurationError("the access token lifetime must be at least 1 second")
        if self.leeway < 0 or self.think < 0:
            raise ConfigurationError("leeway and think time must not be negative")

    @property
    def refresh_interval(self) -> float:
        """How long a token is used before it is due (``TokenSet.refresh_due_at``)."""
        return self.token_ttl - min(self.leeway, self.token_ttl / 2)


@attrs.frozen
class DemoResult:
    """What the demo measured; ``broken`` names every guarantee that did not hold."""

    values: dict[str, Any]
    broken: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when every guarantee held."""
        return not self.broken


def tenant_names(count: int) -> list[str]:
    """``count`` readable tenant ids."""
    return [_NAMES[i] if i < len(_NAMES) else f"company-{i + 1}" for i in range(count)]


def redact_url(url: str) -> str:
    """``url`` without its password (store URLs may hold one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# --------------------------------------------------------------------------- worker side


@attrs.frozen
class _WorkerSpec:
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


def worker_main(spec: _WorkerSpec, out: Any, go: Any) -> None:
    """Entry point of one worker process (spawned); reports on ``out``."""
    try:
        asyncio.run(_worker(spec, out, go))
    except KeyboardInterrupt:
        sys.exit(130)  # Ctrl-C reached the whole process group: the parent reports it
    except BaseException as exc:  # report, then die non-zero: the parent counts a crash
        out.put(("crashed", spec.index, f"{type(exc).__name__}: {exc}"[:300]))
        raise


async def _worker(spec: _WorkerSpec, out: Any, go: Any) -> None:
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
        if not await loop.run_in_executor(None, go.wait, _READY_TIMEOUT):
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
                if spec.think:
                    await asyncio.sleep(spec.think * random.uniform(0.5, 1.5))

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


# --------------------------------------------------------------------------- parent side


@contextlib.contextmanager
def _store_url(config: DemoConfig) -> Iterator[str]:
    if config.store is not None:
        if urlsplit(config.store).scheme.lower() == "memory":
            raise ConfigurationError(
                "memory:// lives inside one process; the demo's workers need a shared store "
                "(sqlite:///path, redis://..., postgresql://...)"
            )
        store_from_url(config.store)  # fail early on an unknown scheme or bad options
        yield config.store
        return
    folder = tempfile.mkdtemp(prefix="factorial-tokens-demo-")
    try:
        yield "sqlite:///" + os.path.join(folder, "tokens.db")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Live:
    """Live progress on a terminal; a few plain lines elsewhere."""

    def __init__(self, console: Console, config: DemoConfig) -> None:
        self.console = console
        self.config = config
        self._live: Any = None
        self._progress: Any = None
        self._task: Any = None

    def say(self, text: str) -> None:
        if self._live is None:
            self.console.print(text, highlight=False)

    def start(self) -> None:
        if not self.console.is_terminal:
            return
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]running"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._task = self._progress.add_task("run", total=self.config.duration)
        self._live = Live(console=self.console, refresh_per_second=8, transient=True)
        self._live.start()

    def update(self, elapsed: float, line: dict[str, int]) -> None:
        if self._live is None:
            return
        from rich.console import Group
        from rich.table import Table

        self._progress.update(self._task, completed=min(elapsed, self.config.duration))
        table = Table.grid(padding=(0, 2))
        for _ in line:
            table.add_column(justify="right")
        table.add_row(*(f"[dim]{name}[/dim]" for name in line))
        table.add_row(*(f"{value:,}" for value in line.values()))
        renderable: RenderableType = Group(self._progress, table)
        self._live.update(renderable)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


async def _connect(tm: TokenManager, base: str, sim: Any, tenants: list[str]) -> tuple[int, int]:
    """Connect every tenant through its connect link -> authorize -> callback (sent twice
    at once), as one browser would: the cookie set by /connect goes with the callback.

    Returns (callbacks sent, callbacks answered 200).
    """
    sent = ok = 0
    # unsafe=True: the demo's server is an IP address, whose cookies aiohttp drops otherwise.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for tenant in tenants:
            link = tm.connect_link(tenant, ttl=600, base_url=base)
            async with http.get(link, allow_redirects=False) as resp:
                if resp.status != 302:
                    raise FactorialTokensError(f"/connect answered {resp.status} for {tenant!r}")
                authorize = resp.headers["Location"]
            callback = await sim.authorize(authorize)
            if not callback.startswith(base + "/"):
                raise FactorialTokensError("the simulator redirected somewhere unexpected")

            async def deliver(url: str = callback) -> int:
                async with http.get(url, allow_redirects=False) as answer:
                    await answer.read()
                    return answer.status

            statuses = await asyncio.gather(deliver(), deliver())
            sent += len(statuses)
            ok += sum(status == 200 for status in statuses)
    return sent, ok


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


async def _run(config: DemoConfig, live: _Live) -> DemoResult:
    from .testing import FakeFactorial, RefreshMode

    tenants = tenant_names(config.tenants)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    client_id = f"demo-{secrets.token_hex(4)}"
    client_secret = secrets.token_hex(24)
    sim = FakeFactorial(
        client_id=client_id,
        client_secret=client_secret,
        redirect_uri=f"{base}/oauth/callback",
        refresh_mode=RefreshMode.REVOKE_AT_REFRESH,
        reuse_detection=True,
        access_token_ttl=config.token_ttl,
    )
    with _store_url(config) as store_url:
        async with sim:
            app = FactorialApp(
                client_id=client_id,
                client_secret=client_secret,
                redirect_uri=f"{base}/oauth/callback",
                base_url=sim.base_url,
            )
            exchanged: dict[str, set[str]] = {t: set() for t in tenants}

            def on_event(event: TokenEvent) -> None:
                if event.kind is EventKind.EXCHANGED and event.fingerprint:
                    exchanged.setdefault(event.tenant, set()).add(event.fingerprint)

            async with TokenManager(app, store_url, leeway=config.leeway, on_event=on_event) as tm:
                runner = web.AppRunner(connect_app(tm), access_log=None)
                await runner.setup()
                try:
                    await web.SockSite(runner, listener).start()
                    live.say(
                        f"Simulated Factorial at {sim.base_url} (revoke at refresh, reuse detection, "
                        f"access tokens live {config.token_ttl:g} s); store {redact_url(store_url)}"
                    )
                    callbacks, callbacks_ok = await _connect(tm, base, sim, tenants)
                    live.say(f"Connected {len(tenants)} companies through {base}/connect/...")
                    workers = await _run_workers(config, app, store_url, tenants, sim, live)
                finally:
                    await runner.cleanup()
                infos = await tm.tenants()
                if config.store is not None:
                    # Leave nothing behind in the user's store (the namespace is this run's).
                    for tenant in tenants:
                        await tm.forget(tenant)
            stats = sim.stats
    return _judge(config, tenants, callbacks, callbacks_ok, exchanged, workers, infos, stats, store_url)


async def _run_workers(
    config: DemoConfig, app: FactorialApp, store_url: str, tenants: list[str], sim: Any, live: _Live
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    procs = []
    for index in range(config.workers):
        spec = _WorkerSpec(
            index=index,
            client_id=app.client_id,
            client_secret=app.client_secret,
            redirect_uri=app.redirect_uri,
            base_url=app.base_url,
            store=store_url,
            tenants=tuple(tenants),
            tasks=config.tasks,
            duration=config.duration,
            leeway=config.leeway,
            think=config.think,
        )
        proc = ctx.Process(target=worker_main, args=(spec, out, go), name=f"demo-worker-{index}", daemon=True)
        proc.start()
        procs.append(proc)
    loop = asyncio.get_running_loop()
    ready: set[int] = set()
    done: dict[int, dict[str, Any]] = {}
    crashed: dict[int, str] = {}
    progress: dict[int, dict[str, int]] = {}
    started: float | None = None
    limit = loop.time() + _READY_TIMEOUT

    def start_when_ready() -> None:
        nonlocal started
        if started is None and len(ready | set(crashed)) == len(procs):
            live.say(
                f"Running {config.workers} worker processes x {config.tasks} tasks "
                f"for {config.duration:g} s ..."
            )
            live.start()
            started = loop.time()
            go.set()

    try:
        while len(done) + len(crashed) < len(procs):
            try:
                message: tuple[str, int, Any] | None = out.get_nowait()
            except queue.Empty:
                message = None
            if message is None:
                for i, proc in enumerate(procs):
                    if not proc.is_alive() and i not in done and i not in crashed and out.empty():
                        crashed[i] = f"exited with code {proc.exitcode}"
                        start_when_ready()
                if started is None and loop.time() > limit:
                    raise FactorialTokensError("the demo's workers did not start in time")
                if started is not None and loop.time() > started + config.duration + _READY_TIMEOUT:
                    raise FactorialTokensError("the demo's workers did not finish in time")
                if started is not None:
                    stats = sim.stats
                    live.update(
                        loop.time() - started,
                        {
                            "API calls": stats.api_calls,
                            "refreshes": stats.refreshes,
                            "invalid_grant": stats.invalid_grant,
                            "401 seen by callers": sum(p.get("unauthorized", 0) for p in progress.values()),
                            "errors": sum(p.get("errors", 0) for p in progress.values()),
                        },
                    )
                await asyncio.sleep(0.05)
                continue
            kind, index, payload = message
            if kind == "ready":
                ready.add(index)
            elif kind == "progress":
                progress[index] = payload
            elif kind == "done":
                done[index] = payload
            elif kind == "crashed":
                crashed[index] = payload
            start_when_ready()
    finally:
        live.stop()
        if len(done) + len(crashed) < len(procs):
            # Interrupted or timed out: stop the workers now rather than at their deadline.
            for proc in procs:
                proc.terminate()
        go.set()
        for proc in procs:
            await loop.run_in_executor(None, proc.join, 10)
            if proc.is_alive():
                proc.kill()
                await loop.run_in_executor(None, proc.join, 5)
        out.close()
    for index, proc in enumerate(procs):
        if proc.exitcode != 0 and index not in crashed:
            crashed[index] = f"exited with code {proc.exitcode}"
    return {"done": done, "crashed": crashed}


def _judge(
    config: DemoConfig,
    tenants: list[str],
    callbacks: int,
    callbacks_ok: int,
    exchanged: dict[str, set[str]],
    workers: dict[str, Any],
    infos: list[Any],
    stats: Any,
    store_url: str,
) -> DemoResult:
    done: dict[int, dict[str, Any]] = workers["done"]
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    generations: dict[str, set[str]] = {t: set(exchanged.get(t, ())) for t in tenants}
    token_latency: list[float] = []
    api_latency: list[float] = []
    for result in done.values():
        counts.update(result["counts"])
        errors.update(result["errors"])
        for group in ("seen", "refreshed"):
            for tenant, fps in result[group].items():
                generations.setdefault(tenant, set()).update(fps)
        token_latency.extend(result["token_latency"])
        api_latency.extend(result["api_latency"])
    distinct = sum(len(fps) for fps in generations.values())
    ideal = distinct - len(tenants)
    reauth = sum(1 for info in infos if info.needs_reauthorization)
    values: dict[str, Any] = {
        "tenants": len(tenants),
        "workers": config.workers,
        "tasks": config.tasks,
        "duration": config.duration,
        "token_ttl": config.token_ttl,
        "leeway": config.leeway,
        "store": redact_url(store_url),
        "callbacks": callbacks,
        "callbacks_ok": callbacks_ok,
        "exchanges": stats.exchanges,
        "exchange_attempts": stats.exchange_attempts,
        "api_calls": counts["calls"],
        "api_calls_at_provider": stats.api_calls,
        "api_ok": counts["ok"],
        "api_401_answered": stats.api_unauthorized,
        "api_401_seen_by_callers": counts["unauthorized"],
        "api_other_status": counts["other"],
        "refresh_attempts": stats.refresh_attempts,
        "refreshes": stats.refreshes,
        "refreshes_by_workers": counts["refreshes"],
        "generations": distinct,
        "ideal_refreshes": ideal,
        "expected_refreshes_from_time": round(len(tenants) * config.duration / config.refresh_interval),
        "invalid_grant": stats.invalid_grant,
        "families_revoked": stats.families_revoked,
        "tenants_needing_reauth": reauth,
        "caller_errors": dict(errors),
        "workers_crashed": len(workers["crashed"]),
        "access_token_p50_ms": _percentile(token_latency, 50) * 1000,
        "access_token_p99_ms": _percentile(token_latency, 99) * 1000,
        "api_p50_ms": _percentile(api_latency, 50) * 1000,
        "api_p99_ms": _percentile(api_latency, 99) * 1000,
    }
    checks = {
        "every callback answered 200": callbacks_ok == callbacks,
        "one exchange per company": stats.exchanges == len(tenants) == stats.exchange_attempts,
        "refresh requests == ideal": stats.refresh_attempts == ideal,
        "refreshes == ideal": stats.refreshes == ideal,
        "refreshes by workers == refreshes": counts["refreshes"] == stats.refreshes,
        "zero invalid_grant": stats.invalid_grant == 0,
        "zero families revoked": stats.families_revoked == 0,
        "zero tenants needing re-authorization": reauth == 0 and len(infos) == len(tenants),
        "zero 401 seen by callers": counts["unauthorized"] == 0,
        "zero caller errors": not errors and counts["other"] == 0,
        "no worker crashed": not workers["crashed"] and len(done) == config.workers,
        "callers made API calls": counts["calls"] > 0,
    }
    broken = tuple(name for name, held in checks.items() if not held)
    values["worker_crashes"] = dict(sorted(workers["crashed"].items()))
    values["broken"] = list(broken)
    values["ok"] = not broken
    return DemoResult(values, broken)


def render(result: DemoResult, console: Console) -> None:
    """Print the result table and the verdict."""
    from rich.table import Table

    v = result.values
    table = Table(title="factorial-tokens demo", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("ideal", justify="right")
    table.add_column("", justify="center")

    def row(name: str, value: object, ideal: object = "", held: bool | None = None) -> None:
        mark = "" if held is None else ("[green]ok[/green]" if held else "[red]BROKEN[/red]")
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value), str(ideal), mark)

    t = v["tenants"]
    row("companies connected", t - v["tenants_needing_reauth"], t, v["tenants_needing_reauth"] == 0)
    row("callbacks (each sent twice)", v["callbacks_ok"], v["callbacks"], v["callbacks_ok"] == v["callbacks"])
    row("exchanges", v["exchanges"], t, v["exchanges"] == t == v["exchange_attempts"])
    row("API calls by callers", v["api_calls"])
    row("API 401 answered (retried in client)", v["api_401_answered"])
    row("API 401 seen by callers", v["api_401_seen_by_callers"], 0, v["api_401_seen_by_callers"] == 0)
    row("token generations (distinct)", v["generations"])
    ideal = v["ideal_refreshes"]
    row("refresh requests", v["refresh_attempts"], ideal, v["refresh_attempts"] == ideal)
    row("refreshes", v["refreshes"], ideal, v["refreshes"] == ideal)
    row("  expected from time (approx.)", f"~{v['expected_refreshes_from_time']}")
    row("invalid_grant", v["invalid_grant"], 0, v["invalid_grant"] == 0)
    row("families revoked", v["families_revoked"], 0, v["families_revoked"] == 0)
    row("re-authorizations needed", v["tenants_needing_reauth"], 0, v["tenants_needing_reauth"] == 0)
    errors = sum(v["caller_errors"].values()) + v["api_other_status"]
    row("caller errors", errors, 0, errors == 0)
    row("workers crashed", v["workers_crashed"], 0, v["workers_crashed"] == 0)
    row("access_token p50 / p99", f"{v['access_token_p50_ms']:.3f} / {v['access_token_p99_ms']:.1f} ms")
    row("API call p50 / p99", f"{v['api_p50_ms']:.1f} / {v['api_p99_ms']:.1f} ms")
    console.print(table)
    console.print(
        f"{v['tenants']} companies, {v['workers']} processes x {v['tasks']} tasks, {v['duration']:g} s, "
        f"tokens live {v['token_ttl']:g} s (refresh {v['leeway']:g} s early); store {v['store']}",
        highlight=False,
    )
    if result.ok:
        console.print("[green]All guarantees held.[/green]")
    else:
        console.print("[red]Guarantees broken:[/red] " + "; ".join(result.broken))
        if v["caller_errors"]:
            console.print(f"caller errors: {v['caller_errors']}", highlight=False)
        for index, reason in v["worker_crashes"].items():
            console.print(f"worker {index}: {reason}", highlight=False)


def run_demo(config: DemoConfig, console: Console) -> DemoResult:
    """Run the demo (blocking); shows progress on ``console``. Raises ConfigurationError."""
    config.check()
    live = _Live(console, config)
    started = time.monotonic()
    result = asyncio.run(_run(config, live))
    result.values["wall_seconds"] = round(time.monotonic() - started, 1)
    return result
