"""Routes for operators: ``/healthz``, ``/readyz`` and ``/metrics``, as ``serve`` mounts them.

* ``GET /healthz``: 200 when the store answers within a second, else 503; the body is
  :meth:`TokenManager.health` as JSON (store latency or error, age of Factorial's last
  answer).
* ``GET /readyz``: the same check, 200 only when the manager is also open.
* ``GET /metrics``: the manager's OpenTelemetry metrics in Prometheus' text format, through
  the OpenTelemetry Prometheus exporter (extra ``prometheus``); 501 without it.

Why the OpenTelemetry exporter rather than ``prometheus_client`` instruments: the library
reports through the OpenTelemetry API only, so one set of instruments feeds ``/metrics``,
an OTLP collector, or both; the exporter uses ``prometheus_client`` underneath for the
text format, so Prometheus sees ordinary names (``factorial_tokens_refreshes_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .._errors import FactorialTokensError
from .._telemetry import Telemetry

if TYPE_CHECKING:
    from .._manager import TokenManager

__all__ = ["MetricsRenderer", "add_ops_routes", "prometheus_exporter"]

#: Renders the metrics in Prometheus' text format: ``(body, content type)``.
MetricsRenderer = Callable[[], tuple[bytes, str]]

_HEADERS = {"Cache-Control": "no-store"}


def prometheus_exporter() -> tuple[Telemetry, MetricsRenderer] | None:
    """A Telemetry whose metrics a Prometheus scrape can read, and the renderer; None
    when the ``prometheus`` extra is not installed. Nothing global is touched: the
    meter provider and the collector registry are this exporter's own."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError:
        return None
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])

    def render() -> tuple[bytes, str]:
        return generate_latest(registry), CONTENT_TYPE_LATEST

    return Telemetry(meter_provider=provider), render


def add_ops_routes(app: web.Application, manager: TokenManager, metrics: MetricsRenderer | None) -> None:
    """Add ``/healthz``, ``/readyz`` and ``/metrics`` for ``manager`` to ``app``."""

    async def healthz(request: web.Request) -> web.Response:
        health = await manager.health()
        return _json(200 if health.healthy else 503, health.to_dict())

    async def readyz(request: web.Request) -> web.Response:
        health = await manager.health()
        return _json(200 if health.ready else 503, health.to_dict())

    async def metrics_route(request: web.Request) -> web.Response:
        if metrics is None:
            return web.Response(
                status=501,
                text='metrics need the prometheus extra: pip install "factorial-tokens[prometheus]"\n',
                headers=_HEADERS,
            )
        # At most one store listing a minute; when the store is down the gauge keeps its
        # last value (and /healthz tells why).
        with contextlib.suppress(FactorialTokensError, TimeoutError):
            async with asyncio.timeout(2.0):
                await manager.tenant_counts()
        body, content_type = metrics()
        return web.Response(body=body, headers={**_HEADERS, "Content-Type": content_type})

    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", metrics_route, allow_head=False)


def _json(status: int, data: object) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data), content_type="application/json", headers=_HEADERS
    )
