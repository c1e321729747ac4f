"""Scripted faults (:class:`Fault`, queued with ``FakeFactorial.inject``) and the rate
limiter: the ways the simulated provider misbehaves, and what each one answers."""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from typing import Any, Final

import attrs
from aiohttp import web

from ._stats import Counters
from ._wire import NO_STORE, drop, format_seconds, json_response

__all__ = ["ENDPOINTS", "PRE_FAULTS", "Fault", "FaultQueue", "QueuedFault", "RateLimiter", "fault_response"]


class Fault(enum.Enum):
    """A scripted fault, consumed by the next matching request (see ``inject``).

    ``HTTP_5xx``, ``HTML_ERROR``, ``RATE_LIMITED``, ``HTML_200``, ``MALFORMED_JSON``,
    ``MISSING_FIELDS`` and ``DROP_BEFORE`` answer *before* the request is processed:
    nothing is consumed or rotated. ``DROP_AFTER`` and ``SLOW`` process the request fully
    (a code is consumed, a refresh token rotated, and it is counted) and then drop the
    connection, or answer only after ``delay`` seconds: the "in doubt" cases.

    A dropped connection reaches an aiohttp client as ``ServerDisconnectedError`` (a
    ``ClientConnectionError``). Note that aiohttp silently retries an idempotent request
    (GET: the API and authorize endpoints) once after a disconnect, so a drop on those
    reaches the caller only with ``times=2``; POSTs (token, revoke) are never retried.
    """

    HTTP_500 = "http_500"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    HTTP_504 = "http_504"
    #: A proxy's HTML error page with status 502.
    HTML_ERROR = "html_error"
    #: 429 with a ``Retry-After`` header.
    RATE_LIMITED = "rate_limited"
    #: Status 200 with an HTML body (a login page, a captive portal).
    HTML_200 = "html_200"
    #: Status 200, ``application/json``, truncated JSON.
    MALFORMED_JSON = "malformed_json"
    #: Status 200 with JSON lacking the expected fields (no ``access_token``).
    MISSING_FIELDS = "missing_fields"
    #: Close the connection without an answer; the request is not processed.
    DROP_BEFORE = "drop_before"
    #: Process the request fully, then close the connection without an answer.
    DROP_AFTER = "drop_after"
    #: Process the request fully, then wait ``delay`` seconds before answering.
    SLOW = "slow"


PRE_FAULTS: Final = frozenset(
    {
        Fault.HTTP_500,
        Fault.HTTP_502,
        Fault.HTTP_503,
        Fault.HTTP_504,
        Fault.HTML_ERROR,
        Fault.RATE_LIMITED,
        Fault.HTML_200,
        Fault.MALFORMED_JSON,
        Fault.MISSING_FIELDS,
        Fault.DROP_BEFORE,
    }
)

#: Endpoint families accepted by ``FakeFactorial.inject``.
ENDPOINTS: Final = ("token", "revoke", "api", "authorize")


@attrs.frozen
class QueuedFault:
    """One injected fault, waiting for its request."""

    fault: Fault
    retry_after: float
    delay: float


class FaultQueue:
    """The injected faults of each endpoint family, served in order (not thread-safe:
    the simulator holds its lock)."""

    def __init__(self, counters: Counters) -> None:
        self._c = counters
        self._faults: dict[str, deque[QueuedFault]] = {e: deque() for e in ENDPOINTS}

    @staticmethod
    def make(fault: Fault, times: int, endpoint: str, retry_after: float, delay: float) -> list[QueuedFault]:
        """``times`` queued copies of ``fault``; ValueError on a bad argument (see ``inject``)."""
        if not isinstance(fault, Fault):
            raise ValueError(f"fault must be a Fault, not {fault!r}")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
        if times < 1:
            raise ValueError("times must be >= 1")
        if retry_after < 0 or delay < 0:
            raise ValueError("retry_after and delay must be >= 0")
        return [QueuedFault(fault, float(retry_after), float(delay))] * times

    def add(self, endpoint: str, queued: list[QueuedFault]) -> None:
        """Queue faults for ``endpoint``."""
        self._faults[endpoint].extend(queued)

    def pending(self, endpoint: str | None) -> int:
        """How many faults are still queued (for one endpoint family or all)."""
        if endpoint is None:
            return sum(len(q) for q in self._faults.values())
        return len(self._faults[endpoint])

    def clear(self) -> None:
        """Drop every queued fault."""
        for queue in self._faults.values():
            queue.clear()

    def take(self, endpoint: str) -> QueuedFault | None:
        """The next fault for ``endpoint``, counted as served; None when none is queued."""
        if not self._faults[endpoint]:
            return None
        queued = self._faults[endpoint].popleft()
        self._c.faults_injected += 1
        self._c.faults_by_kind[queued.fault.name] += 1
        return queued


class RateLimiter:
    """POSTs per rolling window per endpoint family (``token``, ``revoke``); the limit and
    the window are read from the simulator at every request (not thread-safe)."""

    def __init__(self, counters: Counters) -> None:
        self._c = counters
        self._rate_windows: dict[str, deque[float]] = {"token": deque(), "revoke": deque()}

    def check(self, endpoint: str, limit: int | None, span: float) -> float | None:
        """Record a POST; return seconds to wait if over the limit (locked)."""
        window = self._rate_windows.get(endpoint)
        if limit is None or window is None:
            return None
        now = time.monotonic()
        while window and now - window[0] >= span:
            window.popleft()
        if len(window) >= limit:
            self._c.rate_limited += 1
            return max(1.0, math.ceil(span - (now - window[0])))
        window.append(now)
        return None


def fault_response(request: web.Request, endpoint: str, queued: QueuedFault) -> web.StreamResponse:
    """The answer of a fault served before the request is processed (``PRE_FAULTS``)."""
    fault = queued.fault
    if fault in (Fault.HTTP_500, Fault.HTTP_502, Fault.HTTP_503, Fault.HTTP_504):
        status = int(fault.name.removeprefix("HTTP_"))
        return json_response(status, {"error": "server_error", "error_description": fault.name})
    if fault is Fault.HTML_ERROR:
        return web.Response(
            status=502,
            text="<html><head><title>502 Bad Gateway</title></head><body>"
            "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center>"
            "</body></html>",
            content_type="text/html",
        )
    if fault is Fault.RATE_LIMITED:
        return json_response(
            429,
            {"error": "too_many_requests", "error_description": "Rate limit exceeded"},
            headers={"Retry-After": format_seconds(queued.retry_after)},
        )
    if fault is Fault.HTML_200:
        return web.Response(
            status=200,
            text="<!DOCTYPE html><html><body><h1>Sign in to Factorial</h1></body></html>",
            content_type="text/html",
        )
    if fault is Fault.MALFORMED_JSON:
        return web.Response(
            status=200,
            text='{"access_token": "0123456789abcdef", "token_type": "Bea',
            content_type="application/json",
        )
    if fault is Fault.MISSING_FIELDS:
        bodies: dict[str, dict[str, Any]] = {
            "token": {"token_type": "Bearer", "expires_in": 7200, "scope": "read"},
            "api": {"meta": {}},
        }
        body = bodies.get(endpoint, {"unexpected": True})
        return json_response(200, body, headers=NO_STORE if endpoint == "token" else None)
    # DROP_BEFORE
    return drop(request)
