"""One pub/sub subscription per store feeding the core's Notifier.

Every script that changes a tenant publishes ``"<digest> <origin>"`` on the prefix's one
channel. The listener task subscribes once, lazily (on the first ``watch`` or
``on_change``), and hands each digest to the :class:`~factorial_tokens.Notifier`. The
store notifies its own writes locally at once, so messages carrying its own ``origin`` are
skipped (they would only drop the cache entry the manager just filled).

A lost connection is retried with a jittered backoff; once resubscribed the listener
calls ``notify_all()``, because announcements may have been lost meanwhile. The
Notifier's jittered poll bounds every wait in the meantime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from factorial_tokens import Notifier

log = logging.getLogger("factorial_tokens.redis")

#: Builds a fresh pub/sub object (on the server, or on one node of a cluster).
PubSubFactory = Callable[[], Awaitable[Any]]


class Listener:
    """The store's single subscription to its change channel."""

    def __init__(self, notifier: Notifier, channel: str, origin: str, pubsub: PubSubFactory) -> None:
        self._notifier = notifier
        self._channel = channel
        self._origin = origin.encode()
        self._pubsub = pubsub
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._failed_once = False
        self._stopping = False
        self.subscriptions = 0  # how many times the subscription was (re)made

    @property
    def started(self) -> bool:
        """True once the listener task runs (it is never started twice)."""
        return self._task is not None

    def start(self) -> None:
        """Start the listener task if it is not running (needs a running loop)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop and self._task.get_loop().is_closed():
            self._task = None  # its loop is gone (a new asyncio.run): start over on this one
            self._ready = asyncio.Event()
        if self._task is None and not self._stopping:
            self._task = loop.create_task(self._run(), name="factorial-tokens-redis")

    async def ready(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the first subscription, unless it already failed.

        Waiting once, at the first watch, keeps an announcement made between the watch
        and its read from being missed. After a failure the poll is the safety net: a
        caller must not be slowed down by an unreachable Redis.
        """
        if self._ready.is_set() or self._failed_once:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)

    async def _run(self) -> None:
        me = asyncio.current_task()
        backoff = 0.05
        while not self._stopping:
            pubsub: Any = None
            try:
                pubsub = await self._pubsub()
                await pubsub.subscribe(self._channel)
                await self._confirmed(pubsub)
                self.subscriptions += 1
                if self.subscriptions > 1 or self._failed_once:
                    self._notifier.notify_all()  # messages may have been lost while away
                self._ready.set()
                backoff = 0.05
                while not self._stopping:
                    # redis-py can swallow a cancellation that lands inside a read; the
                    # short read timeout and these checks end the loop regardless.
                    if me is not None and me.cancelling():
                        raise asyncio.CancelledError
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the listener must outlive any failure: retry
                self._ready.clear()
                self._failed_once = True
                if not self._stopping:
                    log.warning("redis change subscription lost (%s); resubscribing", type(exc).__name__)
            finally:
                if pubsub is not None:
                    await _close_quietly(pubsub.aclose())
            if not self._stopping:
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 1.0)

    async def _confirmed(self, pubsub: Any) -> None:
        """Read until the server confirmed the subscription (so nothing after it is missed)."""
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=5.0)
            if message is None:
                raise RedisError("no subscription confirmation")
            if message.get("type") == "subscribe":
                return
            if message.get("type") == "message":
                self._deliver(message["data"])

    def _deliver(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        digest, _, origin = raw.partition(b" ")
        if origin == self._origin:
            return
        self._notifier.notify(digest.decode("ascii", "replace"))

    async def aclose(self) -> None:
        """Stop the listener task and drop its connection."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5.0)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: it was logged already


async def _close_quietly(closing: Awaitable[Any]) -> None:
    with contextlib.suppress(RedisError, OSError, RuntimeError):
        await asyncio.shield(closing)
