"""factorial_tokens.store, the kit for store authors: its names, the scheme registry and
its install hints, URL options, and what the top-level namespace no longer carries."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import importlib.metadata
import logging
import pkgutil
from collections.abc import Callable
from typing import Any

import pytest

import factorial_tokens
import factorial_tokens.store
from factorial_tokens import ConfigurationError, StoreUnavailable
from factorial_tokens.store import (
    Batcher,
    MemoryStore,
    Notifier,
    PushListener,
    SQLiteStore,
    TenantKey,
    choice,
    flag,
    known_schemes,
    seconds,
    store_from_url,
    url_options,
)
from factorial_tokens.store import _registry as registry

KIT = factorial_tokens.store


def test_the_kit_exports_every_public_name_of_its_modules() -> None:
    names = KIT.__all__
    assert names == sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    for name in names:
        assert getattr(KIT, name) is not None
    for info in pkgutil.iter_modules(KIT.__path__):
        module = importlib.import_module(f"factorial_tokens.store.{info.name}")
        missing = set(getattr(module, "__all__", ())) - set(names) - {"HINT_GROUP", "STORE_GROUP"}
        assert not missing, f"factorial_tokens.store.{info.name} exports {missing} but the kit does not"


def test_store_author_names_are_not_in_the_top_level() -> None:
    for name in ("Store", "Lease", "Notifier", "MemoryStore", "SQLiteStore", "store_from_url", "Record"):
        assert name not in factorial_tokens.__all__


def test_builtin_schemes() -> None:
    assert {"memory", "sqlite"} <= set(known_schemes())
    assert isinstance(store_from_url("memory://"), MemoryStore)
    assert isinstance(store_from_url("SQLite:///x.db"), SQLiteStore)


def test_every_plugin_scheme_has_an_install_hint() -> None:
    hints = {ep.name for ep in importlib.metadata.entry_points(group=registry.HINT_GROUP)}
    plugins = {
        ep.name
        for ep in importlib.metadata.entry_points(group=registry.STORE_GROUP)
        if not ep.value.startswith("factorial_tokens.")
    }
    assert (
        plugins == hints == {"redis", "rediss", "redis+cluster", "rediss+cluster", "postgresql", "postgres"}
    )


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigurationError, match=r"no token store for mongodb:// \(known: .*memory://"
    ) as info:
        store_from_url("mongodb://x")
    assert "pip install" not in str(info.value)
    with pytest.raises(ConfigurationError, match="needs a scheme"):
        store_from_url("tokens.db")


def _without_plugin(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """As if ``module``'s distribution were not installed: its store entry points vanish."""
    real = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        found = real(**params)
        if params.get("group") == registry.STORE_GROUP:
            return [ep for ep in found if ep.module != module]
        return found

    monkeypatch.setattr(registry, "entry_points", entry_points)


@pytest.mark.parametrize(
    ("scheme", "extra"),
    [("rediss+cluster", "redis"), ("redis", "redis"), ("postgres", "postgres")],
)
def test_a_missing_plugin_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, scheme: str, extra: str
) -> None:
    _without_plugin(monkeypatch, f"factorial_tokens_{extra}")
    with pytest.raises(ConfigurationError) as info:
        store_from_url(f"{scheme}://127.0.0.1:1/0")
    message = str(info.value)
    assert f"no token store for {scheme}://" in message
    assert f"pip install 'factorial-tokens[{extra}]' for {scheme}://" in message


def test_a_plugin_that_cannot_be_imported_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint("redis", "factorial_tokens_nosuch:Store", registry.STORE_GROUP)

    def entry_points(**params: Any) -> Any:
        if params.get("group") == registry.STORE_GROUP and params.get("name") == "redis":
            return [broken]
        return real(**params)

    monkeypatch.setattr(registry, "entry_points", entry_points)
    with pytest.raises(
        ConfigurationError, match=r"cannot be imported: .*pip install 'factorial-tokens\[redis\]'"
    ):
        store_from_url("redis://127.0.0.1:1/0")


def test_url_options() -> None:
    options, rest = url_options(
        "x://h/db?poll=0.5&on=yes&mode=FULL&sslmode=require",
        {"poll": seconds, "on": flag, "mode": choice("normal", "full")},
        store="x",
        rest=True,
        rename={"poll": "poll_interval"},
    )
    assert options == {"poll_interval": 0.5, "on": True, "mode": "full"}
    assert rest == "x://h/db?sslmode=require"
    with pytest.raises(ConfigurationError, match=r"unknown x store option 'sslmode' \(known: on, poll\)"):
        url_options("x://h?sslmode=1", {"poll": seconds, "on": flag}, store="x")
    for bad, message in (("poll=soon", "number of seconds"), ("on=maybe", "true or false")):
        with pytest.raises(ConfigurationError, match=message):
            url_options(f"x://h?{bad}", {"poll": seconds, "on": flag}, store="x")


# -- Notifier: the watches every store hands out -----------------------------------------


async def test_a_watch_remembers_a_change_announced_before_it_waits() -> None:
    notifier = Notifier()
    key = TenantKey("app", "acme")
    async with notifier.watch(key) as watch:
        notifier.notify(key.digest)
        assert await watch.wait(0)  # announced before the wait: no waiting
        assert not await watch.wait(0.01)  # consumed: the next wait times out
        waiting = asyncio.ensure_future(watch.wait(10))
        await asyncio.sleep(0)
        notifier.notify(TenantKey("app", "other").digest)  # another tenant's change
        await asyncio.sleep(0)
        assert not waiting.done()
        notifier.notify(key.digest)
        assert await asyncio.wait_for(waiting, 1)
    assert not notifier.watching


async def test_a_cancelled_wait_leaves_the_watch_usable() -> None:
    notifier = Notifier()
    key = TenantKey("app", "acme")
    async with notifier.watch(key) as watch:
        waiting = asyncio.ensure_future(watch.wait(10))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        notifier.notify(key.digest)
        assert await watch.wait(0)


async def test_a_watch_whose_ready_step_fails_is_not_left_registered() -> None:
    notifier = Notifier()
    seen: list[bool] = []

    async def ready() -> None:
        seen.append(notifier.watching)  # registered before the step runs
        raise StoreUnavailable("the subscription did not start")

    with pytest.raises(StoreUnavailable):
        async with notifier.watch(TenantKey("app", "acme"), ready):
            pass
    assert seen == [True] and not notifier.watching


class _Subscribing(PushListener):
    """Subscribes at once, then delivers nothing until stopped."""

    async def listen(self, connected: Callable[[], None]) -> None:
        connected()
        while not self.stopping:
            await asyncio.sleep(0.01)


def test_a_listener_is_settled_once_its_first_attempt_finished_on_the_running_loop() -> None:
    """``settled``: a watch can skip waiting for the subscription (the Redis store does)."""
    listener = _Subscribing(Notifier(), name="test", log=logging.getLogger("test"))

    async def first_loop() -> None:
        assert not listener.settled  # not started
        listener.start()
        assert not listener.settled  # started, first attempt not finished
        await listener.ready(2.0)
        assert listener.settled

    async def second_loop() -> None:
        assert not listener.settled  # its task ran on a loop that is gone
        listener.start()
        await listener.ready(2.0)
        assert listener.settled
        await listener.aclose()

    asyncio.run(first_loop())
    asyncio.run(second_loop())


class _LeakingCancellation(PushListener):
    """Its first subscription dies with a CancelledError of the driver's own (the listener
    task was not cancelled); the next one holds."""

    attempts = 0

    async def listen(self, connected: Callable[[], None]) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise asyncio.CancelledError  # e.g. a driver's read cut short on a dropped connection
        connected()
        while not self.stopping:
            await asyncio.sleep(0.01)


async def test_a_subscription_that_dies_with_a_stray_cancellation_is_made_again() -> None:
    listener = _LeakingCancellation(
        Notifier(), name="test", log=logging.getLogger("test"), backoff=(0.01, 0.05)
    )
    listener.start()
    for _ in range(300):
        if listener.listening:
            break
        await asyncio.sleep(0.01)
    assert listener.listening and listener.attempts == 2
    await listener.aclose()


# -- Batcher -----------------------------------------------------------------------------


async def test_a_batch_runs_in_no_callers_context() -> None:
    """The batch's work (its log lines among it) carries no one caller's context variables,
    such as the tenant the log fields name."""
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="-")
    seen: list[str] = []

    async def send(items: list[str]) -> list[str]:
        seen.append(tenant.get())
        return [f"answer-{item}" for item in items]

    batcher: Batcher[str, str] = Batcher(send, concurrency=1, size=10, cancelled=StoreUnavailable)

    async def call(item: str) -> str:
        tenant.set(item)
        return await batcher(item)

    assert await asyncio.gather(*(call(i) for i in "abc")) == ["answer-a", "answer-b", "answer-c"]
    assert seen == ["-"]


class _Unrebuildable(Exception):
    """An error whose constructor takes other arguments than its ``args``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code}: {text}")


async def test_a_batch_whose_send_raises_an_error_that_cannot_be_copied_fails_each_caller() -> None:
    """Each caller gets its own copy of a failed batch's error; an error that cannot be
    copied was raised in the drainer instead, and the batch's callers waited forever."""

    async def send(items: list[str]) -> list[str]:
        raise _Unrebuildable(7, "down")

    batcher: Batcher[str, str] = Batcher(send, concurrency=1, size=10, cancelled=StoreUnavailable)
    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(*(batcher(i) for i in "abc"), return_exceptions=True)
    assert all(isinstance(o, _Unrebuildable) and str(o) == "7: down" for o in outcomes), outcomes


async def test_a_batch_whose_orphan_handler_raises_still_answers_its_other_callers() -> None:
    """The handler of a cancelled caller's result raised inside the batch's answering loop:
    the callers after it in the batch were never answered and waited forever."""
    gate = asyncio.Event()

    async def send(items: list[str]) -> list[str]:
        await gate.wait()
        return [f"answer-{item}" for item in items]

    def orphaned(item: str, result: str) -> None:
        raise RuntimeError("the handler failed")

    batcher: Batcher[str, str] = Batcher(
        send, concurrency=1, size=10, cancelled=StoreUnavailable, orphaned=orphaned
    )
    first = asyncio.ensure_future(batcher("a"))
    second = asyncio.ensure_future(batcher("b"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # both left in one batch
    first.cancel()
    gate.set()
    async with asyncio.timeout(5):
        assert await second == "answer-b"
