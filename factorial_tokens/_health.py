"""Health of a worker: does its store answer, when did Factorial last answer.

:func:`check_health` is what :meth:`TokenManager.health` returns and what the ``serve``
command's ``/healthz`` and ``/readyz`` answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import attrs

from ._errors import FactorialTokensError
from .store import Store

__all__ = ["Health"]


@attrs.frozen
class Health:
    """A worker's health at ``checked_at``.

    ``healthy``: the store answered ``check()`` within the timeout. ``ready``: healthy and
    the manager is open (subscribed to the store's announcements). ``store_error``: why the
    store did not answer. ``provider_last_answer_age``: seconds since Factorial last
    answered an HTTP request of this process (any status), ``None`` if it never did:
    informational, since an idle worker sends nothing.
    """

    healthy: bool
    ready: bool
    store: str
    store_latency: float | None
    store_error: str | None
    provider_last_answer_age: float | None
    checked_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return attrs.asdict(self)


async def check_health(
    backend: Store, *, store: str, open: bool, last_answer_at: float | None, timeout: float = 1.0
) -> Health:
    """Check that ``backend`` answers within ``timeout`` seconds (``store`` names it);
    an unhealthy store is reported, never raised."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    error: str | None = None
    try:
        async with asyncio.timeout(timeout):
            await backend.check()
    except TimeoutError:
        error = f"no answer within {timeout:g}s"
    except FactorialTokensError as exc:
        error = f"{type(exc).__name__}: {exc}"
    latency = loop.time() - started
    now = time.time()
    healthy = error is None
    return Health(
        healthy=healthy,
        ready=healthy and open,
        store=store,
        store_latency=latency if healthy else None,
        store_error=error,
        provider_last_answer_age=None if last_answer_at is None else max(now - last_answer_at, 0.0),
        checked_at=now,
    )
