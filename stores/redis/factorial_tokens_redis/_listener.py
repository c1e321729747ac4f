"""One pub/sub subscription per store feeding the core's Notifier.

Every script that changes a tenant publishes ``"<digest> <origin>"`` on the prefix's one
channel. The reconnect/backoff, first-try gate, own-echo filter and ``notify_all`` after
a reconnect are :class:`~factorial_tokens.store.PushListener`'s; this module only speaks
redis-py's pub/sub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from factorial_tokens.store import Notifier, PushListener

log = logging.getLogger("factorial_tokens.redis")

#: A subscription silent this long (seconds) is sent a PING ...
_PING_AFTER = 5.0
#: ... and given up if no answer comes within this.
_PONG_WAIT = 5.0

#: Builds a fresh pub/sub object (on the server, or on one node of a cluster).
PubSubFactory = Callable[[], Awaitable[Any]]


class Listener(PushListener):
    """The store's single subscription to its change channel."""

    def __init__(self, notifier: Notifier, channel: str, origin: str, pubsub: PubSubFactory) -> None:
        super().__init__(notifier, name="redis", log=log, origin=origin, backoff=(0.05, 1.0))
        self._channel = channel
        self._pubsub = pubsub

    async def listen(self, connected: Callable[[], None]) -> None:
        """Subscribe, confirm, then deliver messages until the connection fails."""
        me = asyncio.current_task()
        pubsub: Any = None
        try:
            pubsub = await self._pubsub()
            await pubsub.subscribe(self._channel)
            await self._confirmed(pubsub)
            connected()
            # Announcements are read straight from the subscribed connection, in windows of
            # a second under one timer: redis-py's get_message costs several times the parse
            # per message (a retry wrapper, a timer, a dict), and every process reads every
            # announcement, its own included.
            connection = pubsub.connection
            loop = asyncio.get_running_loop()
            heard = loop.time()  # when the connection last said anything
            pinged: float | None = None
            while not self.stopping:
                # redis-py can swallow a cancellation that lands inside a read; the
                # window's end and these checks end the loop regardless.
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError
                # A flow dropped in between (a NAT's or a balancer's idle timeout) says
                # nothing: a quiet subscription is asked for a PONG, and one that gives
                # none is given up (the resubscription tells every watcher to read again).
                if pinged is not None and loop.time() - pinged > _PONG_WAIT:
                    raise RedisError("the subscription answered no PING")
                if pinged is None and loop.time() - heard >= _PING_AFTER:
                    # Not through redis-py's health check, which expects a plain PONG.
                    await connection.send_command("PING", check_health=False)
                    pinged = loop.time()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        while not self.stopping:
                            reply = await connection.read_response(
                                timeout=math.inf, disconnect_on_error=False, push_request=True
                            )
                            heard, pinged = loop.time(), None
                            if isinstance(reply, list) and reply[0] == b"message":  # [kind, channel, data]
                                self.deliver(reply[2])
        finally:
            if pubsub is not None:
                await _close_quietly(pubsub.aclose())

    async def _confirmed(self, pubsub: Any) -> None:
        """Read until the server confirmed the subscription (so nothing after it is missed)."""
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=5.0)
            if message is None:
                raise RedisError("no subscription confirmation")
            if message.get("type") == "subscribe":
                return
            if message.get("type") == "message":
                self.deliver(message["data"])


async def _close_quietly(closing: Awaitable[Any]) -> None:
    with contextlib.suppress(RedisError, OSError, RuntimeError):
        await asyncio.shield(closing)
