"""Store wrappers that behave as real clients and races do, around a real store.

``ReplayingStore`` runs every primitive twice and answers with the second run, as a
client that resends a command after its reply was lost (redis-py's retries, a proxy).
``HookedStore`` runs a test's coroutine just before a chosen primitive, to place another
worker's step exactly in a race window.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from factorial_tokens.store import Store

PRIMITIVES = ("read", "acquire", "extend", "release", "commit", "replace", "claim_code", "advance_code")


class ReplayingStore:
    """Forwards to ``inner``; each primitive runs twice, the second answer is returned."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name not in PRIMITIVES:
            return target

        async def twice(*args: Any, **kwargs: Any) -> Any:
            await target(*args, **kwargs)
            return await target(*args, **kwargs)

        return twice


class HookedStore:
    """Forwards to ``inner``; ``hooks[name](*args)`` is awaited before primitive ``name``."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.hooks: dict[str, Callable[..., Awaitable[None]]] = {}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name not in PRIMITIVES:
            return target

        async def hooked(*args: Any, **kwargs: Any) -> Any:
            hook = self.hooks.get(name)
            if hook is not None:
                await hook(*args, **kwargs)
            return await target(*args, **kwargs)

        return hooked
