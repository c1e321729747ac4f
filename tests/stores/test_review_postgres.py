"""Review of the Postgres store fixes (aa4ade1): failing reproductions, real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from factorial_tokens_postgres import PostgresStore

from factorial_tokens import FactorialTokensError

from .. import postgres_server
from ..postgres_server import store_url


@pytest.fixture(scope="module")
def base_url() -> str:
    return postgres_server.server_url()


@contextlib.asynccontextmanager
async def _flaky_front(host: str, port: int, drop_first: int) -> AsyncIterator[dict[str, int]]:
    """Forwards to host:port, except that the first ``drop_first`` connections are closed
    as soon as they are accepted (a database restarting, a load balancer's hiccup)."""
    seen = {"connections": 0, "port": 0}
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        writers.append(writer)
        if seen["connections"] <= drop_first:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(host, port)
        writers.append(up_writer)
        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.get_running_loop().create_task(coro)
            tasks.add(task)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    seen["port"] = server.sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        server.close()
        for writer in writers:
            writer.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_calls_queued_behind_an_opening_that_is_retried_are_not_failed(base_url: str) -> None:
    """The first connection the store opens is dropped (a transient, retryable failure):
    the call that opens the store retries it and succeeds, but every call queued behind
    it on the init lock is handed the opener's first failure (``_open_failed``) as a
    StoreUnavailable, which _call does not retry, although the database answers."""
    parts = urlsplit(base_url)
    async with _flaky_front(parts.hostname or "127.0.0.1", parts.port or 5432, drop_first=1) as front:
        proxied = base_url.replace(
            parts.netloc, f"{parts.username + '@' if parts.username else ''}127.0.0.1:{front['port']}"
        )
        store = PostgresStore.from_url(store_url(proxied, sslmode="disable"))
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(store.check() for _ in range(4)), return_exceptions=True), 30.0
            )
        finally:
            await store.aclose()
    failed = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    assert not failed, f"{len(failed)} of 4 concurrent first calls failed: {failed[0]}"


@pytest.mark.parametrize(
    "dsn",
    [
        # A password with an unescaped '@' then '#' or '?': urllib takes what lies between
        # them for the host, and _where() shows it ("at s3cretpiece:5432/?").
        "postgresql://postgres:abc@s3cretpiece#x@127.0.0.1/test",
        "postgresql://postgres:abc@s3cretpiece?x@127.0.0.1/test",
        # An unescaped '?' early in the password: asyncpg's ValueError, untyped, quotes the
        # rest of the password ("bad query field: 'cdefgh5ecret@127.0.0.1/test'").
        "postgresql://postgres:ab?cdefgh5ecret@127.0.0.1/test",
        # An unclosed '[': PostgresStore's new keyword-form check calls urlsplit itself,
        # and its ValueError escapes the constructor untyped (store_from_url maps it).
        "postgresql://postgres:pw-s3cretpiece@[::1:5432/test",
    ],
)
@pytest.mark.parametrize("via", ["dsn", "url"])
async def test_a_mangled_password_never_reaches_an_error(dsn: str, via: str) -> None:
    with pytest.raises(FactorialTokensError) as caught:
        store = (
            PostgresStore(dsn=dsn, connect_timeout=1.0, acquire_timeout=2.0)
            if via == "dsn"
            else PostgresStore.from_url(dsn + ("&" if "?" in dsn else "?") + "connect_timeout=1")
        )
        try:
            await asyncio.wait_for(store.check(), 20.0)
        finally:
            await store.aclose()
    text = f"{caught.value} {caught.value!r}"
    assert "s3cretpiece" not in text and "cdefgh5ecret" not in text, text
