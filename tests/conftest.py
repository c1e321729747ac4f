"""Shared fixtures: a strict FakeFactorial, an app pointed at it, a manager on it, and a
fresh store of every kind in the table of stores (``tests/stores``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from factorial_tokens import FactorialApp, TokenManager
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


def app_for(sim: FakeFactorial, **options: Any) -> FactorialApp:
    """The test app, pointed at ``sim``."""
    return FactorialApp(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        base_url=sim.base_url,
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


#: Modules whose module-scoped fixtures start something costly (wheel builds, a Redis Cluster,
#: a PgBouncer): under pytest-xdist each stays on one worker, so it starts once.
ONE_WORKER_MODULES = ("test_packaging.py", "test_redis.py", "test_pgbouncer.py", "test_postgres.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for ``make test``'s ``pytest -n N --dist loadgroup``: every ``storm`` in one
    group, so two never run at once (each one loads both cores), and first, so the longest
    group does not start last; see also :data:`ONE_WORKER_MODULES`."""
    for item in items:
        if item.get_closest_marker("storm"):
            item.add_marker(pytest.mark.xdist_group("storms"))
        elif item.path.name in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    items.sort(key=lambda item: item.get_closest_marker("storm") is None)


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
