"""The demo's run: the strict simulator and the connect server on loopback, every company
connected through the real authorization-code flow, then the worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ..._errors import ConfigurationError, FactorialTokensError
from ..._events import EventKind, TokenEvent
from ..._manager import TokenManager
from ..._models import FactorialApp, redact_url
from ...store import store_from_url
from ...web import connect_app
from ._config import DemoConfig, DemoResult, tenant_names
from ._judge import judge
from ._render import Live
from ._worker import READY_TIMEOUT, WorkerSpec, worker_main

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["run_demo"]


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


async def _run(config: DemoConfig, live: Live) -> DemoResult:
    from ...testing import FakeFactorial, RefreshMode

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
    return judge(config, tenants, callbacks, callbacks_ok, exchanged, workers, infos, stats, store_url)


async def _run_workers(
    config: DemoConfig, app: FactorialApp, store_url: str, tenants: list[str], sim: Any, live: Live
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    procs = []
    for index in range(config.workers):
        spec = WorkerSpec(
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
    limit = loop.time() + READY_TIMEOUT

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
                if started is not None and loop.time() > started + config.duration + READY_TIMEOUT:
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


def run_demo(config: DemoConfig, console: Console) -> DemoResult:
    """Run the demo (blocking); shows progress on ``console``. Raises ConfigurationError."""
    config.check()
    live = Live(console, config)
    started = time.monotonic()
    result = asyncio.run(_run(config, live))
    result.values["wall_seconds"] = round(time.monotonic() - started, 1)
    return result
