"""Shared fixtures: a strict FakeFactorial, an app pointed at it, a manager on it, and a
fresh store of every kind in the table of stores (``tests/stores``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from factorial_tokens import FactorialApp, TokenManager
from factorial_tokens._oauth import OAuthClient
from factorial_tokens.testing import FakeFactorial, RefreshMode

from .stores import STORES, Backend, open_backend

CLIENT_ID = "app-client-id"
CLIENT_SECRET = "app-client-secret-4f9d2b7e1c"
REDIRECT_URI = "http://127.0.0.1:8765/oauth/callback"

SimFactory = Callable[..., contextlib.AbstractAsyncContextManager[FakeFactorial]]


@pytest.fixture
def make_sim() -> SimFactory:
    """Build a simulator registered for the test app; strict by default."""

    @contextlib.asynccontextmanager
    async def factory(**options: Any) -> AsyncIterator[FakeFactorial]:
        options.setdefault("refresh_mode", RefreshMode.REVOKE_AT_REFRESH)
        options.setdefault("reuse_detection", True)
        async with FakeFactorial(
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI, **options
        ) as sim:
            yield sim

    return factory


@pytest.fixture
async def sim(make_sim: SimFactory) -> AsyncIterator[FakeFactorial]:
    """The strictest simulator: revoke at refresh, reuse detection, one-hour tokens."""
    async with make_sim(access_token_ttl=3600) as simulator:
        yield simulator


def app_for(sim: FakeFactorial | str, **options: Any) -> FactorialApp:
    """The test app, pointed at ``sim`` (or at a base URL)."""
    return FactorialApp(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        base_url=sim if isinstance(sim, str) else sim.base_url,
        **options,
    )


@pytest.fixture
def app(sim: FakeFactorial) -> FactorialApp:
    return app_for(sim)


@pytest.fixture
async def tm(app: FactorialApp) -> AsyncIterator[TokenManager]:
    """A manager on a memory store, with short budgets so failures surface fast."""
    async with TokenManager(app, "memory://", lease_ttl=6.0, provider_timeout=2.0) as manager:
        yield manager


@pytest.fixture(params=list(STORES))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh store of each kind in ``tests/stores.STORES``: the test runs once per kind
    (``@pytest.mark.parametrize("backend", ["memory"], indirect=True)`` narrows it)."""
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


#: Multi-process storms (worker processes at once, each loading both cores) by node id prefix.
STORMS = (
    "tests/test_multiprocess.py::",
    "tests/test_telemetry.py::test_counts_from_worker_processes_add_up_to_the_simulators",
    "tests/test_cli.py::test_demo_holds_every_guarantee",
    "tests/stores/test_postgres.py::test_eight_processes_start_at_once_on_an_empty_schema",
    "tests/stores/test_sqlite.py::test_eight_processes_create_the_schema_at_once",
)
#: Modules whose module-scoped fixtures start something costly (wheel builds, a Redis Cluster,
#: a PgBouncer): under pytest-xdist each stays on one worker, so it starts once.
ONE_WORKER_MODULES = (
    "tests/test_packaging.py",
    "tests/stores/test_redis.py",
    "tests/stores/test_pgbouncer.py",
    "tests/stores/test_postgres.py",
)


def xdist_scope(nodeid: str) -> str:
    """The unit pytest-xdist hands to one worker: all storms together (so two never run at
    once), a module of :data:`ONE_WORKER_MODULES`, else the test alone."""
    if nodeid.startswith(STORMS):
        return "storms"
    module = nodeid.split("::", 1)[0]
    return module if module in ONE_WORKER_MODULES else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``pytest -n N`` (``make test``) schedules by :func:`xdist_scope`. (pytest-xdist's own
    ``--dist loadgroup`` cannot be used: it renames node ids, which pytest 9 ignores.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class StormScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return StormScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Storms first: the longest unit of work must not start last."""
    items.sort(key=lambda item: xdist_scope(item.nodeid) != "storms")


ThreadSimFactory = Callable[..., contextlib.AbstractContextManager[FakeFactorial]]


@pytest.fixture
def make_thread_sim() -> ThreadSimFactory:
    """Like ``make_sim``, but served from its own thread: for tests of blocking code."""

    @contextlib.contextmanager
    def factory(**options: Any) -> Iterator[FakeFactorial]:
        options.setdefault("refresh_mode", RefreshMode.REVOKE_AT_REFRESH)
        options.setdefault("reuse_detection", True)
        options.setdefault("access_token_ttl", 3600)
        sim = FakeFactorial(
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI, **options
        )
        with sim.serve_in_thread():
            yield sim

    return factory


@pytest.fixture
async def raw_server() -> AsyncIterator[Any]:
    """A tiny HTTP server whose /oauth/token handler each test sets."""
    holder: dict[str, Any] = {}

    async def token(request: web.Request) -> web.StreamResponse:
        result: web.StreamResponse = await holder["handler"](request)
        return result

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    holder["base_url"] = f"http://127.0.0.1:{port}"
    try:
        yield holder
    finally:
        await runner.cleanup()


def oauth_client(base_url: str) -> OAuthClient:
    """An OAuth client of the test app, pointed at ``base_url``."""
    return OAuthClient(app_for(base_url), timeout=5.0)
