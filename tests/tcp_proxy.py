"""A small TCP proxy for tests: sits between a client and Redis/Postgres and loses replies.

``drop_reply(n)`` arms it: the reply to the ``n``-th request (client-to-server write)
from then on is swallowed *after the server executed the request*, and that connection is
closed (the client sees a dropped connection, and a retrying client resends); with
``stall=True`` the connection stays open and silent instead (the client waits for its own
timeout). Everything else is forwarded unchanged. ``dropped`` counts swallowed replies.
``hold(marker)`` holds back a request containing ``marker`` (and whatever follows it on that
connection) until ``release()``: the server sees it late (a slow first subscription).
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["TcpProxy"]


class _Link:
    __slots__ = ("dead", "drop_next", "held", "stall")

    def __init__(self) -> None:
        self.drop_next = False
        self.stall = False
        self.held = False
        self.dead = False


class TcpProxy:
    """Forwards ``127.0.0.1:self.port`` to ``host:port``. Use as ``async with``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.dropped = 0
        self.requests = 0
        self._countdown: int | None = None
        self._stall = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._marker: bytes | None = None
        self._released = asyncio.Event()
        self._links: set[_Link] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def drop_reply(self, nth: int, *, stall: bool = False) -> None:
        """Lose the reply to the ``nth`` request from now on (1 = the next one)."""
        self._countdown, self._stall = nth, stall

    def hold(self, marker: bytes) -> None:
        """Hold back each request containing ``marker`` (and what follows it on its
        connection) until :meth:`release`."""
        self._marker = marker
        self._released.clear()

    def release(self) -> None:
        """Let held requests through; hold nothing more."""
        self._marker = None
        self._released.set()

    def blackhole(self) -> None:
        """Every connection open now goes silent both ways, yet stays open (a NAT or load
        balancer that dropped an idle flow): nothing is forwarded, nothing is closed.
        Connections made afterwards work."""
        for link in self._links:
            link.dead = True

    def disarm(self) -> None:
        """Forget an armed drop that has not happened yet."""
        self._countdown = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        link = _Link()
        self._links.add(link)
        self._writers |= {writer, up_writer}
        for coro in (self._requests(reader, up_writer, link), self._replies(up_reader, writer, link)):
            task = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _requests(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while data := await src.read(65536):
                self.requests += 1
                if self._countdown is not None:
                    self._countdown -= 1
                    if self._countdown == 0:
                        link.drop_next, link.stall = True, self._stall
                        self._countdown = None
                if link.held or (self._marker is not None and self._marker in data):
                    link.held = True
                    await self._released.wait()
                if link.dead:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.close()

    async def _replies(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while data := await src.read(65536):
                if link.drop_next:
                    link.drop_next = False
                    self.dropped += 1
                    if link.stall:
                        while await src.read(65536):
                            pass  # silent: the client waits for its own timeout
                    break
                if link.dead:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.close()
